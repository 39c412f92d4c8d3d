"""Fixed-size cache policies (lm.policies): budget, exact eviction hand-over, each policy's rule, bad input."""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from lm.attention import attach
from lm.cache import BoundedCache, stream
from lm.memory_attention import KnnConfig, session_memory
from lm.model import tiny_llama
from lm.policies import (
    OPTIONS,
    POLICIES,
    SELECTIVE,
    Adaptive,
    CacheEntries,
    CumulativeAverage,
    HeavyHitters,
    KeyNorm,
    Recurrent,
    SnapKV,
    ValueAware,
    make_policy,
    parse_cache_spec,
)
from memsvc.contract import InvalidInput

N = 90
BUDGET = 24
SMALL = {"budget": BUDGET, "window": 8, "pool": 3}  # what applies of these, per policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(name: str, **overrides):
    return make_policy(name, **{k: v for k, v in {**SMALL, **overrides}.items() if k in OPTIONS[name]})


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2)[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 2000, (1, N), generator=torch.Generator().manual_seed(5))


def raw_projections(model):
    """Hooks recording each layer's pre-RoPE keys and values [1, kv, n, d] as the stream goes."""
    attn = [layer.self_attn for layer in model.model.layers]
    seen = {i: {"k": [], "v": []} for i in range(len(attn))}
    hooks = [a.k_proj.register_forward_hook(lambda m, i, o, l=l: seen[l]["k"].append(o)) for l, a in enumerate(attn)]
    hooks += [a.v_proj.register_forward_hook(lambda m, i, o, l=l: seen[l]["v"].append(o)) for l, a in enumerate(attn)]
    as_heads = lambda x: x.view(1, x.shape[1], -1, attn[0].head_dim).transpose(1, 2)
    stacked = lambda l, kind: as_heads(torch.cat(seen[l][kind], 1))
    return hooks, stacked


def run(model, ids, cache, knn=None, decode=0):
    """Stream ids in the cache's blocks, then decode `decode` more tokens one at a time; the longest view any
    layer returned to attention."""
    longest = [0]
    for layer in cache.layers:
        update = layer.update

        def recorded(k, v, *a, update=update, **kw):
            keys, values = update(k, v, *a, **kw)
            longest[0] = max(longest[0], keys.shape[-2])
            return keys, values

        layer.update = recorded
    with attach(model, cache, knn, session_memory(model) if knn else None, None), torch.inference_mode():
        for _ in stream(model, ids[:, :N - decode], cache):
            pass
        for i in range(N - decode, N):
            model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
    return longest[0]


@pytest.mark.parametrize("name", list(SELECTIVE))
@pytest.mark.parametrize("knn", [False, True])
def test_no_query_sees_more_than_the_budget(model, ids, name, knn):
    """Prefill blocks, then decoding steps: no view handed to attention exceeds the budget (and the cache fills it)."""
    cache = BoundedCache(model, small(name))
    assert run(model, ids, cache, KnnConfig(blocks=0, k=4) if knn else None, decode=20) == cache.peak_entries == BUDGET


@pytest.mark.parametrize("name", list(SELECTIVE))
def test_evictions_cover_the_stream_exactly_once(model, ids, name):
    """Every stream token is either still in the cache or was handed to on_evict (its pre-RoPE key and value),
    exactly once; summaries stand only for tokens that were handed over."""
    evicted = {0: [], 1: []}
    cache = BoundedCache(model, small(name), on_evict=lambda l, t, k, v: evicted[l].append((t, k, v)))
    hooks, projected = raw_projections(model)
    try:
        run(model, ids, cache, decode=20)
    finally:
        for h in hooks:
            h.remove()
    for l, layer in enumerate(cache.layers):
        assert len(layer.tokens) == BUDGET
        tokens = torch.cat([t for t, _, _ in evicted[l]])
        assert sorted(tokens.tolist() + layer.tokens[layer.raw].tolist()) == list(range(N))
        keys = torch.cat([k for _, k, _ in evicted[l]], -2)
        values = torch.cat([v for _, _, v in evicted[l]], -2)
        assert torch.allclose(keys, projected(l, "k")[..., tokens, :], atol=1e-5)
        assert torch.equal(values, projected(l, "v")[..., tokens, :])
        assert layer.count[~layer.raw].sum() <= len(tokens)


