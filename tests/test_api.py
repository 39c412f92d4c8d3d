"""The REST API over HTTP: every kind of bad input gets a 4xx error body naming the problem and stores
nothing; JSON, tensor-frame and npz bodies agree; the client sends and reads tensor frames; data survives restarts; the catalog runs on SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import uuid

import httpx
import numpy as np
import pytest
from conftest import ServerProcess
from sqlalchemy import create_engine, make_url, text
from typer.testing import CliRunner

from memsvc.cli.commands import app
from memsvc.client import AsyncMemoryClient, MemoryClient
from memsvc.connect import connect
from memsvc.contract import AlreadyExists, InvalidInput, NotFound, TooLarge, Unauthorized
from memsvc.contract.wire import (
    NPZ,
    TENSORS,
    decode_npz,
    decode_tensors,
    encode_npz,
    encode_tensors,
    search_result,
)
from memsvc.db import Catalog
from memsvc.service import Service

KEY = "secret-key"
LIMITS = {"MEMSVC_MAX_BODY_BYTES": str(256 << 10), "MEMSVC_MAX_BATCH": "500", "MEMSVC_MAX_K": "64",
          "MEMSVC_MAX_DIM": "1024", "MEMSVC_API_KEYS": f"other-key,{KEY}"}
POSTGRES_URL = os.environ.get("MEMSVC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DIM = 8


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server with small limits and API keys."""
    with ServerProcess(tmp_path_factory.mktemp("limited") / "data", env=LIMITS) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(limited):
    with httpx.Client(base_url=limited.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture
def mem(http):
    """A fresh token memory holding 3 entries; yields its name."""
    name = f"m-{uuid.uuid4().hex[:8]}"
    assert http.post("/v1/memories", json={"name": name, "dim": DIM, "value_kind": "token"}).status_code == 201
    r = http.post(f"/v1/memories/{name}/entries", json={"keys": vecs(3).tolist(), "values": [1, 2, 3]})
    assert r.status_code == 201 and r.json() == {"ids": [0, 1, 2]}
    return name


def vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def npz(**members) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def post_npz(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": NPZ})


def assert_error(r: httpx.Response, status: int, field: str | None, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err.get("field") == field and err["code"] and err["message"]
    for word in words:
        assert word in err["message"], err["message"]


def entries(name: str, http: httpx.Client) -> int:
    assert http.get("/v1/health").status_code == 200  # still serving
    return http.get(f"/v1/memories/{name}").json()["count"]


def chunks(size: int):
    for _ in range(size // 65536 + 1):
        yield b"x" * 65536


BAD_ADDS = {
    "wrong dim": (lambda: {"json": {"keys": vecs(2, dim=5).tolist(), "values": [1, 2]}}, 422, "keys", "dimension 5"),
    "NaN literal in JSON": (lambda: {"content": b'{"keys": [[NaN, 1, 1, 1, 1, 1, 1, 1]], "values": [1]}',
                                     "headers": {"Content-Type": "application/json"}}, 422, "body", "JSON"),
    "NaN": (lambda: {"content": npz(keys=np.full((1, DIM), np.nan, np.float32), values=np.array([1])),
                     "headers": {"Content-Type": NPZ}}, 422, "keys", "NaN"),
    "inf": (lambda: {"content": npz(keys=np.full((1, DIM), np.inf, np.float32), values=np.array([1])),
                     "headers": {"Content-Type": NPZ}}, 422, "keys", "infinity"),
    "beyond float32 in JSON": (lambda: {"json": {"keys": [[1e39] + [1.0] * (DIM - 1)], "values": [1]}},
                               422, "keys", "beyond float32"),
    "norm above MAX_NORM": (lambda: {"content": npz(keys=np.full((1, DIM), 1e18, np.float32), values=np.array([1])),
                                     "headers": {"Content-Type": NPZ}}, 422, "keys", "row 0", "largest accepted"),
    "norm below MIN_NORM": (lambda: {"json": {"keys": [[1e-20] * DIM], "values": [1]}},
                            422, "keys", "row 0", "smallest accepted"),
    "float64 keys": (lambda: {"content": npz(keys=vecs(2).astype(np.float64), values=np.array([1, 2])),
                              "headers": {"Content-Type": NPZ}}, 422, "keys", "float32", "float64"),
    "int keys": (lambda: {"content": npz(keys=np.ones((2, DIM), np.int32), values=np.array([1, 2])),
                          "headers": {"Content-Type": NPZ}}, 422, "keys", "int32"),
    "negative token value": (lambda: {"json": {"keys": vecs(2).tolist(), "values": [5, -1]}}, 422, "values",
                             "token ids >= 0", "got -1"),
    "float token values": (lambda: {"content": npz(keys=vecs(2), values=np.array([0.5, 1.5])),
                                    "headers": {"Content-Type": NPZ}}, 422, "values", "integer"),
    "empty batch": (lambda: {"content": npz(keys=np.zeros((0, DIM), np.float32), values=np.zeros(0, int)),
                             "headers": {"Content-Type": NPZ}}, 422, "keys", "empty"),
    "empty JSON batch": (lambda: {"json": {"keys": [], "values": []}}, 422, "keys"),
    "ragged JSON": (lambda: {"json": {"keys": [[1.0] * DIM, [1.0]], "values": [1, 2]}}, 422, "keys", "rectangular"),
    "strings": (lambda: {"json": {"keys": [["a"] * DIM], "values": [1]}}, 422, "keys", "dtype"),
    "unknown field": (lambda: {"json": {"keys": vecs(1).tolist(), "values": [1], "colour": "red"}}, 422, "colour"),
    "missing keys": (lambda: {"json": {"values": [1]}}, 422, "keys", "required"),
    "payloads count": (lambda: {"json": {"keys": vecs(2).tolist(), "values": [1, 2], "payloads": [1]}},
                       422, "payloads"),
    "too many rows": (lambda: {"content": npz(keys=vecs(600), values=np.arange(600)),
                               "headers": {"Content-Type": NPZ}}, 413, "keys", "max_batch=500"),
    "body too large": (lambda: {"content": npz(keys=vecs(400, dim=DIM * 40), values=np.arange(400)),
                                "headers": {"Content-Type": NPZ}}, 413, "body", "max_body_bytes"),
    "body too large, streamed": (lambda: {"content": chunks(300 << 10), "headers": {"Content-Type": NPZ}},
                                 413, "body", "max_body_bytes"),
    "not an npz": (lambda: {"content": b"\x93NUMPY garbage", "headers": {"Content-Type": NPZ}},
                   422, "body", "npz"),
    "truncated npz": (lambda: {"content": npz(keys=vecs(50), values=np.arange(50))[:700],
                               "headers": {"Content-Type": NPZ}}, 422, "body", "malformed"),
    "compressed npz": (lambda: {"content": _compressed(keys=vecs(2), values=np.arange(2)),
                                "headers": {"Content-Type": NPZ}}, 422, "body", "uncompressed"),
    "pickled member": (lambda: {"content": npz(keys=vecs(1), values=np.array([{"a": 1}], dtype=object)),
                                "headers": {"Content-Type": NPZ}}, 422, "body", "malformed"),
    "payloads not JSON": (lambda: {"content": npz(keys=vecs(1), values=np.array([1]), payloads=np.array("{nope")),
                                   "headers": {"Content-Type": NPZ}}, 422, "payloads", "JSON"),
    "wrong content type": (lambda: {"content": b"keys=1", "headers": {"Content-Type": "text/plain"}},
                           415, "body", "Content-Type"),
    "tensors: npz body": (lambda: {"content": npz(keys=vecs(1), values=np.array([1])),
                                   "headers": {"Content-Type": TENSORS}}, 422, "body", "malformed", "MSVT"),
    "tensors: cut short": (lambda: {"content": encode_tensors({"keys": vecs(2), "values": [1, 2]})[:-8],
                                    "headers": {"Content-Type": TENSORS}}, 422, "body", "malformed"),
    "tensors: version 9": (lambda: {"content": b"MSVT\x09" + encode_tensors({"keys": vecs(1), "values": [1]})[5:],
                                    "headers": {"Content-Type": TENSORS}}, 422, "body", "version 9"),
    "tensors: int keys": (lambda: {"content": encode_tensors({"keys": np.ones((1, DIM), np.int64), "values": [1]}),
                                   "headers": {"Content-Type": TENSORS}}, 422, "keys", "float32"),
    "tensors: NaN": (lambda: {"content": encode_tensors({"keys": np.full((1, DIM), np.nan, np.float32),
                                                         "values": [1]}),
                              "headers": {"Content-Type": TENSORS}}, 422, "keys", "NaN"),
    "tensors: unknown field": (lambda: {"content": encode_tensors({"keys": vecs(1), "values": [1], "x": 1}),
                                        "headers": {"Content-Type": TENSORS}}, 422, "x", "Extra"),
    "tensors: too many rows": (lambda: {"content": encode_tensors({"keys": vecs(600), "values": np.arange(600)}),
                                        "headers": {"Content-Type": TENSORS}}, 413, "keys", "max_batch=500"),
}


def _compressed(**members) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **members)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(BAD_ADDS))
def test_bad_add_is_rejected_and_stores_nothing(http, mem, case):
    request, status, field, *words = BAD_ADDS[case]
    assert_error(http.post(f"/v1/memories/{mem}/entries", **request()), status, field, *words)
    assert entries(mem, http) == 3


BAD_SEARCHES = {
    "k zero": ({"queries": vecs(1).tolist(), "k": 0}, 422, "k"),
    "k negative": ({"queries": vecs(1).tolist(), "k": -1}, 422, "k"),
    "k above max_k": ({"queries": vecs(1).tolist(), "k": 65}, 422, "k", "max_k=64"),
    "k not an integer": ({"queries": vecs(1).tolist(), "k": "ten"}, 422, "k"),
    "queries wrong dim": ({"queries": vecs(1, dim=3).tolist(), "k": 1}, 422, "queries", "dimension 3"),
    "partition not a string": ({"queries": vecs(1).tolist(), "k": 1, "partition": 7}, 422, "partition"),
    "queries norm above MAX_NORM": ({"queries": [[1e18] * DIM], "k": 1}, 422, "queries", "largest accepted"),
    "queries beyond float32": ({"queries": [[-1e39] * DIM], "k": 1}, 422, "queries", "beyond float32"),
    "ef_search on a flat memory": ({"queries": vecs(1).tolist(), "k": 1, "ef_search": 64}, 422, "ef_search",
                                   "only to hnsw"),
    "nprobe on a flat memory": ({"queries": vecs(1).tolist(), "k": 1, "nprobe": 4}, 422, "nprobe", "only to ivfpq"),
    "ef_search not an integer": ({"queries": vecs(1).tolist(), "k": 1, "ef_search": 1.5}, 422, "ef_search"),
}


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
def test_bad_search_is_rejected(http, mem, case):
    body, status, field, *words = BAD_SEARCHES[case]
    assert_error(http.post(f"/v1/memories/{mem}/search", json=body), status, field, *words)
    assert entries(mem, http) == 3


LONE = "abc \ud800 def"  # a lone UTF-16 surrogate: JSON escapes and UTF-32 arrays carry it, UTF-8 cannot (issue 12 #4)


def raw_json(body: dict) -> dict:
    """A request whose body is `body` as JSON text with \\u escapes (what any client can send)."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


LONE_SURROGATES = {  # route, request, field in the 422 (JSON bodies are refused whole by the strict reader)
    "create name": ("POST", "", raw_json({"name": LONE, "dim": DIM}), "name"),
    "create metadata": ("POST", "", raw_json({"name": "ok-name", "dim": DIM, "metadata": {"k": LONE}}), "metadata"),
    "patch metadata key": ("PATCH", "/{mem}", raw_json({"metadata": {LONE: 1}}), "metadata"),
    "add partition JSON": ("POST", "/{mem}/entries", raw_json({"keys": vecs(1).tolist(), "values": [1],
                                                                "partition": LONE}), "body"),
    "add partition npz": ("POST", "/{mem}/entries", {"content": npz(keys=vecs(1), values=np.array([1]),
                                                                    partition=np.array(LONE)),
                                                     "headers": {"Content-Type": NPZ}}, "partition"),
    "add payload npz": ("POST", "/{mem}/entries", {"content": npz(keys=vecs(1), values=np.array([1]),
                                                                  payloads=np.array(json.dumps([{"p": LONE}]))),
                                                   "headers": {"Content-Type": NPZ}}, "payloads"),
    "search partition JSON": ("POST", "/{mem}/search", raw_json({"queries": vecs(1).tolist(), "k": 1,
                                                                 "partition": LONE}), "body"),
    "search partition npz": ("POST", "/{mem}/search", {"content": npz(queries=vecs(1), k=np.array(1),
                                                                      partition=np.array(LONE)),
                                                       "headers": {"Content-Type": NPZ}}, "partition"),
    "delete partition npz": ("POST", "/{mem}/delete", {"content": npz(partition=np.array(LONE)),
                                                       "headers": {"Content-Type": NPZ}}, "partition"),
}


@pytest.mark.parametrize("case", list(LONE_SURROGATES))
def test_lone_surrogates_are_422_in_every_memory_route(http, mem, case):
    method, route, request, field = LONE_SURROGATES[case]
    assert_error(http.request(method, "/v1/memories" + route.format(mem=mem), **request), 422, field)
    assert entries(mem, http) == 3
    assert http.get(f"/v1/memories/{mem}").json()["metadata"] == {}
    assert "ok-name" not in [m["name"] for m in http.get("/v1/memories").json()["memories"]]


def test_whole_number_lists_count_as_float_on_every_face(limited):
    """`search([[0, 0, 1, 0]])` and int-list keys work through RemoteMemory as in a REST JSON body and in the
    in-process Memory (converted to float32); an integer numpy array stays refused on every face."""
    from memsvc.store import Memory

    with MemoryClient(limited.url, api_key=KEY) as client:
        remote = client.create_memory(f"ints-{uuid.uuid4().hex[:8]}", dim=4, value_kind="token")
        local = Memory(remote.spec)  # in RAM
        for mem in (remote, local):
            assert mem.add([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], values=[7, 8, 9]).tolist() == [0, 1, 2]
            found = mem.search([[0, 0, 1, 0]], k=1)
            assert (found.ids.tolist(), found.values.tolist(), found.distances.tolist()) == ([[2]], [[9]], [[0.0]])
            with pytest.raises(InvalidInput, match="got integers"):
                mem.search(np.array([[0, 0, 1, 0]]), k=1)
            with pytest.raises(InvalidInput, match="token ids >= 0") as negative:
                mem.add([[0.5, 0.5, 0, 0]], values=[-1])
            assert negative.value.field == "values" and mem.stats().count == 3
        client.delete_memory(remote.spec.name)


def test_unknown_things_are_404_and_duplicates_409(http, mem):
    assert_error(http.post("/v1/memories/nope/search", json={"queries": vecs(1).tolist(), "k": 1}),
                 404, "name", "nope")
    assert_error(http.get("/v1/memories/nope"), 404, "name")
    assert_error(http.delete("/v1/memories/nope"), 404, "name")
    assert_error(http.get(f"/v1/memories/{mem}/entries/99"), 404, "id")
    assert_error(http.get("/v1/nothing-here"), 404, None, "/v1/nothing-here")
    assert_error(http.put("/v1/health"), 405, None)
    assert_error(http.post("/v1/memories", json={"name": mem, "dim": 4}), 409, "name", "already exists")
    assert http.get(f"/v1/memories/{mem}").json()["dim"] == DIM  # the original is untouched
    assert entries(mem, http) == 3


@pytest.mark.parametrize("spec, field", [
    ({"name": "ok", "dim": 0}, "dim"),
    ({"name": "ok", "dim": 2048}, "dim"),
    ({"name": "ok", "dim": 8, "value_kind": "vector", "value_dim": 4096}, "value_dim"),
    ({"name": "bad/name", "dim": 8}, "name"),
    ({"name": "ok", "dim": 8, "metric": "manhattan"}, "metric"),
    ({"name": "ok", "dim": 8, "value_kind": "vector"}, None),
    ({"name": "ok"}, "dim"),
])
def test_bad_create_is_rejected(http, spec, field):
    assert_error(http.post("/v1/memories", json=spec), 422, field)
    assert "ok" not in [m["name"] for m in http.get("/v1/memories").json()["memories"]]


def test_api_keys(limited, http):
    assert http.get("/v1/memories").status_code == 200
    assert_error(httpx.get(f"{limited.url}/v1/memories"), 401, "authorization")
    assert_error(httpx.get(f"{limited.url}/v1/memories", headers={"Authorization": "Bearer wrong"}), 401,
                 "authorization")
    assert httpx.get(f"{limited.url}/v1/health").status_code == 200
    with pytest.raises(Unauthorized):
        MemoryClient(limited.url).list_memories()
    assert isinstance(MemoryClient(limited.url, api_key="other-key").list_memories(), list)


def test_json_and_npz_agree(http, mem):
    keys, payloads = vecs(20, seed=3), [{"i": i} for i in range(20)]
    ids_json = http.post(f"/v1/memories/{mem}/entries", json={
        "keys": keys[:10].tolist(), "values": list(range(10)), "payloads": payloads[:10], "partition": "p"})
    ids_npz = post_npz(http, f"/v1/memories/{mem}/entries", encode_npz(
        {"keys": keys[10:], "values": np.arange(10, 20), "payloads": payloads[10:], "partition": "p"}))
    assert ids_json.json() == {"ids": list(range(3, 13))}
    assert ids_npz.headers["content-type"].startswith("application/json") and ids_npz.json()["ids"][0] == 13

    queries = vecs(4, seed=4)
    as_json = http.post(f"/v1/memories/{mem}/search", json={"queries": queries.tolist(), "k": 30, "partition": "p"})
    as_npz = http.post(f"/v1/memories/{mem}/search", content=encode_npz({"queries": queries, "k": 30, "partition": "p"}),
                       headers={"Content-Type": NPZ, "Accept": NPZ})
    assert as_npz.headers["content-type"] == NPZ
    body = as_json.json()
    assert body["distances"][0][-1] is None and body["ids"][0][-1] == -1  # 20 entries in p, k=30
    a, b = search_result(body), search_result(decode_npz(as_npz.content))
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.payloads == b.payloads and np.isinf(a.distances[:, 20:]).all()
    assert set(a.ids[:, :20].ravel()) == set(range(3, 23))

    as_tensors = http.post(f"/v1/memories/{mem}/search", headers={"Content-Type": TENSORS, "Accept": TENSORS},
                           content=encode_tensors({"queries": queries, "k": 30, "partition": "p"}))
    assert as_tensors.headers["content-type"] == TENSORS
    c = search_result(decode_tensors(as_tensors.content))
    np.testing.assert_array_equal(a.ids, c.ids)
    np.testing.assert_array_equal(a.distances, c.distances)
    np.testing.assert_array_equal(a.values, c.values)
    assert a.payloads == c.payloads

    entry = http.get(f"/v1/memories/{mem}/entries/13").json()
    assert entry == {"id": 13, "key": keys[10].tolist(), "value": 10, "payload": {"i": 10}, "partition": "p"}


class Recording(httpx.HTTPTransport):
    """An HTTP transport that notes the Content-Type of each request and of its answer."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str, str | None, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((request.method, request.url.path.rsplit("/", 1)[-1], request.headers.get("content-type"),
                          response.headers.get("content-type")))
        return response


