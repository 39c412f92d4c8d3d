"""The collection types every side shares: documents in, hits and answers out, and the name rules.

The in-process `memsvc.collections.Collection` and the client's `RemoteCollection` take and return these.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from memsvc.contract.errors import InvalidInput

COLLECTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,123}$"  # its memory `col.<name>` fits a memory name
MEMORY_PREFIX = "col."
MAX_DOCUMENT_BYTES = 8 << 20  # ~2M tokens: embedding one takes minutes on CPU, so larger ones get 413


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
    """A passage an answer was given: `n` is its number in the prompt, `cited` whether the answer says [n]."""

    n: int
    document_id: str
    chunk_id: str
    score: float
    cited: bool


@dataclass(frozen=True)
class Answer:
    answer: str
    citations: list[Citation]


def check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(COLLECTION_NAME, name):
        raise InvalidInput("collection name must be 1..124 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit", "name")
    return name