def test_kv_memory_receives_what_the_policy_drops_and_attention_reaches_the_policy(model, ids):
    """With kNN memory on layer 1 only: layer 1's evictions are searchable, and both layers (explicit attention
    on 0, the kNN attend path on 1) report their local attention to h2o."""
    cache = BoundedCache(model, small("h2o"))
    memory = session_memory(model)
    with attach(model, cache, KnnConfig(blocks=0, k=4, layers=[1]), memory, None), torch.inference_mode():
        for _ in stream(model, ids, cache):
            pass
        assert len(memory) == 2 * (N - len(cache.layers[1].tokens))  # 2 KV heads
    for layer in cache.layers:
        assert layer.scores.sum() > 0
    assert len(memory) == 0  # the session's partitions are gone


@pytest.mark.parametrize("name", list(SELECTIVE))
def test_a_budget_beyond_the_stream_is_full_attention(model, ids, name):
    policy = make_policy(name, budget=200)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        cache = BoundedCache(model, policy)
        with attach(model, cache, None, None, None):
            logits = torch.cat([out.logits for _, out in stream(model, ids, cache)], 1)
    assert torch.allclose(logits, expected, atol=1e-4)


def entries(keys=None, values=None, scores=None, n=10, heads=4, kv=2, d=4, sinks_raw=True):
    """Synthetic raw entries 0..n-1 for calling a policy's compact directly."""
    g = torch.Generator().manual_seed(0)
    return CacheEntries(keys if keys is not None else torch.randn(1, kv, n, d, generator=g),
                   values if values is not None else torch.randn(1, kv, n, d, generator=g),
                   torch.arange(n), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.long),
                   scores if scores is not None else torch.zeros(heads, n), torch.zeros(n, dtype=torch.bool))


def layer_stub(observed=None):
    return SimpleNamespace(observed=observed, modes=None)


def test_knorm_keeps_the_lowest_norm_keys_and_the_window():
    norms = torch.tensor([5.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 6.0, 4.0, 9.5])
    keys = torch.ones(1, 2, 10, 4) * norms[:, None] / 2  # each key's L2 norm is `norms`
    kept, gone = KeyNorm(budget=12, window=2).compact(layer_stub(), entries(keys=keys), 6)
    assert kept.tokens.tolist() == [0, 1, 3, 5, 8, 9]  # the 4 lowest norms before the window (1, 2, 3, 5) + it
    assert gone.tolist() == [2, 4, 6, 7]


def test_h2o_keeps_the_most_attended_and_vatp_weighs_by_value_norm():
    attention = torch.tensor([0.1, 3.0, 0.2, 2.0, 0.3, 1.0, 0.0, 0.0, 0.0, 0.0])
    scores = attention.expand(4, 10) / 4
    values = torch.ones(1, 2, 10, 4)
    values[..., 1, :] = 0.01  # most attended, tiny value: VATP drops it
    e = entries(values=values, scores=scores)
    kept, _ = HeavyHitters(budget=12, window=2).compact(layer_stub(), e, 5)
    assert kept.tokens.tolist() == [1, 3, 5, 8, 9]
    kept, _ = ValueAware(budget=12, sinks=0, window=2).compact(layer_stub(), e, 5)
    assert kept.tokens.tolist() == [3, 4, 5, 8, 9]


