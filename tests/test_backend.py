"""One suite, every backend: the in-process Memory (in RAM, and durable through the Service), the
RemoteMemory of a live server, and the Milvus backend on milvus-lite and on a real Milvus server must
behave identically, down to the errors they raise."""
from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerProcess

from memsvc.client import MemoryClient
from memsvc.config import Settings
from memsvc.contract import MAX_NORM, MIN_NORM, InvalidInput, MemoryBackend, spec_from
from memsvc.service import Service
from memsvc.store import Memory

DIM = 16
MILVUS_CONFIGURED = Settings().vector_backend == "milvus"  # MEMSVC_VECTOR_BACKEND=milvus: the Service uses it too
KINDS = {"flat": {}, "hnsw": {"hnsw_m": 16},
         "ivfpq": {"nlist": 8, "train_size": 256, "nprobe": 8, "pq_m": 4}}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with Service(Settings(data_dir=tmp_path_factory.mktemp("service"))) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(server):
    with MemoryClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    from memsvc.store.milvus import MilvusStore

    store = MilvusStore(str(tmp_path_factory.mktemp("milvus") / "m.db"))
    yield store
    store.close()


@pytest.fixture(scope="module")
def milvus_on_server(milvus_server):
    """The Milvus backend on a real Milvus server (tests/milvus_server.py)."""
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    from memsvc.store.milvus import MilvusStore

    store = MilvusStore(milvus_server.uri)
    yield store
    for name in store.names():
        store.drop(name)
    store.close()


@pytest.fixture(params=["memory", "durable", "remote", "milvus", "milvus-server"])
def make(request):
    """make(**spec) -> a new, empty memory of the backend under test."""

    def make(**spec) -> MemoryBackend:
        spec = {"dim": DIM, **spec}
        name = f"t-{uuid.uuid4().hex[:12]}"
        if request.param == "memory":
            return Memory(spec_from(name=name, **spec))
        on_milvus = request.param == "milvus" or (request.param != "memory" and MILVUS_CONFIGURED)
        if on_milvus and spec.get("index") == "ivfpq":
            pytest.skip("milvus-lite has no IVF_PQ index")
        if request.param in ("milvus", "milvus-server"):
            store = request.getfixturevalue("milvus" if request.param == "milvus" else "milvus_on_server")
            return store.create(spec_from(name=name, **spec))
        owner = request.getfixturevalue("service" if request.param == "durable" else "client")
        return owner.create_memory(name, **spec)

    return make


def vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def exact(keys: np.ndarray, queries: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k with the store's distances (smaller is closer)."""
    if metric == "l2":
        d = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    elif metric == "ip":
        d = -queries @ keys.T
    else:
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        d = 1 - qn @ kn.T
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d, ids, 1)


def test_is_a_memory_backend(make):
    mem = make()
    assert isinstance(mem, MemoryBackend)
    assert mem.spec.dim == DIM and mem.stats().count == 0


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_flat_search_is_exact(make, metric):
    mem = make(metric=metric)
    keys, queries = vecs(300), vecs(7, seed=1)
    np.testing.assert_array_equal(mem.add(keys), np.arange(300))
    res = mem.search(queries, k=10)
    ids, dist = exact(keys, queries, metric, 10)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.distances, dist, rtol=1e-4, atol=1e-4)
    assert res.ids.dtype == np.int64 and res.distances.dtype == np.float32
    assert res.values is None and res.payloads is None


@pytest.mark.parametrize("index", ["hnsw", "ivfpq"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_approximate_indexes_find_stored_keys(make, index, metric):
    mem = make(metric=metric, index=index, **KINDS[index])
    keys = vecs(400)
    mem.add(keys[:200], partition="a")
    mem.add(keys[200:])
    deadline = time.monotonic() + 60  # ivfpq trains in the background once it holds train_size entries
    while not mem.stats().trained and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = mem.stats()
    assert stats.count == 400 and stats.trained
    res = mem.search(keys[::40], k=10)
    assert (np.diff(res.distances, axis=1) >= 0).all()
    truth, _ = exact(keys, keys[::40], metric, 10)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(res.ids, truth)])
    assert recall >= (0.9 if index == "hnsw" else 0.5)


@pytest.mark.parametrize("index", list(KINDS))
def test_missing_neighbours_are_padded(make, index):
    mem = make(value_kind="token", index=index, **KINDS[index])
    mem.add(vecs(3), values=[7, 8, 9], payloads=["x", None, {"y": 1}])
    res = mem.search(vecs(2, seed=1), k=5)
    assert res.ids.shape == res.distances.shape == res.values.shape == (2, 5)
    assert (res.ids[:, 3:] == -1).all() and np.isinf(res.distances[:, 3:]).all()
    assert (res.values[:, 3:] == -1).all() and all(row[3:] == [None, None] for row in res.payloads)
    assert sorted(res.ids[0, :3]) == [0, 1, 2]
    assert [res.values[0, j] - 7 for j in range(3)] == list(res.ids[0, :3])


