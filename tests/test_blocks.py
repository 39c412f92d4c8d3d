"""Block memory (lm.blocks) on tiny random Llamas: grouping, exactness over the whole history, positions inside
the trained range at any stream length, the gate's initial value, and bad options refused before any work."""
import math
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from typer.testing import CliRunner

from lm import blocks
from lm.attention import attach
from lm.blocks import BlockStore
from lm.cache import BoundedCache, stream
from lm.gate import Gate, MemoryBias
from lm.knn_config import KnnConfig, decode_search_options
from lm.model import tiny_llama
from lm.policies import Full, Window
from memsvc.contract import InvalidInput, MemorySpec
from memsvc.store import Memory

N = 60
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2)[0]  # 4 query heads sharing 2 KV heads, head_dim 16, 2048 positions


@pytest.fixture(scope="module")
def short_model():
    return tiny_llama(num_layers=2, max_positions=64)[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 2000, (1, N), generator=torch.Generator().manual_seed(3))


def run(model, ids, policy, config, gate=None, token_by_token=False, inspect=None):
    """Logits [1, n, vocab] of ids streamed in exact blocks (or one token at a time) through policy + block memory;
    `inspect(session, cache)` runs before the session closes."""
    cache = BoundedCache(model, policy)
    with attach(model, cache, config, gate=gate) as session, torch.inference_mode():
        if token_by_token:
            logits = torch.cat([model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits
                                for i in range(ids.shape[1])], 1)
        else:
            logits = torch.cat([out.logits for _, out in stream(model, ids, cache)], 1)
        if inspect is not None:
            inspect(session, cache)
    return logits


@pytest.mark.parametrize("token_by_token", [False, True])
def test_every_evicted_token_is_in_exactly_one_contiguous_block(model, ids, token_by_token):
    seen = {}

    def inspect(session, cache):
        for layer in (0, 1):
            store = session.stores[layer]
            stored = store.tokens[:store.count].tolist()
            evicted = sorted(set(range(N)) - set(cache.layers[layer].tokens.tolist()))
            assert sorted(stored) == evicted and len(stored) == len(set(stored))  # each evicted token once
            assert store.num_blocks == math.ceil(len(evicted) / 4)
            for b in range(store.num_blocks):  # a block is a run of consecutive stream tokens
                block = stored[4 * b:4 * b + 4]
                assert block == list(range(block[0], block[0] + len(block)))
        seen["tokens"] = session.stores[1].tokens[:session.stores[1].count].tolist()

    run(model, ids, Window(8, 2), KnnConfig(blocks=4), token_by_token=token_by_token, inspect=inspect)
    if token_by_token:  # sinks 0, 1 stay; the last 8 are still in the window
        assert seen["tokens"] == list(range(2, N - 8))


@pytest.mark.parametrize("positions, query_group", [("ordered", 0), ("hybrid", 0), ("absolute", 0), ("ordered", 3),
                                                    ("hybrid", 4)])
@pytest.mark.parametrize("token_by_token", [False, True])
@pytest.mark.parametrize("sinks", [0, 2])
def test_retrieving_every_block_is_full_attention(model, ids, positions, query_group, token_by_token, sinks):
    """Reference: full attention. With all of the history retrieved and in-range true distances, every position
    scheme puts each past token at its true distance from the query, through the cache's re-bases (period 10:
    before tokens 19, 29, ...) that leave the sinks at positions 0, 1, with the sinks rotated back below the
    retrieved run (sink positions "below"), where the stream has them; kept at 0, 1 they are not."""
    config = KnnConfig(blocks=4, top_blocks=N, positions=positions, precision="float32", query_group=query_group,
                       sink_positions="below")
    logits = run(model, ids, Window(8, sinks), config, token_by_token=token_by_token)
    with torch.inference_mode():
        full = model(input_ids=ids).logits
    assert torch.allclose(logits, full, atol=1e-4)
    kept = run(model, ids, Window(8, sinks), replace(config, sink_positions="kept"), token_by_token=token_by_token)
    assert torch.allclose(kept, full, atol=1e-4) == (sinks == 0)


def test_a_few_blocks_change_what_the_window_predicts(model, ids):
    alone = run(model, ids, Window(8, 2), None)
    some = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2))
    assert not torch.allclose(some, alone, atol=1e-3)
    assert torch.allclose(some, run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2)))  # deterministic
    one_query = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2), token_by_token=True)
    grouped = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, query_group=1))
    assert not torch.allclose(grouped, some, atol=1e-3)  # each query retrieves its own blocks, as in decoding
    assert grouped[0, :10].allclose(one_query[0, :10], atol=1e-5)  # nothing evicted yet: the same


