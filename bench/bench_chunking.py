"""Chunking, BM25 indexing and embedding time of single-line documents up to 8 MiB (the document limit):
the work must grow linearly with the size (issue 12: one line of 20,000 words took 83.5 s to chunk).

Documents are one line each: words without a sentence end (the case that was quadratic), sentences,
CJK text (no spaces; every character is a word for the MiniLM tokenizer), and letters without any space
or punctuation (one word, which the tokenizer makes one [UNK]). Each is chunked with the default chunk
size by the MiniLM tokenizer, counting tokenizer calls and the characters given to it; its chunks are
indexed by `BM25Retriever` (add, then the first search builds the matrix); with --embed, the first 128
chunks of the 8 MiB words document are embedded by all-MiniLM-L6-v2 (what a collection does on ingest,
in batches of a fixed size: its time is chunks / this rate). Prints a table, writes
results/chunking.json and results/chunking.png.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python bench/bench_chunking.py [--mib 1 2 4 8] [--embed]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib
from transformers import AutoTokenizer

from retrievers.bm25 import BM25Retriever
from retrievers.chunking import Chunker, CountingTokenizer
from retrievers.dense import SentenceEncoder, model_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
MIB = 1 << 20
EMBED_SAMPLE = 128  # chunks of the 8 MiB words document embedded with --embed


def document(shape: str, size: int) -> str:
    """One line of `size` UTF-8 bytes (give or take a character)."""
    unit = {"words": lambda i: f"word{i % 9973} ", "sentences": lambda i: f"Sentence {i} says a thing. ",
            "cjk": lambda i: chr(0x4E00 + i % 20000), "no spaces": lambda i: "abcdefgh"[i % 8]}[shape]
    parts, total, i = [], 0, 0
    while total < size:
        parts.append(unit(i))
        total += len(parts[-1].encode())
        i += 1
    return "".join(parts).encode()[:size].decode(errors="ignore").strip()


def run(shape: str, size: int, tokenizer, encoder: SentenceEncoder | None) -> dict:
    text = document(shape, size)
    counting = CountingTokenizer(tokenizer)
    start = time.perf_counter()
    chunks = Chunker(counting).chunk("doc.txt", text)
    chunk_s = time.perf_counter() - start
    bm25 = BM25Retriever()
    start = time.perf_counter()
    bm25.add(chunks)
    bm25.search("word1", 10)  # builds the index
    bm25_s = time.perf_counter() - start
    row = {"shape": shape, "mib": round(len(text.encode()) / MIB, 2), "chars": len(text), "chunks": len(chunks),
           "tokenizer_calls": counting.calls, "chars_tokenized_per_char": round(counting.chars / len(text), 2),
           "chunk_s": round(chunk_s, 2), "bm25_s": round(bm25_s, 2), "largest_chunk_chars": max(len(c.text) for c in chunks)}
    if encoder is not None:  # a sample: embedding is batches of a fixed size, so its time is per chunk
        sample = chunks[:EMBED_SAMPLE]
        start = time.perf_counter()
        encoder.encode([c.text for c in sample])
        row["embed_chunks_per_s"] = round(len(sample) / (time.perf_counter() - start), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=float, nargs="+", default=[1, 2, 4, 8], help="sizes of the words documents")
    ap.add_argument("--embed", action="store_true", help="also time embedding chunks of the 8 MiB words document")
    ap.add_argument("--json", type=Path, default=RESULTS / "chunking.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "chunking.png")
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    encoder = SentenceEncoder() if args.embed else None
    load = os.getloadavg()[0]
    rows = [run("words", int(m * MIB), tokenizer, None) for m in args.mib]
    rows += [run(shape, 8 * MIB, tokenizer, encoder if shape == "words" else None)
             for shape in ("words", "sentences", "cjk", "no spaces")]
    rows[-4:] = [{**row, "set": "8 MiB shapes"} for row in rows[-4:]]
    load_end = os.getloadavg()[0]
    columns = ["shape", "mib", "chunks", "tokenizer_calls", "chars_tokenized_per_char", "chunk_s", "bm25_s",
               "embed_chunks_per_s", "largest_chunk_chars"]
    print(f"load average {load:.1f} at the start, {load_end:.1f} at the end")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in columns))
    args.json.write_text(json.dumps({"load": [round(load, 1), round(load_end, 1)], "rows": rows}, indent=1) + "\n")
    plot(rows, load, args.plot)


def plot(rows: list[dict], load: float, path: Path) -> None:
    scale = [r for r in rows if "set" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("chunk_s", "chunk"), ("bm25_s", "BM25 index")):
        ax.plot([r["mib"] for r in scale], [r[key] for r in scale], marker="o", label=label)
    ax.set_xlabel("document size, MiB (one line of words, no sentence end)")
    ax.set_ylabel("seconds")
    ax.set_title(f"Chunking and BM25 time by document size (load {load:.1f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
