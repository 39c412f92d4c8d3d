"""Retrieval speed: ingestion chunks/s, and search QPS and p50/p99 latency per mode at 10K and 100K chunks.

In-process: `HybridRetriever` over `BM25Retriever` and a `DenseRetriever` (its `DenseIndex`) on an in-RAM flat
`memsvc.store.Memory`, one query at a time on one thread. The chunks are the Python docs (all reST
sources, default chunk size), repeated under new document ids up to the target count; search cost
depends on the count, not on the copies being alike. Chunk vectors come from the embedding cache that
eval_retrieval.py fills (so ingesting 100K chunks takes minutes, not hours); live embedding speed is
measured on a sample of chunks, and queries (the eval's glossary and FAQ questions) are always
embedded live.
rank-bm25's BM25Okapi is timed on the same chunks: it is why BM25Retriever keeps a sparse index.

With --rest, the same through `memsvc serve` (a subprocess): `memsvc ingest --url` of a few docs
directories with live embedding (REST ingestion chunks/s), then `POST /v1/collections/{c}/search` per
mode; and, at each size, a server over a data dir that `Collections` filled in-process from the
embedding cache (embedding 100K chunks live is hours on CPU), timed the same way. Each mode gets its
own queries, as the server caches query embeddings. Results go to results/retrieval_speed.json (one key
per run kind) and the plot.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_retrieval.py [--sizes 10000 100000] [--embed-sample 256]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_retrieval.py --rest [--sizes 10000 100000]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from bench_store import start_server
from eval_retrieval import DOCS, OUT, RESULTS, CachedEncoder, corpus, faq, glossary
from rank_bm25 import BM25Okapi

from memsvc.config import Settings
from memsvc.contract import Document
from memsvc.service import Service
from memsvc.store import Memory
from retrievers.base import Chunk
from retrievers.bm25 import BM25Retriever, tokenize
from retrievers.chunking import Chunker
from retrievers.dense import DenseIndex, DenseRetriever, SentenceEncoder
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


def rank_bm25_index(chunks: list[Chunk]) -> BM25Okapi:
    return BM25Okapi([tokenize(c.text) for c in chunks])


def rank_bm25_scores(index: BM25Okapi, query: str) -> np.ndarray:
    """rank-bm25's score of every chunk for the query (no top-k: its cost is the scoring)."""
    return index.get_scores(tokenize(query))


def latencies(search, queries: list) -> dict[str, float]:
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
    ap.add_argument("--rest", action="store_true", help="through a memsvc server instead of in-process")
    ap.add_argument("--rest-dirs", nargs="+", default=["tutorial", "howto", "faq"],
                    help="docs directories ingested live through REST")
    ap.add_argument("--rest-queries", type=int, default=90, help="queries timed per mode through REST")
    ap.add_argument("--plot", type=Path, default=RESULTS / "retrieval_speed.png")
    ap.add_argument("--json", type=Path, default=RESULTS / "retrieval_speed.json")
    args = ap.parse_args()

    live = SentenceEncoder()
    chunker = Chunker(live.tokenizer)
    documents = corpus(None)
    chunks = [c for doc_id, text in documents.items() for c in chunker.chunk(doc_id, text)]
    questions = [q.text for q in glossary() + faq()]
    queries = random.Random(0).sample(questions, min(args.queries, len(questions)))
    cached = CachedEncoder(OUT / "embeddings-minilm.npz")
    print(f"{len(chunks)} corpus chunks, {len(queries)} queries, device {live.model.device}")
    if args.rest:
        per_mode = random.Random(1).sample(questions, 3 * args.rest_queries)
        by_mode = {mode: per_mode[i::3] for i, mode in enumerate(("bm25", "dense", "hybrid"))}
        counts = Counter(c.document_id for c in chunks)
        rows = rest(args, documents, counts, by_mode, Prefilled(cached, live))
        print(rest_table(rows))
        plot(save(args.json, "rest", rows), args.plot)
        return

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
        dense = DenseIndex(Memory(DenseIndex.spec("bench", cached)), cached)
        _, dense_s = timed(dense.add, docs)
        vectors = live.encode(queries)
        row = {"chunks": n, "live embedding chunks/s": len(sample) / seconds,
               "bm25 ingest chunks/s": n / (add_s + build_s), "bm25 index build s": build_s,
               "dense ingest chunks/s (cached vectors)": n / dense_s}
        for mode in ("bm25", "dense", "hybrid"):  # a fresh dense retriever: no query embeddings cached
            hybrid = HybridRetriever(bm25, DenseRetriever(dense, live))
            row[mode] = latencies(partial(hybrid.search, k=args.k, mode=mode), queries)
        row["memory.search only"] = latencies(partial(dense.memory.search, k=args.k),
                                              [vectors[i:i + 1] for i in range(len(queries))])
        okapi, init_s = timed(rank_bm25_index, docs)
        row["rank-bm25 ingest chunks/s"] = n / init_s
        row["rank-bm25"] = latencies(partial(rank_bm25_scores, okapi), queries[: args.rank_bm25_queries])
        rows.append(row)
        print(row)

    print(table(rows))
    plot(save(args.json, "in-process", rows), args.plot)


