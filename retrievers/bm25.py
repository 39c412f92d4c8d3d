"""`BM25Retriever`: Okapi BM25 over an inverted index kept as a sparse matrix.

rank-bm25 scores every chunk in a Python loop per query term and rebuilds its statistics from the
whole corpus on every change, so each query costs time in proportion to the whole corpus
(bench/bench_retrieval.py, 100K chunks: 233.5 ms p50 for rank-bm25's scores alone, 0.9 ms for this
retriever's search). Here the term weights live in a column-sparse matrix W[chunk, term], so a query
touches only the postings of its own terms: scores = W[:, q] @ (idf[q] * count[q]). The
scoring is rank-bm25's BM25Okapi (Robertson and Zaragoza 2009, "The Probabilistic Relevance Framework:
BM25 and Beyond") with Lucene's idf, log(1 + (N - df + 0.5) / (df + 0.5)), which stays positive, so a term
found in half of a tiny corpus still counts. k1 = 1.5, b = 0.75 (rank-bm25's): k1 = 0.9, the choice of
bench/eval_retrieval.py's tuning half, gave the hybrid one or two questions more on the held-out half but
BM25 alone one to five fewer (bench/results/retrieval_v2.md section 8). The matrix is rebuilt
(vectorised) on the first search after a change.

Tokens suit code and docs: lowercase words and identifiers, plus the parts of dotted, snake_case
and CamelCase identifiers (`os.path.join` -> os.path.join, os, path, join; `__init__` -> __init__, init),
minus common English words; plain words are stemmed (Snowball English: "importing" -> "import"),
which lifted BM25's MRR@10 from 0.420 to 0.445 on the chunk-size sweep corpus of
bench/eval_retrieval.py (tuning half). Digits stay with their word (`utf8`, `float32`).
"""
from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import snowballstemmer
from scipy import sparse

from retrievers.base import Chunk, Hit, by_document, check_k, check_query

WORD = re.compile(r"\w+(?:\.\w+)*")
PART = re.compile(r"[A-Z]+(?![a-z])\d*|[A-Z]?[a-z]+\d*|\d+")
STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its may must no not "  # noqa: SIM905
    "of on or should so such than that the their then there these this to was we were what when where "
    "which while who why will with you your".split())
STEMMER = snowballstemmer.stemmer("english")  # keeps state while stemming: one thread at a time
STEMMER_LOCK = threading.Lock()


@lru_cache(maxsize=1 << 18)
def stem(term: str) -> str:
    """English Snowball stem of a plain word ("classes" -> "class"); identifiers and numbers as they are."""
    if not term.isalpha():
        return term
    with STEMMER_LOCK:
        return STEMMER.stemWord(term)


def tokenize(text: str) -> list[str]:
    """BM25 terms of a text: words and identifiers (lowercased, stemmed) and the parts of compound identifiers."""
    terms = []
    for word in WORD.findall(text):
        parts = PART.findall(word)
        terms.append(word.lower())
        if parts != [word]:
            terms.extend(part.lower() for part in parts)
    return [stem(t) for t in terms if t not in STOPWORDS]


@dataclass(frozen=True)
class _Index:
    """An immutable snapshot for searching: chunk ids and documents by row (and rows by chunk id),
    W[chunk, term], idf[term]."""

    chunk_ids: list[str]
    document_ids: list[str]
    rows: dict[str, int]
    weights: sparse.csc_matrix
    idf: np.ndarray


