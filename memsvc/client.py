"""Python client of the REST API: `MemoryClient`, `AsyncMemoryClient` and their remote memories.

`MemoryClient` is the REST face of the `memsvc.contract.Client` interface (`memsvc.service.Service` is the
embedded one). A `RemoteMemory` behaves exactly like the in-process `memsvc.store.Memory`: it implements
`MemoryBackend`, checks its inputs with the same functions and raises the same `memsvc.contract` error types
(rebuilt from the server's error body). Vectors travel, both ways, as tensor frames
(`application/x-memsvc-tensors`, `memsvc.contract.wire`).

Each operation is described once as a `Call` (what to send, how to read the answer); the sync and the
async client only differ in how they perform it. New resources (collections) add their calls the same way.

Failures: a refused connection is tried again by httpx's transport (`retries`, backoff 0.5 s, 1 s, 2 s, ...);
a 503 with Retry-After (the server still loading its model) is sent again after the time it asks, until the
call's timeout; a connection that broke after sending is sent again only for calls that change nothing or
can be repeated (`Call.idempotent`); the first wait of a call is logged as a warning (so a first `ask` says
that it waits for the model). What still fails raises `ServerUnavailable`, never an httpx error.
Generation (`ask`) has its own, longer timeout (`long_timeout`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import quote

import httpx
import numpy as np

from memsvc.contract import (
    Answer,
    AnswerStream,
    Citation,
    CollectionStats,
    Document,
    DocumentHit,
    Entries,
    InvalidInput,
    MemorySpec,
    MemoryStats,
    MemsvcError,
    SearchMode,
    SearchResult,
    ServerUnavailable,
    UpsertResult,
    as_documents,
    check_ask,
    check_ids,
    check_k,
    check_keys,
    check_partition,
    check_partitions,
    check_payloads,
    check_search_params,
    check_values,
    error_from_dict,
    spec_from,
)
from memsvc.contract.wire import (
    JSON,
    NPZ,
    SSE,
    TENSORS,
    decode,
    encode_tensors,
    entries_result,
    loads_json,
    media_type,
    read_sse,
    search_result,
)


def _fields(fields: dict[str, Any] | None) -> Any:
    return fields


@dataclass(frozen=True)
class Call:
    """One HTTP exchange: a binary body (tensor frame or npz) also asks for an answer in its format;
    `read` turns the answer's fields into the result."""

    method: str
    path: str
    read: Callable[[dict[str, Any] | None], Any] = _fields
    content: bytes | None = None
    content_type: str | None = None
    idempotent: bool = True  # sending it twice does what sending it once does (safe to repeat after a break)
    long: bool = False  # generation: waits up to the client's long_timeout

    @property
    def headers(self) -> dict[str, str]:
        if self.content_type is None:
            return {}
        binary = self.content_type in (TENSORS, NPZ)
        return {"Content-Type": self.content_type, **({"Accept": self.content_type} if binary else {})}

    def answer(self, response: httpx.Response) -> Any:
        """The result of a response, or the typed error the server sent."""
        if response.is_error:
            try:
                body = loads_json(response.content)
            except ValueError:
                body = {"error": {"message": f"HTTP {response.status_code}: {response.text[:200]}"}}
            exc = error_from_dict(body)
            exc.status = response.status_code  # what the server answered, for callers that log it
            raise exc
        content_type = response.headers.get("content-type")
        return self.read(decode(response.content, content_type) if response.content else None)


def _path(name: str, *rest: str) -> str:
    return "/".join(("/v1/memories", quote(name, safe=""), *rest))


def _json_call(method: str, path: str, body: dict[str, Any], read: Callable[[Any], Any],
               idempotent: bool = True, long: bool = False) -> Call:
    try:
        content = json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"metadata is not JSON: {exc}", "metadata") from None
    return Call(method, path, read, content, JSON, idempotent, long)


