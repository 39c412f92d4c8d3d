"""kNN-memory attention on a tiny random Llama: exactness, sessions and partitions, bad input, the gate."""
import json

import numpy as np
import pytest
import torch

from lm.attention import ATTACHED, ATTENTION, attach
from lm.cache import BoundedCache, stream
from lm.gate import PARAMS, Gate
from lm.memory_attention import KnnConfig, session_memory
from lm.model import tiny_llama
from lm.policies import Full, Window
from lm.sessions import SessionState, end_session, sessions
from memsvc.contract import InvalidInput, MemorySpec, NotFound
from memsvc.store import Memory

N = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2)[0]  # 4 query heads sharing 2 KV heads, head_dim 16


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 2000, (1, N), generator=torch.Generator().manual_seed(2))


def run(model, ids, policy, config, memory=None, gate=None, token_by_token=False, session=None, persist=False):
    cache = BoundedCache(model, policy)
    with attach(model, cache, config, memory, gate, session, persist), torch.inference_mode():
        if token_by_token:
            return torch.cat([model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits
                              for i in range(ids.shape[1])], 1)
        return torch.cat([out.logits for _, out in stream(model, ids, cache)], 1)


def full_attention(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("token_by_token", [False, True])
def test_joint_attention_over_all_of_memory_is_full_attention(model, ids, token_by_token):
    """With k >= everything evicted, window + memory sees every past token at its true logit."""
    logits = run(model, ids, Window(8), KnnConfig(blocks=0, k=N), token_by_token=token_by_token)
    assert torch.allclose(logits, full_attention(model, ids), atol=1e-4)


def test_memory_changes_what_a_window_predicts(model, ids):
    window = run(model, ids, Window(8, 2), KnnConfig(blocks=0, k=4, mode="gated"), gate=gate_of(model, -30.0))
    with torch.inference_mode():
        cache = BoundedCache(model, Window(8, 2))
        alone = torch.cat([out.logits for _, out in stream(model, ids, cache)], 1)
    assert torch.allclose(window, alone, atol=1e-5)  # gate closed: memory is ignored
    assert not torch.allclose(run(model, ids, Window(8, 2), KnnConfig(blocks=0, k=4)), alone, atol=1e-3)


@pytest.mark.parametrize("config", [KnnConfig(blocks=0, k=4), KnnConfig(blocks=0, k=4, positions="none"),
                                    KnnConfig(blocks=0, k=4, positions="window"), KnnConfig(blocks=0, k=4, mode="gated"),
                                    KnnConfig(blocks=0, k=3, mode="gated", positions="none", layers=[1])])
def test_blocks_retrieve_what_token_by_token_decoding_retrieves(model, ids, config):
    gate = gate_of(model, 0.5, log_scale=0.2)
    blocks = run(model, ids, Window(8, 2), config, gate=gate)
    assert torch.allclose(blocks, run(model, ids, Window(8, 2), config, gate=gate, token_by_token=True), atol=1e-5)


def test_evictions_land_in_one_partition_per_layer_and_kv_head_and_leave_with_the_session(model, ids):
    memory = session_memory(model)
    other = np.ones((3, 16), dtype=np.float32)
    memory.add(other, values=other, partition="someone-else")
    cache = BoundedCache(model, Window(8, 2))
    with attach(model, cache, KnnConfig(blocks=0, k=4, layers=[1]), memory, session="s7"), torch.inference_mode():
        for _ in stream(model, ids, cache):
            pass
        parts = {p.name: p.count for p in memory.stats().partitions}
        evicted = N - len(cache.layers[1].tokens)
        assert parts == {"someone-else": 3, "s7/l1/h0": evicted, "s7/l1/h1": evicted}
    assert {p.name: p.count for p in memory.stats().partitions} == {"someone-else": 3}


def test_a_kept_session_resumed_by_a_fresh_cache_sees_all_of_its_history(model, ids):
    """Two "processes" (each its own cache): the first keeps its session (its window flushed to memory), the
    second resumes it by id at stream index 30; with k >= everything stored, the second's logits are full
    attention's over the whole 60-token stream (no sinks: those sit nearer than they are). Ending the session deletes its partitions and its state."""
    memory = session_memory(model)
    half = N // 2
    first = run(model, ids[:, :half], Window(8), KnnConfig(blocks=0, k=N), memory, session="talk", persist=True)
    parts = {p.name: p.count for p in memory.stats().partitions}
    assert parts == {f"talk/l{layer}/h{h}": half for layer in (0, 1) for h in (0, 1)}  # evicted + flushed
    assert sessions(memory)["talk"] == SessionState("talk", half, "absolute", [0, 1], model.config.name_or_path)
    second = run(model, ids[:, half:], Window(8), KnnConfig(blocks=0, k=N), memory, session="talk", persist=True)
    full = full_attention(model, ids)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-4)
    assert sessions(memory)["talk"].tokens == N
    assert end_session(memory, "talk") == 4 * N
    assert memory.stats().partitions == [] and sessions(memory) == {}
    with pytest.raises(NotFound):
        end_session(memory, "talk")


