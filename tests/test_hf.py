"""Hugging Face generate with memsvc caches (issue 17): a bare BoundedCache, `bounded_cache` and
`memory_attention` give the tokens of memsvc's own loop (`stream_tokens`), greedy and sampled, within the budget;
what cannot be exact is refused."""
import copy

import pytest
import torch

from lm.attention import attach
from lm.cache import INNER_FORWARD, BoundedCache, stream
from lm.generate import stream_tokens
from lm.hf import bounded_cache, memory_attention
from lm.memory_attention import KnnConfig, session_memory
from lm.model import tiny_llama
from lm.policies import Window, parse_cache_spec
from memsvc.contract import InvalidInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = 245  # the issue's prompt length
NEW = 24


@pytest.fixture(scope="module")
def model():
    """A 2-layer random Llama whose weights are scaled up, so that greedy tokens vary with the context (at the
    default scale they repeat one token whatever the cache keeps)."""
    model = tiny_llama(num_layers=2)[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10)
    model.generation_config.eos_token_id = None  # always NEW tokens, from both loops
    return model


def prompt(n: int = PROMPT, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 2000, (1, n), generator=torch.Generator().manual_seed(seed))


def own_loop(model, ids, spec, knn=None, **sampling):
    """memsvc's own loop with a fresh cache (wired as `memsvc generate --cache` wires it): (tokens, peak)."""
    cache = BoundedCache(model, parse_cache_spec(spec) if isinstance(spec, str) else spec)
    with attach(model, cache, knn), torch.inference_mode():
        tokens = list(stream_tokens(model, ids, max_new_tokens=NEW, cache=cache, **sampling))
    return tokens, cache.peak_entries


def hf_generate(model, ids, **options):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=NEW, **options)[0, ids.shape[1]:].tolist()


# --- a bare BoundedCache (issue 17 #1) -----------------------------------------------------------------

@pytest.mark.parametrize("n", [PROMPT, 40, 67, 68, 69, 132, 133])  # below, at and around the budget and re-bases
def test_generate_with_a_bare_cache_gives_the_own_loop_tokens_within_the_budget(model, n):
    ids = prompt(n)
    expected, own_peak = own_loop(model, ids, Window(64, 4))
    cache = BoundedCache(model, Window(64, 4))
    assert hf_generate(model, ids, cache=cache, do_sample=False) == expected
    assert cache.peak_entries == own_peak == min(68, n + NEW - 1)


def test_the_issue_prompt_is_no_longer_read_with_full_attention(model):
    """The report: the first token equalled full attention's, as the prompt went through one forward."""
    ids = prompt()
    full = hf_generate(model, ids, do_sample=False)
    bounded = hf_generate(model, ids, cache=BoundedCache(model, Window(64, 4)), do_sample=False)
    assert bounded[0] != full[0]


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_sampling_with_a_bare_cache_gives_the_own_loop_tokens_for_the_same_seed(model, temperature, top_p):
    ids = prompt()
    expected, _ = own_loop(model, ids, Window(64, 4), temperature=temperature, top_p=top_p, seed=5)
    torch.manual_seed(5)
    got = hf_generate(model, ids, cache=BoundedCache(model, Window(64, 4)), do_sample=True,
                      temperature=temperature, top_p=top_p, top_k=0)
    assert got == expected


def test_a_plain_forward_through_a_bounded_cache_is_the_streamed_one(model):
    """One forward of 245 tokens gives the logits of `stream` (exact blocks), not full attention."""
    ids = prompt()
    with torch.inference_mode():
        expected = torch.cat([out.logits for _, out in stream(model, ids, BoundedCache(model, Window(64, 4)))], 1)
        logits = model(ids, cache=BoundedCache(model, Window(64, 4))).logits
        last = model(input_ids=ids, cache=BoundedCache(model, Window(64, 4)), logits_to_keep=3).logits
    assert torch.equal(logits, expected)
    assert torch.allclose(last, expected[:, -3:], atol=1e-5)  # the head on 3 rows, not all: rounding


def test_an_attention_ranked_policy_without_wiring_is_refused(model):
    """h2o scores entries by the attention they receive, which only the wired model reports."""
    with pytest.raises(InvalidInput, match="bounded_cache"):
        hf_generate(model, prompt(), cache=BoundedCache(model, parse_cache_spec("policy:h2o,budget:96,"
                                                                                            "window:32")))


def test_padding_and_options_that_cannot_span_blocks_are_refused(model):
    ids = prompt(100)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(InvalidInput, match="padding"):
        hf_generate(model, ids, attention_mask=mask, cache=BoundedCache(model, Window(64, 4)))
    with pytest.raises(InvalidInput, match="labels"), torch.inference_mode():
        model(input_ids=ids, labels=ids, cache=BoundedCache(model, Window(64, 4)))


def test_a_forward_that_crosses_a_re_base_is_refused_where_it_cannot_be_split(model):
    """The decoder alone (no exact forward around it) refuses a block past the cache's re-base."""
    cache = BoundedCache(model, Window(8, 2))
    with pytest.raises(InvalidInput, match="re-base"), torch.inference_mode():
        model.get_decoder()(input_ids=prompt(30), cache=cache)


def test_a_deep_copy_runs_its_own_weights(model):
    BoundedCache(model, Window(8, 2))
    twin = copy.deepcopy(model)
    assert getattr(twin, INNER_FORWARD).__self__ is twin
    with torch.no_grad():
        twin.get_decoder().norm.weight.mul_(-1)  # the last hidden state, hence the logits, change sign
    ids = prompt(20)
    with torch.inference_mode():
        mine = model(ids, cache=BoundedCache(model, Window(8, 2))).logits
        theirs = twin(ids, cache=BoundedCache(twin, Window(8, 2))).logits
    assert torch.allclose(theirs, -mine, atol=1e-5)


