"""`/v1/collections`: create, list, inspect and delete collections; upsert and delete documents; search; ask.

The collections (and the embedder) are opened on the first request that needs them, the language model
on the first ask. Authorization is the memories': a key's prefix applies to collection names, and
read-only keys may search and ask but not write.
"""
from __future__ import annotations

import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from memsvc.api.auth import WRITE, Caller, authorize, check_name
from memsvc.api.deps import ServiceDep, SettingsDep
from memsvc.api.limits import check_max_k
from memsvc.collections import Collection, Collections
from memsvc.contract import Answer, CollectionStats, Document, DocumentHit, UpsertResult

router = APIRouter(prefix="/v1/collections", tags=["collections"], dependencies=[Depends(authorize)])
_opening, _loading = threading.Lock(), threading.Lock()  # the LM loads for seconds: its own lock


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRequest(Body):
    name: str


class DocumentIn(Body):
    id: str = Field(description="the caller's id, e.g. a path; re-sending it replaces the document")
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict, description="returned with the document's hits")


class DocumentsRequest(Body):
    documents: list[DocumentIn]


class SearchRequest(Body):
    query: str
    k: int = Field(10, gt=0)
    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"


class AskRequest(Body):
    question: str
    k: int = Field(4, gt=0, le=20, description="passages given to the model")
    max_new_tokens: int = Field(256, gt=0, le=1024)


class CollectionList(BaseModel):
    collections: list[str]


class SearchResponse(BaseModel):
    hits: list[DocumentHit]


def get_collections(request: Request, service: ServiceDep) -> Collections:
    state = request.app.state
    with _opening:
        if not hasattr(state, "collections"):
            state.collections = Collections(service)
    return state.collections


CollectionsDep = Annotated[Collections, Depends(get_collections)]


def get_collection(name: str, collections: CollectionsDep) -> Collection:
    return collections.get(name)


CollectionDep = Annotated[Collection, Depends(get_collection)]


def get_language_model(request: Request) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2, loaded on the first ask (`app.state.language_model` if set)."""
    state = request.app.state
    with _loading:
        if not hasattr(state, "language_model"):
            from lm.model import load_model

            state.language_model = load_model("smollm2")
    return state.language_model


@router.post("", status_code=201, response_model=CollectionStats, dependencies=[WRITE])
def create_collection(body: CreateRequest, collections: CollectionsDep, key: Caller) -> CollectionStats:
    """Create an empty collection; 409 if the name is taken."""
    check_name(key, body.name)
    return collections.create(body.name).stats()


@router.get("", response_model=CollectionList)
def list_collections(collections: CollectionsDep, key: Caller) -> CollectionList:
    """The collections this key may use."""
    return CollectionList(collections=[name for name in collections.list() if key.allows(name)])


@router.get("/{name}", response_model=CollectionStats)
def collection_stats(collection: CollectionDep) -> CollectionStats:
    return collection.stats()


@router.delete("/{name}", status_code=204, dependencies=[WRITE])
def delete_collection(name: str, collections: CollectionsDep) -> None:
    """Delete a collection, its documents and its vectors."""
    collections.delete(name)


@router.post("/{name}/documents", response_model=UpsertResult, dependencies=[WRITE])
def upsert_documents(body: DocumentsRequest, collection: CollectionDep) -> UpsertResult:
    """Add or replace documents by id, all or nothing; unchanged ones are skipped."""
    return collection.upsert([Document(d.id, d.text, d.metadata) for d in body.documents])


@router.delete("/{name}/documents/{document_id:path}", status_code=204, dependencies=[WRITE])
def delete_document(document_id: str, collection: CollectionDep) -> None:
    collection.delete(document_id)


@router.post("/{name}/search", response_model=SearchResponse)
def search(body: SearchRequest, collection: CollectionDep, settings: SettingsDep) -> SearchResponse:
    """The k best chunks for the query, best first."""
    check_max_k(body.k, settings)
    return SearchResponse(hits=collection.search(body.query, body.k, body.mode))


@router.post("/{name}/ask", response_model=Answer)
def ask(body: AskRequest, collection: CollectionDep, request: Request) -> Answer:
    """Retrieve k passages, then answer the question from them with the language model, citing them."""
    from lm.rag import ask as rag_ask

    model, tokenizer = get_language_model(request)
    return rag_ask(collection, model, tokenizer, body.question, body.k, max_new_tokens=body.max_new_tokens)
