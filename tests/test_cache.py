"""Bounded cache: budget, exact eviction hand-over, positions, and block == token-by-token decoding."""
import pytest
import torch

from lm.cache import BoundedCache, forward, stream
from lm.model import tiny_llama
from lm.policies import Full, Window, make_policy, parse_cache_spec, visible
from memsvc.contract import InvalidInput

N = 70


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2)[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 2000, (1, N), generator=torch.Generator().manual_seed(1))


def token_by_token(model, ids, cache):
    with torch.inference_mode():
        return torch.cat([model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits
                          for i in range(ids.shape[1])], 1)


def blockwise(model, ids, cache, block=None):
    with torch.inference_mode():
        return torch.cat([out.logits for _, out in stream(model, ids, cache, block)], 1)


def banded_reference(model, ids, policy):
    """Full forward (absolute positions) with each query restricted to what the policy lets it see."""
    tokens = torch.arange(ids.shape[1])
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=visible(policy, tokens, tokens)[None, None]).logits


@pytest.mark.parametrize("window, sinks", [(0, 0), (-3, 0), (4, 5), (8, -1)])
def test_bad_window_or_sinks_is_rejected(window, sinks):
    with pytest.raises(InvalidInput):
        Window(window, sinks)


def test_make_policy_checks_names_and_options():
    assert make_policy("sinks") == Window(256, 4)
    assert make_policy("window", window=64) == Window(64, 0)
    assert isinstance(make_policy("full"), Full)
    with pytest.raises(InvalidInput, match="valid policies: full, window, sinks"):
        make_policy("h2")
    with pytest.raises(InvalidInput):
        make_policy("window", sinks=4)
    with pytest.raises(InvalidInput):
        make_policy("full", window=64)


def test_parse_cache_spec():
    assert parse_cache_spec("window:256,sinks:4") == Window(256, 4)
    assert parse_cache_spec(" sinks:2, window:16 ") == Window(16, 2)
    assert parse_cache_spec("window:32") == Window(32, 0)
    assert isinstance(parse_cache_spec("full"), Full)
    for bad in ("", "window", "window:x", "sinks:4", "window:8,window:9", "window:8,keep:2", "window:0"):
        with pytest.raises(InvalidInput):
            parse_cache_spec(bad)


def test_budget_beyond_trained_context_is_rejected(model):
    with pytest.raises(InvalidInput, match="trained context"):
        BoundedCache(model, Window(2048, 4))


def test_token_by_token_never_holds_more_than_window_plus_sinks(model, ids):
    policy = Window(8, 2)
    cache = BoundedCache(model, policy)
    with torch.inference_mode():
        for i in range(N):
            model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
            for layer in cache.layers:
                assert len(layer.tokens) == layer.keys.shape[-2] == min(i + 1, policy.budget)
                assert layer.positions.max() < cache.limit  # positions stay in range on any stream
    assert cache.peak_entries == policy.budget
    assert cache.layers[0].tokens.tolist() == [0, 1] + list(range(N - 8, N))


def test_block_mask_lets_no_query_see_more_than_the_budget(model, ids):
    policy = Window(8, 2)
    cache = BoundedCache(model, policy)
    for start, _ in stream(model, ids, cache):
        pass
    mask = cache.block_mask(cache.room(), model)
    assert mask.dtype == torch.bool and mask.sum(-1).max() == policy.budget
    assert cache.peak_entries == policy.budget


@pytest.mark.parametrize("policy", [Window(8, 2), Window(8, 0), Window(5, 5)])
def test_blocks_give_the_logits_of_token_by_token_decoding(model, ids, policy):
    expected = token_by_token(model, ids, BoundedCache(model, policy))
    assert torch.allclose(blockwise(model, ids, BoundedCache(model, policy)), expected, atol=1e-5)
    assert torch.allclose(blockwise(model, ids, BoundedCache(model, policy), block=3), expected, atol=1e-5)


def test_window_keeps_true_distances_across_rebases(model, ids):
    """Without sinks only distances matter (RoPE is relative): re-based positions give the banded logits."""
    policy = Window(8)
    assert torch.allclose(token_by_token(model, ids, BoundedCache(model, policy)),
                          banded_reference(model, ids, policy), atol=1e-5)


def test_sinks_match_banded_attention_before_the_first_rebase(model, ids):
    policy = Window(8, 2)
    cache = BoundedCache(model, policy, period=64)
    n = cache.limit  # positions are still the stream indices up to here
    assert torch.allclose(token_by_token(model, ids[:, :n], cache), banded_reference(model, ids[:, :n], policy),
                          atol=1e-5)


def test_full_policy_is_plain_attention(model, ids):
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    assert torch.allclose(blockwise(model, ids, BoundedCache(model, Full()), block=16), expected, atol=1e-5)


