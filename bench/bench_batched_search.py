"""Memory attention's retrieval alone, per decoded token, for SmolLM2-135M's shape (issue 15 #1).

30 layers x 3 KV heads, 3 query heads per KV head, head_dim 64, k = 32, a session memory (flat, ip, vector
values) holding N entries per layer and KV head partition. "per head" is what memory attention issued before:
one `search` per layer and KV head (90 calls per token); "batched" is one `search(..., partitions=[...])` per
layer (30 calls per token). Prints CPU and wall ms per token with the machine's load. Random vectors: a flat
search costs the same whatever they hold.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_batched_search.py --entries 1000,4000
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from memsvc.contract import MemorySpec
from memsvc.store import Memory

LAYERS, KV_HEADS, GROUP, HEAD_DIM, K = 30, 3, 3, 64, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", default="1000,4000", help="entries per partition, comma-separated")
    ap.add_argument("--tokens", type=int, default=20, help="tokens timed per setting")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| entries per partition | searches | CPU ms/token | wall ms/token | load |\n|---|---|---|---|---|")
    for n in (int(x) for x in args.entries.split(",")):
        mem = Memory(MemorySpec(name="session", dim=HEAD_DIM, metric="ip", value_kind="vector",
                                value_dim=HEAD_DIM))
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                keys = rng.standard_normal((n, HEAD_DIM)).astype(np.float32)
                mem.add(keys, values=keys, partition=f"s/l{layer}/h{head}")
        queries = rng.standard_normal((LAYERS, KV_HEADS * GROUP, HEAD_DIM)).astype(np.float32)

        def per_head(mem: Memory = mem, queries: np.ndarray = queries) -> None:
            for layer in range(LAYERS):
                for head in range(KV_HEADS):
                    mem.search(queries[layer, head * GROUP:(head + 1) * GROUP], K, partition=f"s/l{layer}/h{head}")

        def batched(mem: Memory = mem, queries: np.ndarray = queries) -> None:
            for layer in range(LAYERS):
                mem.search(queries[layer], K,
                           partitions=[f"s/l{layer}/h{head}" for head in range(KV_HEADS) for _ in range(GROUP)])

        for name, token in ((f"per head ({LAYERS * KV_HEADS} calls)", per_head),
                            (f"batched ({LAYERS} calls)", batched)):
            token()  # warm-up
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(args.tokens):
                token()
            print(f"| {n:,} | {name} | {1e3 * (time.process_time() - cpu) / args.tokens:.2f} "
                  f"| {1e3 * (time.perf_counter() - wall) / args.tokens:.2f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