def test_the_client_sends_and_reads_tensor_frames(limited):
    """RemoteMemory's add, search, get and delete travel as tensor frames both ways; values vectors,
    payloads and partitions come back as sent."""
    transport = Recording()
    with MemoryClient(limited.url, api_key=KEY, transport=transport) as c:
        m = c.create_memory(f"t-{uuid.uuid4().hex[:8]}", dim=DIM, value_kind="vector", value_dim=3)
        keys, values = vecs(5, seed=6), np.random.default_rng(7).random((5, 3), np.float32)
        ids = m.add(keys, values=values, payloads=[{"i": i} for i in range(5)], partition="p")
        res = m.search(keys[:2], k=3)
        got = m.get(np.array([ids[4], 99]))
        assert m.delete(ids=ids[:1]) == 1
        c.delete_memory(m.spec.name)
    np.testing.assert_array_equal(ids, np.arange(5))
    np.testing.assert_array_equal(res.ids[:, 0], [0, 1])
    np.testing.assert_array_equal(res.values[0, 0], values[0])
    assert res.payloads[1][0] == {"i": 1} and res.ids.dtype == np.int64 and res.distances.dtype == np.float32
    np.testing.assert_array_equal(got.keys[0], keys[4])
    assert got.found.tolist() == [True, False] and got.partitions == ["p", None] and got.payloads == [{"i": 4}, None]
    vector_calls = [seen for seen in transport.seen if seen[1] in ("entries", "search", "get", "delete")]
    assert [call[1] for call in vector_calls] == ["entries", "search", "get", "delete"]
    assert all(call[2] == TENSORS and call[3] == TENSORS for call in vector_calls), vector_calls