def test_decoding_searches_once_per_query_group(model, ids):
    """Window 8 + 2 sinks: memory holds entries from token 10 on, so 50 decoding steps at each of 2 layers search;
    with query groups of 4 a step's blocks serve the next 3 steps too, and a re-base of the cache's positions
    (period 10: before tokens 19, 29, ..., 59) starts a new group: searches at tokens 10, 14, 18, 19, 23, 27, 29,
    33, 37, 39, 43, 47, 49, 53, 57, 59."""
    searches, logits = {}, {}
    for group in (1, 4):
        logits[group] = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, query_group=group,
                                                                decode_group=None),
                            token_by_token=True, inspect=lambda session, cache, g=group: searches.update({g: session.searches}))
    assert searches == {1: 2 * 50, 4: 2 * 16}
    assert torch.allclose(logits[4][0, :11], logits[1][0, :11], atol=1e-5)  # the first search is the same one
    assert not torch.allclose(logits[4], logits[1], atol=1e-3)


def test_decode_group_sets_the_decoding_steps_per_search_and_leaves_blocked_forwards_alone(model, ids):
    """Query groups of 4 with decode_group 1 (the default): every decoding step searches (2 layers x 50 steps) and the logits are
    those of query groups of 1 token by token; in exact blocks (eval-long's prefill) decode_group changes nothing."""
    searches = {}
    every = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, query_group=4, decode_group=1),
                token_by_token=True, inspect=lambda session, cache: searches.update({"every": session.searches}))
    ones = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, query_group=1), token_by_token=True)
    assert searches == {"every": 2 * 50}
    assert torch.equal(every, ones)
    blocked = [run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, decode_group=d)) for d in (None, 1, 4)]
    assert torch.equal(blocked[0], blocked[1]) and torch.equal(blocked[0], blocked[2])


def test_decode_every_key_ranks_decoding_searches_by_the_exact_max_only(model, ids):
    """Token by token (every forward decodes) decode_every_key with 2 representative keys of 4 is rep_keys 0 (every
    key) exactly, and differs from ranking by the representative keys; in exact blocks it changes nothing but the
    last token, which a re-base before token 59 leaves alone in a one-token (decoding) forward."""
    config = KnnConfig(blocks=4, top_blocks=2, rep_keys=2, decode_group=1, decode_every_key=False)
    exact = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, rep_keys=0, decode_group=1),
                token_by_token=True)
    every_key = run(model, ids, Window(8, 2), KnnConfig(**{**vars(config), "decode_every_key": True}),
                    token_by_token=True)
    assert torch.equal(every_key, exact)
    assert not torch.allclose(run(model, ids, Window(8, 2), config, token_by_token=True), exact, atol=1e-3)
    blocked = [run(model, ids, Window(8, 2), KnnConfig(**{**vars(config), "decode_every_key": e})) for e in (False, True)]
    assert torch.equal(blocked[0][:, :59], blocked[1][:, :59])


def test_decode_top_blocks_sets_the_blocks_a_decoding_step_attends_and_leaves_blocked_forwards_alone(model, ids):
    """decode_top_blocks 3 with top_blocks 2: token by token every step attends 3 blocks of 4 (12 slots at each layer),
    as top_blocks 3 would, and the logits are top_blocks 3's; in exact blocks nothing changes but the last token
    (a one-token forward after the re-base before token 59)."""
    config = KnnConfig(blocks=4, top_blocks=2, decode_top_blocks=3, decode_candidates=0)
    slots = {}

    def inspect(session, cache):
        slots.update({layer: retrieval.r for layer, retrieval in session.reused.items()})

    wider = run(model, ids, Window(8, 2), config, token_by_token=True, inspect=inspect)
    assert torch.equal(wider, run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=3, decode_candidates=0),
                                  token_by_token=True))
    assert not torch.allclose(wider, run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2,
                                                                             decode_candidates=0),
                                         token_by_token=True), atol=1e-3)
    blocked = [run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, decode_top_blocks=d,
                                                       decode_candidates=0)) for d in (None, 3)]
    assert torch.equal(blocked[0][:, :59], blocked[1][:, :59])


def test_named_decode_searches_set_the_decoding_fields():
    """`memsvc generate --decode-search`: "rerank" is the default's every step by every key of 192 candidates,
    "exact" every block by every key, "grouped" the query groups' reuse by the representative keys; another name is
    refused naming the field."""
    assert decode_search_options("exact") == {"decode_group": 1, "decode_every_key": True, "decode_candidates": 0}
    assert decode_search_options("rerank") == {"decode_group": 1, "decode_every_key": True, "decode_candidates": 192}
    assert decode_search_options("grouped") == {"decode_group": None, "decode_every_key": False,
                                                "decode_candidates": 0}
    default = KnnConfig()
    assert (default.decode_group, default.decode_every_key, default.decode_candidates) == (1, True, 192)
    with pytest.raises(InvalidInput, match="decode search must be one of exact, rerank, grouped, got 'all'") as err:
        decode_search_options("all")
    assert err.value.field == "decode_search"