class BM25Retriever:
    """Keyword retrieval; a `ChunkIndex` (its own, in RAM: rebuild it by adding the chunks again) and a `Scorer`."""

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self._vocab: dict[str, int] = {}
        self._chunks: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}  # id -> (document, terms, counts)
        self._documents: dict[str, list[str]] = {}  # document id -> chunk ids
        self._index: _Index | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._chunks)

    def tokenized(self, chunks: Iterable[Chunk]) -> dict[str, Counter[str]]:
        """The terms and their counts of each chunk this retriever does not hold yet, by chunk id: the slow
        part of `add`, done ahead (and outside the lock) so that `add(chunks, terms)` is short."""
        return {c.id: Counter(tokenize(c.text)) for c in chunks if c.id not in self._chunks}

    def add(self, chunks: Iterable[Chunk], terms: Mapping[str, Counter[str]] | None = None) -> int:
        """Upsert documents: each document's chunks become exactly these (its other chunks go); chunks
        already held are kept as they are. `terms` may give chunks' terms (`tokenized`); the others are
        tokenized here. Returns how many chunks were new."""
        terms = terms or {}
        added = 0
        with self._lock:
            for document_id, new in by_document(chunks).items():
                old = set(self._documents.get(document_id, ()))
                for chunk_id in old - {c.id for c in new}:
                    del self._chunks[chunk_id]
                for chunk in new:
                    if chunk.id not in old:
                        self._chunks[chunk.id] = (document_id, *self._terms(chunk.text, terms.get(chunk.id)))
                        added += 1
                if old != {c.id for c in new}:
                    self._index = None
                self._documents[document_id] = [c.id for c in new]
        return added

    def remove(self, document_id: str) -> int:
        with self._lock:
            chunk_ids = self._documents.pop(document_id, [])
            for chunk_id in chunk_ids:
                del self._chunks[chunk_id]
            if chunk_ids:
                self._index = None
            return len(chunk_ids)

    def search(self, query: str, k: int) -> list[Hit]:
        query, k = check_query(query), check_k(k)
        index, scores = self._scores(query)
        rows = np.flatnonzero(scores)
        if len(rows) > k:
            rows = rows[np.argpartition(-scores[rows], k - 1)[:k]]
        rows = rows[np.lexsort((rows, -scores[rows]))]
        return [Hit(index.chunk_ids[r], index.document_ids[r], float(scores[r])) for r in rows]

    def score(self, query: str, chunk_ids: Sequence[str]) -> list[Hit]:
        index, scores = self._scores(check_query(query))
        rows = [(chunk_id, index.rows.get(chunk_id)) for chunk_id in chunk_ids]
        return [Hit(chunk_id, index.document_ids[r], float(scores[r])) for chunk_id, r in rows if r is not None]

    def _scores(self, query: str) -> tuple[_Index, np.ndarray]:
        """The current snapshot (rebuilt if chunks changed) and every chunk's score for the query."""
        terms = tokenize(query)
        with self._lock:
            if self._index is None:
                self._index = self._build()
            index = self._index
            ids = [self._vocab[t] for t in terms if t in self._vocab]
        if not ids or not index.chunk_ids:
            return index, np.zeros(len(index.chunk_ids))
        cols, counts = np.unique(ids, return_counts=True)
        return index, index.weights[:, cols] @ (index.idf[cols] * counts)

    def _terms(self, text: str, counts: Counter[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Term ids and their counts in one chunk (growing the vocabulary); `counts` if already tokenized."""
        counts = Counter(tokenize(text)) if counts is None else counts
        ids = [self._vocab.setdefault(term, len(self._vocab)) for term in counts]
        return np.array(ids, dtype=np.int64), np.array(list(counts.values()), dtype=np.float64)

    def _build(self) -> _Index:
        """The search snapshot of the current chunks (called under the lock)."""
        entries = list(self._chunks.values())
        n, vocab = len(entries), len(self._vocab)
        terms = np.concatenate([np.empty(0, np.int64)] + [t for _, t, _ in entries])
        tf = np.concatenate([np.empty(0)] + [c for _, _, c in entries])
        rows = np.repeat(np.arange(n), [len(t) for _, t, _ in entries])
        lengths = np.array([c.sum() for _, _, c in entries])
        norm = 1 - self.b + self.b * lengths / max(lengths.mean() if n else 0.0, 1e-9)
        weights = tf * (self.k1 + 1) / (tf + self.k1 * norm[rows])
        df = np.bincount(terms, minlength=vocab)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        matrix = sparse.csc_matrix((weights, (rows, terms)), shape=(n, vocab))
        chunk_ids = list(self._chunks)
        rows = {chunk_id: row for row, chunk_id in enumerate(chunk_ids)}
        return _Index(chunk_ids, [d for d, _, _ in entries], rows, matrix, idf)