def _tensor_call(path: str, read: Callable[[Any], Any], idempotent: bool = True, **fields: Any) -> Call:
    return Call("POST", path, read, encode_tensors(fields), TENSORS, idempotent)


def _spec(fields: dict[str, Any]) -> MemorySpec:
    return MemorySpec(**{name: fields[name] for name in MemorySpec.model_fields})


def _stats(fields: dict[str, Any]) -> MemoryStats:
    """The stats the server sent (fields a newer server adds are left out)."""
    return MemoryStats(**{name: fields[name] for name in MemoryStats.model_fields if name in fields})


# --- the calls: inputs are checked here with the in-process Memory's own check functions -----------

def health_call() -> Call:
    return Call("GET", "/v1/health")


def create_call(spec: MemorySpec) -> Call:
    return _json_call("POST", "/v1/memories", spec.model_dump(), _spec, idempotent=False)


def spec_call(name: str) -> Call:
    return Call("GET", _path(name), _spec)


def list_call() -> Call:
    return Call("GET", "/v1/memories", lambda fields: [MemorySpec(**spec) for spec in fields["memories"]])


def drop_call(name: str) -> Call:
    return Call("DELETE", _path(name))


def metadata_call(name: str, metadata: dict[str, Any]) -> Call:
    return _json_call("PATCH", _path(name), {"metadata": metadata}, MemorySpec.model_validate)


def search_params_call(spec: MemorySpec, ef_search: int | None, nprobe: int | None) -> Call:
    ef_search, nprobe = check_search_params(spec, ef_search, nprobe)
    body = {name: value for name, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value is not None}
    return _json_call("PATCH", _path(spec.name), body, MemorySpec.model_validate)


def stats_call(spec: MemorySpec) -> Call:
    return Call("GET", _path(spec.name), _stats)


def add_call(spec: MemorySpec, keys: Any, values: Any, payloads: list[Any] | None, partition: str | None,
             partitions: Sequence[str | None] | None = None) -> Call:
    keys = check_keys(keys, spec, "keys")
    values, payloads = check_values(spec, values, len(keys)), check_payloads(payloads, len(keys))
    partition = check_partition(partition)
    return _tensor_call(_path(spec.name, "entries"), lambda f: np.asarray(f["ids"], dtype=np.int64), False,
                        keys=keys, values=values, payloads=payloads, partition=partition,
                        partitions=check_partitions(partitions, len(keys), partition, "key"))


def search_call(spec: MemorySpec, queries: Any, k: int, partition: str | None,
                partitions: Sequence[str | None] | None = None, ef_search: int | None = None,
                nprobe: int | None = None) -> Call:
    queries = check_keys(queries, spec, "queries")
    k, partition = check_k(k), check_partition(partition)
    ef_search, nprobe = check_search_params(spec, ef_search, nprobe)
    return _tensor_call(_path(spec.name, "search"), search_result, queries=queries, k=k, partition=partition,
                        partitions=check_partitions(partitions, len(queries), partition),
                        ef_search=ef_search, nprobe=nprobe)


def get_call(spec: MemorySpec, ids: Any) -> Call:
    return _tensor_call(_path(spec.name, "get"), entries_result, ids=check_ids(ids))


def delete_call(spec: MemorySpec, ids: Any, partition: str | None) -> Call:
    ids = None if ids is None else check_ids(ids)
    return _tensor_call(_path(spec.name, "delete"), lambda f: int(f["deleted"]), ids=ids, partition=partition)


def _collection_path(name: str, *rest: str) -> str:
    return "/".join(("/v1/collections", quote(name, safe=""), *rest))


def create_collection_call(name: str) -> Call:
    return _json_call("POST", "/v1/collections", {"name": name}, lambda f: f["name"], idempotent=False)


def collection_call(name: str) -> Call:
    return Call("GET", _collection_path(name), lambda f: f["name"])


def collection_stats_call(name: str) -> Call:
    return Call("GET", _collection_path(name), lambda f: CollectionStats(**f))