def test_search_params_over_rest(http):
    """Per request: ef_search on an hnsw memory, nprobe refused there; PATCH: ef_search changed and
    answered, bad values and the wrong kind refused before anything (metadata included) changes."""
    name = f"h-{uuid.uuid4().hex[:8]}"
    assert http.post("/v1/memories", json={"name": name, "dim": DIM, "index": "hnsw"}).status_code == 201
    http.post(f"/v1/memories/{name}/entries", json={"keys": vecs(50).tolist()})
    r = http.post(f"/v1/memories/{name}/search", json={"queries": vecs(2).tolist(), "k": 3, "ef_search": 8})
    assert r.status_code == 200 and r.json()["ids"][0][0] == 0
    assert_error(http.post(f"/v1/memories/{name}/search", json={"queries": vecs(1).tolist(), "k": 3, "nprobe": 8}),
                 422, "nprobe", "only to ivfpq")
    assert_error(http.post(f"/v1/memories/{name}/search", json={"queries": vecs(1).tolist(), "k": 3,
                                                                 "ef_search": 0}), 422, "ef_search", "1..1048576")
    r = http.patch(f"/v1/memories/{name}", json={"ef_search": 40})
    assert r.status_code == 200 and r.json()["ef_search"] == 40 and r.json()["metadata"] == {}
    for body, field, words in (({"metadata": {"a": 1}, "nprobe": 4}, "nprobe", "only to ivfpq"),
                               ({"metadata": {"a": 1}, "ef_search": 1 << 21}, "ef_search", "1..1048576"),
                               ({"ef_search": True}, "ef_search", "integer"),
                               ({}, None, "give metadata, ef_search or nprobe")):
        assert_error(http.patch(f"/v1/memories/{name}", json=body), 422, field, words)
    assert http.get(f"/v1/memories/{name}").json()["ef_search"] == 40
    assert http.get(f"/v1/memories/{name}").json()["metadata"] == {}
    r = http.patch(f"/v1/memories/{name}", json={"metadata": {"b": 2}, "ef_search": 64})
    assert (r.json()["metadata"], r.json()["ef_search"]) == ({"b": 2}, 64)
    assert http.delete(f"/v1/memories/{name}").status_code == 204


