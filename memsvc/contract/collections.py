"""The collection types every side shares: documents in, hits and answers out, and the name rules.

The in-process `memsvc.collections.Collection` and the client's `RemoteCollection` take and return these.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memsvc.contract.checks import invalid_input
from memsvc.contract.errors import InvalidInput

COLLECTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,123}$"  # its memory `col.<name>` fits a memory name
MEMORY_PREFIX = "col."
MAX_DOCUMENT_BYTES = 8 << 20  # ~2M tokens: embedding one takes minutes on CPU, so larger ones get 413
MAX_DOCUMENT_ID = 1024  # characters; the catalog's document_id column (chunk ids add '#n-digest')
MAX_ASK_K = 20  # passages an ask gives the model (they share its context with the question and the answer)
MAX_ASK_TOKENS = 1024  # the longest answer an ask decodes
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


class AnswerStream:
    """An answer as it decodes (`ask_stream`): iterating yields its text pieces in order; `result()` gives the
    whole `Answer` (the pieces joined, and the citations) once they are all out, reading whatever is left.

    `events` yields the pieces (str), then the one final `Answer`. Closing the stream (or leaving its `with`
    block) closes `events` and calls `on_close`, which stops the generation, in process or on the server
    (the client closes the HTTP response). Errors raised while decoding come out of the iteration.
    """

    def __init__(self, events: Iterator[str | Answer], on_close: Callable[[], None] | None = None):
        self._events = events
        self._on_close = on_close
        self._answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            if isinstance(event, Answer):
                self._answer = event
            else:
                yield event

    def result(self) -> Answer:
        """The whole answer; reads the pieces not iterated yet. RuntimeError if the stream was closed before
        its end."""
        for _ in self:
            pass
        if self._answer is None:
            raise RuntimeError("the answer stream was closed before its end")
        return self._answer

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_documents(documents: Sequence[Document | dict[str, Any]]) -> list[Document]:
    """Documents given as `Document`s or dicts {id, text, metadata?}, as `Document`s."""
    return [d if isinstance(d, Document) else Document(**d) for d in documents]


def check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(COLLECTION_NAME, name):
        raise InvalidInput("collection name must be 1..124 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit", "name")
    return name


def check_document_id(document_id: Any, field: str = "document_id") -> str:
    """`document_id` if it is a printable string (no control characters, no line breaks; spaces are printable)
    of 1..MAX_DOCUMENT_ID characters, else InvalidInput naming `field`: the rule every upsert applies (in
    process, over REST, and `memsvc ingest` before it reads a file)."""
    if not isinstance(document_id, str) or not 0 < len(document_id) <= MAX_DOCUMENT_ID \
            or not document_id.isprintable():
        raise InvalidInput(f"document_id must be a printable string of 1..{MAX_DOCUMENT_ID} characters", field)
    return document_id


class AskOptions(BaseModel):
    """The numbers of an ask, on every face (`POST .../ask`, `Collection.ask`, `RemoteCollection.ask`, `memsvc
    ask`): k passages, an answer of at most max_new_tokens tokens."""

    model_config = ConfigDict(strict=True)

    k: int = Field(4, gt=0, le=MAX_ASK_K, description="passages given to the model")
    max_new_tokens: int = Field(256, gt=0, le=MAX_ASK_TOKENS, description="the longest answer, in tokens")


def check_ask(k: Any, max_new_tokens: Any) -> None:
    """InvalidInput naming the field ("k: Input should be less than or equal to 20") unless k is an integer in
    1..MAX_ASK_K and max_new_tokens one in 1..MAX_ASK_TOKENS: what the REST API answers 422, checked before a
    model loads or a request is sent."""
    try:
        AskOptions(k=k, max_new_tokens=max_new_tokens)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None