def test_snapkv_selects_by_the_pooled_observation_window_then_slides_while_decoding():
    observed = torch.zeros(4, 3, 12)
    observed[:, :, 2] = 1.0  # the last prompt queries look at token 2
    e = entries(n=12)
    kept, _ = SnapKV(budget=16, window=3).compact(layer_stub(observed), e, 6)
    assert 2 in kept.tokens.tolist() and kept.tokens[-3:].tolist() == [9, 10, 11]
    assert kept.pinned.tolist() == [True] * 3 + [False] * 3  # selected by votes: pinned; the window slides
    pooled = kept.tokens[:3].tolist()
    assert set(pooled) <= {0, 1, 2, 3, 4, 5}  # pooling (kernel 7) spreads token 2's votes to its neighbours
    grown = kept.cat(entries(n=14).take(torch.tensor([12, 13])))
    decoded, gone = SnapKV(budget=16, window=3).compact(layer_stub(torch.zeros(4, 1, 8)), grown, 6)
    assert decoded.tokens.tolist() == pooled + [11, 12, 13] and gone.tolist() == [3, 4]


def test_adaptive_profiles_each_head_and_masks_it():
    policy = Adaptive(budget=32, sinks=2, window=4)
    observed = torch.zeros(4, 2, 20)  # 18 kept entries + 2 new ones
    observed[0, :, 0] = 1.0  # head 0: the sinks
    observed[1, :, 15] = 1.0  # head 1: local (within the last 4 kept)
    observed[2, :, 7] = 1.0  # head 2: an old heavy hitter
    observed[3] = 1.0 / 20  # head 3: everything
    e = entries(n=20, scores=observed.sum(1))
    modes = policy.profile(e, observed)
    assert modes.tolist() == [0, 1, 2, 3]
    layer = SimpleNamespace(modes=modes, tokens=e.tokens, raw=e.raw, scores=e.scores)
    mask = policy.head_mask(layer, 2)
    assert mask[0].nonzero().squeeze(1).tolist() == [0, 1, 18, 19]
    assert mask[1].nonzero().squeeze(1).tolist() == [0, 1, 14, 15, 16, 17, 18, 19]
    assert mask[2, 7] and not mask[2, 8] and mask[3].all()


def test_adaptive_heads_attend_only_to_their_mode_in_a_stream(model, ids):
    cache = BoundedCache(model, small("adaptive"))
    run(model, ids, cache, decode=4)
    for layer in cache.layers:
        assert layer.modes is not None and len(layer.modes) == 4
        mask = layer.head_mask(1)
        assert mask.shape == (4, len(layer.tokens)) and mask[:, -1].all()


def unrotated(cache, layer):
    return cache.rotate(layer.keys, -layer.positions)


@pytest.mark.parametrize("policy, fold", [
    (CumulativeAverage(budget=BUDGET, sinks=2), lambda x: x.mean(-2)),
    (Recurrent(budget=BUDGET, sinks=2), None),
])
def test_one_slot_policies_hold_the_mean_or_the_recurrent_state_of_what_they_absorbed(model, ids, policy, fold):
    evicted = {"k": [], "v": [], "t": []}

    def on_evict(l, t, k, v):
        if l == 0:
            evicted["t"].append(t), evicted["k"].append(k), evicted["v"].append(v)

    cache = BoundedCache(model, policy, on_evict=on_evict)
    run(model, ids, cache, decode=10)
    layer = cache.layers[0]
    keys, values = torch.cat(evicted["k"], -2), torch.cat(evicted["v"], -2)
    if fold is None:  # Mem_i = (1 - a) Mem_{i-1} + a x_i, Mem_0 = x_0
        fold = lambda x: torch.stack([s := x[..., 0, :]] + [s := (1 - policy.rate) * s + policy.rate * x[..., i, :]
                                                              for i in range(1, x.shape[-2])], -2)[..., -1, :]
    slot = (~layer.raw).nonzero().squeeze(1)
    assert len(slot) == 1 and layer.count[slot].item() == keys.shape[-2]
    assert layer.tokens[slot].item() == torch.cat(evicted["t"]).max()  # it sits where its newest token was
    assert torch.allclose(unrotated(cache, layer)[..., slot[0], :], fold(keys)[0], atol=1e-4)
    assert torch.allclose(layer.values[..., slot[0], :], fold(values)[0], atol=1e-5)
    assert layer.tokens[:2].tolist() == [0, 1] and (layer.positions.diff() == 1).all()