def list_collections_call() -> Call:
    return Call("GET", "/v1/collections", lambda f: f["collections"])


def drop_collection_call(name: str) -> Call:
    return Call("DELETE", _collection_path(name))


def upsert_call(name: str, documents: list[Document]) -> Call:
    body = {"documents": [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in documents]}
    return _json_call("POST", _collection_path(name, "documents"), body, lambda f: UpsertResult(**f))


def delete_document_call(name: str, document_id: str) -> Call:
    return Call("DELETE", _collection_path(name, "documents", quote(document_id, safe="")))


def collection_search_call(name: str, query: str, k: int, mode: str, group_by: str | None = None,
                           score: str = "max") -> Call:
    body = {"query": query, "k": k, "mode": mode, "group_by": group_by, "score": score}
    return _json_call("POST", _collection_path(name, "search"), body,
                      lambda f: [DocumentHit(**hit) for hit in f["hits"]])


def _answer(fields: dict[str, Any]) -> Answer:
    return Answer(fields["answer"], [Citation(**c) for c in fields["citations"]])


def ask_call(name: str, question: str, k: int, max_new_tokens: int, stream: bool = False) -> Call:
    check_ask(k, max_new_tokens)  # the server's limits, before a request
    body = {"question": question, "k": k, "max_new_tokens": max_new_tokens, **({"stream": True} if stream else {})}
    return _json_call("POST", _collection_path(name, "ask"), body, _answer, long=True)

def answer_events(call: Call, response: httpx.Response) -> Iterator[str | Answer]:
    """The pieces and the final Answer of a streamed ask (`memsvc.api.collections`: `token` events, then
    `done`, or `error`, raised as its memsvc error); closes the response when done or closed. A server that
    answered plain JSON gives the whole answer as one piece."""
    try:
        if media_type(response.headers.get("content-type")) != SSE:
            response.read()
            answer = call.answer(response)
            yield answer.answer
            yield answer
            return
        for event, data in read_sse(response.iter_lines()):
            fields = loads_json(data)
            if event == "token":
                yield fields["text"]
            elif event == "done":
                yield _answer(fields)
                return
            elif event == "error":
                raise error_from_dict(fields)
        raise MemsvcError("the server ended the answer stream before its end (no `done` event)")
    finally:
        response.close()


log = logging.getLogger(__name__)


