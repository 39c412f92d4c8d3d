"""The one memory abstraction: `MemoryBackend`, what its calls return (`SearchResult`, `Entries`) and
its typed `MemoryStats`. Implemented in-process by `memsvc.store.Memory` and over REST by
`memsvc.client.RemoteMemory`, with identical behaviour (one shared test suite runs against both).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field

from memsvc.contract.spec import MemorySpec


@dataclass
class SearchResult:
    """Top-k neighbours of m queries: ids/distances [m, k]; values [m, k, ...] and payloads [m][k] if stored."""

    ids: np.ndarray
    distances: np.ndarray
    values: np.ndarray | None = None
    payloads: list[list[Any]] | None = None


@dataclass
class Entries:
    """Stored entries fetched by id: rows follow the requested ids; `found` marks which exist."""

    ids: np.ndarray
    found: np.ndarray
    keys: np.ndarray
    values: np.ndarray | None = None
    payloads: list[Any] | None = None
    partitions: list[str | None] | None = None


class Partition(BaseModel):
    """A partition of a memory and its number of live entries; `name` None is the unpartitioned entries."""

    name: str | None
    count: int


class MemoryStats(MemorySpec):
    """What `MemoryBackend.stats()` returns: the spec, the live entry count, partitions and index state."""

    count: int
    partitions: list[Partition]
    trained: bool
    train_seconds: float | None = Field(None, description="how long training the ivfpq index took")
    snapshot_seconds: float | None = Field(None, description="how long the memory's last snapshot took")
    device: str
    durable: bool
    log_bytes: int


@runtime_checkable
class MemoryBackend(Protocol):
    """Everything that remembers vectors goes through this: in-process `Memory` or REST `RemoteMemory`."""

    spec: MemorySpec

    def add(self, keys: np.ndarray, values: np.ndarray | None = None, payloads: list[Any] | None = None,
            partition: str | None = None, partitions: Sequence[str | None] | None = None) -> np.ndarray:
        """Store n entries [n, dim] (values, payloads: one per key) and return their new ids [n], in order.

        `partition` tags every entry (None: unpartitioned). `partitions` (instead of `partition`) is a
        batched add: one name per key row, row i stored exactly as `add(keys[i:i + 1], ...,
        partition=partitions[i])` would store it, ids still consecutive in row order, in one call (e.g. the
        evictions of every KV head of a layer, each head a partition)."""
        ...

    def search(self, queries: np.ndarray, k: int, partition: str | None = None,
               partitions: Sequence[str | None] | None = None, *, ef_search: int | None = None,
               nprobe: int | None = None) -> SearchResult:
        """Top-k entries of each query [m, dim], closest first: ids/distances [m, k].

        `partition` scopes every query to one partition (None: the whole memory). `partitions` (instead
        of `partition`) is a batched search: one name per query row, row i answered exactly as
        `search(queries[i:i + 1], k, partition=partitions[i])` would answer it, in one call (e.g. all
        KV heads of a layer, each head a partition). `ef_search` (hnsw, at least k is used) / `nprobe`
        (ivfpq) override the memory's own for this call (InvalidInput for another index kind or out of
        range)."""
        ...

    def get(self, ids: np.ndarray) -> Entries: ...

    def delete(self, ids: np.ndarray | None = None, partition: str | None = None) -> int: ...

    def stats(self) -> MemoryStats: ...

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the memory's free-form metadata (e.g. tuned kNN-LM settings) in `spec.metadata`."""
        ...

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the memory's `spec.ef_search` (hnsw) / `spec.nprobe` (ivfpq) for every later search,
        durably where the memory is; None leaves one as it is."""
        ...
