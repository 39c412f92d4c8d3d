"""memsvc's REST hot path before and after a change, on one HNSW memory (issue 18 #2).

One data directory with N random 576-d float32 keys in an hnsw memory (m 32, ef_search `--ef`), built once
through the server of `--after`. Then, per round, the server of each checkout in turn (`--before`, `--after`:
source trees put first on PYTHONPATH) serves that directory, and a client process of the same checkout
(so each side uses its own client and wire format) times one-at-a-time searches at batch 1 and 64 for
`--seconds` each; rounds alternate the order. The in-process `Memory` of `--after` on the same snapshot is
the floor. Random vectors, not the hidden states of bench_peers.py (which need SmolLM2 and its cache):
the QPS of the REST layer is what is compared, recall is not reported. Also the CPU time per call of the
server process and of the client (from /proc and `time.process_time`): on a shared, oversubscribed machine
it moves much less with the load than latency does. Servers run with MEMSVC_PRELOAD_MODEL=false (loading
ask's model in the background would take the CPU being measured). `--after-path` puts more directories on
the after side's PYTHONPATH only: dependencies the change adds that this environment lacks (e.g. a
`pip install --target` of httptools and uvloop, which `memsvc serve` then uses). Rows: `--out`
(default bench/results/rest-hotpath.json).

    nice -n 10 python bench/bench_rest.py --before /path/to/base/checkout --after . --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_peers import SERVER_ENV, free_port, timed  # timed: one client calling search(batch) in turn

DIM, K, BATCHES = 576, 32, (1, 64)


def env_for(root: Path, extra: list[Path] = ()) -> dict[str, str]:
    """The environment of a server or client of checkout `root`, with `extra` after it on PYTHONPATH."""
    return {**os.environ, **SERVER_ENV, "PYTHONPATH": os.pathsep.join(str(p.resolve()) for p in (root, *extra))}


def serve(root: Path, data_dir: Path, extra: list[Path] = ()) -> tuple[subprocess.Popen, str]:
    """`memsvc serve` of the checkout `root` (`extra` on its PYTHONPATH) on `data_dir`; returns once it
    answers /v1/health."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memsvc.cli", "serve", "--port", str(port), "--data-dir",
                             str(data_dir)], env=env_for(root, extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server of {root} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(600)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(search, queries: np.ndarray, seconds: float, server_pid: int | None = None) -> dict:
    """`timed` at each batch size, with the CPU time per call of this process and of the server: what a
    call costs, which the load of a shared machine changes much less than its latency."""
    search(queries[:64])  # warm: the memory is opened (snapshot read) on first use
    out = {}
    for batch in BATCHES:
        own, server = time.process_time(), cpu_seconds(server_pid) if server_pid else 0.0
        out[str(batch)] = row = {**timed(search, queries, batch, seconds), "load": os.getloadavg()[0]}
        row["client_cpu_ms"] = 1e3 * (time.process_time() - own) / row["calls"]
        if server_pid:
            row["server_cpu_ms"] = 1e3 * (cpu_seconds(server_pid) - server) / row["calls"]
    return out


def client_main(url: str, seconds: float, queries_path: str, server_pid: int) -> None:
    """In a client process of one checkout: time its RemoteMemory against `url`, print JSON."""
    from memsvc.client import MemoryClient

    queries = np.load(queries_path)
    with MemoryClient(url, timeout=600) as client:
        mem = client.memory("hnsw")
        print(json.dumps(measure(lambda q: mem.search(q, K), queries, seconds, server_pid)))


def build(root: Path, data_dir: Path, n: int, ef: int, rng: np.random.Generator) -> float:
    """The hnsw memory of n random keys, added through the server of `root` in batches of 1,000; insert/s."""
    from memsvc.client import MemoryClient

    proc, url = serve(root, data_dir)
    try:
        with MemoryClient(url, timeout=600) as client:
            mem = client.create_memory("hnsw", dim=DIM, index="hnsw", ef_search=ef)
            t = time.perf_counter()
            for _ in range(0, n, 1000):
                mem.add(rng.standard_normal((1000, DIM), dtype=np.float32))
            return n / (time.perf_counter() - t)
    finally:
        stop(proc)  # a clean stop snapshots the memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout of the code after it")
    parser.add_argument("--after-path", type=Path, nargs="*", default=[],
                        help="directories also on the after side's PYTHONPATH (dependencies it adds)")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ef", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rest-hotpath.json",
                        help="where the rows go")
    parser.add_argument("--client", nargs=4, metavar=("URL", "SECONDS", "QUERIES", "PID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args.client[0], float(args.client[1]), args.client[2], int(args.client[3]))

    rng = np.random.default_rng(18)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, queries_path = Path(tmp) / "data", Path(tmp) / "queries.npy"
        np.save(queries_path, rng.standard_normal((1000, DIM), dtype=np.float32))
        insert = build(args.after, data_dir, args.n, args.ef, rng)
        print(f"built {args.n:,} x {DIM} hnsw m32 ef{args.ef} through REST: {insert:,.0f} inserts/s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        rows = []
        for r in range(args.rounds):
            sides = [("before", args.before, []), ("after", args.after, args.after_path)]
            for side, root, extra in sides if r % 2 == 0 else sides[::-1]:
                proc, url = serve(root, data_dir, extra)
                try:
                    out = subprocess.run([sys.executable, __file__, "--before", ".", "--client", url, str(args.seconds),
                                          str(queries_path), str(proc.pid)], env=env_for(root, extra), check=True,
                                         capture_output=True,
                                         text=True).stdout
                finally:
                    stop(proc)
                rows.append({"side": side, "round": r, **json.loads(out.strip().splitlines()[-1])})
                print(side, r, {b: {k: round(v, 2) for k, v in m.items()} for b, m in rows[-1].items()
                                if b in map(str, BATCHES)}, flush=True)
        sys.path.insert(0, str(args.after.resolve()))
        from memsvc.store import Memory

        mem = Memory.open(data_dir / "memories" / "hnsw")
        rows.append({"side": "in-process", "round": 0, **measure(lambda q: mem.search(q, K), np.load(queries_path),
                                                                  args.seconds)})
        mem.close()
    print("\n| server + client | batch | QPS (median of rounds) | p50 / p99 ms | CPU ms per call: server + client "
          "| load |\n|---|---:|---:|---:|---:|---:|")
    for side in ("before", "after", "in-process"):
        for batch in map(str, BATCHES):
            ms = [row[batch] for row in rows if row["side"] == side]
            med = sorted(ms, key=lambda m: m["qps"])[len(ms) // 2]
            cpu = f"{np.median([m.get('server_cpu_ms', 0) for m in ms]):.2f} + " \
                  f"{np.median([m['client_cpu_ms'] for m in ms]):.2f}"
            print(f"| {side} | {batch} | {np.median([m['qps'] for m in ms]):,.0f} | "
                  f"{med['p50_ms']:.2f} / {med['p99_ms']:.2f} | {cpu} | {min(m['load'] for m in ms):.1f}–"
                  f"{max(m['load'] for m in ms):.1f} |")
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