def test_token_values_and_payloads_round_trip(make):
    mem = make(value_kind="token", metric="ip")
    keys = vecs(50)
    payloads = [{"doc": f"d{i}", "pos": [i, i + 1]} if i % 3 else None for i in range(50)]
    ids = mem.add(keys, values=np.arange(1000, 1050), payloads=payloads, partition="p")
    res = mem.search(keys[:4], k=3)
    assert res.values.dtype == np.int64
    np.testing.assert_array_equal(res.values, res.ids + 1000)
    assert res.payloads == [[payloads[i] for i in row] for row in res.ids]
    got = mem.get([ids[5], 999, ids[6]])
    np.testing.assert_array_equal(got.found, [True, False, True])
    np.testing.assert_array_equal(got.keys[[0, 2]], keys[[5, 6]])
    assert (got.keys[1] == 0).all()
    np.testing.assert_array_equal(got.values, [1005, -1, 1006])
    assert got.payloads == [payloads[5], None, payloads[6]]
    assert got.partitions == ["p", None, "p"]


def test_vector_values_round_trip(make):
    mem = make(value_kind="vector", value_dim=5, metric="cosine")
    keys, values = vecs(20), vecs(20, seed=2, dim=5)
    mem.add(keys, values=values)
    res = mem.search(keys[:3], k=4)
    assert res.values.shape == (3, 4, 5) and res.values.dtype == np.float32
    np.testing.assert_array_equal(res.values, values[res.ids])
    np.testing.assert_array_equal(mem.get([2, 50]).values, np.stack([values[2], np.zeros(5, np.float32)]))


