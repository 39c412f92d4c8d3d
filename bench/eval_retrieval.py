"""Retrieval evaluation on the Python 3.11 docs: glossary terms as questions, definitions as answers.

Every glossary entry with a real definition (8+ words, so not a bare "See :term:`x`.") becomes a
document `glossary/<term>` holding the definition without its term line, ingested (chunked) among all
other reST sources of the docs (glossary.rst.txt itself left out), and the question "What is a <term>?".
A query's rank is that of the first chunk of its definition document; we report MRR@10 and
Recall@1/5/10 over queries.

The queries are split in two halves by a seeded shuffle. Everything chosen here (fusion family and its
weights, chunk size) is chosen on half A; the report table is half B. A second table swaps the halves
(tune on B, report on A) as a check that the choice is not an accident of one split. Embeddings are cached under bench/out/ by text hash, so reruns embed
only new chunk texts.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_retrieval.py [--size 256] [--overlap 32] [--dirs library ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import time
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from memsvc.store import Memory
from retrievers.base import Hit
from retrievers.bm25 import BM25Retriever
from retrievers.chunking import DEFAULT_OVERLAP, DEFAULT_SIZE, Chunker
from retrievers.dense import DenseRetriever, SentenceEncoder, model_path
from retrievers.hybrid import DEFAULT_FUSION, RRF, Fusion, HybridRetriever, ScoreFusion

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "results"
DEPTH = 50  # chunks each retriever hands to the fusion, and chunks ranked per query
CUTOFFS = (1, 5, 10)
WEIGHTS = [round(w, 2) for w in np.arange(0.05, 1.0, 0.05)]  # the dense weight; BM25 gets 1 - w


class CachedEncoder:
    """An `Encoder` that keeps every vector on disk by the sha1 of its text; loads the model on a miss."""

    def __init__(self, path: Path):
        self.path, self._encoder = path, None
        self.dim = json.loads((model_path() / "config.json").read_text())["hidden_size"]
        self.cache: dict[bytes, np.ndarray] = {}
        if path.exists():
            data = np.load(path)
            self.cache = dict(zip(data["keys"].tolist(), data["vectors"]))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode()).digest() for t in texts]
        missing = list({k: t for k, t in zip(keys, texts) if k not in self.cache}.items())
        if missing:
            self._encoder = self._encoder or SentenceEncoder()
            batches = range(0, len(missing), 2048)
            for start in tqdm(batches, desc="embedding", unit="batch", disable=len(missing) < 2048):
                batch = missing[start:start + 2048]
                self.cache.update(zip([k for k, _ in batch], self._encoder.encode([t for _, t in batch])))
                if len(missing) > 1:
                    self.save()
        return np.stack([self.cache[k] for k in keys])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(self.cache), dtype="S20"), vectors=np.stack(list(self.cache.values())))
        os.replace(tmp, self.path)


def glossary(path: Path) -> list[tuple[str, str]]:
    """(term, definition) pairs of the `.. glossary::` directive: terms at indent 3, definitions at 6."""
    entries: list[tuple[str, list[str]]] = []
    inside = False
    for line in path.read_text().splitlines():
        if line.startswith(".. glossary::"):
            inside = True
        elif inside and re.match(r"^   \S", line):
            entries.append((line.strip().strip("`"), []))
        elif inside and entries:
            entries[-1][1].append(line[6:])
    return [(term, "\n".join(body).strip()) for term, body in entries if len(" ".join(body).split()) >= 8]


def question(term: str) -> str:
    """'What is a generator?'; no article before names, acronyms and code ('What is CPython?')."""
    if not term[0].islower():
        return f"What is {term}?"
    return f"What is {'an' if term[0] in 'aeiou' else 'a'} {term}?"


def corpus(dirs: list[str] | None) -> dict[str, str]:
    """document id -> text: the docs' reST sources (all, or those under `dirs`), glossary excluded."""
    docs = {}
    for path in sorted(DOCS.rglob("*.txt")):
        doc_id = str(path.relative_to(DOCS))
        if doc_id != "glossary.rst.txt" and (not dirs or doc_id.split("/")[0] in dirs):
            docs[doc_id] = path.read_text()
    return docs


def rank_of(hits: list[Hit], relevant: str) -> float:
    """1-based rank of the relevant document among the distinct documents of the hits, inf if absent."""
    documents = list(dict.fromkeys(h.document_id for h in hits))
    return documents.index(relevant) + 1.0 if relevant in documents else np.inf


