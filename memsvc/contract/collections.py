"""The collection types every side shares: documents in, hits and answers out, and the name rules.

The in-process `memsvc.collections.Collection` and the client's `RemoteCollection` take and return these.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from memsvc.contract.errors import InvalidInput

COLLECTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,123}$"  # its memory `col.<name>` fits a memory name
MEMORY_PREFIX = "col."
MAX_DOCUMENT_BYTES = 8 << 20  # ~2M tokens: embedding one takes minutes on CPU, so larger ones get 413
SearchMode = Literal["bm25", "dense", "hybrid"]
SEARCH_MODES: tuple[SearchMode, ...] = ("bm25", "dense", "hybrid")


@dataclass(frozen=True)
class Document:
    """A document to upsert: `id` is the caller's (e.g. a path), `metadata` a JSON object returned with hits."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentHit:
    """A search result with what an answer needs: the chunk's text and its document's metadata."""

    document_id: str
    chunk_id: str
    score: float
    text: str
    section: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class UpsertResult:
    """Document ids by outcome, and how many chunks were embedded."""

    added: list[str]
    updated: list[str]
    unchanged: list[str]
    chunks: int


@dataclass(frozen=True)
class CollectionStats:
    """What a collection's `stats()` returns: its name and how many documents and chunks it holds."""

    name: str
    documents: int
    chunks: int


@dataclass(frozen=True)
class Citation:
    """A passage an answer was given: `n` is its number in the prompt, `cited` whether the answer says [n];
    `text` and `section` are the passage as the model read it (empty from a server that predates them)."""

    n: int
    document_id: str
    chunk_id: str
    score: float
    cited: bool
    text: str = ""
    section: str = ""


@dataclass(frozen=True)
class Answer:
    answer: str
    citations: list[Citation]


def as_documents(documents: Sequence[Document | dict[str, Any]]) -> list[Document]:
    """Documents given as `Document`s or dicts {id, text, metadata?}, as `Document`s."""
    return [d if isinstance(d, Document) else Document(**d) for d in documents]


def check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(COLLECTION_NAME, name):
        raise InvalidInput("collection name must be 1..124 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit", "name")
    return name
