"""Fixed-size cache policies (issue 7) on SmolLM2-135M, every policy at one entry budget:

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_policies.py

For each policy of `lm.policies.POLICIES` (full attention as the reference): perplexity past the first 256
tokens of >= 3K-token Python docs pages, the same with `--knn-memory` (what the policy drops stays
searchable), a needle-in-a-haystack trial (a passphrase planted early in a long prompt, asked at the end),
tokens/s and the most cache entries any query attended to. Prints a markdown table and writes
bench/results/policies.json (after every policy, so a cut run keeps what it measured) and policies.png.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import matplotlib
import numpy as np
import typer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lm.longeval import answer, evaluate_stream, needle_prompt, read_tokens
from lm.memory_attention import KnnConfig, session_memory
from lm.model import load_model
from lm.policies import DEFAULT_SINKS, OPTIONS, POLICIES, Full, make_policy

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
RESULTS = Path(__file__).parent / "results"
WORD = "tangerine-47"


def policy_at(name: str, budget: int):
    """Policy `name` with `budget` entries per query (its other options at their defaults)."""
    if name == "full":
        return Full()
    if name == "window":
        return make_policy(name, window=budget)
    if name == "sinks":
        return make_policy(name, window=budget - DEFAULT_SINKS)
    return make_policy(name, budget=budget)


def pooled(nll: list[np.ndarray], skip: int) -> float:
    return math.exp(np.concatenate([x[skip:] for x in nll]).mean())


def main(policies: Annotated[str, typer.Option(help="comma-separated policy names")] = ",".join(POLICIES),
         budget: int = 260, files: str = "heapq,zlib",
         knn_files: Annotated[str, typer.Option(help="pages also run with kNN memory")] = "heapq",
         max_tokens: int = 3072, skip: int = 256,
         needle_tokens: int = 1024, needle_depth: float = 0.1, needle_page: str = "multiprocessing",
         out: str = "policies") -> None:
    """Run every policy; print the table; write OUT.json and OUT.png under bench/results."""
    model, tokenizer = load_model()
    pages, knn_pages = files.split(","), knn_files.split(",")
    streams = {p: read_tokens(tokenizer, DOCS / f"{p}.rst.txt", max_tokens) for p in pages}
    prompt = needle_prompt(tokenizer, (DOCS / f"{needle_page}.rst.txt").read_text(), needle_tokens, needle_depth, WORD)
    setup = {"budget": budget, "files": pages, "knn_files": knn_pages, "max_tokens": max_tokens, "skip": skip,
             "needle": {"page": needle_page, "prompt_tokens": prompt.shape[1], "depth": needle_depth, "word": WORD},
             "knn": {"k": 32, "layers": "all", "mode": "joint", "positions": "absolute", "index": "flat"}}
    rows = []
    for name in policies.split(","):
        policy = policy_at(name, budget)
        row = {"policy": name, "options": {"budget": policy.budget, **{k: getattr(policy, k) for k in OPTIONS[name]}}}
        for knn in (None, KnnConfig(blocks=0, k=32)) if name != "full" else (None,):
            tag = "" if knn is None else "knn_"
            results = {p: evaluate_stream(model, streams[p], policy, knn=knn,
                                          memory=session_memory(model) if knn else None)
                       for p in (pages if knn is None else knn_pages)}
            row[f"{tag}perplexity"] = {p: r.perplexity(skip) for p, r in results.items()}
            row[f"{tag}pooled"] = pooled([r.nll for r in results.values()], skip)
            row[f"{tag}tokens_per_s"] = sum(len(r.nll) for r in results.values()) / sum(
                r.seconds for r in results.values())
            row[f"{tag}peak"] = max(r.peak_cache_entries for r in results.values())
            if knn is None:  # the policy alone on the pages run with memory, for the comparison
                row["knn_pages_pooled"] = pooled([results[p].nll for p in knn_pages], skip)
            started = time.perf_counter()
            text = answer(model, tokenizer, prompt, policy, knn=knn, memory=session_memory(model) if knn else None)
            row[f"{tag}needle"] = {"answer": text, "correct": WORD in text, "seconds": time.perf_counter() - started}
            print(json.dumps({k: v for k, v in row.items() if k.startswith(tag) or k == "policy"}), flush=True)
        rows.append(row)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{out}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    report(rows, setup, out)


def report(rows: list[dict], setup: dict, out: str) -> None:
    """The markdown table and the plot."""
    pages, knn_pages = setup["files"], setup["knn_files"]
    hit = lambda r, tag: "" if f"{tag}needle" not in r else "yes" if r[f"{tag}needle"]["correct"] else "no"
    print(f"\n| policy | perplexity ({' + '.join(pages)}) | {' | '.join(pages)} | + kNN memory "
          f"({' + '.join(knn_pages)}) | needle | needle + kNN | tok/s | tok/s + kNN | peak entries |")
    print("|---|---:|" + "---:|" * len(pages) + "---:|---|---|---:|---:|---:|")
    for r in rows:
        knn = f"{r['knn_pooled']:.2f}" if "knn_pooled" in r else "–"
        knn_speed = f"{r['knn_tokens_per_s']:.1f}" if "knn_tokens_per_s" in r else "–"
        cells = " | ".join(f"{r['perplexity'][p]:.2f}" for p in pages)
        print(f"| {r['policy']} | {r['pooled']:.2f} | {cells} | {knn} | {hit(r, '')} | {hit(r, 'knn_') or '–'} | "
              f"{r['tokens_per_s']:.1f} | {knn_speed} | {r['peak']} |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["policy"] for r in rows]
    x = np.arange(len(rows))
    ax1.bar(x - 0.2, [r["knn_pages_pooled"] for r in rows], 0.4, label="policy alone")
    ax1.bar(x + 0.2, [r.get("knn_pooled", math.nan) for r in rows], 0.4, label="+ kNN memory")
    ax1.set_ylabel(f"perplexity ({', '.join(knn_pages)}, past token {setup['skip']})")
    ax2.bar(x - 0.2, [r["tokens_per_s"] for r in rows], 0.4, label="policy alone")
    ax2.bar(x + 0.2, [r.get("knn_tokens_per_s", math.nan) for r in rows], 0.4, label="+ kNN memory")
    ax2.set_ylabel("tokens/s (1 CPU thread)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=40, ha="right")
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {setup['budget']} cache entries per query, {setup['max_tokens']}-token docs pages")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
