"""kNN-LM benchmark on the Python 3.11 library docs with SmolLM2-135M: perplexity vs datastore size, key
choice, λ, continuous cache; build throughput; generation overhead per token in-process and over REST.

The corpus split is fixed (seeded shuffle of library/*.rst.txt): a test set (reported), a validation set
(λ and temperature are tuned there, never on test), and the rest as the datastore pool, taken in order.
SmolLM2 runs over each document once: `encode` caches its keys (both kinds), next tokens and log p_LM
under bench/out/knnlm/, and every other step reads that cache.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_knnlm.py encode --pool-tokens 210000
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_knnlm.py curve
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_knnlm.py overhead

`encode` is the model pass (resumable); `curve` tunes on validation and reports test perplexity vs
datastore size, key and λ (flat L2, exact); `overhead` times generation per token with the datastore
in-process and over REST for each index kind. Each writes a JSON and PNGs under bench/results/.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import typer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lm.generate import stream_tokens
from lm.knnlm import (
    KEY_KINDS,
    KNNLM,
    KNNParams,
    Scores,
    datastore_spec,
    encode,
    neighbours,
    neighbours_reading,
    text_id,
)
from lm.model import load_model, load_tokenizer
from memsvc.client import MemoryClient
from memsvc.contract import MemorySpec, NotFound
from memsvc.store import Memory

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import start_server

LIBRARY = Path("/usr/share/doc/python3.11/html/_sources/library")
CACHE = Path(__file__).parent / "out" / "knnlm"
RESULTS = Path(__file__).parent / "results"
TEST_TOKENS, VAL_TOKENS, MAX_HELD_OUT_DOC = 25_000, 12_000, 8_000
K, WINDOW = 64, 512
app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def main() -> None:
    """kNN-LM benchmark on the Python library docs (see the module docstring)."""


def split() -> dict[str, list[tuple[str, str, int]]]:
    """{"test", "val", "pool"} -> [(file name, text, tokens)], fixed by a seeded shuffle."""
    tok = load_tokenizer()
    files = sorted(LIBRARY.glob("*.rst.txt"))
    random.Random(0).shuffle(files)
    parts: dict[str, list[tuple[str, str, int]]] = {"test": [], "val": [], "pool": []}
    for f in files:
        text = f.read_text()
        n = len(tok(text).input_ids) - 1
        if n < 1:
            continue
        held = sum(x[2] for x in parts["test"]), sum(x[2] for x in parts["val"])
        part = ("pool" if n > MAX_HELD_OUT_DOC else "test" if held[0] < TEST_TOKENS
                else "val" if held[1] < VAL_TOKENS else "pool")
        parts[part].append((f.name, text, n))
    return parts


@app.command()
def files(part: str, tokens: int = 0) -> None:
    """Print the paths of one part of the split (test, val, pool; the pool's first `tokens` if given),
    for the CLI: `memsvc knnlm eval ... $(python bench/bench_knnlm.py files test)`."""
    total = 0
    for name, _, n in split()[part]:
        if tokens and total >= tokens:
            break
        print(LIBRARY / name)
        total += n


def cached(text: str) -> Path:
    return CACHE / "docs" / f"{text_id(text)}.npz"


def load(docs: list[tuple[str, str, int]]) -> list[dict[str, np.ndarray]]:
    """The cached arrays of each document (keys as float32)."""
    out = []
    for _, text, _ in docs:
        with np.load(cached(text)) as z:
            out.append({name: z[name].astype(np.float32) if name in KEY_KINDS else z[name]
                        for name in z.files})
    return out


def joined(docs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([d[name] for d in docs]) for name in docs[0]}


@app.command("encode")
def encode_corpus(pool_tokens: int = 400_000, window: int = 512, batch_size: int = 2) -> None:
    """Run SmolLM2 over test, validation and the first `pool_tokens` of the pool; skip cached documents."""
    parts = split()
    pool, total = [], 0
    for doc in parts["pool"]:
        if total >= pool_tokens:
            break
        pool.append(doc)
        total += doc[2]
    (CACHE / "docs").mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    t0, n = time.perf_counter(), 0
    for docs, logprobs in ((parts["test"] + parts["val"], True), (pool, False)):  # the pool needs no p_LM
        todo = [doc for doc in docs if not cached(doc[1]).exists()]
        for (name, text, _), enc in zip(todo, encode(model, [tok(text).input_ids for _, text, _ in todo],
                                                    KEY_KINDS, window, batch_size, logprobs=logprobs)):
            arrays = {kind: enc.keys[kind].astype(np.float16) for kind in KEY_KINDS}
            if logprobs:
                arrays["lm"] = enc.lm_logprobs
            tmp = cached(text).with_suffix(".tmp.npz")
            np.savez(tmp, targets=enc.targets.astype(np.int32), **arrays)
            tmp.rename(cached(text))
            n += len(enc.targets)
    if n:
        rate = n / (time.perf_counter() - t0)
        print(f"encoded {n} tokens at {rate:.0f} tok/s (both keys captured in the same forward pass)")
        with open(CACHE / "encode_rate.jsonl", "a") as f:
            row = {"tokens": n, "tok_per_s": rate, "window": window, "batch": batch_size}
            f.write(json.dumps(row) + "\n")
    print({part: (len(docs), sum(d[2] for d in docs)) for part, docs in parts.items()},
          "pool encoded:", total)


def datastore(pool: dict[str, np.ndarray], kind: str, size: int, memory=None, index: str = "flat"):
    """The first `size` pool entries (keys of `kind`) added to `memory` (default: a new in-process one)."""
    mem = memory or Memory(MemorySpec(name="bench", dim=pool[kind].shape[1], value_kind="token", index=index))
    for s in range(0, size, 16384):
        e = min(s + 16384, size)
        mem.add(pool[kind][s:e], values=pool["targets"][s:e].astype(np.int64))
    return mem


def scores(mem: Memory, docs: list[dict[str, np.ndarray]], kind: str, continuous: bool) -> Scores:
    """Scores of held-out documents against the memory, optionally with the continuous cache."""
    parts = []
    for d in docs:
        found = (neighbours_reading(mem, d[kind], d["targets"].astype(np.int64), K, WINDOW) if continuous
                 else neighbours(mem, d[kind], K))
        parts.append(Scores(d["targets"].astype(np.int64), d["lm"], *found))
    return Scores.concat(parts)


def held_out_scores(pool: dict[str, np.ndarray], held_out: dict[str, list], kind: str, size: int,
                    continuous: bool, index: str = "flat") -> dict[str, Scores]:
    """{"val", "test"} scores with the first `size` pool entries as datastore; cached on disk."""
    suffix = "" if index == "flat" else f"-{index}"
    path = CACHE / "scores" / f"{kind}-{size}-{'cache' if continuous else 'plain'}{suffix}.npz"
    if path.exists():
        with np.load(path) as z:
            fields = ("targets", "lm_logprobs", "distances", "neighbours")
            return {part: Scores(*(z[f"{part}-{f}"] for f in fields)) for part in held_out}
    mem = datastore(pool, kind, size, index=index)
    out = {part: scores(mem, docs, kind, continuous) for part, docs in held_out.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{part}-{f}": v for part, sc in out.items() for f, v in vars(sc).items()})
    return out


@app.command()
def curve(sizes: str = "0,25000,50000,100000,200000", continuous_at: str = "0,200000",
          hnsw_from: int = 10**9) -> None:
    """Test perplexity vs datastore size for both keys (λ, temperature tuned on validation at each size),
    with and without the continuous cache; λ sweep at 200K (or the largest size below). Exact (flat) L2
    search, except hnsw for datastores of `hnsw_from` tokens or more."""
    parts = split()
    held_out = {"val": load(parts["val"]), "test": load(parts["test"])}
    pool = joined(load([d for d in parts["pool"] if cached(d[1]).exists()]))
    wanted = [int(x) for x in sizes.split(",") if int(x) <= len(pool["targets"])]
    with_cache = {int(x) for x in continuous_at.split(",")}
    base = math.exp(-np.concatenate([d["lm"] for d in held_out["test"]]).astype(np.float64).mean())
    rows, test_scores = [], {}
    for kind in KEY_KINDS:
        for size in wanted:
            for continuous in (False, True):
                if (continuous and size not in with_cache) or (size == 0 and not continuous):
                    continue
                t = time.perf_counter()
                index = "hnsw" if size >= hnsw_from else "flat"
                sc = held_out_scores(pool, held_out, kind, size, continuous, index)
                tuned, val_ppl = sc["val"].tune(K)
                ppl = sc["test"].perplexity(tuned)
                test_scores[kind, size, continuous] = sc["test"]
                rows.append({"key": kind, "datastore_tokens": size, "continuous": continuous, "index": index,
                             **tuned.model_dump(),
                             "val_ppl": val_ppl, "val_base_ppl": sc["val"].base_perplexity,
                             "test_base_ppl": base, "test_ppl": ppl, "cut_pct": 100 * (1 - ppl / base),
                             "seconds": time.perf_counter() - t})
                print(json.dumps(rows[-1]), flush=True)
    at = max(x for x in wanted if x <= 200_000)
    best = min((r for r in rows if r["datastore_tokens"] == at and not r["continuous"]),
               key=lambda r: r["val_ppl"])
    sc = test_scores[best["key"], best["datastore_tokens"], False]
    knn = sc.knn_logprobs(best["temp"], K)
    sweep = [{"lam": float(lam), "test_ppl": sc.mixed_perplexity(knn, float(lam))}
             for lam in np.arange(19) / 20]
    report = {"split": {p: {"files": [d[0] for d in parts[p]], "tokens": sum(d[2] for d in parts[p])}
                        for p in ("test", "val")},
              "pool_tokens_encoded": len(pool["targets"]), "k": K, "window": WINDOW, "rows": rows,
              "lambda_sweep": {"key": best["key"], "datastore_tokens": best["datastore_tokens"],
                               "temp": best["temp"], "points": sweep}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "knnlm_curve.json").write_text(json.dumps(report, indent=1))
    print_table(rows)
    plot_curve(rows, base, RESULTS / "knnlm_size.png")
    plot_lambda(report["lambda_sweep"], base, RESULTS / "knnlm_lambda.png")


def ms_per_token(model, prompt: torch.Tensor, tokens: int, hook=None) -> float:
    """Median milliseconds between consecutive decoded tokens (decode steps only, not the prompt)."""
    steps = stream_tokens(model, prompt, max_new_tokens=tokens, logprobs_hook=hook)
    stamps = [time.perf_counter() for _ in steps]
    return 1e3 * float(np.median(np.diff(stamps)))


@app.command()
def overhead(size: int = 200_000, tokens: int = 40, indexes: str = "flat,hnsw,ivfpq",
             key: str = "mlp-input") -> None:
    """Generation ms/token: base model vs kNN-LM with the datastore in-process (flat) and over REST (each
    index kind, memory built from the cached keys); plus test perplexity per index (tuned on validation)."""
    parts = split()
    held_out = {"val": load(parts["val"]), "test": load(parts["test"])}
    pool = joined(load([d for d in parts["pool"] if cached(d[1]).exists()]))
    size = min(size, len(pool["targets"]))
    model, tok = load_model()
    prompt = torch.tensor([tok(parts["test"][0][1]).input_ids[:256]])
    rows = []

    def measure(where: str, index: str, memory, sc: dict[str, Scores] | None = None) -> None:
        sc = sc or {part: scores(memory, docs, key, False) for part, docs in held_out.items()}
        tuned, _ = sc["val"].tune(K)
        knn = KNNLM(model, tok, memory, key=key, progress=False)
        with knn.hook(KNNParams(k=K)) as hook:  # alternate, keep the best of two: the CPU is shared
            base, mixed = (min(pair) for pair in zip(*[(ms_per_token(model, prompt, tokens),
                                                          ms_per_token(model, prompt, tokens, hook))
                                                         for _ in range(2)]))
        memory.search(pool[key][:1], K)
        t = time.perf_counter()
        for q in pool[key][:50]:
            memory.search(q[None], K)
        rows.append({"where": where, "index": index, "datastore": size, "base_ms": base, "knnlm_ms": mixed,
                     "overhead_pct": 100 * (mixed / base - 1), "search_ms": 20 * (time.perf_counter() - t),
                     "test_ppl": sc["test"].perplexity(tuned), "test_base_ppl": sc["test"].base_perplexity})
        print(json.dumps(rows[-1]), flush=True)

    measure("in-process", "flat", datastore(pool, key, size),
            held_out_scores(pool, held_out, key, size, False))
    proc, url = start_server(CACHE / "server")
    try:
        client = MemoryClient(url, timeout=3600)
        for index in indexes.split(","):
            name = f"bench-{key}-{index}-{size}"
            try:
                memory = client.memory(name)
            except NotFound:
                memory = client.create_memory(**datastore_spec(name, model, index))
            if memory.stats().count != size:
                client.delete_memory(name)
                memory = client.create_memory(**datastore_spec(name, model, index))
                t = time.perf_counter()
                datastore(pool, key, size, memory)
                seconds = time.perf_counter() - t
                print(f"{index}: {size} entries added over REST in {seconds:.0f}s", flush=True)
            measure("REST", index, memory)
    finally:
        proc.terminate()
        proc.wait()
    (RESULTS / "knnlm_overhead.json").write_text(json.dumps(rows, indent=1))
    print(f"{'where':<11}{'index':<7}{'base ms/tok':>12}{'kNN-LM ms/tok':>15}{'overhead':>10}"
          f"{'search ms':>10}{'test ppl':>10}")
    for r in rows:
        print(f"{r['where']:<11}{r['index']:<7}{r['base_ms']:>12.1f}{r['knnlm_ms']:>15.1f}"
              f"{r['overhead_pct']:>9.1f}%"
              f"{r['search_ms']:>10.2f}{r['test_ppl']:>10.3f}")


def print_table(rows: list[dict]) -> None:
    print(f"{'key':<11}{'datastore':>10}{'index':>7}{'cache':>7}{'λ':>7}{'temp':>8}{'val ppl':>9}"
          f"{'test ppl':>10}{'base':>8}{'cut %':>7}")
    for r in rows:
        cache = "yes" if r["continuous"] else "no"
        print(f"{r['key']:<11}{r['datastore_tokens']:>10,}{r['index']:>7}{cache:>7}{r['lam']:>7.2f}"
              f"{r['temp']:>8.1f}"
              f"{r['val_ppl']:>9.3f}{r['test_ppl']:>10.3f}{r['test_base_ppl']:>8.3f}"
              f"{r['cut_pct']:>7.1f}")


def plot_curve(rows: list[dict], base: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in KEY_KINDS:
        for continuous, style in ((False, "o-"), (True, "s--")):
            pts = sorted((r["datastore_tokens"], r["test_ppl"]) for r in rows
                         if r["key"] == kind and r["continuous"] == continuous)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{kind}{' + continuous cache' if continuous else ''}")
    ax.axhline(base, color="gray", linestyle=":", label="SmolLM2 alone")
    ax.set_xlabel("datastore size (tokens of other library files)")
    ax.set_ylabel("test perplexity")
    ax.set_title("kNN-LM on held-out Python library docs (SmolLM2-135M, k=64, flat L2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_lambda(sweep: dict, base: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["lam"] for p in sweep["points"]], [p["test_ppl"] for p in sweep["points"]], "o-")
    ax.axhline(base, color="gray", linestyle=":", label="SmolLM2 alone")
    ax.set_xlabel("λ (weight of p_kNN)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"{sweep['key']} keys, {sweep['datastore_tokens']:,}-token datastore, "
                 f"temp {sweep['temp']:.1f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app()