# --- the context managers (issue 17 #2) ------------------------------------------------------------------

@pytest.mark.parametrize("spec, knn", [
    ("window:64,sinks:4", None),
    ("window:64,sinks:4", KnnConfig(blocks=0)),
    ("policy:h2o,budget:96,window:32", None),
    ("policy:snapkv,budget:96,window:32", KnnConfig(blocks=0, k=4)),
    ("policy:moving-average,budget:96,sinks:4,window:32,pool:4", None),
])
def test_bounded_cache_generate_gives_the_own_loop_tokens(model, spec, knn):
    ids = prompt()
    expected, peak = own_loop(model, ids, spec, knn)
    with bounded_cache(model, spec, knn=knn) as sequences:
        assert hf_generate(model, ids, do_sample=False) == expected
    assert sequences.cache.peak_entries == peak == parse_cache_spec(spec).budget


def test_memory_attention_generate_gives_the_own_loop_tokens(model):
    """The issue's entry point: the cache made for you, memory attention in, the own loop's tokens (they
    diverged after ~10 tokens when generate's position ids counted stream tokens)."""
    ids = prompt()
    expected, _ = own_loop(model, ids, Window(64, 4), KnnConfig(blocks=0))
    memory = session_memory(model)
    with memory_attention(model, window=64, sinks=4, memory=memory) as sequences:
        assert hf_generate(model, ids, do_sample=False) == expected
        assert len(memory) == 2 * 2 * (PROMPT + NEW - 1 - 68)  # 2 layers x 2 KV heads x evicted tokens
    assert sequences.session is None and len(memory) == 0  # the session's partitions are gone
    assert expected != own_loop(model, ids, Window(64, 4))[0]  # memory attention changed the tokens


def test_each_generate_call_is_a_new_sequence(model):
    ids = prompt()
    with bounded_cache(model, Window(64, 4)) as sequences:
        first = hf_generate(model, ids, do_sample=False)
        cache = sequences.cache
        second = hf_generate(model, ids, do_sample=False)
        assert sequences.cache is not cache and sequences.sequences == 2
    assert first == second


def test_a_cache_given_inside_the_block_is_used(model):
    ids = prompt()
    expected, _ = own_loop(model, ids, Window(32, 2))
    mine = BoundedCache(model, Window(32, 2))
    with bounded_cache(model, Window(64, 4)) as sequences:
        assert hf_generate(model, ids, cache=mine, do_sample=False) == expected
        assert sequences.cache is mine


@pytest.mark.parametrize("options, field", [
    ({"policy": "window:8,foo:2"}, "cache"),
    ({"policy": "policy:h2o,budget:4000"}, "budget"),
    ({"policy": "window:64", "knn": KnnConfig(blocks=0, layers=[7])}, "layers"),
])
def test_bad_settings_are_refused_on_entry(model, options, field):
    with pytest.raises(InvalidInput) as err, bounded_cache(model, **options):
        pass
    assert err.value.field == field
    assert model.forward(input_ids=prompt(5)).logits.shape[1] == 5  # nothing left behind


def test_blocks_do_not_nest_and_close_cleanly(model):
    with bounded_cache(model, "window:64"), pytest.raises(InvalidInput, match="already open"), \
            bounded_cache(model, "window:32"):
        pass
    with torch.inference_mode():
        out = model(prompt(5))
    assert not isinstance(out.cache, BoundedCache)


def test_generate_continues_a_cache_until_it_re_bases(model):
    """A second generate call on the same cache reads only the new tokens, as the own loop does; once the cache
    has re-based, generate would re-read tokens it holds (it counts them by position): refused."""
    ids, extra = prompt(40), prompt(5, seed=4)
    own = BoundedCache(model, Window(64, 4))
    with torch.inference_mode():
        first = list(stream_tokens(model, ids, max_new_tokens=10, cache=own))
        second = list(stream_tokens(model, torch.cat([torch.tensor([first[-1:]]), extra], 1), max_new_tokens=10,
                                    cache=own))
        cache = BoundedCache(model, Window(64, 4))
        out = model.generate(ids, cache=cache, max_new_tokens=10, do_sample=False)
        longer = torch.cat([out, extra], 1)
        again = model.generate(longer, cache=cache, max_new_tokens=10, do_sample=False)
        assert (out[0, 40:].tolist(), again[0, longer.shape[1]:].tolist()) == (first, second)
        model.generate(prompt(), cache=cache, max_new_tokens=40, do_sample=False)  # re-bases
        with pytest.raises(InvalidInput, match="fresh cache"):
            model.generate(prompt(), cache=cache, max_new_tokens=2, do_sample=False)


@pytest.mark.slow
def test_smollm2_generate_reads_the_issue_prompt_within_the_window():
    """The report's case on the real model: a 245-token prompt, window 64 + 4 sinks. generate gives the own loop's
    tokens, within 68 entries, and no longer the first token of full attention."""
    from pathlib import Path

    from lm.model import load_model

    model, tokenizer = load_model()
    text = Path("/usr/share/doc/python3.11/html/_sources/library/heapq.rst.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT]
    cache = BoundedCache(model, Window(64, 4))
    with torch.inference_mode():
        own = list(stream_tokens(model, ids, max_new_tokens=8, cache=cache))
        full = model.generate(ids, max_new_tokens=1, do_sample=False)[0, PROMPT:].tolist()
        with bounded_cache(model, Window(64, 4)) as sequences:
            hf = model.generate(ids, max_new_tokens=8, do_sample=False)[0, PROMPT:].tolist()
    assert hf == own and hf[0] != full[0]
    assert sequences.cache.peak_entries == cache.peak_entries == 68