def test_decoding_gives_the_logits_recorded_before_the_decode_optimisations(model, ids):
    """Token-by-token decoding with the default shape (fp16 store, 4 representative keys, query groups of 4,
    partial blocks) at blocks of 4, 2 retrieved: with the sinks kept where the cache keeps them (the default),
    the logits recorded at commit f64d82d, before the RoPE tables, the whole-block gather and the reused retrieval
    buffers; with the sinks rotated below memory (sink positions "below"), the logits recorded when that came; and
    computing the cos/sin per rotation (no tables) gives the same logits bit for bit."""
    recorded = {"kept": torch.tensor([[-0.0747662410, 0.0841830075], [0.0926628858, -0.0293876864],
                                        [0.0304408744, -0.0377437957], [-0.1439056098, 0.2601769269],
                                        [-0.1034009531, 0.1912996173], [-0.3011971116, 0.3267478347]]),
                "below": torch.tensor([[-0.0747662410, 0.0841830075], [0.0930999964, -0.0292629041],
                                       [0.0304685421, -0.0377270132], [-0.1438564360, 0.2603355944],
                                       [-0.1035600305, 0.1911526769], [-0.3016028404, 0.3267631531]])}
    for sinks in ("kept", "below"):
        logits = {}
        for tables in (True, False):
            cache = BoundedCache(model, Window(8, 2))
            cache.rotary.cached = tables
            old = KnnConfig(blocks=4, top_blocks=2, decode_group=None, decode_every_key=False,  # the path recorded
                            sink_positions=sinks)
            with attach(model, cache, old) as session, torch.inference_mode():
                logits[tables] = torch.cat([model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits
                                            for i in range(N)], 1)
                assert session.searches == 32 and bool(cache.rotary.tables) == tables
        # recorded on an Intel Xeon; other CPUs' float kernels differ by a few 1e-6 (AMD EPYC: 4.4e-6), a change of
        # the retrieval or the positions by far more
        assert torch.allclose(logits[True][0, 12::8, :2], recorded[sinks], atol=2e-5)
        assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("positions", ["ordered", "hybrid"])
@pytest.mark.parametrize("token_by_token", [False, True])
@pytest.mark.parametrize("sinks", ["kept", "below"])
def test_no_distance_leaves_the_trained_range_however_long_the_stream(short_model, positions, token_by_token, sinks):
    """64 trained positions, a stream of 200 tokens: every query-key distance stays below 64; true distances do not."""
    ids = torch.randint(0, 2000, (1, 200), generator=torch.Generator().manual_seed(4))
    distances = {}

    def inspect(session, cache):
        distances[positions] = session.max_distance
        assert all(int(layer.positions.max()) < 64 for layer in cache.layers)

    config = KnnConfig(blocks=4, top_blocks=4, positions=positions, sink_positions=sinks)
    logits = run(short_model, ids, Window(8, 2), config, token_by_token=token_by_token, inspect=inspect)
    assert logits.isfinite().all()
    assert 16 < distances[positions] < 64  # retrieved keys sit beyond the window (8 + 2) yet inside the range

    def absolute(session, cache):
        distances["absolute"] = session.max_distance

    run(short_model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=4, positions="absolute"), inspect=absolute)
    assert distances["absolute"] >= 64  # the comparison: true distances leave the range


@pytest.mark.parametrize("sinks, edge", [("kept", [63, 62, 63, 62]), ("below", [61, 60, 61, 60])])
def test_hybrid_keeps_true_distances_inside_the_range_and_moves_only_the_far_tokens(short_model, sinks, edge):
    """The far tokens take the range's farthest distances, or with the 2 sinks "below" memory the next ones."""
    ids = torch.randint(0, 2000, (1, 200), generator=torch.Generator().manual_seed(5))
    cache = BoundedCache(short_model, Window(8, 2))
    config = KnnConfig(blocks=4, top_blocks=4, positions="hybrid", sink_positions=sinks)
    with attach(short_model, cache, config) as session, torch.inference_mode():
        for _ in stream(short_model, ids, cache):
            pass
        tokens, positions = cache.layers[0].view_tokens, cache.layers[0].view_positions
        found = torch.tensor([[100, 101, 180, 181], [30, 31, 160, 161]])
        placed = session.place(found, torch.ones_like(found, dtype=torch.bool), tokens, positions, session.stores[0])
    last_token, last_pos = int(tokens[-1]), int(positions[-1])
    distance = last_pos - placed
    near = last_token - found < 64 - 16 - (2 if sinks == "below" else 0)  # in range, minus room for 16 retrieved
    assert torch.equal(distance[near], (last_token - found)[near])  # exact
    assert distance[~near].tolist() == edge  # far ones at the range's edge, in stream order


