"""MilvusMemory behaves like the in-process Memory: same ids, distances, values, payloads, partitions,
deletes and errors, on milvus-lite and on a real Milvus server (2.3.5, tests/milvus_server.py); it
survives a restart and a SIGKILL of Milvus, and fails clearly when Milvus is away."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from pymilvus.exceptions import MilvusException

pytest.importorskip("pymilvus", reason="the Milvus backend needs the 'milvus' extra")
pytest.importorskip("milvus_lite", reason="the Milvus backend tests need the 'milvus' extra (milvus-lite)")

from conftest import ServerProcess, free_port
from milvus_server import MilvusServer

from memsvc.api.errors import http_status
from memsvc.contract import (
    AlreadyExists,
    BackendUnavailable,
    InvalidInput,
    MemorySpec,
    MemsvcError,
    NotFound,
    TooLarge,
)
from memsvc.store import Memory
from memsvc.store.milvus import MAX_VALUE_DIM, Connection, MilvusStore

DIM = 16


@pytest.fixture(params=["lite", "server"])
def uri(request, tmp_path):
    """Where a test's Milvus is: a new milvus-lite file, or the session's real server with no collections."""
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    uri = request.getfixturevalue("milvus_server").uri
    store = MilvusStore(uri, timeout=30)
    for collection in store._milvus("list_collections"):
        store._milvus("drop_collection", collection)
    store.close()
    return uri


@pytest.fixture
def store(uri):
    try:
        s = MilvusStore(uri, timeout=30)
    except BackendUnavailable as exc:
        pytest.skip(f"milvus-lite cannot start here: {exc}")
    yield s
    s.close()


def vecs(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def pair(store: MilvusStore, **kw):
    """The same spec as a Milvus memory and as an in-process Memory."""
    spec = MemorySpec(name="m", dim=DIM, **kw)
    return store.create(spec), Memory(spec)


def fill(*mems, value_kind: str = "token") -> None:
    """The same entries in each memory: three partitions (one is None), payloads on some."""
    x = vecs(300, 1)
    values = {"token": lambda a, b: np.arange(a, b) * 7, "vector": lambda a, b: vecs(b - a, a, 4),
              "none": lambda a, b: None}[value_kind]
    for mem in mems:
        mem.add(x[:120], values=values(0, 120), partition="session-1/layer-2",
                payloads=[{"doc": i, "text": f"chunk {i}"} if i % 3 else [i, "x"] for i in range(120)])
        mem.add(x[120:200], values=values(120, 200))
        mem.add(x[200:], values=values(200, 300), partition='quote"back\\slash ü', payloads=list(range(100)))


def assert_same_search(a, b) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-4, atol=1e-5)
    if b.values is None:
        assert a.values is None
    else:
        np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    assert a.payloads == b.payloads


@pytest.mark.parametrize("metric, value_kind", [("l2", "token"), ("ip", "vector"), ("cosine", "none")])
def test_flat_search_matches_memory(store, metric, value_kind):
    mil, ref = pair(store, metric=metric, value_kind=value_kind, value_dim=4 if value_kind == "vector" else None)
    fill(mil, ref, value_kind=value_kind)
    q = vecs(7, 2)
    for partition, k in [(None, 10), ("session-1/layer-2", 5), ('quote"back\\slash ü', 150), ("absent", 3)]:
        assert_same_search(mil.search(q, k, partition=partition), ref.search(q, k, partition=partition))
    assert mil.search(q, 150, partition='quote"back\\slash ü').ids[0, 100:].tolist() == [-1] * 50


def test_get_delete_and_stats_match_memory(store):
    mil, ref = pair(store, value_kind="token")
    fill(mil, ref)
    ids = [0, 5, 119, 150, 299, 10_000, 5]
    a, b = mil.get(ids), ref.get(ids)
    np.testing.assert_array_equal(a.found, b.found)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.payloads == b.payloads and a.partitions == b.partitions

    for call in [{"ids": [1, 2, 3, 150, 10_000]}, {"ids": [4, 160, 170], "partition": "session-1/layer-2"},
                 {"partition": "session-1/layer-2"}, {"partition": "absent"}, {"ids": []}]:
        assert mil.delete(**call) == ref.delete(**call), call
    assert len(mil) == len(ref) == 300 - 4 - 1 - 116
    assert_same_search(mil.search(vecs(5, 3), 20), ref.search(vecs(5, 3), 20))
    assert mil.search(vecs(1, 3), 5, partition="session-1/layer-2").ids.tolist() == [[-1] * 5]
    sa, sb = mil.stats(), ref.stats()
    assert sa.count == sb.count == 179
    assert sorted(p.name or "" for p in sa.partitions) == sorted(
        p.name or "" for p in sb.partitions if p.count)
    assert mil.get([150, 160]).found.tolist() == [False, True]  # the partition-scoped delete spared 160


def test_hnsw_finds_exact_neighbours_of_a_small_memory(store):
    mil, ref = pair(store, index="hnsw", metric="l2")
    x = vecs(200, 4)
    mil.add(x)
    ref.add(x)
    a, b = mil.search(x[:10], 5), ref.search(x[:10], 5)
    assert (a.ids[:, 0] == np.arange(10)).all()  # each key finds itself first
    assert np.mean([len(set(r) & set(s)) / 5 for r, s in zip(a.ids, b.ids)]) >= 0.9


BAD_CALLS = [
    ("add", {"keys": vecs(2, 0, DIM + 1), "values": [1, 2]}, "keys"),
    ("add", {"keys": np.full((1, DIM), np.nan, np.float32), "values": [1]}, "keys"),
    ("add", {"keys": np.ones((1, DIM), np.int64), "values": [1]}, "keys"),
    ("add", {"keys": vecs(2, 0)}, "values"),
    ("add", {"keys": vecs(2, 0), "values": [1.5, 2.5]}, "values"),
    ("add", {"keys": vecs(2, 0), "values": [1]}, "values"),
    ("add", {"keys": vecs(2, 0), "values": [1, 2], "payloads": [{}]}, "payloads"),
    ("add", {"keys": vecs(1, 0), "values": [1], "payloads": [{1, 2}]}, "payloads"),
    ("add", {"keys": vecs(1, 0), "values": [1], "payloads": [float("nan")]}, "payloads"),
    ("add", {"keys": vecs(1, 0), "values": [1], "partition": ""}, "partition"),
    ("add", {"keys": vecs(1, 0), "values": [1], "partition": "tab\there"}, "partition"),
    ("search", {"queries": vecs(1, 0), "k": 0}, "k"),
    ("search", {"queries": vecs(1, 0), "k": True}, "k"),
    ("search", {"queries": vecs(1, 0, DIM - 1), "k": 3}, "queries"),
    ("search", {"queries": vecs(1, 0), "k": 3, "partition": 7}, "partition"),
    ("get", {"ids": [[1, 2]]}, "ids"),
    ("delete", {}, "ids"),
    ("delete", {"ids": ["a"]}, "ids"),
]


@pytest.mark.parametrize("uri", ["lite"], indirect=True)  # on the server: the bad-input cases of test_backend.py
@pytest.mark.parametrize("method, kwargs, field", BAD_CALLS)
def test_bad_input_is_rejected_like_memory_and_stores_nothing(store, method, kwargs, field):
    mil, ref = pair(store, value_kind="token")
    mil.add(vecs(3, 9), values=[1, 2, 3])
    for mem in (mil, ref):
        with pytest.raises(InvalidInput) as err:
            getattr(mem, method)(**kwargs)
        assert err.value.field == field
    assert len(mil) == 3 and mil.add(vecs(1, 9), values=[4]).tolist() == [3]


def test_a_payload_larger_than_a_milvus_field_is_refused_whole(store):
    mil = store.create(MemorySpec(name="m", dim=DIM))
    with pytest.raises(TooLarge) as err:
        mil.add(vecs(2, 0), payloads=[{"ok": 1}, "x" * 70_000])
    assert err.value.field == "payloads" and len(mil) == 0


def test_store_names_create_drop_and_errors(store):
    for name in ["a.b-c_d", "x" * 128, "Z9"]:
        store.create(MemorySpec(name=name, dim=4))
    assert store.names() == sorted(["a.b-c_d", "x" * 128, "Z9"])
    with pytest.raises(AlreadyExists):
        store.create(MemorySpec(name="Z9", dim=8))
    if store._milvus.lite:
        with pytest.raises(InvalidInput) as err:  # no silent substitute for an index milvus-lite lacks
            store.create(MemorySpec(name="pq", dim=16, index="ivfpq", nlist=16, train_size=256))
        assert err.value.field == "index" and "pq" not in store.names()
    else:
        store.create(MemorySpec(name="pq", dim=16, index="ivfpq", nlist=16, train_size=256))
        store.drop("pq")
    store.drop("Z9")
    with pytest.raises(NotFound):
        store.get("Z9")
    with pytest.raises(NotFound):
        store.drop("Z9")
    assert store.names() == sorted(["a.b-c_d", "x" * 128])
    moved = store.quarantine("a.b-c_d")  # kept under another name, out of the store's sight
    assert store.names() == ["x" * 128] and moved in store._milvus("list_collections")


def test_value_vectors_of_up_to_4096_dims_and_a_clear_refusal_beyond(store):
    """Value vectors are an ARRAY field (Milvus 2.3 allows one vector field per collection): the widest
    ARRAY round-trips exactly; a wider one is refused at create, naming the limit, and nothing is made."""
    mil, ref = pair(store, value_kind="vector", value_dim=MAX_VALUE_DIM, metric="ip")
    x, values = vecs(6, 1), vecs(6, 2, MAX_VALUE_DIM)
    for mem in (mil, ref):
        mem.add(x, values=values, partition="p")
    assert_same_search(mil.search(x[:2], 3), ref.search(x[:2], 3))
    np.testing.assert_array_equal(mil.get([5, 0]).values, values[[5, 0]])
    with pytest.raises(InvalidInput) as err:
        store.create(MemorySpec(name="wide", dim=DIM, value_kind="vector", value_dim=MAX_VALUE_DIM + 1))
    assert err.value.field == "value_dim" and "at most 4096 dims" in err.value.message
    assert store.names() == ["m"]


def test_a_memory_made_with_a_vector_value_field_still_works(tmp_path):
    """Earlier versions stored value vectors as a second FLOAT_VECTOR field (which milvus-lite and Milvus
    >= 2.4 allow): such a memory still reads and writes as before."""
    from pymilvus import DataType, MilvusClient

    from memsvc.store.milvus import NEXT_ID, SPEC, collection_name

    store = MilvusStore(str(tmp_path / "milvus.db"), timeout=30)
    spec = MemorySpec(name="old", dim=DIM, value_kind="vector", value_dim=4)
    old = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    old.add_field("id", DataType.INT64, is_primary=True)
    old.add_field("key", DataType.FLOAT_VECTOR, dim=DIM)
    old.add_field("part", DataType.VARCHAR, max_length=1024, is_partition_key=True)
    old.add_field("value", DataType.FLOAT_VECTOR, dim=4)
    old.add_field("payload", DataType.VARCHAR, max_length=65535)
    index = MilvusClient.prepare_index_params()
    index.add_index("key", index_type="FLAT", metric_type="L2")
    index.add_index("value", index_type="FLAT", metric_type="L2")
    store._milvus("create_collection", collection_name("old"), schema=old, consistency_level="Strong",
                  properties={SPEC: spec.model_dump_json(), NEXT_ID: "0"}, index_params=index)
    mem, ref = store.get("old"), Memory(spec)
    x, values = vecs(20, 3), vecs(20, 4, 4)
    for m in (mem, ref):
        m.add(x[:12], values=values[:12])
        m.add(x[12:], values=values[12:], partition="p")
    assert_same_search(mem.search(x[:4], 5), ref.search(x[:4], 5))
    np.testing.assert_array_equal(mem.get([19, 3]).values, values[[19, 3]])
    store.close()


def test_restart_keeps_entries_metadata_and_never_reuses_ids(uri):
    path = uri
    store = MilvusStore(path, timeout=30)
    mem = store.create(MemorySpec(name="m", dim=DIM, value_kind="token"))
    x = vecs(50, 5)
    mem.add(x[:40], values=np.arange(40), partition="p", payloads=[{"i": i} for i in range(40)])
    mem.add(x[40:], values=np.arange(40, 50))
    mem.delete(ids=np.arange(45, 50))  # the newest ids are gone: the next id must still be 50
    mem.set_metadata({"lam": 0.25})
    before = mem.search(x[:5], 8)
    store.close()

    store = MilvusStore(path, timeout=30)
    mem = store.get("m")
    assert len(mem) == 45 and mem.spec.metadata == {"lam": 0.25}
    assert_same_search(mem.search(x[:5], 8), before)
    got = mem.get([3, 47])
    assert got.found.tolist() == [True, False] and got.payloads[0] == {"i": 3} and got.partitions[0] == "p"
    assert mem.add(x[:1], values=[0]).tolist() == [50]
    store.close()


def exact_l2(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d = (queries ** 2).sum(1)[:, None] - 2 * queries @ keys.T + (keys ** 2).sum(1)[None, :]
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_many_queries_over_many_entries_go_in_few_requests(store, monkeypatch, metric):
    """200 queries over 20,000 entries of dim 64 (issue 12): milvus-lite walks its unsealed buffer row by
    row on every request and materialises [queries, entries, dim] for exact L2, so the search seals the
    buffer first and sends 13 L2 queries per request (64 MiB), all ip queries at once; a server takes
    all 200 in one request."""
    mem = store.create(MemorySpec(name="m", dim=64, metric=metric))
    keys, queries = vecs(20_000, 1, 64), vecs(200, 2, 64)
    mem.add(keys)
    calls = []
    send = store._milvus.client.search
    monkeypatch.setattr(store._milvus.client, "search", lambda *a, **kw: calls.append(len(kw["data"])) or send(*a, **kw))
    res = mem.search(queries, 10)
    assert calls == ([13] * 15 + [5] if metric == "l2" and store._milvus.lite else [200])
    expected = exact_l2(keys, queries, 10) if metric == "l2" else np.argsort(-queries @ keys.T, 1, kind="stable")[:, :10]
    np.testing.assert_array_equal(res.ids, expected)


def test_a_call_of_many_requests_ends_at_its_timeout(store, monkeypatch):
    """The timeout bounds a whole search, not each of its requests: a client waiting the same time
    gets the 503, not a timeout of its own while Milvus is still busy."""
    mem = store.create(MemorySpec(name="m", dim=DIM))
    mem.add(vecs(10, 1))
    send = store._milvus.client.search
    monkeypatch.setattr(store._milvus, "timeout", 1.0)
    monkeypatch.setattr(mem, "_search_batch", lambda k: 1)  # one query per request
    monkeypatch.setattr(store._milvus.client, "search", lambda *a, **kw: time.sleep(0.3) or send(*a, **kw))
    with pytest.raises(BackendUnavailable) as err:
        mem.search(vecs(20, 2), 3)
    assert "ran past its 1 s timeout" in err.value.message and http_status(err.value) == 503


def test_the_issue_search_through_the_client_on_milvus_lite_answers(tmp_path):
    """Issue 12's input: 200 queries over 20,000 entries of dim 64 through the REST client on
    milvus-lite timed out (one request per query, 0.4 s each over the unsealed buffer)."""
    from memsvc.client import MemoryClient

    with ServerProcess(tmp_path / "data", env={"MEMSVC_VECTOR_BACKEND": "milvus"}) as srv, \
            MemoryClient(srv.url) as client:
        mem = client.create_memory("big", dim=64, metric="l2")
        keys, queries = vecs(20_000, 1, 64), vecs(200, 2, 64)
        mem.add(keys)
        np.testing.assert_array_equal(mem.search(queries, k=10).ids, exact_l2(keys, queries, 10))


def test_server_refuses_to_start_on_an_unreachable_milvus(tmp_path):
    """No silent fallback to FAISS: `memsvc serve` exits and says why."""
    srv = ServerProcess(tmp_path / "data", env={"MEMSVC_VECTOR_BACKEND": "milvus", "MEMSVC_MILVUS_TIMEOUT": "5",
                                                "MEMSVC_MILVUS_URI": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout=120)
    assert "Milvus connection to 'http://127.0.0.1:" in srv.log.read_text()


def test_unreachable_uri_fails_at_start_with_a_clear_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(BackendUnavailable) as err:
        MilvusStore(uri, timeout=2)
    assert uri in err.value.message and http_status(err.value) == 503
    with pytest.raises(BackendUnavailable) as err:
        MilvusStore(str(tmp_path / "no" / "such" / "dir.db"), timeout=2)
    assert "not exists" in err.value.message
    assert isinstance(err.value, MemsvcError)


class LiteServer:
    """milvus-lite as a gRPC server process on `data_dir` (the calls of tests/milvus_server.MilvusServer)."""

    def __init__(self, data_dir):
        self.data_dir, self.port = data_dir, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def connect(uri: str, timeout: float = 5) -> MilvusStore:
    for _ in range(300):
        try:
            return MilvusStore(uri, timeout=timeout)
        except BackendUnavailable:
            time.sleep(0.1)
    raise AssertionError(f"Milvus at {uri} did not start")


@pytest.mark.parametrize("kind", ["lite", "server"])
def test_milvus_dying_mid_session_gives_503_and_loses_nothing_acknowledged(request, tmp_path, kind):
    if kind == "server":
        request.getfixturevalue("milvus_server")  # skips (or fails) where the server package is missing
    server = LiteServer(tmp_path / "data") if kind == "lite" else MilvusServer(tmp_path / "data")
    server.start()
    try:
        store = connect(server.uri)
        mem = store.create(MemorySpec(name="m", dim=DIM, value_kind="token"))
        assert mem.add(vecs(20, 6), values=np.arange(20)).tolist() == list(range(20))
        assert mem.add(vecs(3, 9), values=np.arange(3), payloads=["a", None, {"b": 1}]).tolist() == [20, 21, 22]
        server.kill()  # SIGKILL: no shutdown, no flush
        for call in (lambda: mem.add(vecs(5, 7), values=np.arange(5)), lambda: mem.search(vecs(1, 7), 3),
                     lambda: mem.delete(ids=[1])):
            with pytest.raises(BackendUnavailable) as err:
                call()
            assert http_status(err.value) == 503 and err.value.code == "backend_unavailable"
        server.start()
        store = connect(server.uri, timeout=120)  # a Milvus server recovers for a while after a restart
        mem = store.get("m")
        assert len(mem) == 23  # every acknowledged add survived the kill; the failed ones left nothing
        np.testing.assert_array_equal(mem.get(np.arange(23)).values, [*range(20), 0, 1, 2])
        assert mem.search(vecs(3, 9), 1).payloads == [["a"], [None], [{"b": 1}]]
        assert mem.add(vecs(1, 8), values=[1]).tolist() == [23]  # no id is handed out twice
    finally:
        server.kill()


class RpcError(grpc.RpcError):
    """A gRPC error with a status code, as the channel raises it."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def connection(timeout: float) -> Connection:
    conn = object.__new__(Connection)  # errors() needs only the timeout: no Milvus here
    conn.timeout = timeout
    return conn