def test_openapi_and_docs(limited, http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/health", "/v1/memories", "/v1/memories/{name}", "/v1/memories/{name}/entries",
                 "/v1/memories/{name}/search", "/v1/memories/{name}/delete", "/v1/memories/{name}/entries/{entry_id}"):
        assert path in spec["paths"], path
    search = spec["paths"]["/v1/memories/{name}/search"]["post"]
    assert set(search["requestBody"]["content"]) == {"application/json", TENSORS, NPZ}
    assert {"queries", "ef_search", "nprobe"} <= set(
        search["requestBody"]["content"]["application/json"]["schema"]["properties"])
    assert {TENSORS, NPZ} <= set(search["responses"]["200"]["content"])
    assert {"name", "dim", "metric"} <= set(spec["components"]["schemas"]["MemorySpec"]["properties"])
    assert "swagger" in http.get("/docs").text.lower()


def test_async_client(limited):
    async def main():
        async with AsyncMemoryClient(limited.url, api_key=KEY) as c:
            m = await c.create_memory(f"a-{uuid.uuid4().hex[:8]}", dim=DIM, value_kind="token", metric="ip")
            keys = vecs(100, seed=5)
            ids = await m.add(keys, values=np.arange(100))
            results = await asyncio.gather(*(m.search(keys[i:i + 8], k=5) for i in range(0, 80, 8)))
            for i, res in zip(range(0, 80, 8), results):
                np.testing.assert_array_equal(res.values, res.ids)
                assert res.ids.shape == (8, 5)
            assert (await m.get(ids[:2])).found.all() and await m.delete(ids=ids[:10]) == 10
            assert (await m.stats()).count == 90
            await m.set_metadata({"lam": 0.5})
            assert (await c.memory(m.spec.name)).spec.metadata == {"lam": 0.5}
            with pytest.raises(InvalidInput):
                await m.search(keys[:1], k=65)
            with pytest.raises(TooLarge):
                await m.add(vecs(501), values=np.arange(501))
            await c.delete_memory(m.spec.name)
            with pytest.raises(NotFound):
                await c.memory(m.spec.name)

    asyncio.run(main())


