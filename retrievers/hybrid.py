"""`HybridRetriever`: keyword (BM25) and semantic (dense) retrieval fused into one ranking.

Each retriever returns its best `depth` chunks, and each list is then completed with its retriever's
own scores of the chunks only the other one found (`HybridRetriever.rankings`), so no candidate has
to be guessed at. A fusion turns the ranked lists into one:
- `RRF`, reciprocal-rank fusion: score = sum_i w_i / (c + rank_i); ranks only, scores ignored.
- `ScoreFusion`: each list's scores normalised (min-max to [0, 1], z-scores, or kept raw), then
  summed with weights. A chunk missing from a list counts as that list's lowest normalised score.

On our evaluation (bench/eval_retrieval.py, results in bench/results/retrieval.md) BM25 is much
weaker than dense, and plain equal-weight RRF ranks below dense alone: it lets BM25's misses push
dense's answers down. The default, z-scores weighted 0.2 BM25 / 0.8 dense over the completed lists,
was chosen on the tuning half of the questions; it is at least as good as dense on every metric on
both halves, and better on MRR@10 and Recall@1.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from memsvc.contract import SEARCH_MODES, InvalidInput, SearchMode
from retrievers.base import Hit, Scorer, check_k, check_query

Fusion = Callable[[Sequence[Sequence[Hit]], int], list[Hit]]


def _check_weights(weights: tuple[float, ...]) -> None:
    if not weights or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise InvalidInput(f"fusion weights must be non-negative and not all zero, got {weights}", "weights")


def _check_arity(weights: tuple[float, ...], rankings: Sequence[Sequence[Hit]]) -> None:
    if len(weights) != len(rankings):
        raise InvalidInput(f"the fusion has {len(weights)} weights for {len(rankings)} rankings", "weights")


@dataclass(frozen=True)
class RRF:
    """Weighted reciprocal-rank fusion; weights follow the order of the rankings."""

    weights: tuple[float, ...] = (1.0, 1.0)
    c: float = 60.0

    def __post_init__(self) -> None:
        _check_weights(self.weights)

    def __call__(self, rankings: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
        _check_arity(self.weights, rankings)
        parts = [w / (self.c + np.arange(1, len(hits) + 1)) for w, hits in zip(self.weights, rankings)]
        return combine(rankings, parts, [0.0] * len(parts), k)


@dataclass(frozen=True)
class ScoreFusion:
    """Weighted sum of per-list normalised scores (`minmax`, `zscore`, or `none`: raw scores)."""

    weights: tuple[float, ...] = (1.0, 1.0)
    norm: Literal["minmax", "zscore", "none"] = "minmax"

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        if self.norm not in ("minmax", "zscore", "none"):
            raise InvalidInput(f"norm must be minmax, zscore or none, got {self.norm!r}", "norm")

    def __call__(self, rankings: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
        _check_arity(self.weights, rankings)
        parts = [w * self.normalise(np.array([h.score for h in hits], dtype=np.float64))
                 for w, hits in zip(self.weights, rankings)]
        return combine(rankings, parts, [p.min() if len(p) else 0.0 for p in parts], k)

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        if len(scores) == 0 or self.norm == "none":
            return scores
        if self.norm == "minmax":
            span = scores.max() - scores.min()
            return (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
        std = scores.std()
        return (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)


def combine(rankings: Sequence[Sequence[Hit]], parts: Sequence[np.ndarray], floors: Sequence[float],
            k: int) -> list[Hit]:
    """Sum each chunk's part from every list (`floors[i]` where list i lacks it); top k, ties in
    order of first appearance."""
    first: dict[str, Hit] = {}
    for hits in rankings:
        for hit in hits:
            first.setdefault(hit.chunk_id, hit)
    fused = dict.fromkeys(first, float(sum(floors)))
    for hits, part, floor in zip(rankings, parts, floors):
        for hit, value in zip(hits, part):
            fused[hit.chunk_id] += float(value) - floor
    order = sorted(first, key=lambda chunk_id: -fused[chunk_id])[:k]
    return [Hit(chunk_id, first[chunk_id].document_id, fused[chunk_id]) for chunk_id in order]


DEFAULT_FUSION: Fusion = ScoreFusion((0.2, 0.8), "zscore")


class HybridRetriever:
    """BM25 and dense retrieval behind one `Retriever`, searchable in any of the three modes. It only reads:
    its parts are written by their owners (`BM25Retriever.add`, `retrievers.dense.DenseIndex`)."""

    def __init__(self, bm25: Scorer, dense: Scorer, fusion: Fusion = DEFAULT_FUSION, depth: int = 50):
        self.bm25, self.dense, self.fusion, self.depth = bm25, dense, fusion, check_k(depth)

    def search(self, query: str, k: int, mode: SearchMode = "hybrid") -> list[Hit]:
        query, k = check_query(query), check_k(k)
        if mode == "bm25":
            return self.bm25.search(query, k)
        if mode == "dense":
            return self.dense.search(query, k)
        if mode == "hybrid":
            return self.fusion(self.rankings(query, max(k, self.depth)), k)
        raise InvalidInput(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}", "mode")

    def rankings(self, query: str, depth: int) -> list[list[Hit]]:
        """[BM25's, dense's] top `depth` chunks, each list extended (below its top) with its retriever's
        own scores of the chunks only the other one returned: every candidate is scored by both."""
        lists = [self.bm25.search(query, depth), self.dense.search(query, depth)]
        candidates = list(dict.fromkeys(hit.chunk_id for hits in lists for hit in hits))
        completed = []
        for retriever, hits in zip((self.bm25, self.dense), lists):
            returned = {hit.chunk_id for hit in hits}
            extra = retriever.score(query, [c for c in candidates if c not in returned])
            completed.append(hits + sorted(extra, key=lambda hit: -hit.score))
        return completed