class Prefilled:
    """What `Collections` needs of an encoder, with vectors from the embedding cache (a miss embeds live)
    and the live model's tokenizer, so the collection chunks exactly as the server does."""

    def __init__(self, cached: CachedEncoder, live: SentenceEncoder):
        self.dim, self.encode = cached.dim, cached.encode
        self.tokenizer, self.max_tokens = live.tokenizer, live.max_tokens


def scaled_documents(documents: dict[str, str], counts: Counter, n: int) -> list[Document]:
    """Whole documents, then copies of them under `copy<j>/...`, until they hold at least n chunks."""
    out, total, copy = [], 0, 0
    while total < n:
        for doc_id, text in documents.items():
            if total >= n:
                break
            out.append(Document(f"copy{copy}/{doc_id}" if copy else doc_id, text))
            total += counts[doc_id]
        copy += 1
    return out


def rest(args: argparse.Namespace, documents: dict[str, str], counts: Counter,
         by_mode: dict[str, list[str]], encoder: Prefilled) -> list[dict]:
    """Live `memsvc ingest --url` of `args.rest_dirs`, then prefilled collections of each size; search
    latency per mode through REST on each."""
    work = Path(__file__).parent / "tmp-retrieval"
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    proc, url = start_server(work / "live")
    try:  # creating the collection loads the server's embedder, outside the timed ingestion
        httpx.post(f"{url}/v1/collections", json={"name": "live"}, timeout=600).raise_for_status()
        command = [sys.executable, "-m", "memsvc.cli", "ingest", *(str(DOCS / d) for d in args.rest_dirs),
                   "--collection", "live", "--url", url]
        done, seconds = timed(subprocess.run, command)
        stats = httpx.get(f"{url}/v1/collections/live", timeout=60).json()
        row = {"chunks": stats["chunks"], "documents": stats["documents"], "ingest": "live, memsvc ingest --url",
               "ingest chunks/s": stats["chunks"] / seconds, "ingest s": seconds, "exit": done.returncode}
        print(row, flush=True)
        rows.append(row | rest_latencies(url, "live", by_mode, args.k))
    finally:
        proc.terminate()
        proc.wait()
    for n in args.sizes:
        data_dir = work / f"prefilled-{n}"
        scaled = scaled_documents(documents, counts, n)
        with Service(Settings(data_dir=data_dir), encoder=lambda: encoder) as service:
            col = service.create_collection("bench")
            start = time.perf_counter()
            for i in range(0, len(scaled), 64):
                col.upsert(scaled[i:i + 64])
            seconds = time.perf_counter() - start
            chunks = col.stats().chunks
        row = {"chunks": chunks, "documents": len(scaled), "ingest": "in-process Collections, cached vectors",
               "ingest chunks/s": chunks / seconds, "ingest s": seconds}
        proc, url = start_server(data_dir)
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                opened, row["open s"] = timed(http.get, "/v1/collections/bench")  # embedder, SQL, BM25
            opened.raise_for_status()
            print(row, flush=True)
            rows.append(row | rest_latencies(url, "bench", by_mode, args.k))
        finally:
            proc.terminate()
            proc.wait()
        shutil.rmtree(data_dir)
    return rows


