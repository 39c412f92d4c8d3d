"""Backend benchmark: add and search throughput of the FAISS store (`Memory`, durable) vs Milvus
(`MilvusMemory` on embedded milvus-lite) on the same data, in-process. Prints a table, writes
bench/results/backends.{json,png}.

    .venv/bin/python bench/bench_backends.py           # 100K x 576, flat, l2 (as in results/backends.md)
    .venv/bin/python bench/bench_backends.py --quick   # 20K, a smoke run
    .venv/bin/python bench/bench_backends.py --rest    # the same through the REST API, a server per backend

With --rest, a third server runs on a real Milvus standalone server (PyPI `milvus` 2.3.5 from
`.venv-milvus`, which `make test` creates; started as the tests start it, tests/milvus_server.py).

Milvus is measured twice: on the first search after the adds (entries still buffered) and after
`flush()` sealed them into an indexed segment (a Milvus server does that in the background).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bench_store import DIM, OUT, K, clustered, start_server, timed_adds, timed_search

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from milvus_server import MilvusServer, available  # a test helper: a real Milvus server

from memsvc.client import MemoryClient
from memsvc.contract import MemorySpec
from memsvc.store import Memory
from memsvc.store.milvus import MilvusStore

BATCHES = (1, 16)


def call_ms(fn, repeat: int = 20) -> float:
    """Median milliseconds of one call: the fixed cost a backend adds to every request."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def bench_backend(name: str, make, keys: np.ndarray, queries: np.ndarray) -> dict:
    """make(memory_name) -> a new empty memory of this backend."""
    tiny = make("tiny")
    tiny.add(keys[:100], values=np.arange(100))
    row = {"backend": name, "n": len(keys),
           "add_1_ms": call_ms(lambda: tiny.add(keys[:1], values=[0])),
           "search_tiny_ms": call_ms(lambda: tiny.search(queries[:1], K))}
    mem = make("bench")
    row["add_per_s"] = timed_adds(lambda k, v: mem.add(k, values=v), keys)
    t = time.perf_counter()
    mem.search(queries[:1], K)
    row["first_search_ms"] = 1e3 * (time.perf_counter() - t)
    t = time.perf_counter()
    if hasattr(mem, "flush"):  # Milvus: seal the buffered entries
        mem.flush()
    row["flush_s"] = time.perf_counter() - t
    for batch in BATCHES:
        r = timed_search(lambda q: mem.search(q, K), queries, batch, seconds=4.0)
        row.update({f"qps_{batch}": r["qps"], f"p50_ms_{batch}": r["p50_ms"], f"p99_ms_{batch}": r["p99_ms"]})
    print(f"{name}: {row}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rest", action="store_true", help="through a memsvc server per backend")
    args = ap.parse_args()
    n = 20_000 if args.quick else 100_000
    keys, queries = clustered(n, seed=1), clustered(1024, seed=2)
    spec = {"dim": DIM, "metric": "l2", "value_kind": "token", "index": "flat"}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_avg_at_start": os.getloadavg()[0]}
    print(f"{n:,} x {DIM} keys, k={K}; {machine}", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        rows = (rest_rows if args.rest else inprocess_rows)(Path(tmp), spec, keys, queries)

    print(f"\n{'backend':<17} {'add/s':>9} {'1-entry add':>12} {'tiny search':>12} {'1st search':>11}"
          f" {'flush':>7} {'q/s b=1':>8} {'p50 b=1':>8} {'q/s b=16':>9} {'p50 b=16':>9}")
    for r in rows:
        print(f"{r['backend']:<17} {r['add_per_s']:>9,.0f} {r['add_1_ms']:>10.2f}ms {r['search_tiny_ms']:>10.2f}ms"
              f" {r['first_search_ms']:>9.0f}ms {r['flush_s']:>6.1f}s {r['qps_1']:>8,.1f} {r['p50_ms_1']:>6.1f}ms"
              f" {r['qps_16']:>9,.1f} {r['p50_ms_16']:>7.0f}ms")
    OUT.mkdir(exist_ok=True)
    name = "backends-rest" if args.rest else "backends"
    (OUT / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    plot(rows, OUT / f"{name}.png", "through REST" if args.rest else "in-process")


def inprocess_rows(tmp: Path, spec: dict, keys: np.ndarray, queries: np.ndarray) -> list[dict]:
    rows = [bench_backend("faiss", lambda name: Memory.create(MemorySpec(name=name, **spec), tmp / name),
                          keys, queries)]
    store = MilvusStore(str(tmp / "milvus.db"), timeout=600)
    try:
        rows.append(bench_backend("milvus-lite", lambda name: store.create(MemorySpec(name=name, **spec)),
                                  keys, queries))
    finally:
        store.close()
    return rows


def rest_rows(tmp: Path, spec: dict, keys: np.ndarray, queries: np.ndarray) -> list[dict]:
    """One server per backend, selected the way a deployment does: MEMSVC_VECTOR_BACKEND."""
    rows = []
    servers = [("faiss", "faiss REST", {}), ("milvus", "milvus-lite REST", {})]
    milvus = None
    if available() is None:
        milvus = MilvusServer(tmp / "milvus-server").start()
        servers.append(("milvus", "milvus-server REST", {"MEMSVC_MILVUS_URI": milvus.uri}))
    else:
        print(f"no Milvus server row: {available()}")
    try:
        for backend, label, env in servers:
            proc, url = start_server(tmp / label.replace(" ", "-"),
                                     {"MEMSVC_VECTOR_BACKEND": backend, "MEMSVC_MILVUS_TIMEOUT": "600", **env})
            try:
                client = MemoryClient(url, timeout=600)
                rows.append(bench_backend(label, lambda name, c=client: c.create_memory(name, **spec), keys, queries))
            finally:
                proc.terminate()
                proc.wait(120)
    finally:
        if milvus is not None:
            milvus.stop(timeout=30)
    return rows


def plot(rows: list[dict], path: Path, how: str) -> None:
    metrics = [("add_per_s", "adds/s\n(batches of 10K)"), ("qps_1", "queries/s\nbatch 1"),
               ("qps_16", "queries/s\nbatch 16")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        bars = ax.bar(np.arange(len(metrics)) + j * width, [r[m] for m, _ in metrics], width, label=r["backend"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(rows) - 1) / 2, [label for _, label in metrics])
    ax.set_yscale("log")
    ax.set_ylabel("per second (log)")
    ax.set_title(f"FAISS store vs Milvus, {rows[0]['n'] // 1000}K x {DIM} flat l2, k={K}, {how}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