def test_block_scores_are_max_and_mean_of_each_blocks_keys():
    store = BlockStore(block=3, dtype=torch.float32)
    keys = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(6))
    store.add(torch.arange(5), keys[:, :5], keys[:, :5] * 2)
    store.add(torch.arange(5, 7), keys[:, 5:], keys[:, 5:] * 2)
    query = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(7))  # 2 KV heads x 3 query heads
    blocks = [range(3), range(3, 6), range(6, 7)]  # the last block is partial
    for h in range(2):
        for b, rows in enumerate(blocks):
            expected_max = sum(max(float(query[h, i] @ keys[h, j]) for j in rows) for i in range(3))
            mean_key = keys[h, list(rows)].mean(0)
            expected_mean = sum(float(query[h, i] @ mean_key) for i in range(3))
            assert math.isclose(float(store.scores(query, "max")[h, b]), expected_max, rel_tol=1e-5, abs_tol=1e-5)
            assert math.isclose(float(store.scores(query, "mean")[h, b]), expected_mean, rel_tol=1e-5, abs_tol=1e-5)
    chosen = torch.tensor([[2, 0], [1, 2]])
    (k, v), (tokens, valid) = store.rows(chosen), store.entries(chosen)
    assert tokens[0, valid[0]].tolist() == [6, 0, 1, 2] and valid.sum().item() == 12 - 4
    assert torch.equal(v[1, :3], 2 * keys[1, 3:6]) and torch.equal(k[1, 3], keys[1, 6])


def test_representative_keys_score_a_block_by_its_best_run_mean():
    store = BlockStore(block=4, dtype=torch.float16, rep_keys=2)  # runs of 2 keys; fp16 entries, fp32 means
    keys = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(8)).half()
    for start, end in ((0, 3), (3, 9), (9, 10)):  # additions that cross run and block boundaries
        store.add(torch.arange(start, end), keys[:, start:end], keys[:, start:end])
    query = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9))
    runs = [[range(2), range(2, 4)], [range(4, 6), range(6, 8)], [range(8, 9), range(9, 10)]]  # block 2: partial
    scores = store.scores(query, "max")
    assert scores.shape == (2, 3) and store.reps.dtype == torch.float32
    for h in range(2):
        for b, block in enumerate(runs):
            expected = sum(max(float(query[h, i] @ keys[h, list(run)].float().mean(0)) for run in block)
                           for i in range(3))
            assert math.isclose(float(scores[h, b]), expected, rel_tol=1e-5, abs_tol=1e-5)
    assert store.nbytes() == 10 * (2 * 2 * 4 * 2 + 8) + 2 * (1 + 2) * 2 * 4 * 4


def test_two_stage_search_ranks_only_the_rep_key_candidates_by_every_key():
    """decode_candidates (section 11): the C best blocks by the representative keys are scored by their best key,
    the others -inf; C >= the blocks stored is the every-key search."""
    store = BlockStore(block=4, dtype=torch.float32, rep_keys=2)  # runs of 2 keys
    xs = [[4, -4, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0], [3, -0.5, 0, 0], [0.5, 0.5]]  # block 4 partial (2 keys)
    keys = torch.tensor([x for block in xs for x in block]).view(1, 18, 1) * torch.tensor([1.0, 0.0])
    store.add(torch.arange(18), keys, keys)
    query = torch.tensor([[[1.0, 0.0]]])  # 1 KV head, 1 query head: a block's score is the first coordinate
    inf = float("inf")
    assert store.scores(query, "max").tolist() == [[0, 1, 2, 1.25, 0.5]]  # best run mean (partial: best key)
    exact = store.scores(query, "max", every_key=True)
    assert exact.tolist() == [[4, 1, 2, 3, 0.5]]
    assert store.scores(query, "max", every_key=True, candidates=3).tolist() == [[-inf, 1, 2, 3, -inf]]
    assert store.scores(query, "max", every_key=True, candidates=2).tolist() == [[-inf, -inf, 2, 3, -inf]]
    assert torch.equal(store.scores(query, "max", every_key=True, candidates=5), exact)
    assert torch.equal(store.scores(query, "max", every_key=True, candidates=64), exact)
    assert store.scores(query, "max", candidates=3).tolist() == [[0, 1, 2, 1.25, 0.5]]  # without every_key: rep keys
    # top 2: the every-key search takes blocks 0 and 3, the two-stage one with 3 candidates 2 and 3
    assert store.scores(query, "max", every_key=True, candidates=3).topk(2).indices.sort().values.tolist() == [[2, 3]]
    assert exact.topk(2).indices.sort().values.tolist() == [[0, 3]]


def test_best_blocks_are_topk_of_the_scores_in_block_order():
    """`best` (the decoding search's choice): the k best blocks by `scores`, ascending, for every search; at most the
    blocks stored."""
    store = BlockStore(block=4, dtype=torch.float32, rep_keys=2)
    xs = [[4, -4, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0], [3, -0.5, 0, 0], [0.5, 0.5]]  # as above: block 4 partial
    keys = torch.tensor([x for block in xs for x in block]).view(1, 18, 1) * torch.tensor([1.0, 0.0])
    store.add(torch.arange(18), keys, keys)
    query = torch.tensor([[[1.0, 0.0]]])
    assert store.best(query, 2, "max").tolist() == [[2, 3]]  # rep keys 0, 1, 2, 1.25, 0.5
    assert store.best(query, 2, "max", every_key=True).tolist() == [[0, 3]]  # every key 4, 1, 2, 3, 0.5
    assert store.best(query, 2, "max", every_key=True, candidates=3).tolist() == [[2, 3]]
    assert store.best(query, 3, "max", every_key=True, candidates=4).tolist() == [[1, 2, 3]]  # block 0 not a candidate
    assert store.best(query, 9, "max", every_key=True, candidates=3).tolist() == [[0, 1, 2, 3, 4]]
    assert store.best(query, 2, "mean").tolist() == [[1, 2]]  # means 0, 1, 1, 0.625, 0.5


