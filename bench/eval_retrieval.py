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

Variants (bench/results/retrieval_v2.md): `--context title|trail` prefixes each chunk with its document
title or heading path (for BM25, the embedder or both: `--context-in`); `--encoder` picks the embedder
or backend; every run also reports document scores (max, sum, ...) per mode. `--documents section` makes each
section of a distractor file its own document (answer-sized distractors: bench/results/retrieval_v2.md
section 8); `--bm25 K1 B` sets BM25's parameters.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_retrieval.py [--size 256] [--overlap 32] [--dirs library ...]
        [--context none|title|trail] [--encoder minilm|minilm-openvino-int8|e5-small-q4|...] [--json F]
        [--documents file|section] [--bm25 K1 B]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from memsvc.store import Memory
from retrievers.base import Chunk, Hit
from retrievers.bm25 import BM25Retriever
from retrievers.chunking import DEFAULT_OVERLAP, DEFAULT_SIZE, Chunker, split_sections
from retrievers.dense import DenseIndex, DenseRetriever, SentenceEncoder, model_path
from retrievers.encoders import E5Small, ExportedEncoder, calibration_texts
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
    """An `Encoder` that keeps every vector on disk by the sha1 of its text; loads the model on a miss.
    Queries of an asymmetric model (one with `encode_queries`, e.g. E5's "query: " prefix) are cached
    under their own keys."""

    def __init__(self, path: Path, make: Callable[[], Any] | None = None, dim: int | None = None,
                 asymmetric: bool = False):
        self.path, self._encoder, self._make, self.asymmetric = path, None, make or SentenceEncoder, asymmetric
        self.dim = dim or json.loads((model_path() / "config.json").read_text())["hidden_size"]
        self.cache: dict[bytes, np.ndarray] = {}
        if path.exists():
            data = np.load(path)
            # numpy's S20 drops trailing NUL bytes of a digest: pad them back, or 1 text in 256 never hits
            self.cache = dict(zip((k.ljust(20, b"\0") for k in data["keys"].tolist()), data["vectors"]))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._cached(texts, query=False)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._cached(texts, query=self.asymmetric)

    def _cached(self, texts: Sequence[str], query: bool) -> np.ndarray:
        keys = [text_key(t, query) for t in texts]
        missing = list({k: t for k, t in zip(keys, texts) if k not in self.cache}.items())
        if missing:
            self._encoder = self._encoder or self._make()
            embed = getattr(self._encoder, "encode_queries", self._encoder.encode) if query else self._encoder.encode
            batches = range(0, len(missing), 2048)
            for start in tqdm(batches, desc="embedding", unit="batch", disable=len(missing) < 2048):
                batch = missing[start:start + 2048]
                self.cache.update(zip([k for k, _ in batch], embed([t for _, t in batch])))
                if len(missing) > 1:
                    self.save()
        return np.stack([self.cache[k] for k in keys])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(self.cache), dtype="S20"), vectors=np.stack(list(self.cache.values())))
        os.replace(tmp, self.path)


def text_key(text: str, query: bool = False) -> bytes:
    """The cache key of a text: sha1 of it (of "\0query\0" + it for an asymmetric model's queries)."""
    return hashlib.sha1((("\0query\0" if query else "") + text).encode()).digest()


class AsymmetricDense(DenseRetriever):
    """A `DenseRetriever` that embeds queries with the encoder's `encode_queries` (E5's "query: ")."""

    def _embed_query(self, query: str) -> np.ndarray:
        return self.encoder.encode_queries([query])


