"""Whole-memory search latency when a memory has a partition per document (issue 16 #3).

A collection keeps one memory partition per document version; a dense search is an unscoped search of that
memory. This times single-query, top-k searches of a flat cosine memory of CHUNKS random DIM-d vectors in
CHUNKS / PER_DOC partitions, in-process (`Memory`) and through REST (`RemoteMemory` against `memsvc serve`
on a free port), and prints p50/p99 ms and QPS with the machine's load. Random vectors: the latency of a
flat search does not depend on what the vectors mean.

    nice -n 10 .venv/bin/python bench/bench_partitions.py --chunks 10000 --per-doc 8
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from bench_store import start_server

from memsvc.client import MemoryClient
from memsvc.contract import MemorySpec
from memsvc.store import Memory


def timed(search, queries: np.ndarray, k: int, process: psutil.Process) -> dict[str, float]:
    """p50/p99 ms and QPS of one query at a time (the first two searches are warm-up, not timed), and the CPU
    ms per query of `process` (the server's, or this one's): what other load on the machine hides less."""
    for q in queries[:2]:
        search(q[None], k)
    times = []
    cpu = process.cpu_times()
    for q in queries[2:]:
        start = time.perf_counter()
        search(q[None], k)
        times.append(time.perf_counter() - start)
    used = process.cpu_times()
    times = np.array(times)
    return {"p50 ms": 1e3 * float(np.percentile(times, 50)), "p99 ms": 1e3 * float(np.percentile(times, 99)),
            "QPS": len(times) / float(times.sum()),
            "CPU ms": 1e3 * (used.user + used.system - cpu.user - cpu.system) / len(times)}


def fill(add, keys: np.ndarray, per_doc: int) -> None:
    for start in range(0, len(keys), per_doc):
        add(keys[start:start + per_doc], f"doc-{start // per_doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--per-doc", type=int, default=8, help="chunks per document (= per partition)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=302)
    ap.add_argument("--no-rest", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.chunks, args.dim)).astype(np.float32)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    spec = {"dim": args.dim, "metric": "cosine"}
    rows = []

    mem = Memory(MemorySpec(name="bench", **spec))
    fill(lambda k, p: mem.add(k, partition=p), keys, args.per_doc)
    rows.append(("in-process", timed(mem.search, queries, args.k, psutil.Process())))

    if not args.no_rest:
        with tempfile.TemporaryDirectory() as work:
            proc, url = start_server(Path(work) / "data")
            try:
                with MemoryClient(url) as client:
                    remote = client.create_memory("bench", **spec)
                    fill(lambda k, p: remote.add(k, partition=p), keys, args.per_doc)
                    rows.append(("REST", timed(remote.search, queries, args.k, psutil.Process(proc.pid))))
            finally:
                proc.terminate()
                proc.wait()

    print(f"\n{args.chunks:,} chunks x {args.dim}-d (random), {args.chunks // args.per_doc:,} partitions, "
          f"k={args.k}, {args.queries - 2} single queries; load {os.getloadavg()[0]:.1f} (1 min)")
    print("| where | p50 ms | p99 ms | QPS | CPU ms/query (server's for REST) |\n|---|---|---|---|---|")
    for where, m in rows:
        print(f"| {where} | {m['p50 ms']:.2f} | {m['p99 ms']:.2f} | {m['QPS']:.0f} | {m['CPU ms']:.2f} |")


if __name__ == "__main__":
    main()
