"""Request and response bodies of the REST API (pydantic), shared with the client.

Vector fields only take shape here (JSON lists become numpy arrays); what they hold is checked by
`memsvc.store.Memory` itself, so every backend rejects exactly the same things.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from memsvc.contract import MemorySpec, lone_surrogate


def _as_array(x: Any) -> np.ndarray:
    """npz arrays pass through; JSON lists become arrays, whole-number matrices counting as float."""
    if isinstance(x, np.ndarray):
        return x
    try:
        a = np.asarray(x)
    except ValueError:
        raise ValueError("must be a rectangular array of numbers") from None
    return a.astype(np.float32) if a.ndim == 2 and a.dtype.kind in "iu" else a


def _array(schema: dict[str, Any]) -> Any:
    return Annotated[Any, BeforeValidator(_as_array), WithJsonSchema(schema)]


_MATRIX = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
Matrix = _array({**_MATRIX, "description": "[n, dim] numbers; float32 in a binary body"})
Values = _array({"description": "value vectors [n, value_dim], or token ids [n]",
                 "anyOf": [_MATRIX, {"type": "array", "items": {"type": "integer"}}]})
Ids = _array({"type": "array", "items": {"type": "integer"}, "description": "entry ids"})


class Body(BaseModel):
    """A request body. Every field of every route's body, JSON or npz, is refused (422) if a string in it
    holds a lone UTF-16 surrogate (`memsvc.contract.lone_surrogate`): one place for all routes."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is a mistake worth reporting

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        wrong = lone_surrogate(value)
        if wrong is not None:
            raise ValueError(wrong)
        return value


class AddRequest(Body):
    keys: Matrix
    values: Values | None = Field(None, description="required unless the memory's value_kind is 'none'")
    payloads: list[Any] | None = Field(None, description="one JSON value per key")
    partition: str | None = Field(None, description="tag that scopes search and delete")
    partitions: list[str | None] | None = Field(
        None, description="instead of `partition`: one partition per key row (null: unpartitioned), e.g. the "
                          "evictions of every KV head of a layer in one request")


class SearchRequest(Body):
    queries: Matrix
    k: StrictInt = Field(description="neighbours per query")
    partition: str | None = Field(None, description="search only this partition")
    ef_search: StrictInt | None = Field(None, description="hnsw: search breadth for this request (at least k "
                                        "is used); default the memory's")
    nprobe: StrictInt | None = Field(None, description="ivfpq: inverted lists probed for this request; default "
                                     "the memory's")
    partitions: list[str | None] | None = Field(
        None, description="instead of `partition`: one partition per query row (null: the whole memory), "
                          "each row answered as a search of its own partition")


class GetRequest(Body):
    ids: Ids


class DeleteRequest(Body):
    ids: Ids | None = Field(None, description="delete these entries (within `partition` if given)")
    partition: str | None = Field(None, description="delete this partition (or only `ids` within it)")


class MemoryPatch(Body):
    """What PATCH /v1/memories/{name} changes: any of these, at least one."""

    metadata: dict[str, Any] | None = Field(None, description="replaces the memory's free-form metadata")
    ef_search: StrictInt | None = Field(None, description="hnsw: the memory's search breadth from now on")
    nprobe: StrictInt | None = Field(None, description="ivfpq: inverted lists probed per query from now on")

    @model_validator(mode="after")
    def _something(self) -> MemoryPatch:
        if self.metadata is None and self.ef_search is None and self.nprobe is None:
            raise ValueError("give metadata, ef_search or nprobe")
        return self



class AddResponse(BaseModel):
    ids: list[int]


class SearchResponse(BaseModel):
    ids: list[list[int]] = Field(description="[m, k]; -1 where there is no neighbour")
    distances: list[list[float | None]] = Field(description="[m, k], smaller is closer; null = +inf (none)")
    values: list[Any] | None = Field(None, description="[m, k] token ids or [m, k, value_dim] vectors")
    payloads: list[list[Any]] | None = None


class EntriesResponse(BaseModel):
    ids: list[int]
    found: list[bool]
    keys: list[list[float]]
    values: list[Any] | None = None
    payloads: list[Any] | None = None
    partitions: list[str | None]


class Entry(BaseModel):
    id: int
    key: list[float]
    value: Any = None
    payload: Any = None
    partition: str | None = None


class DeleteResponse(BaseModel):
    deleted: int = Field(description="entries deleted")


class MemoryList(BaseModel):
    memories: list[MemorySpec]


class Health(BaseModel):
    status: str
    version: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable tag, e.g. invalid_input, not_found, already_exists, "
                                  "too_large, unauthorized, forbidden, insufficient_storage, memory_unavailable")
    message: str = Field(description="what went wrong, for a person")
    field: str | None = Field(None, description="the input at fault (a body field, `name`, `authorization`, "
                                                "`body`); absent when no single one is")


class ErrorBody(BaseModel):
    """Every error response of the API, whatever its status (memsvc.api.errors)."""

    error: ErrorDetail
