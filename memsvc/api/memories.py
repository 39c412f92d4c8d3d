"""`/v1/memories`: create, list, inspect, update and delete memories; add, search, get and delete entries.

FAISS and the log are blocking, so every memory call runs in the threadpool and concurrent searches run
in parallel. Routes that manage memories are plain `def` (FastAPI sends them to the threadpool). The
vector routes are the hot path: `async def` with only the router's async dependencies (the API key), they
make one hop to a worker thread (`deps.vector_call`) for decoding, the call and encoding together. They
take JSON, tensor-frame or npz bodies and answer in the format the client's Accept header names
(`wire.accepted`).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from memsvc.api.auth import WRITE, Caller, authorize, check_name
from memsvc.api.deps import ServiceDep, binary_body, binary_response, vector_call
from memsvc.api.errors import AUTH, BINARY_BODY, JSON_BODY, MEMORY, NAMED, error_responses
from memsvc.api.limits import check_batch, check_max_k
from memsvc.api.schemas import (
    AddRequest,
    AddResponse,
    DeleteRequest,
    DeleteResponse,
    EntriesResponse,
    Entry,
    GetRequest,
    MemoryList,
    MemoryPatch,
    SearchRequest,
    SearchResponse,
)
from memsvc.config import Settings
from memsvc.contract import (
    MEMORY_PREFIX,
    Forbidden,
    InvalidInput,
    MemorySpec,
    MemoryStats,
    NotFound,
    check_search_params,
)
from memsvc.contract.wire import entries_fields, search_fields
from memsvc.service import Service

router = APIRouter(prefix="/v1/memories", tags=["memories"], dependencies=[Depends(authorize)])


async def not_a_collection_memory(name: str) -> None:
    """Writes to a collection's memory go through the collection: vectors changed behind its back would
    no longer match its documents."""
    if name.startswith(MEMORY_PREFIX):
        raise Forbidden(f"memory '{name}' holds a collection's vectors; change it through "
                        f"/v1/collections/{name.removeprefix(MEMORY_PREFIX)}", "name")


OWN = Depends(not_a_collection_memory)


@router.post("", status_code=201, response_model=MemoryStats, dependencies=[WRITE],
             responses=error_responses(*NAMED, *JSON_BODY, "already_exists", "backend_unavailable"))
def create_memory(spec: MemorySpec, service: ServiceDep, key: Caller) -> MemoryStats:
    """Create a memory; 409 if the name is taken. Names starting with `col.` are the collections'."""
    check_name(key, spec.name)
    if spec.name.startswith(MEMORY_PREFIX):
        raise InvalidInput(f"memory names starting with '{MEMORY_PREFIX}' are reserved for collections",
                           "name")
    return service.create(spec).stats()


@router.get("", response_model=MemoryList, responses=error_responses(*AUTH))
def list_memories(service: ServiceDep, key: Caller) -> MemoryList:
    """The memories this key may use."""
    return MemoryList(memories=[spec for spec in service.list_memories() if key.allows(spec.name)])


@router.get("/{name}", response_model=MemoryStats, responses=error_responses(*MEMORY))
def memory_stats(name: str, service: ServiceDep) -> MemoryStats:
    """The memory's spec, entry count, partitions and index state."""
    return service.memory(name).stats()


@router.patch("/{name}", response_model=MemorySpec, dependencies=[WRITE, OWN],
              responses=error_responses(*MEMORY, *JSON_BODY))
def update_memory(name: str, patch: MemoryPatch, service: ServiceDep) -> MemorySpec:
    """Replace the memory's free-form metadata (e.g. tuned kNN-LM settings) and/or change its search
    parameters (`ef_search` of an hnsw memory, `nprobe` of an ivfpq one), kept across restarts. Every
    field is checked before anything changes."""
    tune = patch.ef_search is not None or patch.nprobe is not None
    if tune:
        check_search_params(service.memory(name).spec, patch.ef_search, patch.nprobe)
    spec = None
    if patch.metadata is not None:
        spec = service.set_metadata(name, patch.metadata)
    if tune:
        spec = service.set_search_params(name, ef_search=patch.ef_search, nprobe=patch.nprobe)
    return spec