@pytest.mark.parametrize("name", ["moving-average", "compressive"])
def test_summaries_are_means_of_consecutive_evicted_tokens(model, ids, name):
    evicted = {"t": [], "v": []}
    cache = BoundedCache(model, small(name), on_evict=lambda l, t, k, v: l == 0 and (evicted["t"].append(t),
                                                                                  evicted["v"].append(v)))
    run(model, ids, cache)
    layer = cache.layers[0]
    tokens, values = torch.cat(evicted["t"]), torch.cat(evicted["v"], -2)
    summaries = (~layer.raw).nonzero().squeeze(1)
    assert 0 < len(summaries) <= BUDGET - 4 - 8
    for i in summaries.tolist():
        end = (tokens == layer.tokens[i]).nonzero().item() + 1
        members = values[..., end - layer.count[i]:end, :]
        assert torch.allclose(layer.values[..., i, :], members.mean(-2), atol=1e-5)
    if name == "moving-average":  # merging: every evicted token is in some summary
        assert layer.count[summaries].sum() == len(tokens)
    else:  # FIFO compressed memory: closed summaries hold `pool` tokens, the oldest were dropped
        assert (layer.count[summaries[:-1]] == 3).all() and layer.count[summaries].sum() < len(tokens)


def test_parse_cache_spec_reaches_every_policy():
    assert parse_cache_spec("policy:h2o,budget:64,window:16") == HeavyHitters(budget=64, window=16)
    assert parse_cache_spec("window:16,sinks:0").name == "window"
    with pytest.raises(InvalidInput, match="takes no pool"):
        parse_cache_spec("policy:knorm,pool:4")