def _auth(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


# --- how a call is sent: timeouts, retries, errors ------------------------------------------------

TIMEOUT = 60.0  # seconds for a call, and for a connection to open (at most CONNECT_TIMEOUT)
LONG_TIMEOUT = 900.0  # seconds for generation (ask): a first ask on CPU loads the model, then decodes
CONNECT_TIMEOUT = 10.0
RETRIES = 2  # connection attempts after a refused one (httpx transport retries)
BACKOFF = 0.5  # seconds before the first resend of a broken idempotent call, doubling after each


def check_url(url: str) -> str:
    """The server URL, or InvalidInput when it has no http(s) scheme or no host ('localhost:8000')."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidInput(f"server URL {url!r} is not a URL ({exc})", "url") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput(f"server URL {url!r} needs a scheme and a host, e.g. http://127.0.0.1:8000", "url")
    return url


def check_waits(timeout: Any, long_timeout: Any, retries: Any) -> tuple[float, float, int]:
    """(timeout, long_timeout, retries) as given, or InvalidInput naming the first bad one: the timeouts finite
    seconds > 0, retries an integer >= 0."""
    for field, seconds in (("timeout", timeout), ("long_timeout", long_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < float("inf"):
            raise InvalidInput(f"{field} must be a finite number of seconds > 0, got {seconds!r}", field)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidInput(f"retries must be an integer >= 0, got {retries!r}", "retries")
    return timeout, long_timeout, retries


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT))


def _unavailable(url: str, exc: httpx.TransportError, timeout: float) -> ServerUnavailable:
    """httpx's transport error as the memsvc error a caller handles."""
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return ServerUnavailable(f"cannot reach the memsvc server at {url} ({exc or type(exc).__name__}); "
                                 "is it running, and is the URL right?", "url")
    if isinstance(exc, httpx.TimeoutException):
        return ServerUnavailable(f"the memsvc server at {url} did not answer within {timeout:g} s "
                                 "(a longer timeout waits for slow calls)", "timeout")
    return ServerUnavailable(f"the connection to the memsvc server at {url} failed: "
                             f"{exc or type(exc).__name__}", "url")


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds a 503 asks to wait before sending again (None: not a 503 that asks for a resend)."""
    if response.status_code != 503:
        return None
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _next_try(call: Call, attempt: int, deadline: float, response: httpx.Response | None = None,
              error: httpx.TransportError | None = None, retries: int = RETRIES) -> float | None:
    """Seconds to wait before sending `call` again after this `response` or `error`, or None to stop there.

    A 503 with Retry-After is sent again while the call's time lasts; a connection that broke after sending
    (not a timeout: the server may still be working on it), `retries` times for an idempotent call."""
    left = deadline - time.monotonic()
    if response is not None:
        wait = _retry_after(response)
    elif isinstance(error, httpx.TimeoutException | httpx.ConnectError) or not call.idempotent \
            or attempt >= retries:
        wait = None  # refused connections were already tried again by the transport
    else:
        wait = BACKOFF * 2 ** attempt
    if wait is None or wait >= left:
        return None
    if attempt == 0:  # once per call, on stderr even where logging is not set up (logging's last resort)
        why = _said(response) if response is not None else f"{type(error).__name__}: {error}"
        log.warning("%s %s: %s; sending it again in %g s (waiting up to %.0f s)", call.method, call.path, why,
                    wait, left)
    return wait


def _said(response: httpx.Response) -> str:
    """The message of an error answer (its status when it has none)."""
    try:
        return str(loads_json(response.content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


# --- sync ---------------------------------------------------------------------------------------

class MemoryClient:
    """A memsvc server at `url`: its memories and collections (a `memsvc.contract.Client`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = TIMEOUT,
                 transport: httpx.BaseTransport | None = None, *, long_timeout: float = LONG_TIMEOUT,
                 retries: int = RETRIES):
        """`timeout`: seconds a call may take; `long_timeout`: the same for generation (ask); `retries`:
        resends after a refused connection (by httpx's transport, so not with a `transport` of your own) or
        a broken idempotent call. InvalidInput for a URL without an http(s) scheme or host, a timeout that is
        not a finite number of seconds > 0, or retries < 0."""
        self.url = check_url(url)
        self.timeout, self.long_timeout, self.retries = check_waits(timeout, long_timeout, retries)
        transport = transport or httpx.HTTPTransport(retries=retries)
        self.http = httpx.Client(base_url=url, headers=_auth(api_key), timeout=_timeout(timeout),
                                 transport=transport)

    def send(self, call: Call) -> Any:
        """Perform `call` (resending as the module says); its result, or the typed error."""
        timeout = self.long_timeout if call.long else self.timeout
        deadline, attempt = time.monotonic() + timeout, 0
        extra = {"extensions": {"timeout": _timeout(timeout).as_dict()}} if call.long else {}  # httpx's per-request
        while True:
            try:
                response = self.http.request(call.method, call.path, content=call.content, headers=call.headers,
                                             **extra)
            except httpx.TransportError as exc:
                wait = _next_try(call, attempt, deadline, error=exc, retries=self.retries)
                if wait is None:
                    raise _unavailable(self.url, exc, timeout) from None
            else:
                wait = _next_try(call, attempt, deadline, response=response, retries=self.retries)
                if wait is None:
                    return call.answer(response)
            time.sleep(wait)
            attempt += 1

    def stream(self, call: Call) -> AnswerStream:
        """Send `call` asking for server-sent events (resending as `send` does, within `long_timeout`); the
        typed error if the server refuses it up front, ServerUnavailable if the connection fails."""
        timeout = self.long_timeout
        deadline, attempt = time.monotonic() + timeout, 0
        while True:
            request = self.http.build_request(call.method, call.path, content=call.content,
                                              headers={**call.headers, "Accept": SSE},
                                              extensions={"timeout": _timeout(timeout).as_dict()})
            try:
                response = self.http.send(request, stream=True)
            except httpx.TransportError as exc:
                wait = _next_try(call, attempt, deadline, error=exc, retries=self.retries)
                if wait is None:
                    raise _unavailable(self.url, exc, timeout) from None
            else:
                if not response.is_error:
                    return AnswerStream(self._events(call, response, timeout), on_close=response.close)
                try:
                    response.read()
                finally:
                    response.close()
                wait = _next_try(call, attempt, deadline, response=response, retries=self.retries)
                if wait is None:
                    call.answer(response)  # raises the server's error
            time.sleep(wait)
            attempt += 1

    def _events(self, call: Call, response: httpx.Response, timeout: float) -> Iterator[str | Answer]:
        """`answer_events`, a broken or silent connection raised as ServerUnavailable."""
        try:
            yield from answer_events(call, response)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc, timeout) from None

    def health(self) -> dict[str, Any]:
        return self.send(health_call())

    def create_memory(self, name: str, dim: int, metric: str = "l2", value_kind: str = "none",
                      value_dim: int | None = None, index: str = "flat", **index_params: Any) -> RemoteMemory:
        """Create a memory (index_params: nlist, pq_m, nprobe, hnsw_m, ... of MemorySpec)."""
        spec = spec_from(name=name, dim=dim, metric=metric, value_kind=value_kind, value_dim=value_dim,
                         index=index, **index_params)
        return RemoteMemory(self, self.send(create_call(spec)))

    def memory(self, name: str) -> RemoteMemory:
        return RemoteMemory(self, self.send(spec_call(name)))

    def list_memories(self) -> list[MemorySpec]:
        return self.send(list_call())

    def delete_memory(self, name: str) -> None:
        self.send(drop_call(name))

    def set_metadata(self, name: str, metadata: dict[str, Any]) -> MemorySpec:
        return self.send(metadata_call(name, metadata))

    def set_search_params(self, name: str, ef_search: int | None = None, nprobe: int | None = None) -> MemorySpec:
        """Change a memory's ef_search (hnsw) / nprobe (ivfpq) on the server, kept across restarts."""
        return self.send(search_params_call(self.send(spec_call(name)), ef_search, nprobe))

    def create_collection(self, name: str) -> RemoteCollection:
        return RemoteCollection(self, self.send(create_collection_call(name)))

    def collection(self, name: str) -> RemoteCollection:
        return RemoteCollection(self, self.send(collection_call(name)))

    def list_collections(self) -> list[str]:
        return self.send(list_collections_call())

    def delete_collection(self, name: str) -> None:
        self.send(drop_collection_call(name))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteMemory:
    """A memory on a server; the same `MemoryBackend` behaviour as the in-process `Memory`."""

    def __init__(self, client: MemoryClient, spec: MemorySpec):
        self.client = client
        self.spec = spec

    def add(self, keys: Any, values: Any = None, payloads: list[Any] | None = None,
            partition: str | None = None, partitions: Sequence[str | None] | None = None) -> np.ndarray:
        """Store entries, their ids in order; `partitions`: one partition per key row, in one request."""
        return self.client.send(add_call(self.spec, keys, values, payloads, partition, partitions))

    def search(self, queries: Any, k: int, partition: str | None = None,
               partitions: Sequence[str | None] | None = None, *, ef_search: int | None = None,
               nprobe: int | None = None) -> SearchResult:
        """Top-k per query, closest first; `partitions`: one partition per query row, in one request."""
        return self.client.send(search_call(self.spec, queries, k, partition, partitions, ef_search, nprobe))

    def get(self, ids: Any) -> Entries:
        return self.client.send(get_call(self.spec, ids))

    def delete(self, ids: Any = None, partition: str | None = None) -> int:
        return self.client.send(delete_call(self.spec, ids, partition))

    def stats(self) -> MemoryStats:
        return self.client.send(stats_call(self.spec))

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        self.spec = self.client.set_metadata(self.spec.name, metadata)

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        self.spec = self.client.send(search_params_call(self.spec, ef_search, nprobe))


