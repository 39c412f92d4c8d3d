"""MilvusMemory behaves like the in-process Memory: same ids, distances, values, payloads, partitions,
deletes and errors, on milvus-lite; it survives a restart and fails clearly when Milvus is away."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the Milvus backend needs the 'milvus' extra")
pytest.importorskip("milvus_lite", reason="the Milvus backend tests need the 'milvus' extra (milvus-lite)")

from conftest import ServerProcess, free_port

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
from memsvc.store.milvus import MilvusStore

DIM = 16


@pytest.fixture
def store(tmp_path):
    try:
        s = MilvusStore(str(tmp_path / "milvus.db"), timeout=30)
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
    with pytest.raises(InvalidInput) as err:  # no silent substitute for an index milvus-lite lacks
        store.create(MemorySpec(name="pq", dim=16, index="ivfpq", nlist=16, train_size=256))
    assert err.value.field == "index" and "pq" not in store.names()
    store.drop("Z9")
    with pytest.raises(NotFound):
        store.get("Z9")
    with pytest.raises(NotFound):
        store.drop("Z9")
    assert store.names() == sorted(["a.b-c_d", "x" * 128])
    moved = store.quarantine("a.b-c_d")  # kept under another name, out of the store's sight
    assert store.names() == ["x" * 128] and moved in store._milvus("list_collections")


def test_restart_keeps_entries_metadata_and_never_reuses_ids(tmp_path):
    path = str(tmp_path / "milvus.db")
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


def start_server(data_dir, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def connect(uri: str) -> MilvusStore:
    for _ in range(300):
        try:
            return MilvusStore(uri, timeout=5)
        except BackendUnavailable:
            time.sleep(0.1)
    raise AssertionError(f"milvus-lite server at {uri} did not start")


def test_milvus_dying_mid_session_gives_503_and_loses_nothing_acknowledged(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path / "data", port)
    try:
        store = connect(uri)
        mem = store.create(MemorySpec(name="m", dim=DIM, value_kind="token"))
        assert mem.add(vecs(20, 6), values=np.arange(20)).tolist() == list(range(20))
        server.kill()  # SIGKILL: no shutdown, no flush
        server.wait()
        for call in (lambda: mem.add(vecs(5, 7), values=np.arange(5)), lambda: mem.search(vecs(1, 7), 3),
                     lambda: mem.delete(ids=[1])):
            with pytest.raises(BackendUnavailable) as err:
                call()
            assert http_status(err.value) == 503 and err.value.code == "backend_unavailable"
        server = start_server(tmp_path / "data", port)
        store = connect(uri)
        mem = store.get("m")
        assert len(mem) == 20  # every acknowledged add survived the kill; the failed ones left nothing
        np.testing.assert_array_equal(mem.get(np.arange(20)).values, np.arange(20))
        assert mem.add(vecs(1, 8), values=[1]).tolist() == [20]
    finally:
        server.kill()
        server.wait()
