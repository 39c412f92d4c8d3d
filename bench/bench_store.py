"""Store benchmark: search QPS and latency in-process vs through REST (JSON and binary), durable add
throughput, and restart time (log replay vs snapshot). Prints a table, writes bench/results/store.{json,png}.

    .venv/bin/python bench/bench_store.py            # 100K x 576 flat and 1M x 576 ivfpq (as in RESULTS.md)
    .venv/bin/python bench/bench_store.py --quick    # 20K flat and 100K ivfpq, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
import numpy as np
from bench_peers import SERVER_ENV

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from memsvc.client import MemoryClient
from memsvc.store import Memory, MemorySpec

DIM, K = 576, 32
OUT = Path(__file__).parent / "results"


def clustered(n: int, seed: int, centers: int = 1000) -> np.ndarray:
    """Vectors around random centres: closer to real hidden states than isotropic noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, DIM)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s:s + m] = c[rng.integers(0, centers, m)] + 0.5 * rng.standard_normal((m, DIM)).astype(np.float32)
    return out


def timed_adds(add, keys: np.ndarray, batch: int = 10_000) -> float:
    """Entries per second for durable adds in batches."""
    t = time.perf_counter()
    for s in range(0, len(keys), batch):
        add(keys[s:s + batch], np.arange(s, min(s + batch, len(keys))))
    return len(keys) / (time.perf_counter() - t)


def timed_search(search, queries: np.ndarray, batch: int, seconds: float = 4.0) -> dict:
    """QPS (queries/s) and per-call p50/p99 latency (ms) of `search(batch_of_queries)`."""
    lat, i, end = [], 0, time.perf_counter() + seconds
    search(queries[:batch])  # warm-up
    while time.perf_counter() < end or len(lat) < 5:
        q = queries[(i * batch) % (len(queries) - batch):][:batch]
        t = time.perf_counter()
        search(q)
        lat.append(time.perf_counter() - t)
        i += 1
    lat = np.array(lat)
    return {"qps": batch * len(lat) / lat.sum(), "p50_ms": 1e3 * np.percentile(lat, 50),
            "p99_ms": 1e3 * np.percentile(lat, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`memsvc serve` on a free port (MEMSVC_* settings in `env`); returns the process and its URL. The
    model of ask is not preloaded (`SERVER_ENV`): loading it in the background would take the CPU the
    measurements run on."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memsvc.cli", "serve", "--port", str(port),
                             "--data-dir", str(data_dir)], env={**os.environ, **SERVER_ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def bench_config(index: str, n: int, work: Path) -> list[dict]:
    keys = clustered(n, seed=1)
    queries = clustered(4096, seed=2)
    spec = {"dim": DIM, "metric": "l2", "value_kind": "token", "index": index}
    rows = []

    mem = Memory.create(MemorySpec(name="bench", **spec), work / "inproc")
    add_rate = timed_adds(lambda k, v: mem.add(k, values=v), keys)
    mem.wait_trained()
    train_s = mem.train_seconds or 0.0
    mem._log.rotate()  # keep the log: reopen below replays it
    t = time.perf_counter()
    replayed = Memory.open(work / "inproc")
    replay_s = time.perf_counter() - t
    replayed.wait_trained()  # its re-training must not run under the measurements below
    del replayed
    mem.snapshot()
    t = time.perf_counter()
    mem = Memory.open(work / "inproc")
    snapshot_s = time.perf_counter() - t
    print(f"{index} {n}: durable add {add_rate:,.0f}/s in-process; restart {replay_s:.1f}s from the log, "
          f"{snapshot_s:.1f}s from a snapshot", flush=True)

    proc, url = start_server(work / "server")
    try:
        client = MemoryClient(url, timeout=600)
        remote = client.create_memory("bench", **spec)
        rest_add = timed_adds(lambda k, v: remote.add(k, values=v), keys)
        while not remote.stats().trained:
            time.sleep(0.5)
        http = httpx.Client(base_url=url, timeout=600)

        def json_search(q: np.ndarray) -> None:
            r = http.post("/v1/memories/bench/search", json={"queries": q.tolist(), "k": K})
            r.raise_for_status()
            r.json()

        for batch in (1, 64):
            paths = {"in-process": lambda q: mem.search(q, K), "REST binary": lambda q: remote.search(q, K),
                     "REST JSON": json_search}
            for name, fn in paths.items():
                r = timed_search(fn, queries, batch)
                rows.append({"index": index, "n": n, "batch": batch, "path": name, **r})
                print(f"  batch {batch:>2} {name:<11} {r['qps']:>9,.0f} q/s  p50 {r['p50_ms']:7.2f} ms"
                      f"  p99 {r['p99_ms']:7.2f} ms", flush=True)
        for r in rows:
            r.update(add_per_s_inproc=add_rate, add_per_s_rest=rest_add, restart_replay_s=replay_s,
                     restart_snapshot_s=snapshot_s, train_s=train_s)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    configs = [("flat", 20_000), ("ivfpq", 100_000)] if args.quick else [("flat", 100_000), ("ivfpq", 1_000_000)]
    OUT.mkdir(exist_ok=True)
    rows = []
    for index, n in configs:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            rows += bench_config(index, n, Path(tmp))

    print(f"\n{'index':<6} {'entries':>9} {'batch':>5} {'path':<11} {'q/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'vs in-proc':>10}")
    for r in rows:
        base = next(b["qps"] for b in rows if b["index"] == r["index"] and b["batch"] == r["batch"]
                    and b["path"] == "in-process")
        r["vs_inprocess"] = r["qps"] / base
        print(f"{r['index']:<6} {r['n']:>9,} {r['batch']:>5} {r['path']:<11} {r['qps']:>9,.0f} {r['p50_ms']:>8.2f}"
              f" {r['p99_ms']:>8.2f} {r['vs_inprocess']:>9.0%}")
    print(f"\n{'index':<6} {'entries':>9} {'add/s in-proc':>14} {'add/s REST':>11} {'train':>7} {'restart log':>12}"
          f" {'restart snap':>13}")
    for r in {(r["index"]): r for r in rows}.values():
        print(f"{r['index']:<6} {r['n']:>9,} {r['add_per_s_inproc']:>14,.0f} {r['add_per_s_rest']:>11,.0f}"
              f" {r['train_s']:>6.1f}s {r['restart_replay_s']:>11.1f}s {r['restart_snapshot_s']:>12.1f}s")
    (OUT / "store.json").write_text(json.dumps(rows, indent=1))
    plot(rows, OUT / "store.png")


def plot(rows: list[dict], path: Path) -> None:
    groups = sorted({(r["index"], r["n"], r["batch"]) for r in rows})
    paths = ["in-process", "REST binary", "REST JSON"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(paths)
    for j, name in enumerate(paths):
        qps = [next(r["qps"] for r in rows if (r["index"], r["n"], r["batch"]) == g and r["path"] == name)
               for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, qps, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + width, [f"{i} {n // 1000}K\nbatch {b}" for i, n, b in groups])
    ax.set_yscale("log")
    ax.set_ylabel(f"queries/s (k={K}, dim {DIM})")
    ax.set_title("memsvc search throughput: in-process vs REST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
