"""Document collections: upsert documents by id, delete them, search them (bm25 | dense | hybrid).

Documents and their chunks are rows in SQL; chunk vectors live in a memsvc memory `col.<collection>`
created through the `Service` (so the catalog knows it), cosine, payload = chunk id. Each committed
version of a document owns one memory partition (a fresh random name kept on its SQL row), so:

- an upsert embeds and stores the new version's vectors in a new partition first, then commits the SQL
  rows of the whole batch in one transaction, then drops the replaced versions' partitions;
- readers see one version: the SQL commit and the in-RAM switch to the new versions (dense vector ids,
  BM25 chunks) happen together under the collection's write lock, and a search (retrieval and the SQL
  rows of its hits) runs under its read lock; dense search skips vectors whose ids are not the
  published ones (a version stored but not committed yet, or replaced but not dropped yet);
- opening a collection drops every partition no committed document names, which is all a crash (even
  SIGKILL mid-ingest) can leave behind: nothing is ever half-visible, and a document is either its old
  or its new version.

An unchanged document (same sha256 of text and metadata) is skipped. A changed one is embedded only where
its chunks changed: each chunk row keeps its vector's embedding cache key (sha256 of the embedder's name
and the text embedded), and the new version copies the old version's vector of a chunk with the same key.
A collection records the embedder that makes its vectors (model and backend, e.g.
"all-MiniLM-L6-v2+openvino-int8", `retrievers.encoders.embedder_name`) when it is created, and keeps
embedding its chunks and queries with it, so its memory never mixes vectors of two backends and its
queries meet vectors of their own embedder; the embedding cache key names the embedder too.
A collection may embed and BM25-index its chunks with their document title or heading trail
(`context`, `retrievers.chunking.Chunker.contextual`); plain chunks by default (bench/results/retrieval_v2.md).
BM25 state is rebuilt from the SQL chunks when a collection is first opened (bench numbers in the report); the collection writes chunk
vectors through its `DenseIndex` (the one writer of dense vectors) and publishes a version's vector ids
once its rows commit; dense search reads the memory. `ask` answers from the best passages with the language model (`lm.rag`), loaded on first use.
`Collections` are the collections of a `memsvc.service.Service`, which offers them through the `Client`
calls (create_collection, collection, ...), as `MemoryClient` does over REST.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from memsvc.contract import (
    MAX_DOCUMENT_BYTES,
    MEMORY_PREFIX,
    SEARCH_MODES,
    AlreadyExists,
    Answer,
    AnswerStream,
    CollectionStats,
    Document,
    DocumentHit,
    InvalidInput,
    MemoriesClient,
    MemoryBackend,
    NotFound,
    SearchMode,
    TooLarge,
    UpsertResult,
    as_documents,
    check_ask,
    check_collection_name,
    check_json,
    check_k,
    check_unicode,
)
from memsvc.db.models import ChunkRow, CollectionRow, DocumentRow
from memsvc.store.rwlock import RWLock
from retrievers.base import DOCUMENT_SCORES, Chunk, group_by_document
from retrievers.bm25 import BM25Retriever
from retrievers.chunking import CONTEXTS, Chunker, Context
from retrievers.dense import MODEL_NAME, DenseIndex, DenseRetriever, Encoder, encoder_name
from retrievers.hybrid import HybridRetriever

EMBED_BATCH = 256
log = logging.getLogger(__name__)
T = TypeVar("T")
LanguageModel = tuple[Any, Any]  # (transformers model, tokenizer), as lm.model.load_model gives them


class Lazy(Generic[T]):
    """`factory()`, made once on first use (by whichever thread asks first) and then kept; `start()` makes
    it in a background thread instead, and `ready()` says whether it is made (a server answers "loading"
    meanwhile rather than hold a request)."""

    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._made: list[T] = []
        self._lock = threading.Lock()
        self._state = threading.Lock()  # guards _loading and error, never held while making
        self._loading = False  # a background make is under way
        self.error: BaseException | None = None  # why the last background make failed (None: it did not)

    def __call__(self) -> T:
        with self._lock:
            if not self._made:
                self._made.append(self._factory())
            return self._made[0]

    def ready(self) -> bool:
        return bool(self._made)

    def start(self) -> None:
        """Make it in a daemon thread unless made or being made; a failure is kept in `error`."""
        with self._state:
            if self._made or self._loading:
                return
            self._loading, self.error = True, None
            threading.Thread(target=self._make, daemon=True, name="memsvc-load-model").start()

    def _make(self) -> None:
        error = None
        try:
            self()
        except BaseException as exc:  # noqa: BLE001 - reported to the next caller, not lost in a thread
            error = exc
        with self._state:
            self._loading, self.error = False, error


def content_hash(document: Document) -> str:
    return hashlib.sha256(json.dumps([document.text, document.metadata], sort_keys=True).encode()).hexdigest()


class Collection:
    """One collection: its SQL rows, its memory, and the in-RAM BM25 + dense retrievers over them; a
    `CollectionBackend`."""

    def __init__(self, name: str, row_id: int, memory: MemoryBackend, sessions: sessionmaker[Session],
                 encoder: Encoder, chunker: Chunker, language_model: Callable[[], LanguageModel]):
        self.name, self.row_id, self.memory = name, row_id, memory
        self.encoder, self.chunker, self._sessions = encoder, chunker, sessions
        self._language_model = language_model
        self._lock = threading.Lock()  # one writer at a time
        self._view = RWLock()  # what readers see: SQL rows, published vector ids and BM25 change together
        self.bm25 = BM25Retriever()
        with sessions() as session:
            documents = session.scalars(self._documents().options(selectinload(DocumentRow.chunks))).all()
            self.dense = DenseIndex(memory, encoder, _vector_ids(documents), batch=EMBED_BATCH,
                                    embed_text=chunker.contextual if chunker.context else None)
            self.bm25.add(self._indexed(_chunks(documents)))
            committed = {d.partition for d in documents}
        for partition in self.memory.stats().partitions:  # left by an upsert that never committed
            if partition.name is not None and partition.name not in committed:
                self.memory.delete(partition=partition.name)
        self.hybrid = HybridRetriever(self.bm25, DenseRetriever(self.dense))

    def upsert(self, documents: Sequence[Document]) -> UpsertResult:
        """Add or replace documents by id, all or nothing; unchanged ones are skipped."""
        chunks = self._checked(documents)
        with self._lock:
            with self._sessions() as session:
                old = {d.document_id: d for d in session.scalars(
                    self._documents().where(DocumentRow.document_id.in_([d.id for d in documents]))
                    .options(selectinload(DocumentRow.chunks)))}
            changed = [d for d in documents if d.id not in old or old[d.id].content_hash != content_hash(d)]
            written: list[str] = []
            committed = False
            try:
                rows = self._store(changed, chunks, old, written)
                indexed = list(self._indexed(c for d in changed for c in chunks[d.id]))
                terms = self.bm25.tokenized(indexed)  # before readers wait
                with self._view.write():
                    with self._sessions.begin() as session:
                        replaced = [old[d.id].id for d in changed if d.id in old]
                        session.execute(delete(DocumentRow).where(DocumentRow.id.in_(replaced)))
                        session.add_all(rows)
                    committed = True
                    self.dense.publish(_vector_ids(rows))
                    self.bm25.add(indexed, terms)
            except BaseException:
                for partition in [] if committed else written:
                    with suppress(Exception):  # what stays behind is dropped when the collection next opens
                        self.memory.delete(partition=partition)
                raise
            for document in changed:  # unpublished now: dense search skips them until they are gone
                if document.id in old:
                    self.memory.delete(partition=old[document.id].partition)
        return UpsertResult(added=[d.id for d in changed if d.id not in old],
                            updated=[d.id for d in changed if d.id in old],
                            unchanged=[d.id for d in documents if d not in changed],
                            chunks=sum(len(chunks[d.id]) for d in changed))

    def add_documents(self, documents: Sequence[Document | dict[str, Any]]) -> UpsertResult:
        """`upsert` of documents given as `Document`s or dicts {id, text, metadata?}."""
        return self.upsert(as_documents(documents))

    def delete(self, document_id: str) -> None:
        """Delete a document: its SQL rows first (it is gone once that commits), then its vectors."""
        with self._lock:
            with self._view.write():
                with self._sessions.begin() as session:
                    row = session.scalar(self._documents().where(DocumentRow.document_id == document_id))
                    if row is None:
                        raise NotFound(f"collection '{self.name}' has no document {document_id!r}", "document_id")
                    session.delete(row)
                self.dense.publish({document_id: None})
                self.bm25.remove(document_id)
            self.memory.delete(partition=row.partition)

    def search(self, query: str, k: int = 10, mode: SearchMode = "hybrid", group_by: str | None = None,
               score: str = "max") -> list[DocumentHit]:
        """The k best chunks for the query with their text and document metadata, best first; all of one
        version of each document (the one committed when the search began).

        `group_by="document"` (None or "chunk": chunks, the default) ranks documents instead, for questions
        whose answer is a document: one hit per document, its best chunk, scored by `score` over the
        document's chunks among the top max(k * 5, 50): "max" (its best chunk's score; the default, as
        bench/results/retrieval_v2.md found sums favour long documents) or "sum"
        (`retrievers.base.group_by_document`)."""
        if mode not in SEARCH_MODES:
            raise InvalidInput(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}", "mode")
        if group_by not in (None, "chunk", "document"):
            raise InvalidInput(f"group_by must be 'chunk' or 'document', got {group_by!r}", "group_by")
        if score not in DOCUMENT_SCORES:
            raise InvalidInput(f"score must be one of {', '.join(DOCUMENT_SCORES)}, got {score!r}", "score")
        k = check_k(k)
        with self._view.read():
            if group_by == "document":
                hits = group_by_document(self.hybrid.search(query, max(k * 5, 50), mode), k, score)
            else:
                hits = self.hybrid.search(query, k, mode)
            with self._sessions() as session:  # by chunk id alone, or SQLite reads every chunk of the collection
                found = session.execute(select(ChunkRow, DocumentRow).join(DocumentRow)
                                        .where(ChunkRow.chunk_id.in_([h.chunk_id for h in hits])))
                rows = {c.chunk_id: (c, d) for c, d in found if d.collection_id == self.row_id}
        return [DocumentHit(h.document_id, h.chunk_id, h.score, rows[h.chunk_id][0].text, rows[h.chunk_id][0].section,
                            rows[h.chunk_id][1].meta) for h in hits if h.chunk_id in rows]

    def ask(self, question: str, k: int = 4, max_new_tokens: int = 256) -> Answer:
        """Retrieve k passages, answer the question from them with the language model (loaded on the first
        ask), cite them (`lm.rag.ask`)."""
        from lm.rag import ask

        check_ask(k, max_new_tokens)  # before the model loads
        model, tokenizer = self._language_model()
        return ask(self, model, tokenizer, question, k, max_new_tokens)

    def ask_stream(self, question: str, k: int = 4, max_new_tokens: int = 256) -> AnswerStream:
        """`ask` with the answer's text pieces as they decode (`lm.rag.ask_stream`); the model loads and the
        passages are retrieved before this returns."""
        from lm.rag import ask_stream

        check_ask(k, max_new_tokens)  # before the model loads
        model, tokenizer = self._language_model()
        return ask_stream(self, model, tokenizer, question, k, max_new_tokens)

    def stats(self) -> CollectionStats:
        return CollectionStats(self.name, len(self.dense.vector_ids), len(self.bm25))

    def _documents(self):
        return select(DocumentRow).where(DocumentRow.collection_id == self.row_id)

    def _indexed(self, chunks: Iterable[Chunk]) -> Iterable[Chunk]:
        """The chunks as BM25 indexes them: with their context prefix if the collection has one."""
        if not self.chunker.context:
            return chunks
        return (replace(c, text=self.chunker.contextual(c)) for c in chunks)

    def _checked(self, documents: Sequence[Document]) -> dict[str, list[Chunk]]:
        """Every document's chunks, or the first input error before anything is stored."""
        if not documents:
            raise InvalidInput("give at least one document", "documents")
        chunks: dict[str, list[Chunk]] = {}
        for n, document in enumerate(documents):
            where = f"documents[{n}]"
            if document.id in chunks:
                raise InvalidInput(f"document id {document.id!r} is given twice", f"{where}.id")
            if not isinstance(document.metadata, dict):
                raise InvalidInput("metadata must be a JSON object", f"{where}.metadata")
            check_json(document.metadata, f"{where}.metadata")
            if isinstance(document.text, str):
                check_unicode(document.text, f"{where}.text")
            if isinstance(document.text, str) and len(document.text.encode()) > MAX_DOCUMENT_BYTES:
                raise TooLarge(f"document {document.id!r} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB; split it",
                               f"{where}.text")
            try:
                chunks[document.id] = self.chunker.chunk(document.id, document.text)
            except InvalidInput as exc:
                raise InvalidInput(exc.message, f"{where}.{exc.field}") from None
        return chunks

    def _store(self, documents: Sequence[Document], chunks: dict[str, list[Chunk]], old: dict[str, DocumentRow],
               written: list[str]) -> list[DocumentRow]:
        """Store each document version's vectors in a new partition; their (uncommitted) rows. The chunks of
        all the documents are embedded together (batches sorted by length); a chunk whose embedding cache key
        its document's previous version (`old`) holds gets a copy of that vector instead."""
        partitions = {d.id: uuid.uuid4().hex for d in documents}
        written.extend(partitions.values())
        every = [c for d in documents for c in chunks[d.id]]
        keys = [self.dense.key_of(c) for c in every]
        reuse = {c.embed_key: c.vector_id for d in documents if d.id in old for c in old[d.id].chunks if c.embed_key}
        vector_ids = iter(zip(keys, self.dense.store(every, [partitions[c.document_id] for c in every], reuse, keys)))
        rows = []
        for d in documents:
            stored = [next(vector_ids) for _ in chunks[d.id]]
            rows.append(DocumentRow(collection_id=self.row_id, document_id=d.id, content_hash=content_hash(d),
                                    partition=partitions[d.id], meta=d.metadata,
                                    chunks=[ChunkRow(chunk_id=c.id, position=n, section=c.section, text=c.text,
                                                     vector_id=v, embed_key=key)
                                            for n, (c, (key, v)) in enumerate(zip(chunks[d.id], stored))]))
        return rows