def test_the_partial_blocks_empty_slots_never_score():
    """The partial newest block's empty slots hold zeros in the store: with every key negative, a 0 would win its
    max; every search scores it by its stored keys only (float16 store, as the default)."""
    store = BlockStore(block=4, dtype=torch.float16, rep_keys=2)
    xs = [[-3, -2, -5, -4], [-1.5, -6, -7, -8], [-1]]  # block 2 holds one key
    keys = torch.tensor([x for block in xs for x in block]).view(1, 9, 1) * torch.tensor([1.0, 0.0])
    store.add(torch.arange(9), keys.half(), keys.half())
    query = torch.tensor([[[1.0, 0.0]]])
    inf = float("inf")
    assert store.scores(query, "max").tolist() == [[-2.5, -3.75, -1]]  # run means; the partial block's best key
    assert store.scores(query, "max", every_key=True).tolist() == [[-2, -1.5, -1]]
    assert store.scores(query, "max", every_key=True, candidates=2).tolist() == [[-2, -inf, -1]]
    assert store.block_max(query, torch.tensor([[2, 1]])).tolist() == [[[-1, -1.5]]]  # per query head
    assert store.best(query, 1, "max", every_key=True, candidates=2).tolist() == [[2]]
    assert store.holds_partial(torch.tensor([[0, 2]])) and not store.holds_partial(torch.tensor([[0, 1]]))
    store.add(torch.arange(9, 12), keys[:, :3].half(), keys[:, :3].half())  # block 2 full: no partial block
    assert not store.holds_partial(torch.tensor([[1, 2]]))


def test_chunked_block_search_is_the_batched_one_bit_for_bit(model, ids, monkeypatch):
    """Past `CHUNK_KEYS` keys a block search runs per KV head and chunk: the same scores bit for bit (the partial
    block's empty slots still left out), and the same decoding logits."""
    store = BlockStore(block=4, dtype=torch.float16, rep_keys=2)
    xs = [[-3, -2, -5, -4], [-1.5, -6, -7, -8], [-1]]  # as above: every key negative, block 2 holds one key
    keys = torch.tensor([x for block in xs for x in block]).view(1, 9, 1) * torch.tensor([1.0, 0.0])
    store.add(torch.arange(9), keys.half(), keys.half())
    query = torch.tensor([[[1.0, 0.0]]])
    monkeypatch.setattr(blocks, "CHUNK_KEYS", 4)  # one block per chunk
    assert store.scores(query, "max", every_key=True).tolist() == [[-2, -1.5, -1]]
    assert store.scores(query, "max", every_key=True, candidates=2).tolist() == [[-2, -float("inf"), -1]]
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.float32):
        store = BlockStore(block=8, dtype=dtype, rep_keys=2)
        store.add(torch.arange(301), torch.randn(2, 301, 16, generator=generator).to(dtype),
                  torch.randn(2, 301, 16, generator=generator).to(dtype))
        query = torch.randn(2, 3, 16, generator=generator)
        chosen = torch.stack([torch.randperm(store.num_blocks, generator=generator)[:30] for _ in range(2)])
        chunked = {}
        for chunk in (16, 10**6):  # 2 blocks per chunk; one batched product
            monkeypatch.setattr(blocks, "CHUNK_KEYS", chunk)
            chunked[chunk] = store.block_max(query), store.block_max(query, chosen)
        assert all(torch.equal(a, b) for a, b in zip(chunked[16], chunked[10**6], strict=True))
    config = KnnConfig(blocks=4, top_blocks=2, rep_keys=2, decode_candidates=5)
    monkeypatch.setattr(blocks, "CHUNK_KEYS", 8)
    logits = run(model, ids, Window(8, 2), config, token_by_token=True)
    monkeypatch.setattr(blocks, "CHUNK_KEYS", 10**6)
    assert torch.equal(logits, run(model, ids, Window(8, 2), config, token_by_token=True))