@dataclass(frozen=True)
class Query:
    """A question, the document that answers it, and the answer's text (ingested as that document)."""

    kind: str
    text: str
    document_id: str
    answer: str
    context: str = ""  # the heading path above the answer in its source file (its own heading left out)


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
    title = next(s.trail for s in split_sections((DOCS / "glossary.rst.txt").read_text(), "rst") if s.trail)
    return [Query("glossary", question(term), f"glossary/{term}", "\n".join(body).strip(), title)
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
                context = " > ".join(section.trail.split(" > ")[:-1])
                queries.append(Query("faq", title, f"faq-answers/{path.name}/{n}", answer, context))
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


def rank_of(hits: list[Hit], relevant: str, scoring: DocScore = ("max", 0.0),
            sizes: dict[str, int] | None = None) -> float:
    """1-based rank of the relevant document among the documents of the hits, inf if absent."""
    documents = rank_documents(hits, scoring, sizes)
    return documents.index(relevant) + 1.0 if relevant in documents else np.inf


DocScore = tuple[str, float]  # (how, λ)
DOC_SCORES: list[DocScore] = [("max", 0.0), ("sum", 0.0), ("rrf-sum", 0.0)] + [
    ("max+λ·rest", lam) for lam in (0.05, 0.1, 0.2, 0.3, 0.5)] + [
    ("max-λ·√(2ln n)", lam) for lam in (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)]
PER_MODE = ("max-λ·√(2ln n)",)  # scores on each mode's own scale: λ tuned per mode


def rank_documents(hits: list[Hit], scoring: DocScore, sizes: dict[str, int] | None = None) -> list[str]:
    """The documents of a chunk ranking, best first, by a document score built from their chunks' scores:
    max (the best chunk: the first occurrence), sum (of scores shifted so the list's lowest is 0),
    rrf-sum (sum of 1/(60 + rank)), max+λ·rest (the best chunk plus λ times the shifted others), or
    max-λ·√(2ln n), the best chunk less λ·sqrt(2 ln n) for a document of n chunks (`sizes`): the growth of
    the expected maximum of n draws (a diagnostic of the eval's short answer documents, retrieval_v2.md
    section 8). Ties keep the order of first occurrence."""
    how, lam = scoring
    if how == "max" or not hits:
        return list(dict.fromkeys(h.document_id for h in hits))
    if how == "max-λ·√(2ln n)":
        best = {h.document_id: h.score for h in reversed(hits)}
        return sorted(dict.fromkeys(h.document_id for h in hits),
                      key=lambda doc: -(best[doc] - lam * np.sqrt(2 * np.log(sizes[doc]))))
    low = min(h.score for h in hits)
    chunks: dict[str, list[float]] = {}
    for rank, hit in enumerate(hits):
        value = 1.0 / (61 + rank) if how == "rrf-sum" else hit.score - low
        chunks.setdefault(hit.document_id, []).append(value)
    total = {doc: v[0] + lam * sum(v[1:]) if how == "max+λ·rest" else sum(v) for doc, v in chunks.items()}
    return sorted(chunks, key=lambda doc: -total[doc])


def with_context(chunks: list[Chunk], contexts: dict[str, str], chunker: Chunker, budget: int,
                 title_only: bool = False) -> list[Chunk]:
    """Contextual chunks: each chunk's text preceded by its document's heading path (the document title,
    then the sections down to the chunk's own, or `contexts` for a document without headings), cut to
    `budget` tokens (middle headings dropped first, then the tail); with `title_only`, the title alone."""
    fitted: dict[str, str] = {}

    def fit(trail: str) -> str:
        parts = trail.split(" > ")
        while len(parts) > 2 and chunker.count([" > ".join(parts)])[0] > budget:
            del parts[1]
        trail = " > ".join(parts)
        enc = chunker.tokenizer(trail, add_special_tokens=False, return_offsets_mapping=True)
        return trail if len(enc["input_ids"]) <= budget else trail[:enc["offset_mapping"][budget - 1][1]]

    out = []
    for c in chunks:
        trail = " > ".join(p for p in (contexts.get(c.document_id, ""), c.section) if p)
        trail = trail.split(" > ")[0] if title_only else trail
        if trail and trail not in fitted:
            fitted[trail] = fit(trail)
        out.append(replace(c, text=f"{fitted[trail]}\n{c.text}") if trail else c)
    return out


def by_section(chunks: list[Chunk], keep: set[str]) -> list[Chunk]:
    """Each section of a document its own document, "<document> § <n>" (n: the section's position among the
    document's sections, by heading trail), but the documents in `keep` (the answers, one section each):
    distractors as small as the answers, so a document's size no longer tells an answer from a distractor
    (chunks never span sections, so their texts and vectors stay the same)."""
    numbers: dict[str, dict[str, int]] = {}
    out = []
    for c in chunks:
        if c.document_id in keep:
            out.append(c)
            continue
        sections = numbers.setdefault(c.document_id, {})
        document = f"{c.document_id} § {sections.setdefault(c.section, len(sections))}"
        out.append(replace(c, id=f"{document}#{c.id.rpartition('#')[2]}", document_id=document))
    return out


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


def build(embedded: list[Chunk], indexed: list[Chunk], encoder: CachedEncoder,
          bm25_params: Sequence[float] = ()) -> HybridRetriever:
    """The hybrid retriever of the eval: `embedded` chunks in an in-RAM dense memory, `indexed` in BM25
    (`BM25Retriever(*bm25_params)`: its own k1 and b by default)."""
    index = DenseIndex(Memory(DenseIndex.spec("eval", encoder)), encoder)
    index.add(embedded)
    bm25 = BM25Retriever(*bm25_params)
    bm25.add(indexed)
    return HybridRetriever(bm25, AsymmetricDense(index), depth=DEPTH)


def split(queries: list[Query], seed: int) -> dict[str, list[int]]:
    """Query indices in halves A and B: each question set split in two by a seeded shuffle."""
    halves: dict[str, list[int]] = {"A": [], "B": []}
    for kind in KINDS:
        members = [i for i, q in enumerate(queries) if q.kind == kind]
        random.Random(seed).shuffle(members)
        halves["A"] += members[: len(members) // 2]
        halves["B"] += members[len(members) // 2:]
    return halves


ENCODERS = {"minilm": (lambda: SentenceEncoder(), False),  # the model, and whether queries differ
            "e5-small-q4": (lambda: E5Small(), True)}
for _backend in ("onnx-int8", "openvino", "openvino-int8"):  # int8 OpenVINO: calibrated on the shipped texts
    ENCODERS[f"minilm-{_backend}"] = (lambda b=_backend: ExportedEncoder(
        model_path(), b, OUT / "exported-minilm", calibration=calibration_texts() if b == "openvino-int8" else ()),
        False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="chunk size in embedder tokens")
    ap.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="chunk overlap in tokens")
    ap.add_argument("--dirs", nargs="*", help="only these top-level doc directories (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the query split")
    ap.add_argument("--context", choices=["none", "title", "trail"], default="none",
                    help="prefix each chunk with its document title (title) or title and heading path (trail)")
    ap.add_argument("--context-in", choices=["both", "bm25", "dense"], default="both",
                    help="which retriever sees the prefixed text (the other indexes the plain chunk)")
    ap.add_argument("--context-tokens", type=int, default=32,
                    help="tokens reserved for the heading path (chunks are cut to size minus this)")
    ap.add_argument("--documents", choices=["file", "section"], default="file",
                    help="what a distractor document is: a whole reST file, or each section of one (size-fair)")
    ap.add_argument("--bm25", type=float, nargs=2, metavar=("K1", "B"), help="BM25 parameters (default: the "
                    "retriever's own)")
    ap.add_argument("--encoder", choices=list(ENCODERS), default="minilm")
    ap.add_argument("--cache", type=Path, help="embedding cache (default bench/out/embeddings-<encoder>.npz)")
    ap.add_argument("--export-texts", type=Path, help="write [key, text, is_query] of every text to embed "
                    "(json.gz, for bench/gpu_embed.py) and stop")
    ap.add_argument("--json", type=Path, help="write the held-out metrics here")
    ap.add_argument("--plot", type=Path, default=RESULTS / "retrieval_eval.png")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    reserve = args.context_tokens if args.context != "none" else 0
    chunker = Chunker(AutoTokenizer.from_pretrained(model_path()), args.size - reserve, args.overlap)
    queries = glossary() + faq()
    docs = corpus(args.dirs) | {q.document_id: q.answer for q in queries}
    t0 = time.perf_counter()
    chunks = [c for doc_id, text in docs.items() for c in chunker.chunk(doc_id, text)]
    if args.documents == "section":
        chunks = by_section(chunks, {q.document_id for q in queries})
    plain = chunks
    if args.context != "none":
        contexts = {q.document_id: q.context for q in queries}
        chunks = with_context(chunks, contexts, chunker, reserve, title_only=args.context == "title")
    print(f"{len({c.document_id for c in chunks})} documents -> {len(chunks)} chunks (size {args.size}, overlap "
          f"{args.overlap}, context {args.context}, documents {args.documents}) in {time.perf_counter() - t0:.1f}s")

    make, asymmetric = ENCODERS[args.encoder]
    embedded = plain if args.context_in == "bm25" else chunks
    if args.export_texts:
        rows = [[text_key(c.text).hex(), c.text, False] for c in embedded]
        rows += [[text_key(q.text, asymmetric).hex(), q.text, asymmetric] for q in queries]
        args.export_texts.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(args.export_texts, "wt") as f:
            json.dump(rows, f)
        print(f"{len(rows)} texts -> {args.export_texts}")
        return
    encoder = CachedEncoder(args.cache or OUT / f"embeddings-{args.encoder}.npz", make, 384, asymmetric)
    hybrid = build(embedded, plain if args.context_in == "dense" else chunks, encoder, args.bm25 or ())
    halves = split(queries, args.seed)
    lists = {mode: [hybrid.search(q.text, DEPTH, mode) for q in queries] for mode in ("bm25", "dense")}
    completed = [hybrid.rankings(q.text, DEPTH) for q in queries]

    sizes = dict(Counter(c.document_id for c in chunks))

    def ranks(rankings: list[list[Hit]], scoring: DocScore = ("max", 0.0)) -> np.ndarray:
        return np.array([rank_of(hits, q.document_id, scoring, sizes) for hits, q in zip(rankings, queries)])

    def fused(fusion: Fusion, complete: bool) -> np.ndarray:
        inputs = completed if complete else zip(lists["bm25"], lists["dense"])
        return ranks([fusion(list(pair), DEPTH) for pair in inputs])

    single = {mode: ranks(lists[mode]) for mode in ("bm25", "dense")}
    default_hits = [hybrid.search(q.text, DEPTH) for q in queries]
    default = ranks(default_hits)
    grids = {name: [(f, fused(f, complete)) for f in grid] for name, (complete, grid) in families().items()}
    counts = {kind: sum(q.kind == kind for q in queries) for kind in KINDS}
    print(f"{len(queries)} queries ({counts}), half A {len(halves['A'])}, half B {len(halves['B'])}")

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "chunks": len(chunks)}
    for tune, report in (("A", "B"), ("B", "A")):
        on, fit = np.array(halves[report]), np.array(halves[tune])
        rows = {mode: metrics(r[on]) for mode, r in single.items()}
        tuned = {mode: metrics(r[fit]) for mode, r in single.items()}
        params, margins, chosen = {}, {}, {}
        for name, grid in grids.items():
            best, best_ranks = max(grid, key=lambda fr: margin(fr[1][fit], [r[fit] for r in single.values()]))
            rows[name], params[name], chosen[name] = metrics(best_ranks[on]), describe(best), best
            tuned[name], margins[name] = metrics(best_ranks[fit]), margin(best_ranks[fit], [r[fit] for r in single.values()])
        rows["hybrid default"], params["hybrid default"] = metrics(default[on]), describe(DEFAULT_FUSION)
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
        # document-level scoring: each aggregation applied to every mode; λ tuned on the tuning half
        zscore = chosen["zscore"]
        tuned_hits = [zscore(list(pair), DEPTH) for pair in completed]
        doc_rows, doc_params = {}, {}
        for how in dict.fromkeys(h for h, _ in DOC_SCORES):
            options = [d for d in DOC_SCORES if d[0] == how]
            best = max(options, key=lambda d: metrics(ranks(tuned_hits, d)[fit])["MRR@10"])
            for mode, hits in (("bm25", lists["bm25"]), ("dense", lists["dense"]),
                               ("hybrid default", default_hits), ("hybrid zscore tuned", tuned_hits)):
                if how in PER_MODE:
                    best = max(options, key=lambda d, hits=hits: metrics(ranks(hits, d)[fit])["MRR@10"])
                name = f"{mode}, {how}"
                doc_rows[name], doc_params[name] = metrics(ranks(hits, best)[on]), f"λ={best[1]:g}" if best[1] else ""
        print(f"\ndocument scores (λ tuned on half {tune} by the tuned zscore hybrid's MRR@10; {', '.join(PER_MODE)}: "
              f"by each mode's own), half {report}:\n")
        print(table(doc_rows, doc_params))
        results[report] = {"rows": rows, "params": params, "chosen": choice, "documents": doc_rows,
                           "document params": doc_params}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    plot(results["B"]["rows"], args.plot)


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
