"""Model load time (issue 17 #5): SmolLM2's GGUF read by transformers every time vs the model cache:

    nice -n 5 .venv/bin/python bench/bench_model_load.py [--warm 3]

Each load runs in a fresh process (as a CLI command would), timing `load_tokenizer` and `load_model` apart
from the imports: "gguf" reads the GGUF directly (what every command did before the cache), "cold" converts
into an empty cache directory and loads the copy, "warm" loads the copy again. Every load's logits for one
prompt are compared with the GGUF's. Prints a markdown table and writes bench/results/model_load.json and
model_load.png.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import typer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
PROMPT = "The capital of France is"


def child(mode: str, logits_path: str) -> None:
    """One load in this process; prints {"import_s", "tokenizer_s", "model_s"} and saves the prompt's logits."""
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm.model import bundled_gguf, load_model, load_tokenizer
    imported = time.perf_counter()
    if mode == "gguf":
        gguf = bundled_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded_tokenizer = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    else:
        tokenizer = load_tokenizer()
        loaded_tokenizer = time.perf_counter()
        model, _ = load_model()
    loaded_model = time.perf_counter()
    with torch.inference_mode():
        torch.save(model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits, logits_path)
    print(json.dumps({"import_s": imported - start, "tokenizer_s": loaded_tokenizer - imported,
                      "model_s": loaded_model - loaded_tokenizer}))


def load_average() -> float:
    return os.getloadavg()[0]


def main(warm: int = 3, out: str = "model_load") -> None:
    """Run gguf, cold, warm x WARM loads; print the table; write OUT.json and OUT.png under bench/results."""
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MEMSVC_MODEL_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1"}
        for mode in ["gguf", "cold"] + ["warm"] * warm:
            logits = Path(tmp) / f"{len(rows)}.pt"
            before = load_average()
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(logits)], env=env, check=True,
                                  capture_output=True, text=True)
            row = {"mode": mode, **json.loads(done.stdout.strip().splitlines()[-1]),
                   "load_before": before, "load_after": load_average()}
            row["same_logits"] = bool(torch.equal(torch.load(logits), torch.load(Path(tmp) / "0.pt")))
            rows.append(row)
            print(f"{mode}: tokenizer {row['tokenizer_s']:.1f} s, model {row['model_s']:.1f} s", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(rows, indent=1))
    print("| load | imports s | tokenizer s | model s | tokenizer + model s | logits = GGUF's | load average |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['import_s']:.1f} | {r['tokenizer_s']:.1f} | {r['model_s']:.1f} | "
              f"{r['tokenizer_s'] + r['model_s']:.1f} | {'yes' if r['same_logits'] else 'NO'} | "
              f"{r['load_before']:.1f} → {r['load_after']:.1f} |")
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [f"{r['mode']} {i}" if r["mode"] == "warm" else r["mode"] for i, r in enumerate(rows, start=-1)]
    ax.bar(names, [r["tokenizer_s"] for r in rows], label="tokenizer")
    ax.bar(names, [r["model_s"] for r in rows], bottom=[r["tokenizer_s"] for r in rows], label="model")
    ax.set_ylabel("seconds (fresh process, after imports)")
    ax.set_title("SmolLM2-135M load: GGUF every time vs the model cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        typer.run(main)
