"""Issue 15 #3: the model side on any device. `resolve_device`/`load_model(device=, dtype=)`, bf16 on the CPU
through generate with a bounded cache and memory attention, and the same paths on CUDA where there is a GPU."""
from __future__ import annotations

import math

import pytest
import torch

from lm.attention import attach
from lm.cache import BoundedCache
from lm.devices import resolve_device
from lm.gate import Gate
from lm.gate_training import train_gate
from lm.generate import stream_tokens
from lm.knnlm import interpolate, knn_probs
from lm.longeval import evaluate_stream
from lm.memory_attention import KnnConfig, session_memory
from lm.model import load_model, tiny_llama
from lm.policies import Window
from memsvc.contract import InvalidInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CUDA = torch.cuda.is_available()


def test_resolve_device_defaults_and_bad_values():
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device("cpu", torch.float16) == (torch.device("cpu"), torch.float16)
    assert resolve_device(None)[0].type == ("cuda" if CUDA else "cpu")
    for bad in ("tpu", "cuda:x", "meta", ""):
        with pytest.raises(InvalidInput, match="unknown device") as err:
            resolve_device(bad)
        assert err.value.field == "device"
    with pytest.raises(InvalidInput, match="unknown dtype 'int8'"):
        resolve_device("cpu", "int8")
    if not CUDA:
        with pytest.raises(InvalidInput, match="no CUDA GPU"):
            resolve_device("cuda")


def test_device_names_are_parsed_without_torch_as_torch_reads_them():
    """`--device` is checked torch-free (`memsvc.contract.parse_device`) before a command imports torch; the rule agrees with
    torch.device on what it takes, and names only the devices a model runs on here."""
    import subprocess
    import sys
    from pathlib import Path

    from memsvc.contract import parse_device

    for name, parsed in [("cpu", ("cpu", None)), ("cuda", ("cuda", None)), ("cuda:0", ("cuda", 0)),
                         ("cuda:12", ("cuda", 12)), ("mps", ("mps", None)), ("cpu:0", ("cpu", 0))]:
        assert parse_device(name) == parsed
        assert (torch.device(name).type, torch.device(name).index) == parsed
    for bad in ("tpu", "cuda:x", "cuda:-1", "cuda:01", "cuda:", " cuda", "CUDA", "cuda:1:2", "meta", "xpu", "", 0):
        with pytest.raises(InvalidInput) as err:
            parse_device(bad)
        assert (err.value.message, err.value.field) == (
            f"unknown device {str(bad)!r}: give cpu, cuda, cuda:N or mps", "device")
        with pytest.raises(InvalidInput) as err:
            resolve_device(bad)
        assert err.value.message == f"unknown device {str(bad)!r}: give cpu, cuda, cuda:N or mps"
    probe = "import sys, memsvc.contract, lm.cache_specs, lm.model_source; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "False"


def test_load_model_puts_the_model_on_the_device_in_the_dtype(tmp_path):
    model, tokenizer = tiny_llama(num_layers=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bf16, _ = load_model(tmp_path, dtype="bf16", device="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"
    assert load_model(tmp_path, dtype=torch.bfloat16, device=torch.device("cpu"))[0] is bf16  # one load per device
    if not CUDA:
        assert load_model(tmp_path, dtype=None, device=None)[0].dtype == torch.float32  # CPU default


def decode_with_memory(model: torch.nn.Module, mode: str, device: torch.device) -> tuple[list[int], int]:
    """Sampled tokens (seeded) of a prompt 3x longer than the window, memory attention on; memory entries."""
    ids = torch.randint(0, 2000, (1, 60), generator=torch.Generator().manual_seed(0))
    cache = BoundedCache(model, Window(16, 2))
    memory = session_memory(model)
    gate = Gate.initial(model) if mode == "gated" else None
    with attach(model, cache, KnnConfig(blocks=0, k=8, mode=mode), memory, gate):
        tokens = list(stream_tokens(model, ids, max_new_tokens=6, cache=cache, temperature=1.0, seed=1))
        assert cache.layers[0].keys.device.type == device.type and cache.entries() <= 2 * (16 + 2)
        return tokens, len(memory)


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_bf16_on_the_cpu_generates_through_a_bounded_cache_with_memory_attention(mode):
    model = tiny_llama(num_layers=2)[0].to(torch.bfloat16)
    tokens, stored = decode_with_memory(model, mode, torch.device("cpu"))
    assert len(tokens) == 6 and all(0 <= t < model.config.vocab_size for t in tokens)
    assert stored == 2 * 2 * (60 + 5 - 18)  # layers x KV heads x evicted tokens (prompt + 5 fed back)
    result = evaluate_stream(model, torch.randint(0, 2000, (1, 40)), Window(8, 2), knn=KnnConfig(blocks=0, k=4),
                             memory=session_memory(model))
    assert result.nll.dtype.kind == "f" and len(result.nll) == 39 and math.isfinite(result.nll.mean())


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")
def test_on_cuda_generate_memory_attention_eval_long_gate_training_and_knnlm_math():
    device = torch.device("cuda")
    model = tiny_llama(num_layers=2)[0].to(device, torch.bfloat16)
    for mode in ("joint", "gated"):
        tokens, stored = decode_with_memory(model, mode, device)
        assert len(tokens) == 6 and stored > 0
    ids = torch.randint(0, 2000, (1, 40))  # on the CPU: the loops move them to the model's device
    result = evaluate_stream(model, ids, Window(8, 2), knn=KnnConfig(blocks=0, k=4), memory=session_memory(model))
    assert math.isfinite(result.nll.mean())
    gate, curve = train_gate(model.float(), [ids], window=8, sinks=2, k=4, epochs=1)
    assert gate.bias.device.type == "cuda" and curve and math.isfinite(curve[-1]["loss"])
    probs = knn_probs(torch.tensor([[0.0, 1.0]], device=device), torch.tensor([[3, -1]], device=device), 1.0, 8)
    mixed = interpolate(torch.full((1, 8), -math.log(8), device=device), probs.log(), 0.5)
    assert mixed.device.type == "cuda" and torch.allclose(mixed.exp().sum(), torch.tensor(1.0, device=device))


def test_state_made_before_the_first_forward_follows_the_model_to_its_device():
    """Found on an H200 (bench/results/longctx.md section 16): a fresh cache's first block mask was built from the
    layers' empty CPU state, and a gate loaded from its file stayed on the CPU, so every bounded-cache prefill and
    gated block memory failed on CUDA. A model on the "meta" device shows the same on a CPU-only machine."""
    from lm.gate import MemoryBias
    from lm.policies import Full

    model = tiny_llama(num_layers=2)[0]
    bias = MemoryBias.initial(model)  # on the CPU, as MemoryBias.load gives it
    model = model.to("meta")
    for policy in (Window(8, 2), Full()):
        cache = BoundedCache(model, policy)
        mask = cache.block_mask(16, model)
        assert mask is None or mask.device.type == "meta"
    assert BoundedCache(model, Window(8, 2)).block_mask(16, model).device.type == "meta"
    cache = BoundedCache(model, Window(8, 2))
    with attach(model, cache, KnnConfig(blocks=4, mode="gated"), gate=bias) as session:
        assert session.gate.bias.device.type == "meta"