def _chunks(documents: Iterable[DocumentRow]) -> Iterable[Chunk]:
    return (Chunk(c.chunk_id, d.document_id, c.text, c.section) for d in documents for c in d.chunks)


def _vector_ids(documents: Iterable[DocumentRow]) -> dict[str, dict[str, int]]:
    """document id -> chunk id -> vector id of these SQL rows."""
    return {d.document_id: {c.chunk_id: c.vector_id for c in d.chunks} for d in documents}


class Collections:
    """The collections of a catalog `engine`, their vectors in `memories` (`col.<name>`), each opened once
    (on first use) and kept open. The embedders and the language model are made on first use, so a server
    that never sees a collection never loads them.

    `encoder(name)` makes the encoder of an embedder name; `embedder()` names the embedder of new
    collections (loading nothing). A collection made before embedders were recorded is read as
    `legacy_embedder` (all-MiniLM-L6-v2 in PyTorch, what made it). `language_model` makes the (model,
    tokenizer) of ask; a `Lazy` one is kept as it is (shared with whoever gave it), any other is wrapped in one."""

    def __init__(self, engine: Engine, memories: MemoriesClient, encoder: Callable[[str], Encoder],
                 language_model: Callable[[], LanguageModel] | Lazy[LanguageModel], embedder: Callable[[], str],
                 legacy_embedder: str = MODEL_NAME):
        self.memories = memories
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._make_encoder, self._embedder, self.legacy_embedder = encoder, embedder, legacy_embedder
        self._encoders: dict[str, Lazy[Encoder]] = {}
        self._language_model = language_model if isinstance(language_model, Lazy) else Lazy(language_model)
        self._open: dict[str, Collection] = {}
        self._lock = threading.RLock()

    def create(self, name: str, context: Context | None = None) -> Collection:
        """A new, empty collection; 409 if the name is taken. `context` ("title", "trail" or None, the
        default: plain chunks) makes it embed and BM25-index each chunk after its document title or
        heading trail (`retrievers.chunking.Chunker.contextual`); it is kept with the collection."""
        name = check_collection_name(name)
        if context not in (None, *CONTEXTS):
            raise InvalidInput(f"context must be one of {', '.join(CONTEXTS)} or none, got {context!r}", "context")
        embedder = self._embedder()
        encoder = self.encoder_of(embedder)  # before the row: an embedder that cannot load leaves nothing behind
        try:
            with self._sessions.begin() as session:
                session.add(CollectionRow(name=name, memory=MEMORY_PREFIX + name, context=context,
                                          embedder=encoder_name(encoder)))
        except IntegrityError:
            raise AlreadyExists(f"collection '{name}' already exists", "name") from None
        spec = DenseIndex.spec(MEMORY_PREFIX + name, encoder)
        try:
            self.memories.create_memory(spec.name, spec.dim, spec.metric)
        except BaseException:
            self._delete_row(name)
            raise
        return self.get(name)

    def get(self, name: str) -> Collection:
        with self._lock:
            if name not in self._open:
                with self._sessions() as session:
                    row = session.scalar(select(CollectionRow).where(CollectionRow.name == name))
                if row is None:
                    raise NotFound(f"collection '{name}' not found", "name")
                embedder = row.embedder or self.legacy_embedder
                if embedder != self._embedder():
                    log.info("collection '%s' embeds with %s, the embedder it was created with (new collections "
                             "get %s)", name, embedder, self._embedder())
                encoder = self.encoder_of(embedder)
                self._open[name] = Collection(name, row.id, self.memories.memory(row.memory), self._sessions,
                                              encoder, Chunker(encoder.tokenizer, context=row.context),
                                              self._language_model)
            return self._open[name]

    def list(self) -> list[str]:
        with self._sessions() as session:
            return sorted(session.scalars(select(CollectionRow.name)))

    def delete(self, name: str) -> None:
        """Delete a collection with its documents (one transaction), then its memory."""
        with self._lock:
            self._delete_row(name)
            self._open.pop(name, None)
        with suppress(NotFound):
            self.memories.delete_memory(MEMORY_PREFIX + name)

    @property
    def language_model(self) -> Lazy[LanguageModel]:
        """The model of ask, made on first use (or in the background after `language_model.start()`)."""
        return self._language_model

    @property
    def encoder(self) -> Encoder:
        """The embedder of new collections, loaded on first use."""
        return self.encoder_of(self._embedder())

    def encoder_of(self, embedder: str) -> Encoder:
        """The encoder of an embedder name, made on first use and then shared by every collection using it."""
        return self._lazy_encoder(embedder)()

    def preload_encoder(self) -> None:
        """Start making the embedder of new collections in a background thread (a first int8 OpenVINO build
        takes minutes); whoever needs it meanwhile waits for it."""
        self._lazy_encoder(self._embedder()).start()

    def _lazy_encoder(self, embedder: str) -> Lazy[Encoder]:
        with self._lock:
            return self._encoders.setdefault(embedder, Lazy(lambda: self._make_encoder(embedder)))

    def _delete_row(self, name: str) -> None:
        with self._sessions.begin() as session:
            row = session.scalar(select(CollectionRow).where(CollectionRow.name == name))
            if row is None:
                raise NotFound(f"collection '{name}' not found", "name")
            session.delete(row)