class RemoteCollection:
    """A document collection on a server (a `CollectionBackend`, as the embedded `memsvc.collections.Collection`)."""

    def __init__(self, client: MemoryClient, name: str):
        self.client = client
        self.name = name

    def upsert(self, documents: list[Document]) -> UpsertResult:
        return self.client.send(upsert_call(self.name, documents))

    def add_documents(self, documents: list[Document | dict[str, Any]]) -> UpsertResult:
        """Upsert documents given as `Document`s or dicts {id, text, metadata?}."""
        return self.upsert(as_documents(documents))

    def delete(self, document_id: str) -> None:
        self.client.send(delete_document_call(self.name, document_id))

    def search(self, query: str, k: int = 10, mode: SearchMode = "hybrid", group_by: str | None = None,
               score: str = "max") -> list[DocumentHit]:
        return self.client.send(collection_search_call(self.name, query, k, mode, group_by, score))

    def ask(self, question: str, k: int = 4, max_new_tokens: int = 256) -> Answer:
        return self.client.send(ask_call(self.name, question, k, max_new_tokens))

    def ask_stream(self, question: str, k: int = 4, max_new_tokens: int = 256) -> AnswerStream:
        """`ask` as server-sent events: iterate for the answer's pieces as the server decodes them, then
        `result()` for the Answer with its citations; close the stream (or use `with`) to stop early."""
        return self.client.stream(ask_call(self.name, question, k, max_new_tokens, stream=True))

    def stats(self) -> CollectionStats:
        return self.client.send(collection_stats_call(self.name))


