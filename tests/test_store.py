"""The store's own guarantees: log replay, torn tails, snapshots, crash safety, concurrency, partitions."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from memsvc.api.errors import http_status
from memsvc.contract import (
    AlreadyExists,
    CorruptLog,
    CorruptSnapshot,
    DataDirInUse,
    InvalidInput,
    MemorySpec,
    MemoryUnavailable,
    NotFound,
)
from memsvc.store import Memory, Store
from memsvc.store.memory import RWLock
from memsvc.store.wal import segment_numbers, segment_path

DIM = 8


def spec(**kw) -> MemorySpec:
    return MemorySpec(**{"name": "m", "dim": DIM, "value_kind": "token", **kw})


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_log_replay_restores_adds_and_deletes(tmp_path):
    m = Memory.create(spec(), tmp_path / "m")
    x = vecs(50)
    m.add(x[:30], values=np.arange(30), partition="a", payloads=[{"i": i} for i in range(30)])
    m.add(x[30:], values=np.arange(30, 50))
    m.delete(ids=[3, 4, 40])
    reopened = Memory.open(tmp_path / "m")
    assert len(reopened) == 47
    got = reopened.get(np.arange(50))
    assert not got.found[[3, 4, 40]].any() and got.found.sum() == 47
    np.testing.assert_array_equal(got.keys[got.found], x[got.found])
    np.testing.assert_array_equal(got.values[got.found], np.arange(50)[got.found])
    assert got.payloads[5] == {"i": 5} and got.partitions[5] == "a" and got.partitions[45] is None
    # new ids continue after the old ones
    assert reopened.add(vecs(1, 9), values=[7])[0] == 50


def test_torn_tail_is_cut_and_earlier_records_survive(tmp_path):
    m = Memory.create(spec(), tmp_path / "m")
    m.add(vecs(10), values=np.arange(10))
    m.add(vecs(10, 1), values=np.arange(10))
    seg = segment_path(tmp_path / "m", 1)
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # a crash in the middle of the second record's write
        f.truncate(size - 17)
    reopened = Memory.open(tmp_path / "m")
    assert len(reopened) == 10
    assert seg.stat().st_size < size - 17  # the torn bytes were cut off
    assert reopened.add(vecs(1), values=[1])[0] == 10  # and the log is writable again
    assert len(Memory.open(tmp_path / "m")) == 11


def test_damage_before_the_newest_segment_is_reported(tmp_path):
    m = Memory.create(spec(), tmp_path / "m")
    m.add(vecs(10), values=np.arange(10))
    m._log.rotate()
    m.add(vecs(10, 1), values=np.arange(10))
    with open(segment_path(tmp_path / "m", 1), "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(CorruptLog):
        Memory.open(tmp_path / "m")


def test_snapshot_then_log_then_reopen(tmp_path):
    m = Memory.create(spec(index="hnsw"), tmp_path / "m")
    x = vecs(300)
    m.add(x[:200], values=np.arange(200), partition="p")
    m.snapshot()
    assert segment_numbers(tmp_path / "m") == [2]  # the covered segment is gone
    m.add(x[200:], values=np.arange(200, 300), partition="q")
    m.delete(ids=np.arange(0, 200, 2))
    m.close()
    (tmp_path / "m" / "snapshot.tmp-99").mkdir()  # a snapshot that crashed half-way is ignored
    r = Memory.open(tmp_path / "m")
    assert len(r) == 200
    assert {p.name: p.count for p in r.stats().partitions} == {"p": 100, "q": 100}
    res = r.search(x[[1, 250]], k=1)
    np.testing.assert_array_equal(res.ids[:, 0], [1, 250])
    assert not (tmp_path / "m" / "snapshot.tmp-99").exists()


def test_partition_search_and_delete_leave_other_partitions_alone(tmp_path):
    m = Memory(spec())
    x = vecs(40)
    m.add(x[:20], values=np.arange(20), partition="s1/l0/h0")
    m.add(x[20:], values=np.arange(20, 40), partition="s1/l0/h1")
    other = m._shards["s1/l0/h1"].index
    res = m.search(x[:20], k=1, partition="s1/l0/h1")
    assert set(res.ids[:, 0]) <= set(range(20, 40))
    assert m.delete(partition="s1/l0/h0") == 20
    assert m._shards["s1/l0/h1"].index is other  # not rebuilt
    assert m.search(x[:1], k=3, partition="s1/l0/h0").ids.tolist() == [[-1, -1, -1]]
    assert np.isinf(m.search(x[:1], k=3, partition="s1/l0/h0").distances).all()
    assert len(m) == 20


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_search_over_many_partitions_equals_one_partition(metric):
    """An unscoped search merges every partition's top k: the same neighbours as one index of everything."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((600, DIM)).astype(np.float32)
    queries = rng.standard_normal((5, DIM)).astype(np.float32)
    split, whole = (Memory(MemorySpec(name=n, dim=DIM, metric=metric)) for n in ("split", "whole"))
    for p in range(200):
        split.add(keys[3 * p:3 * p + 3], partition=f"p{p}")
    whole.add(keys)
    for k in (1, 10, 700):  # 700: more than the memory holds, padded with -1 / +inf
        a, b = split.search(queries, k), whole.search(queries, k)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-5)
    assert (a.ids[:, 600:] == -1).all() and np.isinf(a.distances[:, 600:]).all()


