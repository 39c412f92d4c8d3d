"""Rerank the hybrid's top documents with SmolLM2's question likelihood (UPR), on the retrieval eval.

For each question, the default hybrid ranks documents by their best chunk (`eval_retrieval.py`); the top
`--top` documents are rescored by the mean log-probability SmolLM2 gives the question's tokens after
"Passage: <best chunk>\\nPlease write a question based on this passage.\\nQuestion:" (Sachan et al.
2022, "Improving Passage Retrieval with Zero-Shot Question Generation", arXiv:2204.07496). The new
score is fused + α·UPR, α tuned on half A (α = inf: UPR alone), reported on half B; documents below the
top keep their order. Scores are cached in bench/out/upr-smollm2.json; latency is timed per question.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python bench/eval_rerank.py [--top 5] [--passage-tokens 160]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from eval_retrieval import (
    DEPTH,
    OUT,
    RESULTS,
    CachedEncoder,
    build,
    corpus,
    faq,
    glossary,
    metrics,
    split,
    table,
)

from lm.model import load_model
from retrievers.chunking import Chunker
from retrievers.dense import model_path

ALPHAS = [0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, float("inf")]


def upr_scores(model, tokenizer, question: str, passages: list[str], passage_tokens: int) -> list[float]:
    """Mean log-probability of the question's tokens after each passage's prompt (one batch, left padded)."""
    asked = tokenizer(" " + question, add_special_tokens=False)["input_ids"]
    rows = []
    for passage in passages:
        cut = tokenizer.decode(tokenizer(passage, add_special_tokens=False)["input_ids"][:passage_tokens])
        prompt = tokenizer(f"Passage: {cut}\nPlease write a question based on this passage.\nQuestion:",
                           add_special_tokens=False)["input_ids"]
        rows.append(prompt + asked)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -len(asked) - 1:-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(asked).expand(len(rows), -1)[..., None])
    return logp[..., 0].mean(dim=1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--top", type=int, default=5, help="documents reranked per question")
    ap.add_argument("--passage-tokens", type=int, default=160, help="passage cut (SmolLM2 tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS / "v2" / "rerank-upr.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    chunker = Chunker(AutoTokenizer.from_pretrained(model_path()))
    queries = glossary() + faq()
    docs = corpus(None) | {q.document_id: q.answer for q in queries}
    chunks = [c for doc_id, text in docs.items() for c in chunker.chunk(doc_id, text)]
    hybrid = build(chunks, chunks, CachedEncoder(OUT / "embeddings-minilm.npz"))
    halves = split(queries, args.seed)
    text = {c.id: c.text for c in chunks}

    model, tokenizer = load_model()
    cache_path = OUT / "upr-smollm2.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    fused, upr, latency = [], [], []
    for n, q in enumerate(queries):
        best = {}
        for hit in hybrid.search(q.text, DEPTH):
            best.setdefault(hit.document_id, hit)
        ranked = list(best.values())
        top = ranked[:args.top]
        keys = [hashlib.sha1(f"{args.passage_tokens}\0{q.text}\0{text[h.chunk_id]}".encode()).hexdigest() for h in top]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            started = time.perf_counter()
            scores = upr_scores(model, tokenizer, q.text, [text[top[i].chunk_id] for i in missing], args.passage_tokens)
            latency.append(time.perf_counter() - started)
            cache.update({keys[i]: s for i, s in zip(missing, scores)})
            if n % 10 == 0:
                cache_path.write_text(json.dumps(cache))
                print(f"{n}/{len(queries)} questions, {np.median(latency):.2f}s per question", flush=True)
        fused.append((ranked, [h.score for h in top]))
        upr.append([cache[k] for k in keys])
    cache_path.write_text(json.dumps(cache))

    def ranks(alpha: float) -> np.ndarray:
        out = []
        for q, (ranked, scores), lm in zip(queries, fused, upr):
            new = np.array(lm) if alpha == float("inf") else np.array(scores) + alpha * np.array(lm)
            order = [ranked[i].document_id for i in np.argsort(-new, kind="stable")]
            order += [h.document_id for h in ranked[args.top:]]
            out.append(order.index(q.document_id) + 1.0 if q.document_id in order else np.inf)
        return np.array(out)

    results = {"latency s per question (median)": float(np.median(latency)) if latency else None,
               "top": args.top, "passage tokens": args.passage_tokens, "load": os.getloadavg()}
    for tune, report in (("A", "B"), ("B", "A")):
        fit, on = np.array(halves[tune]), np.array(halves[report])
        alpha = max(ALPHAS, key=lambda a: metrics(ranks(a)[fit])["MRR@10"])
        rows = {"hybrid default": metrics(ranks(0.0)[on]), f"+ UPR rerank of top {args.top}, α={alpha:g}":
                metrics(ranks(alpha)[on]), "UPR alone on the top": metrics(ranks(float("inf"))[on])}
        print(f"\nα tuned on half {tune}, half {report}:\n\n{table(rows, {})}")
        results[report] = {"alpha": alpha, "rows": rows}
    print(f"\nUPR latency: {results['latency s per question (median)']} s per question (median), "
          f"{args.top} passages of <= {args.passage_tokens} tokens, load {os.getloadavg()[0]:.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
