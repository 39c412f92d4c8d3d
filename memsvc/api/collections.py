"""`/v1/collections`: create, list, inspect and delete collections; upsert and delete documents; search; ask.

Every route is one call of the service's `Client` interface (`Service.collection(name).search(...)`, ...).
The service loads the embedder on the first request that needs it, the language model at start in the
background (or on the first ask), answering ask with 503 `model_loading` meanwhile.
Authorization is the memories': a key's prefix applies to collection names, and read-only keys may search
and ask but not write.

`ask` streams its answer as server-sent events when asked to (`"stream": true`, or `Accept:
text/event-stream`): a `token` event per text piece as it decodes (data `{"text": ...}`), then one `done` event
with the whole answer and its citations (the JSON answer's body), or an `error` event (an `ErrorBody`) if
decoding fails midway. Errors found before decoding starts (bad input, unknown collection, ...) are plain JSON
error responses, as without streaming.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, Field, TypeAdapter
from starlette.concurrency import run_in_threadpool

from memsvc.api.auth import WRITE, Caller, authorize, check_name
from memsvc.api.deps import ServiceDep, SettingsDep
from memsvc.api.errors import AUTH, JSON_BODY, NAMED, error_responses
from memsvc.api.limits import check_max_k
from memsvc.api.schemas import Body
from memsvc.contract import (
    MAX_ASK_K,
    MAX_ASK_TOKENS,
    Answer,
    AnswerStream,
    BackendUnavailable,
    CollectionBackend,
    CollectionStats,
    Document,
    DocumentHit,
    InvalidInput,
    MemsvcError,
    ModelLoading,
    SearchMode,
    UpsertResult,
)
from memsvc.contract.wire import SSE, sse_event
from memsvc.service import Service

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/collections", tags=["collections"], dependencies=[Depends(authorize)])
COLLECTION = (*NAMED, "not_found", "memory_unavailable", "backend_unavailable")  # routes that open a collection


class CreateRequest(Body):
    name: str


class DocumentIn(Body):
    id: str = Field(description="the caller's id, e.g. a path; re-sending it replaces the document")
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict, description="returned with the document's hits")


class DocumentsRequest(Body):
    documents: list[DocumentIn]


class CollectionSearchRequest(Body):
    query: str
    k: int = Field(10, gt=0)
    mode: SearchMode = "hybrid"
    group_by: Literal["chunk", "document"] | None = Field(
        None, description="document: the k best documents, each as its best chunk (default: chunks)")
    score: Literal["max", "sum"] = Field("max", description="with group_by=document: a document's score over "
                                                           "its chunks' scores")


class AskRequest(Body):
    question: str
    k: int = Field(4, gt=0, le=MAX_ASK_K, description="passages given to the model")  # as AskOptions (the floor)
    max_new_tokens: int = Field(256, gt=0, le=MAX_ASK_TOKENS, description="the longest answer, in tokens")
    stream: bool = Field(False, description="answer as server-sent events (as `Accept: text/event-stream` asks)")


class TokenEvent(BaseModel):
    """The data of a `token` event of a streamed ask."""

    text: str = Field(description="the next piece of the answer; the pieces joined are the answer")


class CollectionList(BaseModel):
    collections: list[str]


class CollectionSearchResponse(BaseModel):
    hits: list[DocumentHit]


def get_collection(name: str, service: ServiceDep) -> CollectionBackend:
    return service.collection(name)


CollectionDep = Annotated[CollectionBackend, Depends(get_collection)]


@router.post("", status_code=201, response_model=CollectionStats, dependencies=[WRITE],
             responses=error_responses(*NAMED, *JSON_BODY, "already_exists", "backend_unavailable"))
def create_collection(body: CreateRequest, service: ServiceDep, key: Caller) -> CollectionStats:
    """Create an empty collection; 409 if the name is taken."""
    check_name(key, body.name)
    return service.create_collection(body.name).stats()


@router.get("", response_model=CollectionList, responses=error_responses(*AUTH))
def list_collections(service: ServiceDep, key: Caller) -> CollectionList:
    """The collections this key may use."""
    return CollectionList(collections=[name for name in service.list_collections() if key.allows(name)])


@router.get("/{name}", response_model=CollectionStats, responses=error_responses(*COLLECTION))
def collection_stats(collection: CollectionDep) -> CollectionStats:
    return collection.stats()


@router.delete("/{name}", status_code=204, dependencies=[WRITE], responses=error_responses(*COLLECTION))
def delete_collection(name: str, service: ServiceDep) -> None:
    """Delete a collection, its documents and its vectors."""
    service.delete_collection(name)


@router.post("/{name}/documents", response_model=UpsertResult, dependencies=[WRITE],
             responses=error_responses(*COLLECTION, *JSON_BODY, "insufficient_storage"))
def upsert_documents(body: DocumentsRequest, collection: CollectionDep) -> UpsertResult:
    """Add or replace documents by id, all or nothing; unchanged ones are skipped."""
    return collection.upsert([Document(d.id, d.text, d.metadata) for d in body.documents])


@router.delete("/{name}/documents/{document_id:path}", status_code=204, dependencies=[WRITE],
               responses=error_responses(*COLLECTION, "insufficient_storage"))
def delete_document(document_id: str, collection: CollectionDep) -> None:
    collection.delete(document_id)


@router.post("/{name}/search", response_model=CollectionSearchResponse,
             responses=error_responses(*COLLECTION, *JSON_BODY))
def search(body: CollectionSearchRequest, collection: CollectionDep, settings: SettingsDep) -> CollectionSearchResponse:
    """The k best chunks (or with `group_by=document`, documents) for the query, best first."""
    check_max_k(body.k, settings)
    return CollectionSearchResponse(hits=collection.search(body.query, body.k, body.mode, body.group_by,
                                                           body.score))


ANSWER = TypeAdapter(Answer)


def answer_events(stream: AnswerStream) -> Iterator[bytes]:
    """The events of a streamed answer: `token`s, then `done` with the Answer, or `error` if decoding fails."""
    with stream:
        try:
            for piece in stream:
                yield sse_event("token", orjson.dumps({"text": piece}))
            yield sse_event("done", ANSWER.dump_json(stream.result()))  # as the JSON answer is serialised
        except MemsvcError as exc:
            yield sse_event("error", orjson.dumps(exc.to_dict()))
        except Exception as exc:  # a bug: the client learns that the answer is cut short, the log tells why
            log.exception("ask stream failed")
            body = {"code": "internal_error", "message": f"internal server error ({type(exc).__name__})"}
            yield sse_event("error", orjson.dumps({"error": body}))


def _data(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


# OpenAPI 3.2's description of an event stream (as FastAPI writes its own): each event, by its name
ANSWER_EVENTS = {"type": "object", "required": ["event", "data"], "oneOf": [
    {"properties": {"event": {"const": "token"},
                    "data": _data(TokenEvent.model_json_schema())}},
    {"properties": {"event": {"const": "done"}, "data": _data({"$ref": "#/components/schemas/Answer"})}},
    {"properties": {"event": {"const": "error"}, "data": _data({"$ref": "#/components/schemas/ErrorBody"})}},
]}
ASK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the answer as JSON, or as server-sent events with stream=true or Accept: "
                         "text/event-stream: `token` {text} events, then `done` (the JSON answer) or `error` "
                         "(an ErrorBody)",
          "content": {SSE: {"itemSchema": ANSWER_EVENTS}}},
    **error_responses(*COLLECTION, *JSON_BODY, "model_loading"),
}


@router.post("/{name}/ask", response_model=Answer, responses=ASK_RESPONSES)
async def ask(body: AskRequest, request: Request, collection: CollectionDep, service: ServiceDep) -> Answer | Response:
    """Retrieve k passages, then answer the question from them with the language model, citing them; streamed
    as server-sent events with `stream` (see the module). 503 `model_loading` with Retry-After while the model
    loads; decoding stops when the client disconnects."""
    if not body.question.strip():  # bad input is answered before "loading"
        raise InvalidInput("question must be a non-empty string", "question")
    check_model_ready(service)
    stream = await run_in_threadpool(collection.ask_stream, body.question, body.k, body.max_new_tokens)
    if body.stream or SSE in request.headers.get("accept", ""):
        return EventSourceResponse(answer_events(stream), headers={"Cache-Control": "no-cache"})
    gone = threading.Event()
    work = asyncio.ensure_future(run_in_threadpool(answer_unless, stream, gone))
    try:
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL))[0]:
            if await request.is_disconnected():
                gone.set()  # the decoding thread stops after its current piece
    finally:
        gone.set()  # also when this request is cancelled (server shutdown)
    answer = work.result()
    return Response(status_code=204) if answer is None else answer  # 204: for nobody, the client has gone


def answer_unless(stream: AnswerStream, gone: threading.Event) -> Answer | None:
    """The stream's Answer, read piece by piece; None once `gone` is set (the stream is closed: decoding stops)."""
    with stream:
        for _ in stream:
            if gone.is_set():
                return None
        return stream.result()


DISCONNECT_POLL = 0.25  # seconds between checks that the asking client is still there


def check_model_ready(service: Service) -> None:
    """ModelLoading (503) unless the model of ask is loaded (its load is started if it is not under way); the
    error of a load that failed, once (the next ask loads again)."""
    model = service.collections.language_model
    if model.ready():
        return
    error, model.error = model.error, None
    if error is not None:
        if isinstance(error, MemsvcError):
            raise error
        raise BackendUnavailable(f"the language model could not be loaded: {type(error).__name__}: {error}",
                                 "model")
    model.start()
    raise ModelLoading("the language model is loading (about a minute on CPU); retry shortly", "model",
                       retry_after=2)