def merged_per_partition(mem: Memory, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole-memory answer the per-partition way: each partition searched alone, the top k merged."""
    found = [mem.search(queries, k, partition=p.name) for p in mem.stats().partitions if p.count]
    ids = np.concatenate([f.ids for f in found], 1)
    dist = np.concatenate([f.distances for f in found], 1)
    order = np.argsort(dist, 1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_whole_memory_search_is_one_index_and_equals_the_per_partition_way(index):
    """Issue 16 #3: a collection keeps a partition per document; an unscoped search is one search of a
    whole-memory index. Deleted partitions and ids stay in it as tombstones, skipped by an id bitmap,
    until they are half of it; then it is dropped and rebuilt on the next unscoped search."""
    kinds = {"flat": {}, "hnsw": {"ef_search": 1024}, "ivfpq": {"nlist": 4, "train_size": 256, "nprobe": 4,
                                                                 "pq_m": 2}}
    mem = Memory(spec(index=index, metric="ip", **kinds[index]))
    keys = vecs(800, seed=5)
    for p in range(100):
        mem.add(keys[8 * p:8 * p + 8], values=np.arange(8 * p, 8 * p + 8), partition=f"doc{p}")
    assert mem.wait_trained(60)
    queries = vecs(6, seed=6)

    def check() -> None:
        for k in (1, 10):
            got = mem.search(queries, k)
            ids, dist = merged_per_partition(mem, queries, k)
            np.testing.assert_array_equal(got.ids, ids)
            np.testing.assert_allclose(got.distances, dist, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got.values, np.where(ids >= 0, ids, -1))  # value i for id i

    check()
    whole = mem._whole
    assert whole is not None and whole.ntotal == 800
    assert mem.delete(partition="doc3") == 8 and mem.delete(ids=[100, 101, 799]) == 3
    assert mem._whole is whole and mem._whole_dead == 11  # a delete is a flag, the index is kept
    check()
    mem.add(keys[:8], values=np.arange(800, 808), partition="doc3")  # a new version, same partition name
    assert mem._whole.ntotal == 808
    assert np.isin(np.arange(800, 808), mem.search(keys[:1], 800).ids).all()
    check()
    for p in range(4, 60):
        mem.delete(partition=f"doc{p}")
    assert mem._whole is None  # more than half tombstones: dropped
    check()
    assert mem._whole is not None and mem._whole.ntotal == len(mem) == 351  # 808 - 8 - 3 - (56 * 8 - 2): ids 100, 101 were in doc12


def test_hnsw_and_ivfpq_deletes_and_training(tmp_path):
    x = vecs(2000, 3)
    h = Memory(spec(index="hnsw"))
    h.add(x, values=np.arange(2000))
    h.delete(ids=[0, 1, 2])
    assert h.search(x[:3], k=1).ids[:, 0].tolist() != [0, 1, 2]
    assert h.search(x[5:6], k=1).ids[0, 0] == 5

    q = Memory(spec(index="ivfpq", nlist=8, pq_m=4, train_size=1000, nprobe=8))
    q.add(x[:500], values=np.arange(500))
    assert not q.stats().trained
    np.testing.assert_array_equal(q.search(x[:5], k=1).ids[:, 0], np.arange(5))  # exact until trained
    q.add(x[500:], values=np.arange(500, 2000))  # crosses train_size: training starts in the background
    np.testing.assert_array_equal(q.search(x[:5], k=1).ids[:, 0], np.arange(5))  # searches go on meanwhile
    assert q.wait_trained(60) and q.stats().trained
    flat = Memory(spec())
    flat.add(x, values=np.arange(2000))
    approx, exact = q.search(x[:100], k=10).ids, flat.search(x[:100], k=10).ids
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.7
    q.delete(ids=np.arange(100))
    assert not np.isin(q.search(x[:100], k=10).ids, np.arange(100)).any()


def issue_12_ivfpq(path: Path) -> tuple[Memory, np.ndarray]:
    """The issue's trained ivfpq memory, durable at `path`, holding its 300 keys."""
    m = Memory.create(MemorySpec(name="x", dim=8, index="ivfpq", nlist=4, pq_m=2, train_size=256, nprobe=4), path)
    keys = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    m.add(keys)
    assert m.wait_trained(60)
    return m, keys


def test_a_snapshot_of_ivfpq_inside_an_id_map_is_rebuilt_not_replayed_over(tmp_path):
    """Snapshots written before the fix hold an IndexIDMap2 around the IVF index whose id table one
    delete has already shifted; replaying a second delete over it aborted the process at every start."""
    m, keys = issue_12_ivfpq(tmp_path / "x")
    m.delete(ids=[0])
    m.snapshot()
    m.delete(ids=[1])  # in the log after the snapshot
    m._log.close()  # a crash: no closing snapshot
    snap = next((tmp_path / "x").glob("snapshot-*"))
    old = faiss.IndexIDMap2(faiss.clone_index(m._template))  # what the old code saved
    old.add_with_ids(keys, np.arange(300))
    old.remove_ids(np.array([0]))
    faiss.write_index(old, str(snap / "index-0.faiss"))
    state = json.loads((snap / "state.json").read_text())
    del state["crc32"]  # old snapshots have no checksums
    (snap / "state.json").write_text(json.dumps(state))

    r = Memory.open(tmp_path / "x")
    assert isinstance(r._shards[None].index, faiss.IndexIVFPQ)  # rebuilt from the snapshot's keys
    assert r.search(keys[-3:], k=1).ids.ravel().tolist() == [297, 298, 299]
    assert r.get([0, 1, 2]).found.tolist() == [False, False, True]
    assert r.delete(ids=[2]) == 1 and len(r) == 297


def test_a_trained_ivfpq_snapshot_is_read_back_and_deletes_keep_working(tmp_path):
    m, keys = issue_12_ivfpq(tmp_path / "x")
    m.delete(ids=[0])
    m.close()  # snapshots
    r = Memory.open(tmp_path / "x")
    index = r._shards[None].index
    assert isinstance(index, faiss.IndexIVFPQ) and index.ntotal == 299  # read, not rebuilt
    for i in (1, 2, 3):
        assert r.delete(ids=[i]) == 1
        assert r.search(keys[-3:], k=1).ids.ravel().tolist() == [297, 298, 299]


@pytest.mark.parametrize("name", ["keys.npy", "index-0.faiss", "template.faiss"])
def test_a_damaged_snapshot_file_is_reported_before_anything_reads_it(tmp_path, name):
    m, _ = issue_12_ivfpq(tmp_path / "x")
    m.close()
    path = next((tmp_path / "x").glob("snapshot-*")) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot, match=name):
        Memory.open(tmp_path / "x")


