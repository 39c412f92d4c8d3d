"""The client's robustness, without a server: a refused connection, a URL without a scheme, a server still
loading its model (503 + Retry-After), a connection that breaks (resent only when that is safe), a timeout,
and generation's own, longer timeout. Each is a memsvc error, never an httpx one (httpx.MockTransport plays
the server)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from conftest import free_port

from memsvc.client import AsyncMemoryClient, MemoryClient, RemoteMemory
from memsvc.contract import InvalidInput, MemorySpec, MemoryUnavailable, ModelLoading, ServerUnavailable

SPEC = MemorySpec(name="m", dim=4).model_dump()
LOADING = {"error": {"code": "model_loading", "message": "the language model is loading", "field": "model"}}


def scripted(*answers) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering the requests in turn with `answers` (a Response, or an exception to raise)."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle), seen


def test_a_dead_server_is_server_unavailable_after_quick_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ServerUnavailable) as caught, MemoryClient(url) as client:
        client.list_memories()
    assert time.monotonic() - start < 5  # two resends, 0.5 s apart at most
    assert caught.value.field == "url" and caught.value.message.startswith(f"cannot reach the memsvc server at {url}")

    async def main() -> None:
        async with AsyncMemoryClient(url, retries=0) as aclient:
            await aclient.list_collections()

    with pytest.raises(ServerUnavailable, match="cannot reach"):
        asyncio.run(main())


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://host", "http://"])
def test_a_url_without_scheme_or_host_fails_at_construction(url):
    for make in (MemoryClient, AsyncMemoryClient):
        with pytest.raises(InvalidInput) as caught:
            make(url)
        assert caught.value.field == "url"
        assert caught.value.message == f"server URL {url!r} needs a scheme and a host, e.g. http://127.0.0.1:8000"


@pytest.mark.parametrize("options, field, message", [
    ({"timeout": 0}, "timeout", "timeout must be a finite number of seconds > 0, got 0"),
    ({"timeout": -1}, "timeout", "timeout must be a finite number of seconds > 0, got -1"),
    ({"timeout": float("nan")}, "timeout", "timeout must be a finite number of seconds > 0, got nan"),
    ({"timeout": "60"}, "timeout", "timeout must be a finite number of seconds > 0, got '60'"),
    ({"long_timeout": float("inf")}, "long_timeout", "long_timeout must be a finite number of seconds > 0, got inf"),
    ({"long_timeout": True}, "long_timeout", "long_timeout must be a finite number of seconds > 0, got True"),
    ({"retries": -1}, "retries", "retries must be an integer >= 0, got -1"),
    ({"retries": 1.5}, "retries", "retries must be an integer >= 0, got 1.5"),
    ({"retries": "x"}, "retries", "retries must be an integer >= 0, got 'x'"),
])
def test_bad_timeouts_and_retries_fail_at_construction(options, field, message):
    """timeout=0 answered every call 'cannot reach the server', timeout=-1 raised httpx's ValueError at the
    first call, retries=-1 and a NaN long_timeout were taken."""
    for make in (MemoryClient, AsyncMemoryClient):
        with pytest.raises(InvalidInput) as caught:
            make("http://memsvc", **options)
        assert (caught.value.field, caught.value.message) == (field, message)
    with MemoryClient("http://memsvc", timeout=0.5, long_timeout=1, retries=0) as client:
        assert (client.timeout, client.long_timeout, client.retries) == (0.5, 1, 0)


def test_503_with_retry_after_is_sent_again_until_it_answers(caplog):
    transport, seen = scripted(httpx.Response(503, json=LOADING, headers={"Retry-After": "0"}),
                               httpx.Response(503, json=LOADING, headers={"Retry-After": "0"}),
                               httpx.Response(200, json={"collections": ["docs"]}))
    with MemoryClient("http://memsvc", transport=transport) as client:
        assert client.list_collections() == ["docs"]
    assert [r.url.path for r in seen] == ["/v1/collections"] * 3
    assert [r.getMessage().split(" (waiting")[0] for r in caplog.records] == [
        "GET /v1/collections: the language model is loading; sending it again in 0 s"]  # once per call


def test_503_is_not_sent_again_past_the_timeout_or_without_retry_after():
    transport, seen = scripted(httpx.Response(503, json=LOADING, headers={"Retry-After": "30"}))
    with MemoryClient("http://memsvc", timeout=5, transport=transport) as client, \
            pytest.raises(ModelLoading, match="loading"):
        client.list_collections()  # waiting 30 s would pass the call's 5 s
    unavailable = {"error": {"code": "memory_unavailable", "message": "damaged", "field": "name"}}
    transport, seen = scripted(httpx.Response(503, json=unavailable))
    with MemoryClient("http://memsvc", transport=transport) as client, pytest.raises(MemoryUnavailable):
        client.memory("m")
    assert len(seen) == 1


def test_a_broken_connection_is_resent_only_for_idempotent_calls():
    broken = httpx.ReadError("connection reset")
    hit = {"ids": [[0]], "distances": [[0.0]]}
    transport, seen = scripted(httpx.Response(200, json=SPEC), broken, httpx.Response(200, json=hit))
    with MemoryClient("http://memsvc", transport=transport) as client:
        memory = client.memory("m")
        assert memory.search([[0, 0, 1, 0]], k=1).ids.tolist() == [[0]]  # search: sent again
        assert [r.url.path for r in seen] == ["/v1/memories/m", "/v1/memories/m/search", "/v1/memories/m/search"]

    transport, seen = scripted(broken, httpx.Response(201, json={"ids": [0]}))
    with MemoryClient("http://memsvc", transport=transport) as client, \
            pytest.raises(ServerUnavailable, match="connection to the memsvc server at http://memsvc failed"):
        RemoteMemory(client, memory.spec).add(np.eye(1, 4, dtype=np.float32))  # sent twice: stored twice
    assert len(seen) == 1


def test_a_timeout_is_server_unavailable_and_not_sent_again():
    transport, seen = scripted(httpx.ReadTimeout("slow"), httpx.Response(200, json={"collections": []}))
    with MemoryClient("http://memsvc", timeout=3, transport=transport) as client, \
            pytest.raises(ServerUnavailable) as caught:
        client.list_collections()
    assert caught.value.field == "timeout" and "did not answer within 3 s" in caught.value.message
    assert len(seen) == 1


def test_ask_waits_with_its_own_longer_timeout():
    answer = {"answer": "yes [1]", "citations": [{"n": 1, "document_id": "a", "chunk_id": "a#0", "score": 1.0,
                                                   "cited": True}]}
    transport, seen = scripted(httpx.Response(200, json={"name": "docs", "documents": 1, "chunks": 1}),
                               httpx.Response(200, json={"hits": []}), httpx.Response(200, json=answer))
    with MemoryClient("http://memsvc", timeout=7, long_timeout=300, transport=transport) as client:
        docs = client.collection("docs")
        assert docs.search("q", k=1) == []
        assert docs.ask("q", k=1).answer == "yes [1]"
    timeouts = [r.extensions["timeout"] for r in seen]
    assert [t["read"] for t in timeouts] == [7, 7, 300] and timeouts[2]["connect"] == 10
    assert json.loads(seen[2].content) == {"question": "q", "k": 1, "max_new_tokens": 256}


def test_the_async_client_resends_503_and_reports_a_dead_server():
    transport, seen = scripted(httpx.Response(503, json=LOADING, headers={"Retry-After": "0"}),
                               httpx.Response(200, json={"collections": ["docs"]}))
    handler = transport.handle_request

    class Async(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return handler(request)

    async def main() -> list[str]:
        async with AsyncMemoryClient("http://memsvc", transport=Async()) as client:
            return await client.list_collections()

    assert asyncio.run(main()) == ["docs"] and len(seen) == 2
