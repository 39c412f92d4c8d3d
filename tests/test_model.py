"""Model loading and the one decoding loop (lm/model.py, lm/generate.py)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import DynamicCache

from lm.cache import BoundedCache, forward
from lm.generate import generate, next_token, stream_tokens
from lm.model import load_model, tiny_llama
from lm.policies import Window
from memsvc.contract import InvalidInput, NotFound


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def test_unknown_model_names_and_paths_are_rejected(tmp_path):
    with pytest.raises(NotFound, match="unknown model"):
        load_model("no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotFound):
        load_model(tmp_path)  # a directory without config.json
    with pytest.raises(NotFound):
        load_model(tmp_path / "weights.bin")


def test_greedy_stream_matches_transformers_generate(tiny):
    model, tok = tiny
    ids = tok("def parse(text):", return_tensors="pt").input_ids
    ours = list(stream_tokens(model, ids, max_new_tokens=12))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_bounded_cache_prompt_prefills_as_token_by_token_decoding(tiny):
    """A prompt longer than the cache's budget: generate() gives what one-token-at-a-time prefill gives."""
    model, tok = tiny
    prompt = "def parse(text): return [line.split(',') for line in text.splitlines() if line] " * 3
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] > 3 * 16
    cache = BoundedCache(model, Window(16, 2))
    with torch.inference_mode():
        for i in range(ids.shape[1] - 1):
            model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
    reference = list(stream_tokens(model, ids[:, -1:], max_new_tokens=10, cache=cache))
    pieces = generate(model, tok, prompt, max_new_tokens=10, cache=BoundedCache(model, Window(16, 2)))
    assert "".join(pieces) == tok.decode(reference, skip_special_tokens=True)


def test_text_pieces_join_to_the_decoded_tokens(tiny):
    model, tok = tiny
    ids = tok("Hello", return_tensors="pt").input_ids
    tokens = list(stream_tokens(model, ids, max_new_tokens=15, temperature=1.0, seed=3))
    pieces = list(generate(model, tok, "Hello", max_new_tokens=15, temperature=1.0, seed=3))
    assert len(pieces) > 1
    assert "".join(pieces) == tok.decode(tokens, skip_special_tokens=True)


def test_hook_replaces_the_logprobs_and_sees_the_outputs(tiny):
    model, tok = tiny
    seen = []

    def force_42(logprobs, outputs):
        seen.append(outputs.logits.shape)
        forced = torch.full_like(logprobs, -float("inf"))
        forced[:, 42] = 0.0
        return forced

    ids = tok("abc", return_tensors="pt").input_ids
    tokens = stream_tokens(model, ids, max_new_tokens=5, temperature=0.7, logprobs_hook=force_42)
    assert list(tokens) == [42] * 5
    assert len(seen) == 5 and seen[0][:2] == (1, 1)


def test_given_cache_is_used_and_grows(tiny):
    model, tok = tiny
    ids = tok("one two three", return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    out = list(stream_tokens(model, ids, max_new_tokens=4, cache=cache))
    assert cache.get_seq_length() == ids.shape[1] + len(out) - 1
    assert out == list(stream_tokens(model, ids, max_new_tokens=4))


def test_stop_ids_end_the_stream(tiny):
    model, tok = tiny
    ids = tok("abc", return_tensors="pt").input_ids
    first = next(stream_tokens(model, ids, max_new_tokens=1))
    assert list(stream_tokens(model, ids, max_new_tokens=10, stop_ids={first})) == [first]


def test_top_p_keeps_only_the_nucleus():
    logprobs = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(next_token(logprobs, 1.0, 0.5, gen)) for _ in range(50)}
    assert picks == {0}
    picks = {int(next_token(logprobs, 1.0, 0.85, gen)) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": float("nan")},
                                    {"temperature": float("inf")}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"top_p": float("nan")}, {"max_new_tokens": -1}])
def test_bad_sampling_options(tiny, kwargs):
    model, tok = tiny
    with pytest.raises(InvalidInput):
        list(generate(model, tok, "x", **kwargs))
    with pytest.raises(InvalidInput, match="empty"):
        list(generate(model, tok, ""))


def test_decoding_uses_no_deprecated_transformers_keyword(tiny, monkeypatch):
    """The model is called with `cache=` and its outputs read as `.cache`: no FutureWarning, no deprecation
    log line. transformers logs those once per process, so the logger is replaced by a recorder here; the
    deprecated spelling itself is the control that the recorder sees them."""
    model, tok = tiny
    notices: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: notices.append(str(msg)))
    ids = tok("one two three four five six seven eight nine ten " * 4, return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(stream_tokens(model, ids, max_new_tokens=3))
        list(stream_tokens(model, ids, max_new_tokens=3, cache=BoundedCache(model, Window(16, 2))))
        forward(model, ids, DynamicCache(config=model.config))
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert [n for n in notices if "deprecated" in n] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            old = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    assert old.past_key_values is old.cache
    assert any("past_key_values" in str(w.message) for w in caught if issubclass(w.category, FutureWarning))
    assert any("deprecated" in n for n in notices)


@pytest.mark.slow
def test_smollm2_chat_answers_in_text():
    model, tok = load_model("smollm2")
    assert model.config.hidden_size == 576
    answer = "".join(generate(model, tok, "What is the capital of France?", chat=True, max_new_tokens=20))
    assert "Paris" in answer
