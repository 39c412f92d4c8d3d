"""The needle path on a GPU: a random-weight Llama of SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, float32;
speed does not depend on the weights) through `lm.longeval.answer`'s pieces (BoundedCache + attach + stream_tokens):
block memory (default, 32 retrieved blocks, gated with the shipped bias), window + sinks and full attention, 2K to
32K tokens; prints prefill seconds and decode ms per token, or FAIL with the traceback (the first one whole).

    PYTHONPATH=. python bench/gpu_smoke.py            # on a CUDA machine (bench/results/longctx.md section 16)
    SMOKE_CPU=1 PYTHONPATH=. python bench/gpu_smoke.py  # the script itself on the CPU: 4 layers, 600 tokens
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from lm.attention import attach
from lm.cache import BoundedCache
from lm.gate import PARAMS, MemoryBias
from lm.generate import stream_tokens
from lm.memory_attention import KnnConfig
from lm.policies import Full, Window

CPU = os.environ.get("SMOKE_CPU") == "1"
DEVICE = "cpu" if CPU else "cuda"


def sync() -> None:
    if not CPU:
        torch.cuda.synchronize()


def run(model, n: int, policy, knn: KnnConfig | None, gate: MemoryBias | None) -> str:
    """Prefill n random tokens and decode 12 greedily; the prefill (with the first token) and per-token decode times."""
    ids = torch.randint(3, 49000, (1, n), generator=torch.Generator().manual_seed(n))
    cache = BoundedCache(model, policy)
    times = []
    with attach(model, cache, knn, None, gate):
        sync()
        started = time.perf_counter()
        for _ in stream_tokens(model, ids, max_new_tokens=12, cache=cache):
            sync()
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
    return f"prefill+1st {times[0]:.2f}s decode {1000 * sum(times[1:]) / len(times[1:]):.1f} ms/token"


def main() -> None:
    print(torch.__version__, DEVICE if CPU else torch.cuda.get_device_name(), "transformers", transformers.__version__)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4 if CPU else 30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(DEVICE)
    bias = MemoryBias.initial(model) if CPU else MemoryBias.load(PARAMS / "smollm2-memory-bias.json")
    sinks = Window(256, 4)
    failed = []
    for name, n, policy, knn, gate in [("memory", 2048, sinks, KnnConfig(), None),
                                       ("memory", 8192, sinks, KnnConfig(), None),
                                       ("gated", 8192, sinks, KnnConfig(mode="gated"), bias),
                                       ("n32", 8192, sinks, KnnConfig(top_blocks=32), None),
                                       ("sinks", 8192, sinks, None, None),
                                       ("full", 8192, Full(), None, None),
                                       ("memory", 32768, sinks, KnnConfig(), None),
                                       ("full", 32768, Full(), None, None)]:
        try:
            print(f"OK   {name} {n}: {run(model, 600 if CPU else n, policy, knn, gate)}", flush=True)
        except Exception as e:  # noqa: BLE001 (each setting reports its own failure; the others still run)
            print(f"FAIL {name} {n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=None if not failed else 1, file=sys.stdout)
            failed.append(name)
    if not CPU:
        print("peak GPU GiB", torch.cuda.max_memory_allocated() / 2**30)


if __name__ == "__main__":
    main()