@router.delete("/{name}", status_code=204, dependencies=[WRITE, OWN], responses=error_responses(*MEMORY))
def delete_memory(name: str, service: ServiceDep) -> None:
    service.delete_memory(name)


@router.post("/{name}/entries", status_code=201, response_model=AddResponse, dependencies=[WRITE, OWN],
             openapi_extra=binary_body(AddRequest),
             responses={**binary_response(201), **error_responses(*MEMORY, *BINARY_BODY, "insufficient_storage")})
async def add_entries(name: str, request: Request) -> Response:
    """Store entries; acknowledged once they are on disk. Returns their ids. `partitions` tags each key row
    with its own partition (a batched add)."""
    def add(body: AddRequest, service: Service, settings: Settings) -> dict[str, Any]:
        check_batch(body.keys, "keys", settings)
        return {"ids": service.memory(name).add(body.keys, body.values, body.payloads, body.partition,
                                                partitions=body.partitions)}

    return await vector_call(request, AddRequest, add, status_code=201)


@router.post("/{name}/search", response_model=SearchResponse,
             openapi_extra=binary_body(SearchRequest),
             responses={**binary_response(), **error_responses(*MEMORY, *BINARY_BODY)})
async def search(name: str, request: Request) -> Response:
    """Top-k entries per query, closest first; missing neighbours are id -1, distance null (+inf).
    `partitions` searches each query row in its own partition; `ef_search` (hnsw) / `nprobe` (ivfpq)
    override the memory's own for this request."""
    def search(body: SearchRequest, service: Service, settings: Settings) -> dict[str, Any]:
        check_batch(body.queries, "queries", settings)
        check_max_k(body.k, settings)
        return search_fields(service.memory(name).search(body.queries, body.k, body.partition,
                                                         partitions=body.partitions,
                                                         ef_search=body.ef_search, nprobe=body.nprobe))

    return await vector_call(request, SearchRequest, search)


@router.post("/{name}/get", response_model=EntriesResponse,
             openapi_extra=binary_body(GetRequest),
             responses={**binary_response(), **error_responses(*MEMORY, *BINARY_BODY)})
async def get_entries(name: str, request: Request) -> Response:
    """Entries by id, in the order asked; `found` is false where an id does not exist."""
    def get(body: GetRequest, service: Service, settings: Settings) -> dict[str, Any]:
        check_batch(body.ids, "ids", settings)
        return entries_fields(service.memory(name).get(body.ids))

    return await vector_call(request, GetRequest, get)


@router.get("/{name}/entries/{entry_id}", response_model=Entry, responses=error_responses(*MEMORY, "invalid_input"))
def get_entry(name: str, entry_id: int, service: ServiceDep) -> Entry:
    entries = service.memory(name).get([entry_id])
    if not entries.found[0]:
        raise NotFound(f"memory '{name}' has no entry {entry_id}", "id")
    value = None if entries.values is None else entries.values[0].tolist()
    return Entry(id=entry_id, key=entries.keys[0].tolist(), value=value, payload=entries.payloads[0],
                 partition=entries.partitions[0])


@router.post("/{name}/delete", response_model=DeleteResponse, dependencies=[WRITE, OWN],
             openapi_extra=binary_body(DeleteRequest),
             responses={**binary_response(), **error_responses(*MEMORY, *BINARY_BODY, "insufficient_storage")})
async def delete_entries(name: str, request: Request) -> Response:
    """Delete entries by ids, by partition, or ids within a partition; returns how many."""
    def delete(body: DeleteRequest, service: Service, settings: Settings) -> dict[str, Any]:
        if body.ids is not None:
            check_batch(body.ids, "ids", settings)
        return {"deleted": service.memory(name).delete(body.ids, body.partition)}

    return await vector_call(request, DeleteRequest, delete)
