"""Retrieval evaluation on the Python 3.11 docs: questions whose answer is one known document.

Two question sets, both from the docs' reST sources:
- glossary: "What is a generator?" for each term; the answer is the term's definition, without the
  term line, as document `glossary/<term>`;
- faq: every FAQ section titled with a question ("How do I copy an object in Python?"), real
  questions in users' words; the answer is the section's body, as document `faq-answers/<file>/<n>`.
Answers shorter than 8 words (bare cross-references) are left out. The answers are ingested (chunked)
among all other reST sources (glossary.rst.txt and faq/ themselves left out). A query's rank is that
of the first chunk of its answer document; we report MRR@10 and Recall@1/5/10.

Each set is split in two halves by a seeded shuffle. Everything chosen here (fusion family and its
weights, chunk size) is chosen on half A; the report table is half B. Fusion parameters are chosen to
maximise the smallest gain over the best single mode across the four metrics (then MRR@10), as the
default must be at least as good as either mode on every metric. A second table swaps the halves
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
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from memsvc.store import Memory
from retrievers.base import Hit
from retrievers.bm25 import BM25Retriever
from retrievers.chunking import DEFAULT_OVERLAP, DEFAULT_SIZE, Chunker, split_sections
from retrievers.dense import DenseIndex, DenseRetriever, SentenceEncoder, model_path
from retrievers.hybrid import DEFAULT_FUSION, RRF, Fusion, HybridRetriever, ScoreFusion

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "results"
DEPTH = 50  # chunks each retriever hands to the fusion, and chunks ranked per query
CUTOFFS = (1, 5, 10)
KINDS = ("glossary", "faq")
MIN_WORDS = 8  # shorter answers are bare cross-references ("See :term:`x`.")
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


@dataclass(frozen=True)
class Query:
    """A question, the document that answers it, and the answer's text (ingested as that document)."""

    kind: str
    text: str
    document_id: str
    answer: str


def glossary() -> list[Query]:
    """'What is a generator?' for every glossary term: terms at indent 3, definitions at indent 6."""
    entries: list[tuple[str, list[str]]] = []
    inside = False
    for line in (DOCS / "glossary.rst.txt").read_text().splitlines():
        if line.startswith(".. glossary::"):
            inside = True
        elif inside and re.match(r"^   \S", line):
            entries.append((line.strip().strip("`"), []))
        elif inside and entries:
            entries[-1][1].append(line[6:])
    return [Query("glossary", question(term), f"glossary/{term}", "\n".join(body).strip())
            for term, body in entries if len(" ".join(body).split()) >= MIN_WORDS]


def question(term: str) -> str:
    """'What is a generator?'; no article before names, acronyms and code ('What is CPython?')."""
    if not term[0].islower():
        return f"What is {term}?"
    return f"What is {'an' if term[0] in 'aeio' else 'a'} {term}?"


def faq() -> list[Query]:
    """The FAQ's questions: every section whose title ends in '?', its body the answer."""
    queries = []
    for path in sorted((DOCS / "faq").glob("*.txt")):
        for n, section in enumerate(split_sections(path.read_text(), "rst")):
            title = section.lines[section.titles - 1] if section.titles else ""
            answer = "\n".join(section.lines[section.titles:]).strip()
            if title.endswith("?") and len(answer.split()) >= MIN_WORDS:
                queries.append(Query("faq", title, f"faq-answers/{path.name}/{n}", answer))
    return queries


def corpus(dirs: list[str] | None) -> dict[str, str]:
    """document id -> text: the docs' reST sources (all, or those under `dirs`) but the glossary and FAQ."""
    docs = {}
    for path in sorted(DOCS.rglob("*.txt")):
        doc_id = str(path.relative_to(DOCS))
        top = doc_id.split("/")[0]
        if doc_id != "glossary.rst.txt" and top != "faq" and (not dirs or top in dirs):
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


def margin(ranks: np.ndarray, singles: list[np.ndarray]) -> tuple[float, float]:
    """How a fusion compares with the best single mode on each metric: its smallest gain, then its MRR@10.
    What the default is chosen by, since it must be at least as good as either mode on every metric."""
    fused, best = metrics(ranks), [metrics(r) for r in singles]
    return min(fused[k] - max(b[k] for b in best) for k in fused), fused["MRR@10"]


def describe(fusion: Fusion) -> str:
    if isinstance(fusion, RRF):
        return f"RRF(w_bm25={fusion.weights[0]:g}, w_dense={fusion.weights[1]:g}, c={fusion.c:g})"
    return f"ScoreFusion({fusion.norm}, w_bm25={fusion.weights[0]:g}, w_dense={fusion.weights[1]:g})"