def test_partitions_scope_search_and_delete(make):
    mem = make(value_kind="token")
    a, b = vecs(30), vecs(30, seed=1)
    ids_a = mem.add(a, values=np.zeros(30, int), partition="session-1/layer-3")
    ids_b = mem.add(b, values=np.ones(30, int), partition="session-2/layer-3")
    res = mem.search(b[:5], k=10, partition="session-1/layer-3")
    assert np.isin(res.ids, ids_a).all() and (res.values == 0).all()
    assert (mem.search(a[:2], k=3, partition="nowhere").ids == -1).all()
    parts = {p.name: p.count for p in mem.stats().partitions}
    assert parts == {"session-1/layer-3": 30, "session-2/layer-3": 30}

    assert mem.delete(ids=ids_b[:5], partition="session-1/layer-3") == 0  # ids of another partition
    assert mem.delete(ids=ids_b[:5], partition="session-2/layer-3") == 5
    assert mem.delete(partition="session-1/layer-3") == 30
    assert mem.delete(partition="session-1/layer-3") == 0
    assert mem.stats().count == 25
    res = mem.search(a[:3], k=40)
    assert set(res.ids[res.ids >= 0].tolist()) == set(ids_b[5:].tolist())
    assert not mem.get(ids_a).found.any()


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_batched_search_over_partitions_equals_one_search_per_partition(make, index):
    """Issue 15: one call searches each query row in its own partition (None: the whole memory), as a
    KV head's queries search that head's partition; every row equals its own single-partition search,
    and flat (and hnsw visiting every entry) is exact within the row's partition."""
    mem = make(index=index, value_kind="vector", value_dim=3, **({"ef_search": 512} if index == "hnsw" else {}))
    keys = vecs(90, seed=3)
    values = np.repeat(np.arange(90, dtype=np.float32)[:, None], 3, axis=1)
    ids = {p: mem.add(keys[30 * i:30 * i + 30], values=values[30 * i:30 * i + 30], partition=p)
           for i, p in enumerate(["l0/h0", "l0/h1", "l0/h2"])}
    queries = vecs(8, seed=4)
    partitions = ["l0/h2", "l0/h0", "l0/h0", None, "nowhere", "l0/h1", "l0/h2", "l0/h1"]
    res = mem.search(queries, k=5, partitions=partitions)
    assert res.ids.shape == (8, 5) and res.values.shape == (8, 5, 3)
    for i, part in enumerate(partitions):
        one = mem.search(queries[i:i + 1], k=5, partition=part)
        np.testing.assert_array_equal(res.ids[i], one.ids[0])
        np.testing.assert_allclose(res.distances[i], one.distances[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(res.values[i], one.values[0])
        if part == "nowhere":
            assert (res.ids[i] == -1).all() and np.isinf(res.distances[i]).all()
            continue
        scope = np.arange(90) if part is None else ids[part]
        truth, dist = exact(keys[scope], queries[i:i + 1], "l2", 5)
        np.testing.assert_array_equal(res.ids[i], scope[truth[0]])
        np.testing.assert_allclose(res.distances[i], dist[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(res.values[i, :, 0], scope[truth[0]])
    assert mem.delete(partition="l0/h0") == 30
    res = mem.search(queries[:3], k=5, partitions=["l0/h0", "l0/h1", None])
    assert (res.ids[0] == -1).all() and np.isin(res.ids[1], ids["l0/h1"]).all()
    assert not np.isin(res.ids[2], ids["l0/h0"]).any()


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_batched_add_over_partitions_equals_one_add_per_partition(make, index):
    """Issue 15: one call adds each key row to its own partition (None: unpartitioned), as a layer's evictions
    go to one partition per KV head; ids are consecutive in row order and every entry is where a
    single-partition add would have put it: same partition counts, same values, same search answers."""
    mem = make(index=index, value_kind="vector", value_dim=2, **({"ef_search": 512} if index == "hnsw" else {}))
    keys = vecs(12, seed=5)
    values = np.repeat(np.arange(12, dtype=np.float32)[:, None], 2, axis=1)
    partitions = ["l3/h0", "l3/h1", "l3/h2", None] * 3
    ids = mem.add(keys, values=values, payloads=[f"p{i}" for i in range(12)], partitions=partitions)
    np.testing.assert_array_equal(ids, ids[0] + np.arange(12))
    assert {p.name: p.count for p in mem.stats().partitions} == {"l3/h0": 3, "l3/h1": 3, "l3/h2": 3, None: 3}
    got = mem.get(ids)
    assert got.partitions == partitions and got.payloads == [f"p{i}" for i in range(12)]
    np.testing.assert_array_equal(got.values, values)
    res = mem.search(keys[:4], k=3, partitions=partitions[:4])
    for row in range(3):  # each head's partition holds exactly its rows, nearest first
        truth, _ = exact(keys[row::4], keys[row:row + 1], "l2", 3)
        np.testing.assert_array_equal(res.ids[row], ids[row::4][truth[0]])
    assert mem.delete(partition="l3/h1") == 3
    assert {p.name: p.count for p in mem.stats().partitions} == {"l3/h0": 3, "l3/h2": 3, None: 3}


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_batched_add_survives_a_restart(tmp_path, snapshot):
    """Replayed from its one log record (or read back from a snapshot), a batched add's rows are in their
    partitions again."""
    spec = spec_from(name="batched", dim=DIM, value_kind="token")
    mem = Memory.create(spec, tmp_path / "m")
    ids = mem.add(vecs(6), values=np.arange(6), partitions=["a", "b", "a", None, "b", "a"])
    mem.close(snapshot=snapshot)
    mem = Memory.open(tmp_path / "m")
    assert {p.name: p.count for p in mem.stats().partitions} == {"a": 3, "b": 2, None: 1}
    assert mem.get(ids).partitions == ["a", "b", "a", None, "b", "a"]
    found = mem.search(vecs(6)[:1], k=4, partition="a").ids[0]
    assert found[0] == ids[0] and set(found[:3].tolist()) == set(ids[[0, 2, 5]].tolist()) and found[3] == -1
    mem.close()


def test_delete_by_ids(make):
    mem = make()
    keys = vecs(10)
    ids = mem.add(keys)
    assert mem.delete(ids=[ids[1], ids[3], 12345]) == 2
    assert mem.delete(ids=[ids[1]]) == 0
    assert mem.stats().count == 8
    res = mem.search(keys[[1, 3]], k=8)
    assert not np.isin([ids[1], ids[3]], res.ids).any()
    np.testing.assert_array_equal(mem.get(ids).found, [i not in (1, 3) for i in range(10)])


def wait_trained(mem: MemoryBackend, timeout: float = 60) -> None:
    """ivfpq trains in the background once it holds train_size entries (also after a restart's replay)."""
    deadline = time.monotonic() + timeout
    while not mem.stats().trained and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mem.stats().trained


def test_issue_12_deleting_from_a_trained_ivfpq_keeps_the_ids(make):
    """The issue's input: the first delete shifted every later id by one, the second aborted the process."""
    mem = make(dim=8, index="ivfpq", nlist=4, pq_m=2, train_size=256, nprobe=4)
    keys = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    mem.add(keys)
    wait_trained(mem)
    assert mem.search(keys[-3:], k=1).ids.ravel().tolist() == [297, 298, 299]
    assert mem.delete(ids=[0]) == 1
    assert mem.search(keys[-3:], k=1).ids.ravel().tolist() == [297, 298, 299]
    assert mem.delete(ids=[1]) == 1
    assert mem.delete(ids=[2, 3, 150]) == 3
    assert mem.search(keys[-3:], k=1).ids.ravel().tolist() == [297, 298, 299]
    assert mem.search(keys[[4, 151]], k=1).ids.ravel().tolist() == [4, 151]
    assert mem.stats().count == 295


# Every kind answers exactly here, so a delete is checked against the kind's own answer over what remains:
# hnsw with ef_search above the entry count visits every entry; ivfpq with nprobe = nlist scans every
# code, and the distance to a code does not depend on what else the index holds.
EXHAUSTIVE = {"flat": {}, "hnsw": {"hnsw_m": 16, "ef_search": 512},
              "ivfpq": {"nlist": 8, "train_size": 256, "nprobe": 8, "pq_m": 4}}


class DeleteScenario:
    """400 entries in partitions a, b and none; `steps` deletes by single ids (twice: the second single
    delete aborted ivfpq), by ids across partitions, by ids within a partition, and a whole partition.
    `check` compares a search with the reference: before any delete, each query's distance to every
    entry as the memory itself ranks them; over the remaining entries the same distances must come back."""

    def __init__(self, mem: MemoryBackend, metric: str = "l2"):
        self.keys = vecs(400, seed=7)
        self.ids = {"a": mem.add(self.keys[:200], partition="a"), "b": mem.add(self.keys[200:350], partition="b"),
                    None: mem.add(self.keys[350:])}
        wait_trained(mem)
        self.queries = np.concatenate([self.keys[[5, 150, 201, 399]], vecs(4, seed=8)])
        res = mem.search(self.queries, k=400)
        assert (res.ids >= 0).all()
        if mem.spec.index != "ivfpq":  # flat and exhaustive hnsw: exact search
            _, dist = exact(self.keys, self.queries, metric, 400)
            np.testing.assert_allclose(res.distances, dist, rtol=1e-4, atol=1e-4)
        self.reference = [dict(zip(i.tolist(), d.tolist())) for i, d in zip(res.ids, res.distances)]
        self.alive = set(range(400))

    def steps(self) -> list[tuple[Callable[[MemoryBackend], int], set[int]]]:
        """The deletes in order: (call on a memory, the ids it deletes)."""
        a, b, none = self.ids["a"], self.ids["b"], self.ids[None]
        across = np.concatenate([a[10:60:3], b[:2], none[-1:], [10_000]])
        within = np.concatenate([a[100:105], b[10:20]])
        return [(lambda m: m.delete(ids=[a[0]]), {a[0]}),
                (lambda m: m.delete(ids=[a[1]]), {a[1]}),
                (lambda m: m.delete(ids=across), set(across[:-1].tolist())),
                (lambda m: m.delete(ids=within, partition="b"), set(b[10:20].tolist())),
                (lambda m: m.delete(partition="b"), set(b.tolist()) - {*b[:2].tolist(), *b[10:20].tolist()})]

    def delete(self, mem: MemoryBackend, step: tuple[Callable[[MemoryBackend], int], set[int]]) -> None:
        call, gone = step
        assert call(mem) == len(gone)
        self.alive -= gone

    def check(self, mem: MemoryBackend) -> None:
        assert mem.stats().count == len(self.alive)
        for k in (1, 10, len(self.alive) + 5):
            self._compare(mem.search(self.queries, k=k), k, None)
        for part in ("a", "b"):
            self._compare(mem.search(self.queries, k=10, partition=part), 10, self.alive & set(self.ids[part].tolist()))
        found = mem.get(np.arange(400)).found
        assert set(np.flatnonzero(found).tolist()) == self.alive

    def _compare(self, res, k: int, scope: set[int] | None) -> None:
        scope = self.alive if scope is None else scope
        n = min(k, len(scope))
        assert (res.ids[:, n:] == -1).all() and np.isinf(res.distances[:, n:]).all()
        for ids, dist, ref in zip(res.ids[:, :n], res.distances[:, :n], self.reference):
            assert set(ids.tolist()) <= scope and len(set(ids.tolist())) == n  # nothing deleted, no -1
            np.testing.assert_allclose(dist, [ref[i] for i in ids], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dist, sorted(ref[i] for i in scope)[:n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", list(EXHAUSTIVE))
def test_delete_then_search_equals_search_over_the_remaining_entries(make, index):
    mem = make(index=index, **EXHAUSTIVE[index])
    scenario = DeleteScenario(mem)
    scenario.check(mem)
    for step in scenario.steps():
        scenario.delete(mem, step)
        scenario.check(mem)


class Durable:
    """A Service on a data dir. A crash is a copy of the dir taken while it runs (acknowledged writes are
    on disk, nothing else is flushed): the copy is opened and the log replayed; a clean restart closes the
    service (which snapshots) and opens the same dir again."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0
        self.svc = Service(Settings(data_dir=root / "d0"))

    def create(self, name: str, **spec) -> MemoryBackend:
        return self.svc.create_memory(name, dim=DIM, **spec)

    def memory(self, name: str) -> MemoryBackend:
        return self.svc.memory(name)

    def tune(self, name: str, **params: int) -> None:
        self.svc.set_search_params(name, **params)
        assert {spec.name: spec for spec in self.svc.list_memories()}[name].model_dump(include=set(params)) == params

    def restart(self, crash: bool) -> None:
        data_dir = self.svc.settings.data_dir
        if crash:
            self.n += 1
            data_dir = self.root / f"d{self.n}"
            shutil.copytree(self.svc.settings.data_dir, data_dir)
        self.svc.close()
        self.svc = Service(Settings(data_dir=data_dir))

    def close(self) -> None:
        self.svc.close()


class Remote:
    """A server process: a crash is SIGKILL, a clean restart SIGTERM (the server snapshots on shutdown)."""

    def __init__(self, root: Path):
        self.server = ServerProcess(root / "data").start()
        self.client = MemoryClient(self.server.url)

    def create(self, name: str, **spec) -> MemoryBackend:
        return self.client.create_memory(name, dim=DIM, **spec)

    def memory(self, name: str) -> MemoryBackend:
        return self.client.memory(name)

    def tune(self, name: str, **params: int) -> None:
        assert self.client.set_search_params(name, **params).model_dump(include=set(params)) == params

    def restart(self, crash: bool) -> None:
        self.client.close()
        self.server.kill() if crash else self.server.stop()
        self.server.start()
        self.client = MemoryClient(self.server.url)

    def close(self) -> None:
        self.client.close()
        self.server.kill()


class Lite:
    """milvus-lite on one file, closed and opened again (it has no crash of its own to tell apart)."""

    def __init__(self, root: Path):
        pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
        from memsvc.store.milvus import MilvusStore

        self.open = lambda: MilvusStore(str(root / "m.db"))
        self.store = self.open()

    def create(self, name: str, **spec) -> MemoryBackend:
        return self.store.create(spec_from(name=name, dim=DIM, **spec))

    def memory(self, name: str) -> MemoryBackend:
        return self.store.get(name)

    def tune(self, name: str, **params: int) -> None:
        self.store.get(name).set_search_params(**params)

    def restart(self, crash: bool) -> None:
        self.store.close()
        self.store = self.open()

    def close(self) -> None:
        self.store.close()


@pytest.mark.parametrize("backend", [Durable, Remote, Lite], ids=["durable", "remote", "milvus"])
def test_delete_then_restart_equals_search_over_the_remaining_entries(backend, tmp_path):
    """Every kind: deletes, then a crash (log replay), a clean restart (snapshot), more deletes on the
    indexes read back from the snapshot, and a crash again; after each, search answers over exactly the
    remaining entries, and new ids continue after the old ones. Before each restart the search parameters
    change (issue 18 #3: ef_search of hnsw, nprobe of ivfpq, still exhaustive), and the restarted memory
    (and the catalog) has the new ones."""
    if backend is not Lite and MILVUS_CONFIGURED:
        pytest.skip("the Service uses Milvus here: the milvus case covers it")
    owner = backend(tmp_path)
    try:
        kinds = [kind for kind in EXHAUSTIVE if not (backend is Lite and kind == "ivfpq")]
        scenarios = {kind: DeleteScenario(owner.create(kind, index=kind, **EXHAUSTIVE[kind])) for kind in kinds}
        steps = {kind: scenario.steps() for kind, scenario in scenarios.items()}
        for round_, (count, crash) in enumerate(((2, True), (1, False), (2, True))):
            tuned = {"hnsw": {"ef_search": 600 + round_}, "ivfpq": {"nprobe": 16 + round_}}
            for kind, scenario in scenarios.items():
                for step in steps[kind][:count]:
                    scenario.delete(owner.memory(kind), step)
                del steps[kind][:count]
                if kind in tuned:
                    owner.tune(kind, **tuned[kind])
            owner.restart(crash)
            for kind, scenario in scenarios.items():
                wait_trained(owner.memory(kind))
                scenario.check(owner.memory(kind))
                if kind in tuned:
                    assert owner.memory(kind).spec.model_dump(include=set(tuned[kind])) == tuned[kind]
        for kind in kinds:
            assert owner.memory(kind).add(vecs(1, seed=9))[0] == 400
    finally:
        owner.close()


def extreme_keys(seed: int = 0) -> np.ndarray:
    """20 random directions, each at three norms: just above MIN_NORM, about 1, just below MAX_NORM."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((20, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    scales = [MIN_NORM * rng.uniform(1.05, 2.0, 20), rng.uniform(0.5, 2.0, 20), MAX_NORM * rng.uniform(0.5, 0.95, 20)]
    return np.concatenate([directions * s[:, None] for s in scales]).astype(np.float32)


def exact64(keys: np.ndarray, queries: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Every distance in float64 [m, n], and how far float32 arithmetic may move each one: about 1e-6 of
    the squared norms for l2, of the norms' product for ip, of 1 for cosine (we allow 1e-5)."""
    q, k = queries.astype(np.float64), keys.astype(np.float64)
    qn, kn = np.linalg.norm(q, axis=1)[:, None], np.linalg.norm(k, axis=1)[None, :]
    if metric == "l2":
        return ((q[:, None, :] - k[None, :, :]) ** 2).sum(-1), 1e-5 * (qn ** 2 + kn ** 2)
    if metric == "ip":
        return -q @ k.T, 1e-5 * qn * kn
    return 1 - (q / qn) @ (k / kn.T).T, np.full((len(q), len(k)), 1e-5)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_keys_at_the_accepted_norm_bounds_give_the_exact_neighbours(make, metric, index):
    """Issue 12 #6: keys from MIN_NORM to MAX_NORM in one memory, each key a query (and a zero query where
    the metric allows one): every entry comes back (none reported missing), distances are finite, sorted
    and equal to float64's up to float32 rounding, and no entry is ranked after one that is really farther."""
    mem = make(metric=metric, index=index, **EXHAUSTIVE[index])
    keys = extreme_keys()
    assert mem.add(keys).tolist() == list(range(60))
    queries = keys if metric == "cosine" else np.concatenate([keys, np.zeros((1, DIM), np.float32)])
    res = mem.search(queries, k=60)
    assert (np.sort(res.ids, axis=1) == np.arange(60)).all()
    assert np.isfinite(res.distances).all() and (np.diff(res.distances, axis=1) >= 0).all()
    truth, tol = exact64(keys, queries, metric)
    got, slack = np.take_along_axis(truth, res.ids, 1), np.take_along_axis(tol, res.ids, 1)
    assert (np.abs(res.distances - got) <= slack).all()
    later_min = np.minimum.accumulate((got + slack)[:, ::-1], axis=1)[:, ::-1]  # min over j' >= j
    assert (got[:, :-1] - slack[:, :-1] <= later_min[:, 1:]).all()
    if metric != "ip":  # each key is its own nearest neighbour; for cosine its copies at other norms too
        same = np.arange(60) % 20 if metric == "cosine" else np.arange(60)
        nearest = res.ids[:60, :3] % 20 if metric == "cosine" else res.ids[:60, :1]
        assert (nearest == same[:, None]).all()


def test_issue_12_keys_whose_distances_overflow_or_underflow_are_refused_with_the_reason(make):
    """The issue's inputs: l2 keys at 1e19 (distances overflowed to inf: stored entries came back as
    missing), cosine copies at 1e20 and 1e-30 (came back at distance 1); each is a 422 naming row and why."""
    x = vecs(5, seed=5)
    l2, cosine = make(), make(metric="cosine")
    for mem, keys, words in ((l2, x * 1e19, "row 0 has L2 norm"),
                             (cosine, np.stack([x[0], x[0] * 1e20]), "row 1 has L2 norm"),
                             (cosine, np.stack([x[0], x[0] * 1e-30]), "row 1 has L2 norm"),
                             (cosine, np.stack([x[0], np.zeros(DIM, np.float32)]), "row 1 is all zeros")):
        with pytest.raises(InvalidInput, match=words) as err:
            mem.add(keys.astype(np.float32))
        assert err.value.field == "keys" and mem.stats().count == 0
    assert l2.add(x * 1e17).tolist() == [0, 1, 2, 3, 4]  # the largest norms accepted (about 4e17 here)
    res = l2.search(x * 1e17, k=5)
    assert res.ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.isfinite(res.distances).all()
    assert l2.add(np.zeros((1, DIM), np.float32)).tolist() == [5]  # zero is a vector for l2 and ip
    assert cosine.add(np.stack([x[0], x[0] * 1e15, x[0] * 1e-11]).astype(np.float32)).tolist() == [0, 1, 2]
    res = cosine.search(x[:1] * 1e-9, k=3)
    assert sorted(res.ids[0].tolist()) == [0, 1, 2]
    np.testing.assert_allclose(res.distances, 0, atol=1e-6)


def test_a_vector_and_its_scaled_copies_are_at_cosine_distance_0(make):
    """The issue's case: a vector and its scaled copy came out at cosine distance 1."""
    mem = make(metric="cosine")
    x = vecs(1, seed=3)[0] / np.linalg.norm(vecs(1, seed=3)[0])
    scales = [MIN_NORM * 1.5, 1e-6, 1.0, 1e6, 1e12, MAX_NORM * 0.9]
    mem.add(np.stack([x * s for s in scales]).astype(np.float32))
    mem.add(vecs(20, seed=4))
    res = mem.search(np.stack([x * s for s in scales]).astype(np.float32), k=6)
    assert (np.sort(res.ids, axis=1) == np.arange(6)).all()
    assert (res.distances >= 0).all() and (res.distances < 1e-5).all()


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_ivfpq_at_the_norm_bounds_gives_finite_sorted_distances(make, metric):
    mem = make(metric=metric, index="ivfpq", **EXHAUSTIVE["ivfpq"])
    keys = np.concatenate([extreme_keys(seed) for seed in range(5)])
    mem.add(keys)
    wait_trained(mem)
    res = mem.search(keys[::7], k=50)
    assert (res.ids >= 0).all() and np.isfinite(res.distances).all()
    assert (np.diff(res.distances, axis=1) >= 0).all()


def test_set_metadata(make):
    mem = make()
    mem.set_metadata({"knnlm": {"lam": 0.25, "temp": 1.0, "k": 32}})
    assert mem.spec.metadata == {"knnlm": {"lam": 0.25, "temp": 1.0, "k": 32}}
    assert mem.stats().metadata == mem.spec.metadata


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_ef_search_per_query_and_per_memory_changes_recall(make, request):
    """Issue 18 #3: on a sparse hnsw graph (m 4) ef_search = k misses neighbours that ef_search 256 finds;
    an ef_search below k searches as k (Milvus' rule, on every backend); set_search_params makes a value the
    memory's default. Milvus searches exactly whatever the index (milvus-lite always; the server while the
    entries sit in a growing segment, unindexed), so there only the calls are checked."""
    mem = make(index="hnsw", hnsw_m=4)
    keys, queries = vecs(2000, seed=3), vecs(50, seed=4)
    mem.add(keys)
    truth, _ = exact(keys, queries, "l2", 10)
    narrow, wide = mem.search(queries, 10, ef_search=10), mem.search(queries, 10, ef_search=256)
    np.testing.assert_array_equal(mem.search(queries, 10, ef_search=1).ids, narrow.ids)
    exact_anyway = request.node.callspec.params["make"].startswith("milvus") or (
        MILVUS_CONFIGURED and request.node.callspec.params["make"] in ("durable", "remote"))
    if not exact_anyway:
        assert recall(wide.ids, truth) >= 0.9 and recall(narrow.ids, truth) <= recall(wide.ids, truth) - 0.2
    assert mem.spec.ef_search == 128
    mem.set_search_params(ef_search=10)
    assert mem.spec.ef_search == 10 and mem.stats().ef_search == 10
    np.testing.assert_array_equal(mem.search(queries, 10).ids, narrow.ids)
    mem.set_search_params(ef_search=256)
    np.testing.assert_array_equal(mem.search(queries, 10).ids, wide.ids)
    np.testing.assert_array_equal(mem.search(queries, 10, ef_search=10).ids, narrow.ids)  # per query wins


def test_nprobe_per_query_and_per_memory(make, request):
    """nprobe 1 of 8 lists finds fewer true neighbours than all 8; set_search_params keeps the value. The
    Milvus server searches a growing segment exactly, so there only the calls are checked."""
    mem = make(index="ivfpq", nlist=8, train_size=512, nprobe=8, pq_m=4)
    keys, queries = vecs(1000, seed=5), vecs(30, seed=6)
    mem.add(keys)
    wait_trained(mem)
    truth, _ = exact(keys, queries, "l2", 10)
    one, all_ = mem.search(queries, 10, nprobe=1), mem.search(queries, 10, nprobe=8)
    exact_anyway = request.node.callspec.params["make"].startswith("milvus") or (
        MILVUS_CONFIGURED and request.node.callspec.params["make"] in ("durable", "remote"))
    if not exact_anyway:
        assert recall(one.ids, truth) <= recall(all_.ids, truth) - 0.1
    mem.set_search_params(nprobe=1)
    assert mem.spec.nprobe == 1 and mem.stats().nprobe == 1
    np.testing.assert_array_equal(mem.search(queries, 10).ids, one.ids)


X = vecs(2, dim=8)
BAD = {
    "keys wrong dim": (lambda m: m.add(X[:, :4], values=[1, 2]), "keys"),
    "keys NaN": (lambda m: m.add(np.where(np.eye(2, 8) > 0, np.nan, X), values=[1, 2]), "keys"),
    "keys inf": (lambda m: m.add(np.full((2, 8), np.inf, np.float32), values=[1, 2]), "keys"),
    "keys integers": (lambda m: m.add(np.ones((2, 8), np.int64), values=[1, 2]), "keys"),
    "keys beyond float32": (lambda m: m.add(np.full((2, 8), 1e39), values=[1, 2]), "keys"),
    "keys norm above MAX_NORM": (lambda m: m.add(np.full((2, 8), MAX_NORM / 2.8), values=[1, 2]), "keys"),
    "keys norm below MIN_NORM": (lambda m: m.add(np.stack([X[0], X[1] * 1e-20]), values=[1, 2]), "keys"),
    "keys 1-D": (lambda m: m.add(X[0], values=[1]), "keys"),
    "keys empty batch": (lambda m: m.add(np.zeros((0, 8), np.float32), values=[]), "keys"),
    "values missing": (lambda m: m.add(X), "values"),
    "values too few": (lambda m: m.add(X, values=[1]), "values"),
    "values not integers": (lambda m: m.add(X, values=[0.5, 1.5]), "values"),
    "payloads too few": (lambda m: m.add(X, values=[1, 2], payloads=["a"]), "payloads"),
    "payloads not JSON": (lambda m: m.add(X, values=[1, 2], payloads=[{1, 2}, None]), "payloads"),
    "partition empty": (lambda m: m.add(X, values=[1, 2], partition=""), "partition"),
    "partition control char": (lambda m: m.add(X, values=[1, 2], partition="a\nb"), "partition"),
    "queries wrong dim": (lambda m: m.search(np.zeros((1, 9), np.float32), k=1), "queries"),
    "queries NaN": (lambda m: m.search(np.full((1, 8), np.nan, np.float32), k=1), "queries"),
    "queries norm above MAX_NORM": (lambda m: m.search(X * 1e18, k=1), "queries"),
    "queries norm below MIN_NORM": (lambda m: m.search(np.full((1, 8), 1e-14, np.float32), k=1), "queries"),
    "queries empty batch": (lambda m: m.search(np.zeros((0, 8), np.float32), k=1), "queries"),
    "k zero": (lambda m: m.search(X, k=0), "k"),
    "k negative": (lambda m: m.search(X, k=-3), "k"),
    "k too large": (lambda m: m.search(X, k=5000), "k"),
    "k float": (lambda m: m.search(X, k=2.0), "k"),
    "k bool": (lambda m: m.search(X, k=True), "k"),
    "partition not a string": (lambda m: m.search(X, k=1, partition=5), "partition"),
    "ef_search on a flat memory": (lambda m: m.search(X, k=1, ef_search=64), "ef_search"),
    "nprobe on a flat memory": (lambda m: m.search(X, k=1, nprobe=4), "nprobe"),
    "ef_search zero": (lambda m: m.search(X, k=1, ef_search=0), "ef_search"),
    "nprobe above the bound": (lambda m: m.search(X, k=1, nprobe=(1 << 20) + 1), "nprobe"),
    "ef_search a float": (lambda m: m.search(X, k=1, ef_search=64.0), "ef_search"),
    "set ef_search on a flat memory": (lambda m: m.set_search_params(ef_search=64), "ef_search"),
    "set nprobe bool": (lambda m: m.set_search_params(nprobe=True), "nprobe"),
    "partitions too few": (lambda m: m.search(X, k=1, partitions=["a"]), "partitions"),
    "partitions a string": (lambda m: m.search(X, k=1, partitions="ab"), "partitions"),
    "partitions bad name": (lambda m: m.search(X, k=1, partitions=["a", ""]), "partitions"),
    "partitions and partition": (lambda m: m.search(X, k=1, partition="a", partitions=["a", "b"]), "partitions"),
    "add partitions too few": (lambda m: m.add(X, values=[1, 2], partitions=["a"]), "partitions"),
    "add partitions bad name": (lambda m: m.add(X, values=[1, 2], partitions=["a", "b\nc"]), "partitions"),
    "add partitions and partition": (lambda m: m.add(X, values=[1, 2], partition="a", partitions=["a", "b"]),
                                     "partitions"),
    "ids 2-D": (lambda m: m.get([[0, 1]]), "ids"),
    "ids floats": (lambda m: m.get([0.5]), "ids"),
    "delete nothing named": (lambda m: m.delete(), "ids"),
    "delete ids floats": (lambda m: m.delete(ids=[1.5]), "ids"),
}


@pytest.fixture(scope="module")
def bad_input_memories() -> dict[str, MemoryBackend]:
    """The memory of the bad-input cases, one per backend, made by the first case: a new collection costs a
    real Milvus server seconds. It holds the two entries of X throughout, which each case checks."""
    return {}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_the_same_error_and_stores_nothing(make, bad_input_memories, request, case):
    call, field = BAD[case]
    backend = request.node.callspec.params["make"]
    if backend not in bad_input_memories:
        bad_input_memories[backend] = make(dim=8, value_kind="token")
        bad_input_memories[backend].add(X, values=[1, 2])
    mem = bad_input_memories[backend]
    with pytest.raises(InvalidInput) as got:
        call(mem)
    reference = Memory(spec_from(name="ref", dim=8, value_kind="token"))
    with pytest.raises(InvalidInput) as expected:
        call(reference)
    assert (got.value.field, got.value.message) == (field, expected.value.message)
    assert mem.stats().count == 2
