"""`/v1/collections`: create, list, inspect and delete collections; upsert and delete documents; search; ask.

Every route is one call of the service's `Client` interface (`Service.collection(name).search(...)`, ...).
The service loads the embedder on the first request that needs it, the language model at start in the
background (or on the first ask), answering ask with 503 `model_loading` meanwhile.
Authorization is the memories': a key's prefix applies to collection names, and read-only keys may search
and ask but not write.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from memsvc.api.auth import WRITE, Caller, authorize, check_name
from memsvc.api.deps import ServiceDep, SettingsDep
from memsvc.api.limits import check_max_k
from memsvc.api.schemas import Body
from memsvc.collections import Collection
from memsvc.contract import (
    Answer,
    BackendUnavailable,
    CollectionStats,
    Document,
    DocumentHit,
    InvalidInput,
    MemsvcError,
    ModelLoading,
    SearchMode,
    UpsertResult,
)
from memsvc.service import Service

router = APIRouter(prefix="/v1/collections", tags=["collections"], dependencies=[Depends(authorize)])


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


class AskRequest(Body):
    question: str
    k: int = Field(4, gt=0, le=20, description="passages given to the model")
    max_new_tokens: int = Field(256, gt=0, le=1024)


class CollectionList(BaseModel):
    collections: list[str]


class CollectionSearchResponse(BaseModel):
    hits: list[DocumentHit]


def get_collection(name: str, service: ServiceDep) -> Collection:
    return service.collection(name)


CollectionDep = Annotated[Collection, Depends(get_collection)]


@router.post("", status_code=201, response_model=CollectionStats, dependencies=[WRITE])
def create_collection(body: CreateRequest, service: ServiceDep, key: Caller) -> CollectionStats:
    """Create an empty collection; 409 if the name is taken."""
    check_name(key, body.name)
    return service.create_collection(body.name).stats()


@router.get("", response_model=CollectionList)
def list_collections(service: ServiceDep, key: Caller) -> CollectionList:
    """The collections this key may use."""
    return CollectionList(collections=[name for name in service.list_collections() if key.allows(name)])


@router.get("/{name}", response_model=CollectionStats)
def collection_stats(collection: CollectionDep) -> CollectionStats:
    return collection.stats()


@router.delete("/{name}", status_code=204, dependencies=[WRITE])
def delete_collection(name: str, service: ServiceDep) -> None:
    """Delete a collection, its documents and its vectors."""
    service.delete_collection(name)


@router.post("/{name}/documents", response_model=UpsertResult, dependencies=[WRITE])
def upsert_documents(body: DocumentsRequest, collection: CollectionDep) -> UpsertResult:
    """Add or replace documents by id, all or nothing; unchanged ones are skipped."""
    return collection.upsert([Document(d.id, d.text, d.metadata) for d in body.documents])


@router.delete("/{name}/documents/{document_id:path}", status_code=204, dependencies=[WRITE])
def delete_document(document_id: str, collection: CollectionDep) -> None:
    collection.delete(document_id)


@router.post("/{name}/search", response_model=CollectionSearchResponse)
def search(body: CollectionSearchRequest, collection: CollectionDep, settings: SettingsDep) -> CollectionSearchResponse:
    """The k best chunks for the query, best first."""
    check_max_k(body.k, settings)
    return CollectionSearchResponse(hits=collection.search(body.query, body.k, body.mode))


@router.post("/{name}/ask", response_model=Answer)
async def ask(body: AskRequest, collection: CollectionDep, service: ServiceDep, request: Request) -> Answer:
    """Retrieve k passages, then answer the question from them with the language model, citing them.

    503 `model_loading` with Retry-After while the model loads; decoding stops when the client disconnects."""
    if not body.question.strip():  # bad input is answered before "loading"
        raise InvalidInput("question must be a non-empty string", "question")
    check_model_ready(service)
    gone = threading.Event()
    work = asyncio.ensure_future(run_in_threadpool(collection.ask_until, gone.is_set, body.question, body.k,
                                                   body.max_new_tokens))
    try:
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL))[0]:
            if await request.is_disconnected():
                gone.set()  # the decoding thread stops after its current token
    finally:
        gone.set()  # also when this request is cancelled (server shutdown)
    return work.result()


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