def families() -> dict[str, tuple[bool, list[Fusion]]]:
    """Each fusion family: whether it fuses the completed lists (every candidate scored by both
    retrievers, `HybridRetriever.rankings`) or the plain top lists, and its grid of parameters."""
    return {
        "rrf (equal, c=60), top lists": (False, [RRF()]),
        "zscore, top lists": (False, [ScoreFusion((1 - w, w), "zscore") for w in WEIGHTS]),
        "weighted rrf": (True, [RRF((1 - w, w), c) for w, c in product(WEIGHTS, (10, 30, 60, 100))]),
        "minmax": (True, [ScoreFusion((1 - w, w), "minmax") for w in WEIGHTS]),
        "zscore": (True, [ScoreFusion((1 - w, w), "zscore") for w in WEIGHTS]),
        "raw mix": (True, [ScoreFusion((w, 1.0), "none") for w in (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05)]),
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
    queries = glossary() + faq()
    docs = corpus(args.dirs) | {q.document_id: q.answer for q in queries}
    t0 = time.perf_counter()
    chunks = [c for doc_id, text in docs.items() for c in chunker.chunk(doc_id, text)]
    print(f"{len(docs)} documents -> {len(chunks)} chunks (size {args.size}, overlap {args.overlap}) "
          f"in {time.perf_counter() - t0:.1f}s")

    encoder = CachedEncoder(OUT / "embeddings-minilm.npz")
    bm25, index = BM25Retriever(), DenseIndex(Memory(DenseIndex.spec("eval", encoder)), encoder)
    index.add(chunks)
    bm25.add(chunks)
    hybrid = HybridRetriever(bm25, DenseRetriever(index), depth=DEPTH)

    halves: dict[str, list[int]] = {"A": [], "B": []}
    for kind in KINDS:  # each query set split in two by a seeded shuffle
        members = [i for i, q in enumerate(queries) if q.kind == kind]
        random.Random(args.seed).shuffle(members)
        halves["A"] += members[: len(members) // 2]
        halves["B"] += members[len(members) // 2:]
    lists = {mode: [hybrid.search(q.text, DEPTH, mode) for q in queries] for mode in ("bm25", "dense")}
    completed = [hybrid.rankings(q.text, DEPTH) for q in queries]

    def ranks(rankings: list[list[Hit]]) -> np.ndarray:
        return np.array([rank_of(hits, q.document_id) for hits, q in zip(rankings, queries)])

    def fused(fusion: Fusion, complete: bool) -> np.ndarray:
        inputs = completed if complete else zip(lists["bm25"], lists["dense"])
        return ranks([fusion(list(pair), DEPTH) for pair in inputs])

    single = {mode: ranks(lists[mode]) for mode in ("bm25", "dense")}
    default = ranks([hybrid.search(q.text, DEPTH) for q in queries])
    grids = {name: [(f, fused(f, complete)) for f in grid] for name, (complete, grid) in families().items()}
    counts = {kind: sum(q.kind == kind for q in queries) for kind in KINDS}
    print(f"{len(queries)} queries ({counts}), half A {len(halves['A'])}, half B {len(halves['B'])}")

    results = {}
    for tune, report in (("A", "B"), ("B", "A")):
        on, fit = np.array(halves[report]), np.array(halves[tune])
        rows = {mode: metrics(r[on]) for mode, r in single.items()}
        tuned = {mode: metrics(r[fit]) for mode, r in single.items()}
        params, margins = {}, {}
        for name, grid in grids.items():
            best, best_ranks = max(grid, key=lambda fr: margin(fr[1][fit], [r[fit] for r in single.values()]))
            rows[name], params[name] = metrics(best_ranks[on]), describe(best)
            tuned[name], margins[name] = metrics(best_ranks[fit]), margin(best_ranks[fit], [r[fit] for r in single.values()])
        rows["hybrid default"], params["hybrid default"] = metrics(default[on]), describe(DEFAULT_FUSION)
        results[report] = rows
        print(f"\n### tuned on half {tune}, reported on half {report} ({len(on)} queries)\n")
        print(f"half {tune}, where each family's parameters are tuned and the default is chosen:\n")
        print(table(tuned, params))
        choice = max(margins, key=margins.get)
        print(f"\nchosen on half {tune}: {choice}, {params[choice]} (worst gain over the best single mode "
              f"{margins[choice][0]:+.3f})\n\nhalf {report}, held out:\n")
        print(table(rows, params))
        for kind in KINDS:
            part = np.array([i for i in halves[report] if queries[i].kind == kind])
            by_kind = {mode: metrics(r[part]) for mode, r in (*single.items(), ("hybrid default", default))}
            print(f"\n{kind} questions only ({len(part)}):\n\n{table(by_kind, {})}")

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
    ax.set_title("Python docs glossary + FAQ questions (half B; fusions tuned on half A)")
    ax.legend(fontsize=8, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
