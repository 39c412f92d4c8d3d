"""One suite, every backend: the in-process Memory (in RAM, and durable through the Service), the
RemoteMemory of a live server, and the Milvus backend on milvus-lite and on a real Milvus server must
behave identically, down to the errors they raise."""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from memsvc.api.schemas import spec_from
from memsvc.client import MemoryClient
from memsvc.config import Settings
from memsvc.errors import InvalidInput
from memsvc.service import Service
from memsvc.store import Memory, MemoryBackend

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
    assert mem.spec.dim == DIM and mem.stats()["count"] == 0


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
    while not mem.stats()["trained"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = mem.stats()
    assert stats["count"] == 400 and stats["trained"]
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
    parts = {p["name"]: p["count"] for p in mem.stats()["partitions"]}
    assert parts == {"session-1/layer-3": 30, "session-2/layer-3": 30}

    assert mem.delete(ids=ids_b[:5], partition="session-1/layer-3") == 0  # ids of another partition
    assert mem.delete(ids=ids_b[:5], partition="session-2/layer-3") == 5
    assert mem.delete(partition="session-1/layer-3") == 30
    assert mem.delete(partition="session-1/layer-3") == 0
    assert mem.stats()["count"] == 25
    res = mem.search(a[:3], k=40)
    assert set(res.ids[res.ids >= 0].tolist()) == set(ids_b[5:].tolist())
    assert not mem.get(ids_a).found.any()


def test_delete_by_ids(make):
    mem = make()
    keys = vecs(10)
    ids = mem.add(keys)
    assert mem.delete(ids=[ids[1], ids[3], 12345]) == 2
    assert mem.delete(ids=[ids[1]]) == 0
    assert mem.stats()["count"] == 8
    res = mem.search(keys[[1, 3]], k=8)
    assert not np.isin([ids[1], ids[3]], res.ids).any()
    np.testing.assert_array_equal(mem.get(ids).found, [i not in (1, 3) for i in range(10)])


def test_set_metadata(make):
    mem = make()
    mem.set_metadata({"knnlm": {"lam": 0.25, "temp": 1.0, "k": 32}})
    assert mem.spec.metadata == {"knnlm": {"lam": 0.25, "temp": 1.0, "k": 32}}
    assert mem.stats()["metadata"] == mem.spec.metadata


X = vecs(2, dim=8)
BAD = {
    "keys wrong dim": (lambda m: m.add(X[:, :4], values=[1, 2]), "keys"),
    "keys NaN": (lambda m: m.add(np.where(np.eye(2, 8) > 0, np.nan, X), values=[1, 2]), "keys"),
    "keys inf": (lambda m: m.add(np.full((2, 8), np.inf, np.float32), values=[1, 2]), "keys"),
    "keys integers": (lambda m: m.add(np.ones((2, 8), np.int64), values=[1, 2]), "keys"),
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
    "queries empty batch": (lambda m: m.search(np.zeros((0, 8), np.float32), k=1), "queries"),
    "k zero": (lambda m: m.search(X, k=0), "k"),
    "k negative": (lambda m: m.search(X, k=-3), "k"),
    "k too large": (lambda m: m.search(X, k=5000), "k"),
    "k float": (lambda m: m.search(X, k=2.0), "k"),
    "k bool": (lambda m: m.search(X, k=True), "k"),
    "partition not a string": (lambda m: m.search(X, k=1, partition=5), "partition"),
    "ids 2-D": (lambda m: m.get([[0, 1]]), "ids"),
    "ids floats": (lambda m: m.get([0.5]), "ids"),
    "delete nothing named": (lambda m: m.delete(), "ids"),
    "delete ids floats": (lambda m: m.delete(ids=[1.5]), "ids"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_the_same_error_and_stores_nothing(make, case):
    call, field = BAD[case]
    mem = make(dim=8, value_kind="token")
    mem.add(X, values=[1, 2])
    with pytest.raises(InvalidInput) as got:
        call(mem)
    reference = Memory(spec_from(name="ref", dim=8, value_kind="token"))
    with pytest.raises(InvalidInput) as expected:
        call(reference)
    assert (got.value.field, got.value.message) == (field, expected.value.message)
    assert mem.stats()["count"] == 2
