"""Cheap retrieval probes on bench/eval_retrieval.py's questions and full corpus, from its embedding cache.

The eval's ranking re-done in numpy (BM25 by `retrievers.bm25.BM25Retriever`, cosine over the cached
vectors, z-score fusion 0.2/0.8 over both retrievers' top-50 candidates, documents by their best chunk;
it matches eval_retrieval.py to within one question of 147), so a signal or a query rewrite can be tried in
seconds. Prints MRR@10 R@1 R@5 R@10 on half A (tuning) and half B (held out) per variant; what the rows
mean: bench/results/retrieval_v2.md section 8. Needs the cache of
`eval_retrieval.py --encoder minilm-openvino-int8` (bench/out/embeddings-minilm-openvino-int8.npz).

    HF_HUB_OFFLINE=1 PYTHONPATH=. nice -n 5 .venv/bin/python bench/probe_retrieval.py [--probes bm25 query ...]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import replace
from itertools import product

import eval_retrieval as ev
import numpy as np

from retrievers.bm25 import BM25Retriever
from retrievers.chunking import Chunker
from retrievers.dense import model_path

ENCODER = "minilm-openvino-int8"
QUESTION = re.compile(r"^(what|how|why|where|when|which|who|is|are|do|does|can|could|should|would|i|my|a|an|the|"
                      r"it|s|'s|there|some|one|to)\b\s*", re.IGNORECASE)
ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`__?")
LITERAL = re.compile(r"``(.+?)``")
LABEL = re.compile(r"^\s*\.\. _[^:]*:\s*$")
DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w:-]+)::\s*(.*)$")
DROPPED = ("index", "highlight", "sectionauthor", "moduleauthor", "testsetup", "testcleanup")


def strip_question(text: str) -> str:
    """'What is a generator?' -> 'generator': leading question and function words and the '?' removed."""
    text, previous = text.rstrip("?").strip(), None
    while previous != text:
        previous, text = text, QUESTION.sub("", text).strip()
    return text or previous


def plain_rst(text: str) -> str:
    """reST markup removed for the embedder: roles and links to their text, ``literals`` bare, labels and
    index/highlight directives dropped, other directives to their argument, '::' to ':'."""
    out, skip = [], None
    for line in text.splitlines():
        if skip is not None:
            if not line.strip() or len(line) - len(line.lstrip()) > skip:
                continue
            skip = None
        if LABEL.match(line):
            continue
        directive = DIRECTIVE.match(line)
        if directive and directive.group(2) in DROPPED:
            skip = len(directive.group(1))
            continue
        if directive:
            line = directive.group(1) + directive.group(3)
        line = LINK.sub(r"\1", LITERAL.sub(r"\1", ROLE.sub(lambda m: m.group(1).lstrip("~!"), line)))
        out.append(line.rstrip()[:-1] if line.rstrip().endswith("::") else line)
    return "\n".join(out)


class Lab:
    """The eval's questions, chunks, vectors and BM25 scores, and its ranking in numpy."""

    def __init__(self):
        from transformers import AutoTokenizer

        chunker = Chunker(AutoTokenizer.from_pretrained(model_path()), ev.DEFAULT_SIZE, ev.DEFAULT_OVERLAP)
        self.queries = ev.glossary() + ev.faq()
        docs = ev.corpus(None) | {q.document_id: q.answer for q in self.queries}
        self.chunks = [c for doc_id, text in docs.items() for c in chunker.chunk(doc_id, text)]
        self.doc_ids = [c.document_id for c in self.chunks]
        self.encoder = ev.CachedEncoder(ev.OUT / f"embeddings-{ENCODER}.npz", ev.ENCODERS[ENCODER][0], 384)
        self.C = self.encoder.encode([c.text for c in self.chunks])
        self.Q = self.encoder.encode_queries([q.text for q in self.queries])
        self.halves = {h: np.array(v) for h, v in ev.split(self.queries, 0).items()}
        self.SD, self.SB = self.Q @ self.C.T, self.bm25()

    def bm25(self, k1: float = 1.5, b: float = 0.75, texts: list[str] | None = None) -> np.ndarray:
        """[queries, chunks] BM25 scores, the chunks' texts replaced by `texts` if given."""
        retriever = BM25Retriever(k1, b)
        chunks = self.chunks if texts is None else [replace(c, text=t) for c, t in zip(self.chunks, texts)]
        retriever.add(chunks)
        retriever.search("x", 1)
        rows = np.array([retriever._index.rows[c.id] for c in self.chunks])
        return np.stack([np.asarray(retriever._scores(q.text)[1]).ravel()[rows] for q in self.queries])

    def ranks(self, scores: np.ndarray) -> np.ndarray:
        """The answer document's rank per question in a chunk ranking by `scores`, inf beyond 50 chunks."""
        out = np.full(len(self.queries), np.inf)
        for i, q in enumerate(self.queries):
            top = np.argpartition(-scores[i], ev.DEPTH)[:ev.DEPTH]
            docs = list(dict.fromkeys(self.doc_ids[j] for j in top[np.argsort(-scores[i, top], kind="stable")]))
            out[i] = docs.index(q.document_id) + 1 if q.document_id in docs else np.inf
        return out

    def hybrid(self, SB: np.ndarray, SD: np.ndarray, w: float = 0.8, extra: np.ndarray | None = None,
               w_extra: float = 0.0) -> np.ndarray:
        """Ranks under z-score fusion (1 - w)·BM25 + w·dense (+ w_extra·extra) over the union of both top-50s."""
        fused = np.full(SD.shape, -np.inf)
        for i in range(len(self.queries)):
            cand = np.union1d(np.argpartition(-SB[i], ev.DEPTH)[:ev.DEPTH], np.argpartition(-SD[i], ev.DEPTH)[:ev.DEPTH])
            parts = [(1 - w, SB[i, cand]), (w, SD[i, cand])] + ([(w_extra, extra[i, cand])] if extra is not None else [])
            fused[i, cand] = sum(weight * (s - s.mean()) / (s.std() or 1.0) for weight, s in parts)
        return self.ranks(fused)

    def show(self, name: str, ranks: np.ndarray) -> None:
        cells = [" ".join(f"{v:.3f}" for v in ev.metrics(ranks[self.halves[h]]).values()) for h in "AB"]
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    probes = ("base", "bm25", "bm25-grid", "query", "prf", "heading", "kind", "hubness", "length", "markup")
    ap.add_argument("--probes", nargs="*", choices=probes, default=list(probes))
    args = ap.parse_args()
    lab = Lab()
    print("| variant | half A: MRR@10 R@1 R@5 R@10 | half B (held out) |\n|---|---|---|")
    if "base" in args.probes:
        lab.show("bm25", lab.ranks(lab.SB))
        lab.show("dense", lab.ranks(lab.SD))
        lab.show("hybrid zscore 0.2/0.8", lab.hybrid(lab.SB, lab.SD))
    if "bm25" in args.probes:
        for k1, b in [(0.9, 0.4), (0.9, 0.75), (1.2, 0.75), (1.2, 1.0), (1.5, 0.9), (1.5, 1.0), (2.0, 1.0)]:
            SB = lab.bm25(k1, b)
            lab.show(f"bm25 k1={k1} b={b}", lab.ranks(SB))
            lab.show(f"hybrid with bm25 k1={k1} b={b}", lab.hybrid(SB, lab.SD))
    if "bm25-grid" in args.probes:  # k1 x b x dense weight, chosen on half A as eval_retrieval.py chooses fusions
        dense, chosen = ev.metrics(lab.ranks(lab.SD)[lab.halves["A"]]), []
        for k1, b in product((0.5, 0.9, 1.2, 1.5, 2.0, 3.0), (0.3, 0.5, 0.75, 0.9, 1.0)):
            SB = lab.bm25(k1, b)
            bm25 = ev.metrics(lab.ranks(SB)[lab.halves["A"]])
            for w in (0.7, 0.8, 0.9):
                ranks = lab.hybrid(SB, lab.SD, w)
                lab.show(f"hybrid with bm25 k1={k1} b={b}, w_dense={w}", ranks)
                tuned = ev.metrics(ranks[lab.halves["A"]])
                chosen.append((min(tuned[k] - max(dense[k], bm25[k]) for k in tuned), tuned["MRR@10"], k1, b, w))
        print("\nchosen on half A (smallest gain over the best single mode, then MRR@10): "
              f"k1={max(chosen)[2]} b={max(chosen)[3]} w_dense={max(chosen)[4]}\n")
    if "query" in args.probes:
        Q2 = lab.encoder.encode_queries([strip_question(q.text) for q in lab.queries])
        mean = lab.Q + Q2
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        lab.show("dense, question words stripped", lab.ranks(Q2 @ lab.C.T))
        lab.show("dense, mean of both query vectors", lab.ranks(mean @ lab.C.T))
        lab.show("hybrid, mean of both query vectors", lab.hybrid(lab.SB, mean @ lab.C.T))
    if "prf" in args.probes:
        for k, beta in ((3, 0.3), (5, 0.5), (10, 0.5)):
            top = np.argpartition(-lab.SD, k, axis=1)[:, :k]
            Qp = lab.Q + beta * lab.C[top].mean(1)
            Qp /= np.linalg.norm(Qp, axis=1, keepdims=True)
            lab.show(f"dense, Rocchio PRF top {k} β={beta}", lab.ranks(Qp @ lab.C.T))
    if "heading" in args.probes:
        heads = [c.section.split(" > ")[-1] for c in lab.chunks]
        names = sorted({h for h in heads if h})
        vectors = dict(zip(names, lab.encoder.encode(names)))
        SH = lab.Q @ np.stack([vectors[h] if h else np.zeros(384, np.float32) for h in heads]).T
        SBH = lab.bm25(texts=heads)
        for wx in (0.1, 0.2):
            lab.show(f"hybrid + {wx}·dense(query, section heading)", lab.hybrid(lab.SB, lab.SD, 0.8, SH, wx))
            lab.show(f"hybrid + {wx}·BM25(section heading)", lab.hybrid(lab.SB, lab.SD, 0.8, SBH, wx))
    if "kind" in args.probes:
        for w in (0.7, 0.9):
            lab.show(f"hybrid w_dense={w}", lab.hybrid(lab.SB, lab.SD, w))
    if "hubness" in args.probes:  # CSLS (Conneau et al. 2018): a chunk close to many chunks is a hub
        hub = np.zeros(len(lab.C))
        for start in range(0, len(lab.C), 1024):
            sims = lab.C[start:start + 1024] @ lab.C.T
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -1.0
            hub[start:start + 1024] = np.partition(sims, -10, axis=1)[:, -10:].mean(1)
        for a in (0.25, 0.5):
            lab.show(f"dense - {a}·mean cos to 10 nearest chunks", lab.ranks(lab.SD - a * hub))
            lab.show(f"hybrid, dense - {a}·mean cos to 10 nearest chunks", lab.hybrid(lab.SB, lab.SD - a * hub))
    if "length" in args.probes:
        sizes = Counter(lab.doc_ids)
        answers = {q.document_id for q in lab.queries}
        print(f"\none-chunk documents: {sum(v == 1 for v in sizes.values())}, of them answer documents: "
              f"{sum(v == 1 for d, v in sizes.items() if d in answers)}\n")
        penalty = np.sqrt(2 * np.log([sizes[d] for d in lab.doc_ids]))[None, :]
        for g in (0.02, 0.04, 0.06):
            lab.show(f"dense - {g}·√(2 ln n_chunks(document))", lab.ranks(lab.SD - g * penalty))
    if "markup" in args.probes:
        texts = [plain_rst(c.text) for c in lab.chunks]
        clean = ev.CachedEncoder(ev.OUT / f"embeddings-{ENCODER}-plain-rst.npz", ev.ENCODERS[ENCODER][0], 384)
        SDc = lab.Q @ clean.encode(texts).T
        lab.show("dense, chunks embedded without reST markup", lab.ranks(SDc))
        lab.show("hybrid, dense without markup", lab.hybrid(lab.SB, SDc))
        SBc = lab.bm25(texts=texts)
        lab.show("hybrid, both without markup", lab.hybrid(SBc, SDc))


if __name__ == "__main__":
    main()