@pytest.mark.parametrize("config", [
    KnnConfig(blocks=4, top_blocks=2, query_group=3),  # 3 queries per group: forwards of 8 end in a short group
    KnnConfig(blocks=4, top_blocks=3, query_group=4, rep_keys=0),  # every key ranks
    KnnConfig(blocks=4, top_blocks=2, query_group=2, representative="mean"),
    KnnConfig(blocks=4, top_blocks=2, query_group=3, positions="hybrid"),
    KnnConfig(blocks=4, top_blocks=2, query_group=3, positions="absolute"),
    KnnConfig(blocks=4, top_blocks=2, query_group=3, mode="gated"),
], ids=["ordered", "every-key", "mean", "hybrid", "absolute", "gated"])
def test_the_batched_group_search_gives_the_loops_logits(model, ids, config, monkeypatch):
    """On an accelerator every query group of a forward searches in one batched pass (`retrieve_groups`); forced on
    the CPU it retrieves what the loop over the groups retrieves: the same logits up to float rounding, with
    partial newest blocks (window 8 + 2 sinks, blocks of 4) and a short last group. The forwards here have 8
    tokens (the cache's period), so each has groups to batch."""
    loop = run(model, ids, Window(8, 2), config)
    monkeypatch.setattr(blocks, "batch_groups", lambda device: True)
    batches = []
    retrieve_groups = blocks.BlockMemoryAttention.retrieve_groups
    monkeypatch.setattr(blocks.BlockMemoryAttention, "retrieve_groups",
                        lambda self, layer, query, *args: batches.append(query.shape[1]) or retrieve_groups(
                            self, layer, query, *args))
    batched = run(model, ids, Window(8, 2), config)
    assert len(batches) >= 10 and any(q % config.query_group for q in batches)  # short last groups too
    assert torch.allclose(batched, loop, atol=1e-5)
    assert not torch.allclose(batched, run(model, ids, Window(8, 2), None), atol=1e-3)  # memory is used


def test_two_stage_decoding_gives_the_logits_recorded_before_its_optimisation(model, ids):
    """Token-by-token decoding with the two-stage search (3 candidates of up to 13 blocks) and with every block by
    every key: with the sinks kept where the cache keeps them (the default), the logits recorded at main fd34e0a,
    before the search lost its slot masks and its float16 copies (rotation from the stored float16, the partial
    block's tail masked in place); with the sinks rotated below memory ("below"), the logits recorded when that
    came."""
    recorded = {"below": {3: [[-0.0747662559, 0.0841830224], [0.1019416898, 0.0114816949],
                              [-0.0163965002, -0.0306525007], [-0.1952972114, 0.2325066328],
                              [-0.1258811504, 0.1199926957], [-0.3287109137, 0.3107489944]],
                          0: [[-0.0747662559, 0.0841830224], [0.1019416898, 0.0114816949],
                              [-0.0183638074, -0.0285855085], [-0.1458619386, 0.2201437503],
                              [-0.1320606172, 0.1371857971], [-0.3534303010, 0.3398331404]]},
                "kept": {3: [[-0.0747662559, 0.0841830224], [0.1015591919, 0.0114620067],
                               [-0.0164333358, -0.0306702629], [-0.1952336729, 0.232403934],
                               [-0.1256097555, 0.1202821508], [-0.3282838166, 0.3109373748]],
                           0: [[-0.0747662559, 0.0841830224], [0.1015591919, 0.0114620067],
                               [-0.0184029713, -0.0286027044], [-0.1457998008, 0.2199889421],
                               [-0.1318034977, 0.137440145], [-0.3530369699, 0.3399874866]]}}
    for sinks, by_candidates in recorded.items():
        for candidates, expected in by_candidates.items():
            config = KnnConfig(blocks=4, top_blocks=2, rep_keys=2, decode_candidates=candidates, sink_positions=sinks)
            logits = run(model, ids, Window(8, 2), config, token_by_token=True)
            # recorded on an Intel Xeon (other CPUs' float kernels differ by a few 1e-6, a change of the retrieval by
            # far more)
            assert torch.allclose(logits[0, 12::8, :2], torch.tensor(expected), atol=2e-5)


def test_two_stage_decoding_is_exact_with_every_block_a_candidate_and_rep_keys_with_top_blocks(model, ids):
    """Token by token, decode_candidates >= the blocks ever stored (13) decodes exactly as the every-key search, and
    decode_candidates = top_blocks exactly as ranking by the representative keys; 3 candidates differ from both."""
    config = KnnConfig(blocks=4, top_blocks=2, rep_keys=2, decode_group=1)
    every_key = run(model, ids, Window(8, 2), config, token_by_token=True)
    reps = run(model, ids, Window(8, 2), KnnConfig(**{**vars(config), "decode_every_key": False}), token_by_token=True)
    rerank = {c: run(model, ids, Window(8, 2), KnnConfig(**{**vars(config), "decode_candidates": c}),
                     token_by_token=True) for c in (2, 3, 16)}
    assert torch.equal(rerank[16], every_key)
    assert torch.equal(rerank[2], reps)
    assert not torch.allclose(every_key, reps, atol=1e-3)
    assert not torch.allclose(rerank[3], every_key, atol=1e-3) and not torch.allclose(rerank[3], reps, atol=1e-3)


def test_one_representative_key_per_entry_is_the_exact_max(model, ids):
    exact = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, precision="float32"))
    runs_of_one = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, precision="float32", rep_keys=4))
    assert torch.allclose(runs_of_one, exact, atol=1e-5)
    coarse = run(model, ids, Window(8, 2), KnnConfig(blocks=4, top_blocks=2, precision="float32", rep_keys=1))
    assert not torch.allclose(coarse, exact, atol=1e-3)  # one mean key per block ranks differently