def test_restart_keeps_data(tmp_path):
    proc = ServerProcess(tmp_path / "data").start()
    try:
        c = MemoryClient(proc.url)
        m = c.create_memory("kept", dim=DIM, value_kind="token", index="hnsw")
        keys = vecs(200, seed=6)
        m.add(keys[:150], values=np.arange(150), payloads=[{"n": i} for i in range(150)], partition="a")
        m.delete(ids=np.arange(10))
        m.set_metadata({"tuned": True})
        before = m.search(keys[:5], k=4)
        proc.stop()  # clean shutdown: snapshot
        proc.start()
        m = c.memory("kept")
        assert m.stats().count == 140 and m.spec.metadata == {"tuned": True}
        after = m.search(keys[:5], k=4)
        np.testing.assert_array_equal(before.ids, after.ids)
        assert before.payloads == after.payloads
        m.add(keys[150:], values=np.arange(150, 200))
        proc.kill()  # no shutdown: the log alone must hold the acknowledged adds
        proc.start()
        assert c.memory("kept").stats().count == 190
        assert [s.name for s in c.list_memories()] == ["kept"]
    finally:
        proc.kill()


def test_start_reconciles_store_with_catalog(tmp_path):
    data = tmp_path / "data"
    proc = ServerProcess(data).start()
    try:
        c = MemoryClient(proc.url)
        for name in ("orphan", "rowonly", "fine"):
            c.create_memory(name, dim=DIM).add(vecs(5))
        proc.stop()
        catalog = Catalog(f"sqlite:///{data / 'catalog.db'}")
        catalog.delete_memory("orphan")  # as if a create crashed between the store and the catalog
        catalog.close()
        shutil.rmtree(data / "memories" / "rowonly")
        proc.start()
        assert not (data / "memories" / "orphan").exists()
        kept = list((data / "orphaned").glob("orphan-*"))  # moved aside, not deleted
        assert len(kept) == 1 and (kept[0] / "spec.json").exists()
        assert "rowonly" in proc.log.read_text()
        assert [s.name for s in c.list_memories()] == ["fine", "rowonly"]
        with pytest.raises(NotFound):
            c.memory("rowonly")
        c.delete_memory("rowonly")
        assert c.create_memory("orphan", dim=4).stats().count == 0
        assert c.memory("fine").stats().count == 5
    finally:
        proc.kill()


