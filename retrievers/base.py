"""What every retriever shares: the `Chunk` it indexes, the `Hit` it returns, and the protocols.

A `ChunkIndex` is written: it indexes chunks (see `retrievers.chunking`); `add` is an upsert by document:
the chunks given for a document replace that document's previous chunks; chunks whose id is unchanged are
kept as they are (chunk ids carry a content hash), so re-adding an unchanged document costs nothing.
A `Retriever` is read: it answers a text query with its best chunks, and a `Scorer` also scores given
chunks. BM25 keeps its own index in RAM (it is both); dense vectors have one writer, `DenseIndex`, and
`DenseRetriever` only scores them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from memsvc.contract import InvalidInput, check_k, check_unicode

__all__ = ["DOCUMENT_SCORES", "Chunk", "ChunkIndex", "Hit", "Retriever", "Scorer", "by_document", "check_k",
           "check_query", "document_of", "group_by_document"]

DOCUMENT_SCORES = ("max", "sum")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough for the embedder; `section` is its heading trail.
    The id starts with `<document_id>#`, so a hit's document is known from its chunk id alone."""

    id: str
    document_id: str
    text: str
    section: str = ""


@dataclass(frozen=True)
class Hit:
    """One search result: larger `score` is better; scores compare only within one retriever."""

    chunk_id: str
    document_id: str
    score: float


@runtime_checkable
class ChunkIndex(Protocol):
    """Index chunks, forget documents."""

    def add(self, chunks: Iterable[Chunk]) -> int:
        """Upsert the documents these chunks belong to; returns how many chunks were newly indexed."""
        ...

    def remove(self, document_id: str) -> int:
        """Forget a document's chunks; returns how many there were."""
        ...


@runtime_checkable
class Retriever(Protocol):
    """Answer queries."""

    def search(self, query: str, k: int) -> list[Hit]:
        """At most k best chunks for the query, best first."""
        ...


@runtime_checkable
class Scorer(Retriever, Protocol):
    """A retriever that can also score chunks it did not return (what score fusion needs)."""

    def score(self, query: str, chunk_ids: Sequence[str]) -> list[Hit]:
        """Hits for those of these chunks it holds, in the given order, scored as `search` would."""
        ...


def check_query(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("query must be a non-empty string", "query")
    return check_unicode(query, "query")


def by_document(chunks: Iterable[Chunk]) -> dict[str, list[Chunk]]:
    """Chunks grouped by document, in order; a chunk id given twice is an error."""
    docs: dict[str, list[Chunk]] = {}
    seen: set[str] = set()
    for chunk in chunks:
        if not isinstance(chunk, Chunk):
            raise InvalidInput(f"expected Chunk objects, got {type(chunk).__name__}", "chunks")
        if not chunk.id.startswith(f"{chunk.document_id}#"):
            raise InvalidInput(f"chunk id {chunk.id!r} must start with its document id and '#'", "chunks")
        if chunk.id in seen:
            raise InvalidInput(f"chunk id {chunk.id!r} is given twice", "chunks")
        seen.add(chunk.id)
        docs.setdefault(chunk.document_id, []).append(chunk)
    return docs


def document_of(chunk_id: str) -> str:
    """The document a chunk id belongs to (see `Chunk`)."""
    return chunk_id.rpartition("#")[0]


def group_by_document(hits: Sequence[Hit], k: int, score: str = "max") -> list[Hit]:
    """Rank documents from a ranked list of chunk hits (best first): one hit per document, its best chunk,
    the k best documents, best first.

    `score` is the document's score: "max", its best chunk's score (so documents rank in the order of
    their first appearance); or "sum", the sum over its chunks in `hits` of (chunk score - the lowest
    score in `hits`), so every chunk adds a non-negative amount whatever the scale of the retriever's
    scores (fused z-scores can be negative). On bench/eval_retrieval.py "max" ranked answer documents
    best (MRR@10 0.557 vs 0.297 for a shifted sum; bench/results/retrieval_v2.md): sums favour long
    documents. Ties keep the order of first appearance. Raises InvalidInput for another `score`."""
    if score not in DOCUMENT_SCORES:
        raise InvalidInput(f"score must be one of {', '.join(DOCUMENT_SCORES)}, got {score!r}", "score")
    k = check_k(k)
    best: dict[str, Hit] = {}
    for hit in hits:
        best.setdefault(hit.document_id, hit)
    if score == "max":
        return list(best.values())[:k]
    floor = min((hit.score for hit in hits), default=0.0)
    total = dict.fromkeys(best, 0.0)
    for hit in hits:
        total[hit.document_id] += hit.score - floor
    order = sorted(best, key=lambda doc: -total[doc])[:k]
    return [Hit(best[doc].chunk_id, doc, total[doc]) for doc in order]