@pytest.mark.parametrize("name, options, message", [
    ("lru", {}, "valid policies: " + ", ".join(POLICIES)),
    ("h2o", {"pool": 4}, "policy 'h2o' takes no pool"),
    ("knorm", {"sinks": 4}, "takes no sinks"),
    ("cumulative-average", {"window": 8}, "takes no window"),
    ("vatp", {"budget": 4, "sinks": 4}, "budget (4) must be at least sinks + 1 (5)"),
    ("h2o", {"budget": 64, "window": 64}, "must be below the budget"),
    ("moving-average", {"budget": 64, "window": 60}, "must be below the budget"),
    ("compressive", {"pool": 0}, "pool must be a positive integer"),
    ("moving-average", {"window": 0}, "window must be a positive integer"),
    ("snapkv", {"window": 0}, "the observation window) must be a positive integer"),
    ("snapkv", {"budget": -1}, "budget must be a non-negative integer"),
])
def test_bad_policy_input_is_rejected(name, options, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        make_policy(name, **options)


@pytest.mark.parametrize("name, options, message, field", [
    ("window", {"window": 0}, "window must be a positive integer, got 0", "window"),
    ("sinks", {"window": 2}, "sinks (4) must not exceed the window (2)", "sinks"),  # the default sinks
    ("sinks", {"sinks": -1}, "sinks must be a non-negative integer, got -1", "sinks"),
    ("h2o", {"budget": 5, "window": 10}, "window + sinks (10) must be below the budget (5)", "window"),
    ("vatp", {"budget": 132}, "window + sinks (132) must be below the budget (132)", "window"),  # defaults 128 + 4
    ("knorm", {"budget": -1}, "budget must be a non-negative integer, got -1", "budget"),
    ("adaptive", {"sinks": 300}, "budget (260) must be at least sinks + 1 (301)", "budget"),
    ("snapkv", {"window": 0}, "window (the observation window) must be a positive integer, got 0", "window"),
    ("moving-average", {"pool": 0}, "pool must be a positive integer, got 0", "pool"),
    ("moving-average", {"window": 0}, "window must be a positive integer, got 0", "window"),
    ("compressive", {"budget": 196}, "window + sinks (196) must be below the budget (196)", "window"),
    ("cumulative-average", {"budget": 4}, "budget (4) must be at least sinks + 1 (5)", "budget"),
    ("recurrent", {"budget": 5, "sinks": 5}, "budget (5) must be at least sinks + 1 (6)", "budget"),
])
def test_policy_numbers_are_checked_torch_free_as_the_policies_check_them(name, options, message, field):
    """The CLI's early check (`lm.cache_specs.policy_options`, no torch) refuses exactly what the policy's
    constructor refuses, with the same message: one rule, `check_policy_values`."""
    from lm.cache_specs import policy_options

    with pytest.raises(InvalidInput) as early:
        policy_options(name, **options)
    with pytest.raises(InvalidInput) as built:
        make_policy(name, **options)
    assert (early.value.message, early.value.field) == (built.value.message, built.value.field) == (message, field)


def test_the_edges_of_each_policy_s_numbers_are_taken():
    from lm.cache_specs import policy_values

    assert policy_values("sinks", window=4) == {"window": 4, "sinks": 4}
    assert policy_values("h2o", budget=129) == {"budget": 129, "sinks": 0, "window": 128, "pool": 0}
    assert policy_values("cumulative-average", budget=5)["budget"] == 5  # one summary slot, window 0
    assert policy_values("snapkv", budget=2, window=1)["window"] == 1
    for name, options in [("sinks", {"window": 4}), ("h2o", {"budget": 129}), ("cumulative-average", {"budget": 5}),
                          ("snapkv", {"budget": 2, "window": 1}), ("compressive", {"budget": 197})]:
        assert make_policy(name, **options).budget == options.get("budget", 8)


def test_a_block_the_budget_cannot_take_is_rejected(model):
    with pytest.raises(InvalidInput, match="the block must be in 1..8 for policy .moving-average."):
        BoundedCache(model, small("moving-average"), period=9)  # its window
    with pytest.raises(InvalidInput, match="trained context"):
        BoundedCache(model, make_policy("h2o", budget=2040))


def cli(*args):
    import typer

    from memsvc.cli.longctx import eval_long

    app = typer.Typer()
    app.command("eval-long")(eval_long)
    app.command("unused")(lambda: None)
    return CliRunner().invoke(app, ["eval-long", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_llama(num_layers=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", POLICIES)
def test_eval_long_runs_every_policy(tiny_dir, tmp_path, name):
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 12)
    options = ["--window", 8] if name in ("window", "sinks") else \
        [x for k in OPTIONS[name] if k in SMALL for x in (f"--{k}", SMALL[k])]
    memory = [] if name == "full" else ["--knn-memory", "--k", 4]
    run = cli(doc, "--policy", name, *options, *memory, "--skip", 10, "--model", tiny_dir, "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["policy"] == name
    assert result["peak_cache_entries"] <= (result["budget"] or result["tokens"] + 10)


def test_eval_long_rejects_options_that_do_not_apply_before_loading_a_model(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 20)
    run = cli(doc, "--policy", "h2o", "--pool", 4, "--model", tmp_path / "no-such-model")
    assert run.exit_code == 2 and "takes no pool" in run.stderr
    run = cli(doc, "--policy", "h3o", "--model", tmp_path / "no-such-model")
    assert run.exit_code == 2 and "valid policies: full, window, sinks, moving-average" in run.stderr
    run = cli(doc, "--policy", "full", "--knn-memory", "--model", tmp_path / "no-such-model")
    assert run.exit_code == 2 and "needs a bounded cache policy" in run.stderr


@pytest.mark.parametrize("name", POLICIES)
def test_a_one_token_forward_sees_its_whole_view(model, ids, name):
    """Block memory's decoding step (`lm.blocks.BlockMemoryAttention.attend_one`) leaves the view mask out: under
    every policy, each entry a one-token forward's `update` returns is one the token attends to."""
    cache = BoundedCache(model, small(name))
    with attach(model, cache), torch.inference_mode():
        for i in range(ids.shape[1]):
            model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
            assert all(layer.in_view(1).all() for layer in cache.layers), i