def test_a_resumed_session_keeps_its_positions_and_layers(model, ids):
    memory = session_memory(model)
    run(model, ids[:, :20], Window(8, 2), KnnConfig(blocks=0, k=4, layers=[1]), memory, session="s", persist=True)
    for config, field in ((KnnConfig(blocks=0, k=4, layers=[1], positions="none"), "positions"),
                          (KnnConfig(blocks=0, k=4), "layers")):
        with pytest.raises(InvalidInput) as err:
            run(model, ids[:, 20:], Window(8, 2), config, memory, session="s")
        assert err.value.field == field
    run(model, ids[:, 20:], Window(8, 2), KnnConfig(blocks=0, k=4, layers=[1]), memory, session="s")  # not kept: ended
    assert memory.stats().partitions == [] and sessions(memory) == {}


def test_the_model_is_restored_after_the_session(model, ids):
    cache = BoundedCache(model, Window(8, 2))
    with attach(model, cache, KnnConfig(blocks=0)):
        assert model.config._attn_implementation == ATTENTION
    assert model.config._attn_implementation == "sdpa" and cache.on_evict is None
    assert not any(hasattr(layer.self_attn, ATTACHED) for layer in model.model.layers)


@pytest.mark.parametrize("bad, field", [
    ({"config": KnnConfig(blocks=0, layers=[2])}, "layers"),
    ({"config": KnnConfig(blocks=0, layers=[-1])}, "layers"),
    ({"config": KnnConfig(blocks=0, layers=[])}, "layers"),
    ({"config": KnnConfig(blocks=0, k=0)}, "k"),
    ({"config": KnnConfig(blocks=0, mode="sum")}, "memory_mode"),
    ({"config": KnnConfig(blocks=0, positions="relative")}, "positions"),
    ({"memory": Memory(MemorySpec(name="m", dim=32, metric="ip", value_kind="vector", value_dim=32))}, "memory"),
    ({"memory": Memory(MemorySpec(name="m", dim=16, metric="l2", value_kind="vector", value_dim=16))}, "memory"),
    ({"memory": Memory(MemorySpec(name="m", dim=16, metric="ip", value_kind="token"))}, "memory"),
    ({"policy": Full()}, "policy"),
    ({"gate": Gate(torch.zeros(3, 4), torch.zeros(3, 4))}, "gate"),
])
def test_bad_input_is_rejected_before_any_work(model, bad, field):
    cache = BoundedCache(model, bad.get("policy", Window(8, 2)))
    options = {name: value for name, value in bad.items() if name != "policy"}
    with pytest.raises(InvalidInput) as err, attach(model, cache, options.pop("config", KnnConfig(blocks=0)), **options):
        pytest.fail("the session must not start")
    assert err.value.field == field
    assert model.config._attn_implementation == "sdpa" and cache.on_evict is None


def gate_of(model, bias, log_scale=0.0):
    gate = Gate.initial(model)
    with torch.no_grad():
        gate.bias.fill_(bias)
        gate.log_scale.fill_(log_scale)
    return gate


def test_gate_round_trips_through_json(model, tmp_path):
    gate = gate_of(model, 1.5, -0.25)
    gate.meta = {"k": 32}
    gate.save(tmp_path / "g.json")
    loaded = Gate.load(tmp_path / "g.json")
    assert torch.equal(loaded.bias, gate.bias) and torch.equal(loaded.log_scale, gate.log_scale)
    assert loaded.meta == {"k": 32}
    loaded.check(model)


def test_bad_gate_files_are_rejected(tmp_path):
    with pytest.raises(NotFound):
        Gate.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"bias": [[0.0]]}))
    with pytest.raises(InvalidInput):
        Gate.load(tmp_path / "bad.json")


def test_shipped_smollm2_gate_loads():
    """The trained parameters in the repo fit SmolLM2-135M: 30 layers x 9 heads, finite, with their settings."""
    gate = Gate.load("smollm2")
    assert (PARAMS / "smollm2-gate.json").is_file()
    assert gate.bias.shape == gate.log_scale.shape == (30, 9)
    assert torch.isfinite(gate.bias).all() and torch.isfinite(gate.log_scale).all()
    assert {"window", "sinks", "k", "positions", "epochs", "epoch_loss"} <= set(gate.meta)