# --- async ---------------------------------------------------------------------------------------

class AsyncMemoryClient:
    """`MemoryClient` for asyncio."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, *, long_timeout: float = LONG_TIMEOUT,
                 retries: int = RETRIES):
        self.url = check_url(url)
        self.timeout, self.long_timeout, self.retries = check_waits(timeout, long_timeout, retries)
        transport = transport or httpx.AsyncHTTPTransport(retries=retries)
        self.http = httpx.AsyncClient(base_url=url, headers=_auth(api_key), timeout=_timeout(timeout),
                                      transport=transport)

    async def send(self, call: Call) -> Any:
        """`MemoryClient.send`, awaited."""
        timeout = self.long_timeout if call.long else self.timeout
        deadline, attempt = time.monotonic() + timeout, 0
        extra = {"extensions": {"timeout": _timeout(timeout).as_dict()}} if call.long else {}  # httpx's per-request
        while True:
            try:
                response = await self.http.request(call.method, call.path, content=call.content,
                                                   headers=call.headers, **extra)
            except httpx.TransportError as exc:
                wait = _next_try(call, attempt, deadline, error=exc, retries=self.retries)
                if wait is None:
                    raise _unavailable(self.url, exc, timeout) from None
            else:
                wait = _next_try(call, attempt, deadline, response=response, retries=self.retries)
                if wait is None:
                    return call.answer(response)
            await asyncio.sleep(wait)
            attempt += 1

    async def health(self) -> dict[str, Any]:
        return await self.send(health_call())

    async def create_memory(self, name: str, dim: int, metric: str = "l2", value_kind: str = "none",
                            value_dim: int | None = None, index: str = "flat",
                            **index_params: Any) -> AsyncRemoteMemory:
        spec = spec_from(name=name, dim=dim, metric=metric, value_kind=value_kind, value_dim=value_dim,
                         index=index, **index_params)
        return AsyncRemoteMemory(self, await self.send(create_call(spec)))

    async def memory(self, name: str) -> AsyncRemoteMemory:
        return AsyncRemoteMemory(self, await self.send(spec_call(name)))

    async def list_memories(self) -> list[MemorySpec]:
        return await self.send(list_call())

    async def delete_memory(self, name: str) -> None:
        await self.send(drop_call(name))

    async def set_metadata(self, name: str, metadata: dict[str, Any]) -> MemorySpec:
        return await self.send(metadata_call(name, metadata))

    async def set_search_params(self, name: str, ef_search: int | None = None,
                                nprobe: int | None = None) -> MemorySpec:
        return await self.send(search_params_call(await self.send(spec_call(name)), ef_search, nprobe))

    async def create_collection(self, name: str) -> AsyncRemoteCollection:
        return AsyncRemoteCollection(self, await self.send(create_collection_call(name)))

    async def collection(self, name: str) -> AsyncRemoteCollection:
        return AsyncRemoteCollection(self, await self.send(collection_call(name)))

    async def list_collections(self) -> list[str]:
        return await self.send(list_collections_call())

    async def delete_collection(self, name: str) -> None:
        await self.send(drop_collection_call(name))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncRemoteMemory:
    """`RemoteMemory` for asyncio: the same calls, awaited."""

    def __init__(self, client: AsyncMemoryClient, spec: MemorySpec):
        self.client = client
        self.spec = spec

    async def add(self, keys: Any, values: Any = None, payloads: list[Any] | None = None,
                  partition: str | None = None, partitions: Sequence[str | None] | None = None) -> np.ndarray:
        return await self.client.send(add_call(self.spec, keys, values, payloads, partition, partitions))

    async def search(self, queries: Any, k: int, partition: str | None = None,
                     partitions: Sequence[str | None] | None = None, *, ef_search: int | None = None,
                     nprobe: int | None = None) -> SearchResult:
        return await self.client.send(search_call(self.spec, queries, k, partition, partitions, ef_search,
                                                  nprobe))

    async def get(self, ids: Any) -> Entries:
        return await self.client.send(get_call(self.spec, ids))

    async def delete(self, ids: Any = None, partition: str | None = None) -> int:
        return await self.client.send(delete_call(self.spec, ids, partition))

    async def stats(self) -> MemoryStats:
        return await self.client.send(stats_call(self.spec))

    async def set_metadata(self, metadata: dict[str, Any]) -> None:
        self.spec = await self.client.set_metadata(self.spec.name, metadata)

    async def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        self.spec = await self.client.send(search_params_call(self.spec, ef_search, nprobe))


class AsyncRemoteCollection:
    """`RemoteCollection` for asyncio: the same calls, awaited."""

    def __init__(self, client: AsyncMemoryClient, name: str):
        self.client = client
        self.name = name

    async def upsert(self, documents: list[Document]) -> UpsertResult:
        return await self.client.send(upsert_call(self.name, documents))

    async def add_documents(self, documents: list[Document | dict[str, Any]]) -> UpsertResult:
        """Upsert documents given as `Document`s or dicts {id, text, metadata?}."""
        return await self.upsert(as_documents(documents))

    async def delete(self, document_id: str) -> None:
        await self.client.send(delete_document_call(self.name, document_id))

    async def search(self, query: str, k: int = 10, mode: SearchMode = "hybrid", group_by: str | None = None,
                     score: str = "max") -> list[DocumentHit]:
        return await self.client.send(collection_search_call(self.name, query, k, mode, group_by, score))

    async def ask(self, question: str, k: int = 4, max_new_tokens: int = 256) -> Answer:
        return await self.client.send(ask_call(self.name, question, k, max_new_tokens))

    async def stats(self) -> CollectionStats:
        return await self.client.send(collection_stats_call(self.name))
