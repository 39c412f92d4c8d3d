"""Load: 32 concurrent clients run a mix of add/search/delete against one real server for 15 s; no
request may fail, the memory must add up afterwards, and p50/p99 per operation are printed (`-s`)."""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import numpy as np
from conftest import ServerProcess

from memsvc.client import AsyncMemoryClient, MemoryClient

CLIENTS, SECONDS, DIM, PREFILL = 32, 15.0, 64, 10_000
MIX = {"add": 0.3, "search": 0.6, "delete": 0.1}
ADD_ROWS, QUERIES, K, DELETE_IDS = 16, 8, 10, 8


async def run_client(url: str, number: int, deadline: float, latencies: dict[str, list[float]],
                     errors: list[str]) -> tuple[int, int, list[int]]:
    """One client's loop until the deadline; returns (added, deleted, ids it still holds)."""
    rng = np.random.default_rng(number)
    added = deleted = 0
    own: list[int] = []
    async with AsyncMemoryClient(url) as client:
        mem = await client.memory("load")
        while time.monotonic() < deadline:
            op = rng.choice(list(MIX), p=list(MIX.values()))
            start = time.perf_counter()
            try:
                if op == "add":
                    ids = await mem.add(rng.standard_normal((ADD_ROWS, DIM), dtype=np.float32),
                                        values=rng.integers(0, 50_000, ADD_ROWS), partition=f"client-{number}")
                    own.extend(ids.tolist())
                    added += len(ids)
                elif op == "search":
                    res = await mem.search(rng.standard_normal((QUERIES, DIM), dtype=np.float32), k=K)
                    assert res.ids.shape == (QUERIES, K) and (res.ids >= 0).all()
                elif own:
                    victims, own = own[:DELETE_IDS], own[DELETE_IDS:]
                    assert await mem.delete(ids=victims) == len(victims)
                    deleted += len(victims)
                else:
                    continue
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"client {number} {op}: {type(exc).__name__}: {exc}")
                continue
            latencies[op].append(time.perf_counter() - start)
    return added, deleted, own


async def run_load(url: str) -> tuple[dict[str, list[float]], list[str], list[tuple[int, int, list[int]]]]:
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    deadline = time.monotonic() + SECONDS
    results = await asyncio.gather(*(run_client(url, i, deadline, latencies, errors) for i in range(CLIENTS)))
    return latencies, errors, results


def table(latencies: dict[str, list[float]]) -> str:
    rows = ["| operation | requests | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for op in MIX:
        ms = np.array(latencies[op]) * 1000
        rows.append(f"| {op} | {len(ms)} | {len(ms) / SECONDS:.0f} | {np.percentile(ms, 50):.1f} | "
                    f"{np.percentile(ms, 99):.1f} |")
    return "\n".join(rows)


def test_32_clients_mixed_load_without_errors(tmp_path):
    with ServerProcess(tmp_path / "data") as srv:
        mem = MemoryClient(srv.url).create_memory("load", dim=DIM, value_kind="token")
        mem.add(np.random.default_rng(99).standard_normal((PREFILL, DIM), dtype=np.float32),
                values=np.arange(PREFILL))

        latencies, errors, results = asyncio.run(run_load(srv.url))

        print(f"\n{CLIENTS} clients, {SECONDS:.0f} s, dim {DIM}, {PREFILL} entries before; add {ADD_ROWS} rows, "
              f"search {QUERIES} queries k={K}, delete {DELETE_IDS} ids\n{table(latencies)}")
        assert errors == [], errors[:5]
        assert all(len(latencies[op]) > 10 for op in MIX), {op: len(v) for op, v in latencies.items()}
        added = sum(a for a, _, _ in results)
        deleted = sum(d for _, d, _ in results)
        assert mem.stats().count == PREFILL + added - deleted
        kept = np.array([i for _, _, own in results for i in own], dtype=np.int64)
        assert mem.get(kept).found.all()