@pytest.mark.parametrize("error", [
    MilvusException(message="[search] Retry timeout: 0.009140557999671728s, message=proxy TaskCondition context Done"),
    MilvusException(message="context deadline exceeded"),
    RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"),
    RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
])
def test_any_error_once_the_time_is_up_is_the_timeout(error):
    """CI: with the server's 20 ms time tick, Milvus gave up first and said "Retry timeout ... context Done"
    instead of gRPC's DEADLINE_EXCEEDED; whatever the name, an error at the deadline is the 503 timeout."""
    with pytest.raises(BackendUnavailable) as err, connection(1.0).errors("search", time.monotonic()):
        raise error
    assert err.value.message == "Milvus search failed: the call ran past its 1 s timeout"
    assert http_status(err.value) == 503


@pytest.mark.parametrize(("error", "message"), [
    (MilvusException(message="collection not loaded"), "Milvus search failed: collection not loaded"),
    (RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"), "Milvus search failed: UNAVAILABLE Socket closed"),
    (RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
     "Milvus search failed: the call ran past its 2.5 s timeout"),  # gRPC's own deadline is the timeout
])
def test_an_error_before_the_time_is_up_keeps_its_own_message(error, message):
    with pytest.raises(BackendUnavailable) as err, connection(2.5).errors("search", time.monotonic() + 10):
        raise error
    assert err.value.message == message
