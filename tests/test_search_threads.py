"""Threads chosen per search call (issue 18): a small batch runs on the calling thread alone, a large one
on the caller's OpenMP threads; the choice is per thread, so concurrent searches never see each other's."""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from memsvc.store import Memory, MemorySpec
from memsvc.store.index import QUERIES_PER_THREAD, search_threads, threads_for

DIM = 16


def vecs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture
def omp_threads():
    """Set this thread's OpenMP thread count for the test; put the old one back afterwards."""
    before = faiss.omp_get_max_threads()
    yield faiss.omp_set_num_threads
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("n, available, expected", [
    (1, 8, 1), (QUERIES_PER_THREAD - 1, 8, 1), (QUERIES_PER_THREAD, 8, 1), (2 * QUERIES_PER_THREAD, 8, 2),
    (64, 8, 4), (64, 2, 2), (100_000, 8, 8), (100_000, 1, 1), (1, 1, 1),
])
def test_rule_one_thread_for_small_batches_the_cores_for_large(n, available, expected):
    assert search_threads(n, available) == expected


def test_omp_thread_count_is_per_calling_thread(omp_threads):
    """What the rule relies on: setting the count in one thread leaves every other thread's as it was."""
    omp_threads(3)
    seen = {}

    def other() -> None:
        seen["start"] = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        seen["set"] = faiss.omp_get_max_threads()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["set"] == 1
    assert seen["start"] != 3  # a new thread starts from the process default, not from this thread's 3
    assert faiss.omp_get_max_threads() == 3


def test_threads_for_restores_the_callers_setting(omp_threads):
    omp_threads(4)
    with threads_for(1) as used:
        assert used == 1 and faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == 4
    with pytest.raises(RuntimeError), threads_for(1):
        raise RuntimeError("a failed search")
    assert faiss.omp_get_max_threads() == 4
    with threads_for(10 * QUERIES_PER_THREAD) as used:
        assert used == 4  # capped by the caller's own setting
    omp_threads(1)
    with threads_for(10 * QUERIES_PER_THREAD) as used:
        assert used == 1  # OMP_NUM_THREADS=1 stays one thread


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_results_identical_at_any_thread_count(index, metric, omp_threads):
    mem = Memory(MemorySpec(name="m", dim=DIM, metric=metric, index=index))
    omp_threads(1)  # the build is not what is compared (and many threads crawl on a busy machine)
    mem.add(vecs(3000, seed=1), partition="a")
    mem.add(vecs(1000, seed=2))
    queries = vecs(64, seed=3)
    results = []
    for threads in (1, 2, 4):
        omp_threads(threads)
        results.append(mem.search(queries, k=10))
    one_by_one = [mem.search(q[None], k=10) for q in queries]
    for r in results[1:] + [None]:
        other = r if r is not None else type(results[0])(
            ids=np.concatenate([x.ids for x in one_by_one]),
            distances=np.concatenate([x.distances for x in one_by_one]))
        np.testing.assert_array_equal(other.ids, results[0].ids)
        np.testing.assert_allclose(other.distances, results[0].distances, rtol=1e-5, atol=1e-5)


def test_search_runs_small_batches_on_one_thread_even_while_large_ones_run(monkeypatch, omp_threads):
    """Each FAISS search sees the thread count its own batch calls for, with searches of other sizes
    running in other threads at the same time (a process-wide setting would leak between them)."""
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()
    search = faiss.IndexIDMap2.search

    def spy(self, x, k, *args, **kwargs):
        with lock:
            seen.append((len(x), faiss.omp_get_max_threads()))
        return search(self, x, k, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexIDMap2, "search", spy)
    mem = Memory(MemorySpec(name="m", dim=DIM, index="hnsw"))
    omp_threads(1)
    mem.add(vecs(2000, seed=1))
    queries = vecs(64, seed=2)
    errors: list[BaseException] = []

    def client(batch: int) -> None:
        try:
            faiss.omp_set_num_threads(4)
            for i in range(40):
                mem.search(queries[:batch], k=5)
                assert faiss.omp_get_max_threads() == 4
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(b,)) for b in (1, 64, 1, 64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(set(seen)) == [(1, 1), (64, 4)]
    assert len(seen) == 160


def test_the_benchmarks_before_server_starts_the_cli_with_the_rule_switched_off():
    """bench/bench_peers.py measures the server as before the rule by running BEFORE_SERVER (python -c) with
    `memsvc serve`'s arguments: it must still reach the CLI (it once imported a name the CLI no longer exports,
    and the benchmark's A/B silently lost its REST rows)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_peers.py"
    spec = importlib.util.spec_from_file_location("bench_peers", path)
    bench_peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_peers)
    probe = bench_peers.BEFORE_SERVER.replace("app()", "print(fx.threads_for(1)); app()")
    out = subprocess.run([sys.executable, "-c", probe, "serve", "--help"], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nullcontext" in out.stdout and "--data-dir" in out.stdout