def test_store_reports_a_memory_it_cannot_open_and_serves_the_others(tmp_path):
    s = Store(tmp_path)
    s.create(spec(name="good")).add(vecs(5), values=np.arange(5))
    s.create(spec(name="bad")).add(vecs(5), values=np.arange(5))
    s.close()
    (tmp_path / "memories" / "bad" / "wal-00000002.log").write_bytes(b"")  # segment 2 began: 1 is not the tail
    with open(tmp_path / "memories" / "bad" / "snapshot-00000002" / "ids.npy", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    s = Store(tmp_path)
    for _ in range(2):  # the first failure is remembered, not retried on every call
        with pytest.raises(MemoryUnavailable, match="memory 'bad' is unavailable.*ids.npy") as err:
            s.get("bad")
        assert (http_status(err.value), err.value.code, err.value.field) == (503, "memory_unavailable", "name")
    assert s.get("good").search(vecs(5)[:1], k=1).ids[0, 0] == 0
    s.drop("bad")
    assert len(s.create(spec(name="bad"))) == 0
    s.close()


def test_compaction_keeps_ids_stable():
    m = Memory(spec())
    x = vecs(10000, 4)
    m.add(x, values=np.arange(10000))
    m.delete(ids=np.arange(0, 9000))
    assert m._keys.size == 1000  # compacted
    got = m.get([9000, 9999, 5])
    assert got.found.tolist() == [True, True, False]
    np.testing.assert_array_equal(got.values[:2], [9000, 9999])
    assert m.search(x[9500:9501], k=1).ids[0, 0] == 9500


def test_bad_input_stores_nothing(tmp_path):
    m = Memory.create(spec(value_kind="vector", value_dim=3), tmp_path / "m")
    good = vecs(2)
    bad = [
        {"keys": np.zeros((2, DIM + 1), np.float32), "values": np.zeros((2, 3), np.float32)},
        {"keys": np.full((2, DIM), np.nan, np.float32), "values": np.zeros((2, 3), np.float32)},
        {"keys": np.zeros((0, DIM), np.float32), "values": np.zeros((0, 3), np.float32)},
        {"keys": np.zeros((2, DIM), np.int64), "values": np.zeros((2, 3), np.float32)},
        {"keys": good, "values": np.zeros((3, 3), np.float32)},
        {"keys": good, "values": np.zeros((2, 4), np.float32)},
        {"keys": good, "values": None},
        {"keys": good, "values": np.zeros((2, 3), np.float32), "payloads": [object(), 1]},
        {"keys": good, "values": np.zeros((2, 3), np.float32), "partition": ""},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInput) as err:
            m.add(**kwargs)
        assert err.value.field in {"keys", "values", "payloads", "partition"}
    for k in (0, -1, 10**6, 2.5):
        with pytest.raises(InvalidInput):
            m.search(good, k=k)
    with pytest.raises(InvalidInput):
        m.delete()
    assert len(m) == 0 and m.log_bytes == 0
    assert len(Memory.open(tmp_path / "m")) == 0


def test_store_create_get_drop(tmp_path):
    s = Store(tmp_path, interval=0.05, snapshot_bytes=1)
    mem = s.create(spec())
    with pytest.raises(AlreadyExists):
        s.create(spec())
    mem.add(vecs(5), values=np.arange(5))
    deadline = time.time() + 5
    snapshots = tmp_path / "memories" / "m"
    while not list(snapshots.glob("snapshot-*")) and time.time() < deadline:  # the background thread
        time.sleep(0.05)
    assert list(snapshots.glob("snapshot-*"))
    with pytest.raises(DataDirInUse):  # one process per data dir
        Store(tmp_path)
    s.close()
    (tmp_path / "memories" / "half").mkdir()  # a create interrupted before spec.json
    s2 = Store(tmp_path)
    assert s2.names() == ["m"] and len(s2.get("m")) == 5
    s2.drop("m")
    with pytest.raises(NotFound):
        s2.get("m")
    assert s2.names() == []
    assert len(s2.create(spec(name="half"))) == 0
    s2.close()


HOLDER = """
import fcntl, sys
from pathlib import Path
lock = open(Path(sys.argv[1]) / ".lock", "r+")
if sys.argv[2] == "pid":
    from memsvc.store.store import hold_data_dir
    lock.close()
    lock = hold_data_dir(sys.argv[1])
else:  # a holder that writes no pid (the lock file keeps what an earlier holder wrote)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def held_by_another_process(root: Path, mode: str) -> subprocess.Popen:
    """A child process holding `root` (mode "pid": as memsvc does, its pid written; "raw": a bare flock)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline() == "held\n"
    return proc


def test_data_dir_in_use_names_its_holder_truly(tmp_path):
    """DataDirInUse said "another memsvc process" when this process held the directory."""
    s = Store(tmp_path)
    for _ in range(2):  # a second Store in this process, then again: the lock stays ours
        with pytest.raises(DataDirInUse) as err:
            Store(tmp_path)
        assert err.value.message == (f"{tmp_path} is already open in this process (pid {os.getpid()}): close the "
                                     "Store or Service that holds it before opening it again")
        assert (err.value.ours, err.value.holder, err.value.field) == (True, os.getpid(), "data_dir")
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    s.close()
    # Closed: another process takes it (its pid replaces ours in the lock file) and is named by its pid.
    proc = held_by_another_process(tmp_path, "pid")
    try:
        with pytest.raises(DataDirInUse) as err:
            Store(tmp_path)
        assert err.value.message == (f"{tmp_path} is in use by another memsvc process (pid {proc.pid}: a server "
                                     "or an embedded command)")
        assert (err.value.ours, err.value.holder) == (False, proc.pid)
        assert (tmp_path / ".lock").read_text() == f"{proc.pid}\n"  # a refused open truncates nothing
    finally:
        proc.communicate("")
    Store(tmp_path).close()  # released with the process; our pid is in the file again, stale once closed
    proc = held_by_another_process(tmp_path, "raw")
    try:
        with pytest.raises(DataDirInUse) as err:
            Store(tmp_path)
        # The file still names this process, which no longer holds it: neither "this process" nor our pid.
        assert err.value.message == f"{tmp_path} is in use by another memsvc process (a server or an embedded command)"
        assert (err.value.ours, err.value.holder) == (False, None)
    finally:
        proc.communicate("")
    Store(tmp_path).close()


def test_rwlock_readers_share_and_a_waiting_writer_goes_first():
    lock, order = RWLock(), []

    def take(kind: str) -> None:
        with lock.write() if kind == "w" else lock.read():
            order.append(kind)

    with lock.read(), lock.read():  # readers share
        writer = threading.Thread(target=take, args=("w",))
        writer.start()
        while not lock._waiting_writers:
            time.sleep(0.001)
        reader = threading.Thread(target=take, args=("r",))
        reader.start()
        time.sleep(0.1)
        assert order == []  # the writer waits for the readers, the late reader for the writer
    writer.join(5)
    reader.join(5)
    assert order == ["w", "r"]


def test_searches_run_while_adds_happen():
    m = Memory(spec())
    x = vecs(20000, 5)
    m.add(x[:1000], values=np.arange(1000))
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                res = m.search(x[:16], k=5)
                assert (res.ids[:, 0] == np.arange(16)).all()
                assert ((res.values == res.ids) | (res.ids < 0)).all()
        except BaseException as exc:  # noqa: BLE001 - collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for start in range(1000, 20000, 500):  # a partition per add, and every other one deleted again:
        m.add(x[start:start + 500], values=np.arange(start, start + 500), partition=f"p{start}")
        if start % 1000 == 0 and start >= 2000:  # the whole-memory index is built, grows and loses entries
            m.delete(partition=f"p{start - 500}")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(m) == 20000 - 18 * 500


WRITER = r"""
import sys, numpy as np
from memsvc.store import Memory
from memsvc.contract import MemorySpec
path = sys.argv[1]
m = Memory.create(MemorySpec(name="m", dim=8, value_kind="token"), path)
rng = np.random.default_rng(0)
for batch in range(100000):
    n = int(rng.integers(1, 50))
    keys = np.full((n, 8), batch, dtype=np.float32)
    ids = m.add(keys, values=np.full(n, batch), payloads=[{"batch": batch}] * n)
    print(batch, ids[0], ids[-1], flush=True)
"""


def test_sigkill_during_adds_loses_no_acknowledged_entry(tmp_path):
    """A writer process is SIGKILLed mid-stream; every add it reported done must be there, whole."""
    for attempt, delay in enumerate((0.7, 1.3)):
        path = tmp_path / f"m{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parents[1])
        first = proc.stdout.readline()  # the first acknowledged add: start-up takes seconds more on a loaded machine
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out = first + out
        # only whole lines: the kill may cut the last one anywhere, even inside a number
        acked = [tuple(map(int, line.split())) for line in out.split("\n")[:-1]]
        assert len(acked) > 10, "the writer did not get going"
        m = Memory.open(path)
        last_batch, _, last_id = acked[-1]
        got = m.get(np.arange(last_id + 1))
        assert got.found.all(), "an acknowledged entry is missing"
        # nothing half-written: every stored entry is a whole batch with consistent key, value, payload
        n = len(m)
        everything = m.get(np.arange(n))
        assert everything.found.all()
        batches = everything.values
        np.testing.assert_array_equal(everything.keys, np.repeat(batches[:, None], DIM, axis=1).astype(np.float32))
        assert [p["batch"] for p in everything.payloads] == batches.tolist()
        assert batches[-1] in (last_batch, last_batch + 1)  # at most the one in flight, and whole
        counts = np.bincount(batches)
        first = {b: lo for b, lo, _ in acked}
        for b, lo, hi in acked:
            assert counts[b] == hi - lo + 1
        assert len(first) == len(acked)