def metrics(ranks: np.ndarray) -> dict[str, float]:
    out = {"MRR@10": float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))}
    out.update({f"R@{c}": float(np.mean(ranks <= c)) for c in CUTOFFS})
    return out


def describe(fusion: Fusion) -> str:
    if isinstance(fusion, RRF):
        return f"RRF(w_bm25={fusion.weights[0]:g}, w_dense={fusion.weights[1]:g}, c={fusion.c:g})"
    return f"{fusion.norm}(w_bm25={fusion.weights[0]:g}, w_dense={fusion.weights[1]:g})"


def families() -> dict[str, list[Fusion]]:
    """Each fusion family with its grid of parameters (tuned on the tuning half)."""
    return {
        "rrf (equal, c=60)": [RRF()],
        "weighted rrf": [RRF((1 - w, w), c) for w, c in product(WEIGHTS, (10, 30, 60, 100))],
        "minmax": [ScoreFusion((1 - w, w), "minmax") for w in WEIGHTS],
        "zscore": [ScoreFusion((1 - w, w), "zscore") for w in WEIGHTS],
    }


def table(rows: dict[str, dict[str, float]], params: dict[str, str]) -> str:
    lines = ["| mode | MRR@10 | R@1 | R@5 | R@10 | parameters |", "|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m.values()) + f" | {params.get(name, '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="chunk size in embedder tokens")
    ap.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="chunk overlap in tokens")
    ap.add_argument("--dirs", nargs="*", help="only these top-level doc directories (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the query split")
    ap.add_argument("--plot", type=Path, default=RESULTS / "retrieval_eval.png")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    chunker = Chunker(AutoTokenizer.from_pretrained(model_path()), args.size, args.overlap)
    entries = glossary(DOCS / "glossary.rst.txt")
    docs = corpus(args.dirs) | {f"glossary/{term}": definition for term, definition in entries}
    t0 = time.perf_counter()
    chunks = [c for doc_id, text in docs.items() for c in chunker.chunk(doc_id, text)]
    print(f"{len(docs)} documents -> {len(chunks)} chunks (size {args.size}, overlap {args.overlap}) "
          f"in {time.perf_counter() - t0:.1f}s")

    encoder = CachedEncoder(OUT / "embeddings-minilm.npz")
    dense = DenseRetriever(Memory(DenseRetriever.spec("eval", encoder)), encoder)
    hybrid = HybridRetriever(BM25Retriever(), dense, depth=DEPTH)
    hybrid.add(chunks)

    queries = [(question(term), f"glossary/{term}") for term, _ in entries]
    order = list(range(len(queries)))
    random.Random(args.seed).shuffle(order)
    halves = {"A": order[: len(order) // 2], "B": order[len(order) // 2:]}
    lists = {mode: [hybrid.search(q, DEPTH, mode) for q, _ in queries] for mode in ("bm25", "dense")}
    default = [hybrid.search(q, DEPTH) for q, _ in queries]
    relevant = [doc for _, doc in queries]

    def score(rankings: list[list[Hit]], half: list[int]) -> dict[str, float]:
        return metrics(np.array([rank_of(rankings[i], relevant[i]) for i in half]))

    def fused(fusion: Fusion) -> list[list[Hit]]:
        return [fusion([lists["bm25"][i], lists["dense"][i]], DEPTH) for i in range(len(queries))]

    print(f"{len(queries)} queries: {len(halves['A'])} in half A (tuning), {len(halves['B'])} in half B (report)")
    results = {}
    for tune, report in (("A", "B"), ("B", "A")):
        rows = {m: score(lists[m], halves[report]) for m in ("bm25", "dense")}
        params = {}
        for name, grid in families().items():
            best = max(grid, key=lambda f: tuple(score(fused(f), halves[tune]).values()))
            rows[name], params[name] = score(fused(best), halves[report]), describe(best)
        rows["hybrid default"], params["hybrid default"] = score(default, halves[report]), describe(DEFAULT_FUSION)
        results[report] = rows
        print(f"\n### tuned on the {tune} half, reported on the {report} half ({len(halves[report])} queries)\n")
        print(table(rows, params))

    plot(results["B"], args.plot)


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, keys = list(rows), list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(keys)) + i * width, [rows[name][k] for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
    ax.set_ylim(0, 1)
    ax.set_title("Python docs glossary retrieval (half B; fusions tuned on half A)")
    ax.legend(fontsize=8, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
