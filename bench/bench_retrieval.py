"""Retrieval speed: ingestion chunks/s, and search QPS and p50/p99 latency per mode at 10K and 100K chunks.

In-process: `HybridRetriever` over `BM25Retriever` and a `DenseRetriever` on an in-RAM flat
`memsvc.store.Memory`, one query at a time on one thread. The chunks are the Python docs (all reST
sources, default chunk size), repeated under new document ids up to the target count; search cost
depends on the count, not on the copies being alike. Chunk vectors come from the embedding cache that
eval_retrieval.py fills (so ingesting 100K chunks takes minutes, not hours); live embedding speed is
measured on a sample of chunks, and queries (the eval's glossary and FAQ questions) are always
embedded live.
rank-bm25's BM25Okapi is timed on the same chunks: it is why BM25Retriever keeps a sparse index.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_retrieval.py [--sizes 10000 100000] [--embed-sample 256]
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi

from eval_retrieval import OUT, RESULTS, CachedEncoder, corpus, faq, glossary
from memsvc.store import Memory
from retrievers.base import Chunk
from retrievers.bm25 import BM25Retriever, tokenize
from retrievers.chunking import Chunker
from retrievers.dense import DenseRetriever, SentenceEncoder
from retrievers.hybrid import HybridRetriever


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def scaled(chunks: list[Chunk], n: int) -> list[Chunk]:
    """n chunks: the corpus, then copies of it under document ids `copy<j>/...`."""
    out = list(chunks[:n])
    copy = 1
    while len(out) < n:
        out += [replace(c, id=f"copy{copy}/{c.id}", document_id=f"copy{copy}/{c.document_id}")
                for c in chunks[: n - len(out)]]
        copy += 1
    return out


def latencies(search, queries: list[str]) -> dict[str, float]:
    times = np.array([timed(search, q)[1] for q in queries])
    return {"QPS": len(times) / times.sum(), "p50 ms": 1e3 * np.percentile(times, 50),
            "p99 ms": 1e3 * np.percentile(times, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--embed-sample", type=int, default=256, help="chunks embedded live to time the model")
    ap.add_argument("--queries", type=int, default=150, help="queries timed per mode")
    ap.add_argument("--rank-bm25-queries", type=int, default=20, help="queries timed on rank-bm25")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--plot", type=Path, default=RESULTS / "retrieval_speed.png")
    args = ap.parse_args()

    live = SentenceEncoder()
    chunker = Chunker(live.tokenizer)
    chunks = [c for doc_id, text in corpus(None).items() for c in chunker.chunk(doc_id, text)]
    questions = [q.text for q in glossary() + faq()]
    queries = random.Random(0).sample(questions, min(args.queries, len(questions)))
    cached = CachedEncoder(OUT / "embeddings-minilm.npz")
    print(f"{len(chunks)} corpus chunks, {len(queries)} queries, device {live.model.device}")

    sample = random.Random(0).sample(chunks, args.embed_sample)
    _, seconds = timed(live.encode, [c.text for c in sample])
    tokens = sum(chunker.count([c.text for c in sample]))
    print(f"live embedding: {len(sample) / seconds:.1f} chunks/s ({tokens / seconds:.0f} tokens/s)")

    rows = []
    for n in args.sizes:
        docs = scaled(chunks, n)
        bm25 = BM25Retriever()
        _, add_s = timed(bm25.add, docs)
        _, build_s = timed(bm25.search, "warm up", 1)
        dense = DenseRetriever(Memory(DenseRetriever.spec("bench", cached)), cached)
        _, dense_s = timed(dense.add, docs)
        vectors = live.encode(queries)
        row = {"chunks": n, "bm25 ingest chunks/s": n / (add_s + build_s), "bm25 index build s": build_s,
               "dense ingest chunks/s (cached vectors)": n / dense_s}
        for mode in ("bm25", "dense", "hybrid"):  # a fresh dense retriever: no query embeddings cached
            hybrid = HybridRetriever(bm25, DenseRetriever(dense.memory, live, dense.vector_ids))
            row[mode] = latencies(lambda q: hybrid.search(q, args.k, mode), queries)
        row["memory.search only"] = latencies(lambda i: dense.memory.search(vectors[i:i + 1], args.k),
                                              list(range(len(queries))))
        tokenized, init_s = timed(lambda: BM25Okapi([tokenize(c.text) for c in docs]))
        row["rank-bm25 ingest chunks/s"] = n / init_s
        row["rank-bm25"] = latencies(lambda q: tokenized.get_scores(tokenize(q)), queries[: args.rank_bm25_queries])
        rows.append(row)
        print(row)

    print(table(rows))
    plot(rows, args.plot)


def table(rows: list[dict]) -> str:
    modes = ["bm25", "dense", "hybrid", "memory.search only", "rank-bm25"]
    lines = ["| chunks | mode | QPS | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for row in rows:
        for mode in modes:
            m = row[mode]
            lines.append(f"| {row['chunks']:,} | {mode} | {m['QPS']:.1f} | {m['p50 ms']:.1f} | {m['p99 ms']:.1f} |")
    lines += ["", "| chunks | bm25 ingest chunks/s | bm25 index build s | rank-bm25 ingest chunks/s "
              "| dense ingest chunks/s (cached vectors) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['chunks']:,} | {row['bm25 ingest chunks/s']:,.0f} | {row['bm25 index build s']:.2f} "
                     f"| {row['rank-bm25 ingest chunks/s']:,.0f} | {row['dense ingest chunks/s (cached vectors)']:,.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["bm25", "dense", "hybrid", "memory.search only", "rank-bm25"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        x = np.arange(len(modes)) + i * width
        axes[0].bar(x, [row[m]["QPS"] for m in modes], width, label=f"{row['chunks']:,} chunks")
        axes[1].bar(x, [row[m]["p50 ms"] for m in modes], width, label=f"p50, {row['chunks']:,}")
        axes[1].scatter(x, [row[m]["p99 ms"] for m in modes], marker="_", s=200, color="k")
    for ax, title in zip(axes, ("search QPS (one thread)", "latency ms (bar p50, tick p99)")):
        ax.set_xticks(np.arange(len(modes)) + 0.4 - width / 2, modes, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("retrieval search speed, in-process, 2 CPU cores")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