def test_gated_at_its_initial_value_is_exactly_joint(model, ids):
    config = KnnConfig(blocks=4, top_blocks=2)
    joint = run(model, ids, Window(8, 2), config)
    gated = KnnConfig(blocks=4, top_blocks=2, mode="gated")
    assert torch.equal(run(model, ids, Window(8, 2), gated), joint)
    assert torch.equal(run(model, ids, Window(8, 2), gated, gate=MemoryBias.initial(model)), joint)
    trusting = MemoryBias(torch.full((2, 4), 2.0))
    assert not torch.allclose(run(model, ids, Window(8, 2), gated, gate=trusting), joint, atol=1e-3)


@pytest.mark.parametrize("bad, field", [
    ({"config": KnnConfig(blocks=-1)}, "memory_blocks"),
    ({"config": KnnConfig(blocks=4, positions="none")}, "positions"),
    ({"config": KnnConfig(blocks=4, positions="sideways")}, "positions"),
    ({"config": KnnConfig(blocks=0, positions="ordered")}, "positions"),  # per-token retrieval has no ordered positions
    ({"config": KnnConfig(blocks=4, top_blocks=0)}, "top_blocks"),
    ({"config": KnnConfig(blocks=4, representative="median")}, "representative"),
    ({"config": KnnConfig(blocks=4, precision="int8")}, "precision"),
    ({"config": KnnConfig(blocks=4, sink_positions="first")}, "sink_positions"),
    ({"config": KnnConfig(blocks=0, sink_positions="below")}, "sink_positions"),  # per-token memory has no such option
    ({"config": KnnConfig(blocks=4, rep_keys=3)}, "rep_keys"),  # must divide the block
    ({"config": KnnConfig(blocks=4, query_group=-1)}, "query_group"),
    ({"config": KnnConfig(blocks=4, decode_group=-1)}, "decode_group"),
    ({"config": KnnConfig(blocks=4, decode_every_key="yes")}, "decode_every_key"),
    ({"config": KnnConfig(blocks=4, top_blocks=4, decode_candidates=3)}, "decode_candidates"),  # < top_blocks
    ({"config": KnnConfig(blocks=4, top_blocks=4, decode_candidates=-1)}, "decode_candidates"),
    ({"config": KnnConfig(blocks=4, top_blocks=4, decode_candidates=8.0)}, "decode_candidates"),
    ({"config": KnnConfig(blocks=16, top_blocks=4)}, "top_blocks"),  # 64 retrieved + 10 + 10 > 64 positions
    ({"config": KnnConfig(blocks=4, top_blocks=2, decode_top_blocks=0)}, "decode_top_blocks"),
    ({"config": KnnConfig(blocks=4, top_blocks=2, decode_top_blocks=2.5)}, "decode_top_blocks"),
    ({"config": KnnConfig(blocks=4, top_blocks=2, decode_top_blocks=8, decode_candidates=4)}, "decode_candidates"),
    ({"config": KnnConfig(blocks=4, top_blocks=2, decode_top_blocks=16, decode_candidates=0)}, "top_blocks"),  # 64 + 20
    ({"config": KnnConfig(blocks=4, layers=[5])}, "layers"),
    ({"memory": Memory(MemorySpec(name="m", dim=16, metric="ip", value_kind="vector", value_dim=16))}, "memory"),
    ({"gate": Gate(torch.zeros(2, 4), torch.zeros(2, 4))}, "gate"),
    ({"gate": MemoryBias(torch.zeros(3, 4))}, "gate"),
    ({"policy": Full()}, "policy"),
])
def test_bad_block_options_are_rejected_before_any_work(short_model, bad, field):
    cache = BoundedCache(short_model, bad.get("policy", Window(8, 2)))
    config = bad.get("config", KnnConfig(blocks=4, top_blocks=4, mode="gated"))
    with pytest.raises(InvalidInput) as err, attach(short_model, cache, config, bad.get("memory"), bad.get("gate")):
        pytest.fail("the session must not start")
    assert err.value.field == field
    assert short_model.config._attn_implementation == "sdpa" and cache.on_evict is None


def test_the_default_is_block_memory_and_positions_follow_the_kind_of_memory():
    default = KnnConfig()
    assert (default.blocks, default.top_blocks, default.rep_keys, default.query_group) == (32, 16, 4, 4)
    assert (default.decode_group, default.decode_every_key, default.decode_candidates) == (1, True, 192)  # 10, 11
    assert default.positions == "ordered" and KnnConfig(blocks=0).positions == "absolute"
    assert default.sink_positions == "kept"  # section 19: "below" lost 4 of 60 needle prompts, gained none


# --- the command line: bad block options fail before the model loads ---------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    import lm.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(lm.model, "load_model", refuse)