@pytest.fixture
def postgres_url():
    """A fresh schema of the `test` database (dropped afterwards), as a SQLAlchemy URL."""
    schema = f"test_api_{uuid.uuid4().hex[:12]}"
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means no server to test against
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.mark.postgres
def test_catalog_on_postgres(tmp_path, postgres_url):
    proc = ServerProcess(tmp_path / "data", env={"MEMSVC_DATABASE_URL": postgres_url}).start()
    try:
        c = MemoryClient(proc.url)
        c.create_memory("pg", dim=DIM).add(vecs(7))
        with pytest.raises(AlreadyExists):
            c.create_memory("pg", dim=DIM)
        c.set_metadata("pg", {"lam": 0.1})
        assert not (tmp_path / "data" / "catalog.db").exists()
        proc.stop()
        proc.start()
        assert [(s.name, s.metadata) for s in c.list_memories()] == [("pg", {"lam": 0.1})]
        assert c.memory("pg").stats().count == 7
        c.delete_memory("pg")
        assert c.list_memories() == []
    finally:
        proc.kill()
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM memories")).scalar() == 0
    engine.dispose()


def test_cli_rejects_bad_options():
    result = CliRunner().invoke(app, ["serve", "--port", "eighty"])
    assert result.exit_code == 2 and "Invalid value for '--port'" in result.output


def test_service_create_undoes_the_catalog_row_when_the_store_fails(tmp_path):
    with connect(None, tmp_path / "data") as service:
        assert isinstance(service, Service)
        (tmp_path / "data" / "memories" / "blocked").write_text("not a memory")  # the store cannot create it
        with pytest.raises(FileExistsError):
            service.create_memory("blocked", dim=DIM)
        assert service.list_memories() == []
        with pytest.raises(InvalidInput) as err:
            service.create_memory("big", dim=service.settings.max_dim + 1)
        assert err.value.field == "dim" and service.list_memories() == []
    assert isinstance(connect("http://127.0.0.1:9", tmp_path), MemoryClient)