def test_eviction_hands_over_exactly_the_evicted_entries(model, ids):
    """Every entry that leaves comes out once, in order, as its pre-RoPE key and its value, per KV head."""
    attn = [layer.self_attn for layer in model.model.layers]
    raw = {i: {"k": [], "v": []} for i in range(len(attn))}
    hooks = [a.k_proj.register_forward_hook(lambda m, i, o, l=l: raw[l]["k"].append(o)) for l, a in enumerate(attn)]
    hooks += [a.v_proj.register_forward_hook(lambda m, i, o, l=l: raw[l]["v"].append(o)) for l, a in enumerate(attn)]
    evicted = {i: [] for i in range(len(attn))}
    cache = BoundedCache(model, Window(8, 2), on_evict=lambda l, t, k, v: evicted[l].append((t, k, v)))
    try:
        blockwise(model, ids, cache)
    finally:
        for h in hooks:
            h.remove()
    head_dim = attn[0].head_dim
    for l, layer in enumerate(cache.layers):
        tokens = torch.cat([t for t, _, _ in evicted[l]])
        assert sorted(tokens.tolist() + layer.tokens.tolist()) == list(range(N))
        assert tokens.tolist() == list(range(2, 2 + len(tokens)))  # sinks stay; the oldest go first
        keys = torch.cat([k for _, k, _ in evicted[l]], dim=-2)
        values = torch.cat([v for _, _, v in evicted[l]], dim=-2)
        as_heads = lambda x: x.view(1, N, -1, head_dim).transpose(1, 2)
        assert keys.shape == (1, 2, len(tokens), head_dim)  # [batch, kv heads, entries, head_dim]
        assert torch.allclose(keys, as_heads(torch.cat(raw[l]["k"], 1))[..., tokens, :], atol=1e-5)
        assert torch.equal(values, as_heads(torch.cat(raw[l]["v"], 1))[..., tokens, :])


def test_forward_prefills_in_exact_blocks(model, ids):
    """`forward` (a prompt's prefill) leaves the cache as token-by-token decoding would."""
    a, b = BoundedCache(model, Window(8, 2)), BoundedCache(model, Window(8, 2))
    with torch.inference_mode():
        last = forward(model, ids, a, logits_to_keep=1).logits
    expected = token_by_token(model, ids, b)[:, -1:]
    assert torch.allclose(last, expected, atol=1e-5)
    seen = a.layers[1].tokens[Window(8, 2).keep(a.layers[1].tokens, torch.tensor(N - 1))]  # what the last token saw
    assert seen.tolist() == b.layers[1].tokens.tolist()
    assert torch.allclose(a.layers[1].keys[..., -len(seen):, :][..., 2:, :], b.layers[1].keys[..., 2:, :], atol=1e-5)


def test_rotating_float16_into_float32_is_rotating_its_float32_copy(model):
    """`dtype` rotates stored float16 keys in float32 without the copy: bit for bit the copy rotated, by a slice of
    the tables, by an index, beyond the tables and without tables; into `out` too."""
    rotary = BoundedCache(model, Window(8)).rotary
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(3, 40, 16, generator=generator).half()
    for cached in (True, False):
        rotary.cached = cached
        for start in (-2048, 100, 2008, 5000):
            rotated = rotary.rotate_from(x, start, dtype=torch.float32)
            assert rotated.dtype == torch.float32 and torch.equal(rotated, rotary.rotate_from(x.float(), start))
            out = torch.empty(3, 40, 16)
            assert rotary.rotate_from(x, start, out=out, dtype=torch.float32) is out and torch.equal(out, rotated)
        grid = torch.randint(-3000, 3000, (3, 40), generator=generator)
        assert torch.equal(rotary.rotate(x, grid, dtype=torch.float32), rotary.rotate(x.float(), grid))
    assert (torch.device("cpu"), torch.float16) not in rotary.tables  # float32 tables serve float16 keys


def test_rotation_tables_give_exactly_the_models_own_rope(model):
    """The cached cos/sin tables (offsets -2048..2047 for a 2048-position model) give bit for bit what the
    model's rotary module computes per call; offsets beyond the table fall back to that module; a [kv, n]
    offset grid rotates each row by its own offsets."""
    rotary = BoundedCache(model, Window(8)).rotary
    generator = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float16):
        for delta in (torch.randint(-2048, 2048, (37,), generator=generator), torch.tensor([-2048, 2047, 0]),
                      torch.tensor([5000, -7, 3])):
            x = torch.randn(2, len(delta), 16, generator=generator).to(dtype)
            cos, sin = rotary.rope(x, delta[None])
            expected = x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin
            assert torch.equal(rotary.rotate(x, delta), expected)
    assert list(rotary.tables) == [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.float16)]
    x = torch.randn(3, 5, 16, generator=generator)
    grid = torch.randint(-100, 100, (3, 5), generator=generator)
    rows = torch.stack([rotary.rotate(x[h], grid[h]) for h in range(3)], 1)
    out = torch.empty(1, 3, 5, 16)
    assert rotary.rotate(x, grid, out=out) is out and torch.equal(out, rows)
