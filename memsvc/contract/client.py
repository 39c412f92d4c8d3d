"""The one client interface, with two faces: `memsvc.service.Service` (embedded: a data directory in this
process) and `memsvc.client.MemoryClient` (REST: a server), in the manner of qdrant-client's `QdrantBase`
and its local and remote implementations. Code written against `Client` runs on either;
`memsvc.connect.connect(url, data_dir)` picks one.

A memory is a `MemoryBackend` (`memsvc.contract.types`); a document collection is a `CollectionBackend`,
embedded `memsvc.collections.Collection` or REST `memsvc.client.RemoteCollection`, `ask` included.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, Self, runtime_checkable

from memsvc.contract.collections import (
    Answer,
    AnswerStream,
    CollectionStats,
    Document,
    DocumentHit,
    SearchMode,
    UpsertResult,
)
from memsvc.contract.spec import MemorySpec
from memsvc.contract.types import MemoryBackend


@runtime_checkable
class CollectionBackend(Protocol):
    """One document collection: upsert documents by id, delete them, search them, answer from them."""

    name: str

    def upsert(self, documents: Sequence[Document]) -> UpsertResult:
        """Add or replace documents by id, all or nothing; unchanged ones are skipped."""
        ...

    def add_documents(self, documents: Sequence[Document | dict[str, Any]]) -> UpsertResult:
        """`upsert` of documents given as `Document`s or dicts {id, text, metadata?}."""
        ...

    def delete(self, document_id: str) -> None: ...

    def search(self, query: str, k: int = 10, mode: SearchMode = "hybrid") -> list[DocumentHit]:
        """The k best chunks for the query with their text and document metadata, best first."""
        ...

    def ask(self, question: str, k: int = 4, max_new_tokens: int = 256) -> Answer:
        """Retrieve k passages, answer the question from them with the language model, cite them."""
        ...

    def ask_stream(self, question: str, k: int = 4, max_new_tokens: int = 256) -> AnswerStream:
        """`ask`, with the answer's text pieces as they decode: iterate the stream for them, then
        `result()` for the `Answer` (the joined pieces and the citations). Bad input and a missing collection
        raise here, before anything decodes."""
        ...

    def stats(self) -> CollectionStats: ...


@runtime_checkable
class MemoriesClient(Protocol):
    """The memory calls of a `Client` (what a collection needs to keep its vectors)."""

    def create_memory(self, name: str, dim: int, metric: str = "l2", value_kind: str = "none",
                      value_dim: int | None = None, index: str = "flat", **index_params: Any) -> MemoryBackend:
        """Create a memory (index_params: nlist, pq_m, nprobe, hnsw_m, ... of MemorySpec); AlreadyExists
        if the name is taken."""
        ...

    def memory(self, name: str) -> MemoryBackend:
        """An existing memory; NotFound if there is none."""
        ...

    def list_memories(self) -> list[MemorySpec]: ...

    def delete_memory(self, name: str) -> None: ...

    def set_metadata(self, name: str, metadata: dict[str, Any]) -> MemorySpec:
        """Replace a memory's free-form metadata; returns its updated spec."""
        ...

    def set_search_params(self, name: str, ef_search: int | None = None, nprobe: int | None = None) -> MemorySpec:
        """Change a memory's ef_search (hnsw) / nprobe (ivfpq), kept across restarts; returns its spec."""
        ...


@runtime_checkable
class Client(MemoriesClient, Protocol):
    """Memories and document collections, embedded or over REST; closes as a context manager."""

    def create_collection(self, name: str) -> CollectionBackend:
        """A new, empty collection; AlreadyExists if the name is taken."""
        ...

    def collection(self, name: str) -> CollectionBackend:
        """An existing collection; NotFound if there is none."""
        ...

    def list_collections(self) -> list[str]: ...

    def delete_collection(self, name: str) -> None:
        """Delete a collection with its documents and vectors."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