def rest_latencies(url: str, collection: str, by_mode: dict[str, list[str]], k: int) -> dict[str, dict]:
    """QPS and p50/p99 ms of `POST /v1/collections/{collection}/search`, one request at a time."""
    out = {}
    with httpx.Client(base_url=url, timeout=600) as http:
        for mode, queries in by_mode.items():
            def search(query: str, mode: str = mode) -> None:
                http.post(f"/v1/collections/{collection}/search",
                          json={"query": query, "k": k, "mode": mode}).raise_for_status()

            search(f"warm up {mode}")
            out[mode] = latencies(search, queries)
            print(mode, out[mode], flush=True)
    return out


def save(path: Path, kind: str, rows: list[dict]) -> dict[str, list[dict]]:
    """Merge this run's rows into the results file under `kind`; returns every kind's rows."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[kind] = rows
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def rest_table(rows: list[dict]) -> str:
    lines = ["| chunks | filled by | ingest chunks/s | mode | QPS | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for mode in ("bm25", "dense", "hybrid"):
            m = row[mode]
            lines.append(f"| {row['chunks']:,} | {row['ingest']} | {row['ingest chunks/s']:,.1f} | {mode} "
                         f"| {m['QPS']:.1f} | {m['p50 ms']:.1f} | {m['p99 ms']:.1f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    modes = ["bm25", "dense", "hybrid", "memory.search only", "rank-bm25"]
    lines = ["| chunks | mode | QPS | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for row in rows:
        for mode in modes:
            m = row[mode]
            lines.append(f"| {row['chunks']:,} | {mode} | {m['QPS']:.1f} | {m['p50 ms']:.1f} | {m['p99 ms']:.1f} |")
    lines += ["", ("| chunks | bm25 ingest chunks/s | bm25 index build s | rank-bm25 ingest chunks/s "
                   "| dense ingest chunks/s (cached vectors) |"), "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['chunks']:,} | {row['bm25 ingest chunks/s']:,.0f} | {row['bm25 index build s']:.2f} "
                     f"| {row['rank-bm25 ingest chunks/s']:,.0f} | {row['dense ingest chunks/s (cached vectors)']:,.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """In-process QPS and latency per mode and size; REST latency per mode and size when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("in-process", ["bm25", "dense", "hybrid", "memory.search only", "rank-bm25"]),
              ("rest", ["bm25", "dense", "hybrid"])]
    panels = [(kind, modes) for kind, modes in panels if results.get(kind)]
    count = sum(2 if kind == "in-process" else 1 for kind, _ in panels)
    fig, axes = plt.subplots(1, count, figsize=(6 * count, 4), squeeze=False)
    axes = list(axes[0])
    for kind, modes in panels:
        rows = results[kind]
        width = 0.8 / len(rows)
        targets = [axes.pop(0), axes.pop(0)] if kind == "in-process" else [None, axes.pop(0)]
        for i, row in enumerate(rows):
            x = np.arange(len(modes)) + i * width
            if targets[0] is not None:
                targets[0].bar(x, [row[m]["QPS"] for m in modes], width, label=f"{row['chunks']:,} chunks")
            targets[1].bar(x, [row[m]["p50 ms"] for m in modes], width, label=f"{row['chunks']:,} chunks")
            targets[1].scatter(x, [row[m]["p99 ms"] for m in modes], marker="_", s=200, color="k")
        titles = (("search QPS, in-process (one thread)", "latency ms, in-process (bar p50, tick p99)")
                  if kind == "in-process" else (None, "latency ms through REST (bar p50, tick p99)"))
        for ax, title in zip(targets, titles):
            if ax is not None:
                ax.set_xticks(np.arange(len(modes)) + 0.4 - width / 2, modes, fontsize=8, rotation=15)
                ax.set_yscale("log")
                ax.set_title(title)
                ax.legend(fontsize=8)
    fig.suptitle("retrieval search speed, 2 shared CPU cores")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