def cli(*args):
    import typer

    from memsvc.cli.longctx import eval_long
    from memsvc.cli.model import generate

    app = typer.Typer()
    app.command("eval-long")(eval_long)
    app.command("generate")(generate)
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--memory-blocks", 0, "--positions", "ordered"], "need block memory"),
    (["--memory-blocks", -2], "memory blocks must be a positive number"),
    (["--memory-blocks", 64, "--positions", "sideways"], "positions must be one of"),
    (["--memory-blocks", 64, "--retrieved-blocks", 0], "retrieved blocks must be a positive integer"),
    (["--memory-blocks", 30], "representative keys per block must be 0 (every key) or divide the block size (30)"),
    (["--rep-keys", -1], "representative keys per block must be 0"),
    (["--sink-positions", "first"], "sink positions must be 'kept' or 'below', got 'first'"),
    (["--memory-blocks", 0, "--sink-positions", "below"], "sink_positions (--sink-positions) applies only to block"),
])
@pytest.mark.parametrize("command", ["eval-long", "generate"])
def test_cli_rejects_bad_block_options_before_loading_the_model(no_model_load, tmp_path, args, message, command):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 20)
    common = ([doc, "--knn-memory"] if command == "eval-long"
              else ["--prompt-file", doc, "--cache", "window:8,sinks:2", "--memory-attention"])
    result = cli(command, *common, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_hf_bounded_cache_takes_block_memory(model, ids):
    from lm.hf import bounded_cache

    config = KnnConfig(blocks=4, top_blocks=N, precision="float32")
    with bounded_cache(model, "window:8", knn=config) as sequences, torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert sequences.session.stored[0] > 0
    with torch.inference_mode():
        assert torch.allclose(logits, model(input_ids=ids).logits, atol=1e-4)


# --- block memory's trained bias (issue 14): train-gate --memory-blocks ---------------------------------


def test_training_the_memory_bias_starts_at_joint_moves_it_and_lowers_the_loss(model, tmp_path):
    from lm.gate_training import train_gate

    stream_ids = torch.randint(0, 2000, (1, 120), generator=torch.Generator().manual_seed(5))
    bias, curve = train_gate(model, [stream_ids], window=8, sinks=2, epochs=4, lr=0.2, memory_blocks=4)
    assert isinstance(bias, MemoryBias) and bias.bias.shape == (2, 4)
    steps = len(curve) // 4
    assert steps > 1 and len(curve) == 4 * steps == bias.meta["steps"]
    assert bias.bias.detach().abs().min() > 0.05  # every (layer, head) got gradient and moved from 0
    losses = bias.meta["epoch_loss"]  # the same blocks each epoch: a random model, so small but steady gains
    assert all(b < a for a, b in pairwise(losses)) and losses[-1] < losses[0] - 0.005, losses
    assert bias.meta["memory_blocks"] == 4 and bias.meta["positions"] == "ordered"
    bias.save(tmp_path / "bias.json")
    loaded = MemoryBias.load(tmp_path / "bias.json")
    assert torch.equal(loaded.bias, bias.bias.detach()) and loaded.meta["epoch_loss"] == bias.meta["epoch_loss"]


def test_a_saved_bias_changes_the_logits_only_where_memory_is_retrieved(model, ids, tmp_path):
    MemoryBias(torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 0.3]]), {"note": "x"}).save(tmp_path / "b.json")
    loaded = MemoryBias.load(tmp_path / "b.json")
    assert loaded.meta == {"note": "x"} and loaded.bias[0, 2] == 2.0
    joint_config, gated_config = KnnConfig(blocks=4, top_blocks=2), KnnConfig(blocks=4, top_blocks=2, mode="gated")
    first_stored = {}

    def inspect(session, cache):
        first_stored["token"] = min(int(store.tokens[0]) for store in session.stores.values())

    for token_by_token in (False, True):
        joint = run(model, ids, Window(8, 2), joint_config, token_by_token=token_by_token, inspect=inspect)
        gated = run(model, ids, Window(8, 2), gated_config, gate=loaded, token_by_token=token_by_token)
        differs = (gated - joint).abs().amax(-1)[0] > 1e-4  # [n]
        assert first_stored["token"] == 2  # the first entry past the 2 sinks is the first evicted
        # memory is empty until the cache (8 + 2 entries) evicts its first entry at the 11th token
        assert torch.equal(gated[:, :10], joint[:, :10])
        assert differs[10:].all()


def test_shipped_smollm2_memory_bias_loads_with_its_training_record():
    from lm.gate import PARAMS

    bias = MemoryBias.load("smollm2")
    assert (PARAMS / "smollm2-memory-bias.json").is_file() and bias.bias.shape == (30, 9)
    assert torch.isfinite(bias.bias).all() and bias.bias.abs().max() > 0.1  # trained: not the zero of joint
    meta = bias.meta
    assert (meta["model"], meta["memory_blocks"], meta["window"], meta["sinks"]) == ("smollm2", 32, 256, 4)
    assert len(meta["curve"]) == meta["steps"] and min(meta["stream_tokens"]) > 8192  # streams past 8K
    evaluated = {"heapq", "zlib", "cmd", "uuid", "multiprocessing"}
    assert not evaluated & set(meta["files"].replace("+", ",").split(","))
