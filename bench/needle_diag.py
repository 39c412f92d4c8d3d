"""Why block memory misses the needle: one prefill, many retrieval rules (issue 14, bench/results/longctx.md 10).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/needle_diag.py --length 16000 --depth 0.5 --out NAME

Builds the bench's needle prompt (`bench_longctx.needle`; `--kind passcode` or `passphrase`), prefills it once through window 256 + 4 sinks + block
memory (`--blocks/--top-blocks/--rep-keys/--query-group`, default `KnnConfig()`), recording every layer's queries
un-rotated (pre-RoPE). Then:

1. Ranks: for the queries of the answer "The secret passcode is NNNN." (or "... passphrase is WORD."; teacher-forced) and of the question, the
   rank of the needle's block among all stored blocks, per layer and KV head, for several block sizes and ranking
   rules, computed from the stored pre-RoPE keys in the frame the search uses (every key just past the window):
   `max` (best key), `repR` (best of R means of equal runs: the default is rep4), `attR` (InfLLM: the R keys
   that received the largest summed query-key products from the following `--window` queries, averaged into one
   vector), summed over the KV head's query heads (`kv`) or over all heads of the layer (`layer`, InfLLM).
2. Decoding variants from the same prefill (the cache and stores are restored before each): the greedy answer and
   the teacher-forced log-probabilities of the needle's tokens (the 4 digits, or the passphrase's) with the default decoding, a search at every step, exact
   max over every key, layer-shared scores, more blocks, and oracles that force the needle's blocks into every
   search (all layers, or only layers < 11 / >= 11); `exact` and `rerankC` (section 11: every key of the C best
   blocks by the representative keys) set the decoding fields explicitly, whatever `KnnConfig()`'s default.
   Section 18's variants: a block scoring as its neighbours (`-after1`, `-before1`, `-around1`, `-after2`), hybrid
   or absolute positions, the prompt's first blocks forced (`-headH`), a bias on the memory logits (`-biasB`,
   `-biastrained`: the shipped `MemoryBias`), the prompt's last retrieved blocks forced (`prompt-blocks`), every
   block (`all`), the sinks rotated below the retrieved run (`KnnConfig.sink_positions` "below": `sinks-first`,
   `all-sinks-first`).
   `--prefill-variant V` runs the prefill under a variant too; `--full` adds full attention's answer and
   teacher-forced rows; `--precision` sets the stored keys' dtype. Every option is checked before the model loads.

Prints tables and writes bench/results/NAME.json.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from bench.bench_longctx import DOCS, MEMORY_BIAS, RESULTS, SINKS_POLICY, check_needle, needle_of
from lm import blocks as blocks_module
from lm.attention import attach
from lm.cache import BoundedCache, forward
from lm.gate import MemoryBias
from lm.knn_config import KnnConfig, check_options
from lm.longeval import answer, needle_prompt
from lm.model import load_model
from lm.policies import Full
from memsvc.contract import InvalidInput

app = typer.Typer(pretty_exceptions_enable=False)
ORIGINAL_SCORES = blocks_module.BlockStore.scores
ORIGINAL_BEST = blocks_module.BlockStore.best
VARIANT: dict = {}  # the decoding variant `scores` applies (see `patched_scores`)


def patched_scores(store, query, representative, every_key=False, candidates=0):
    """BlockStore.scores under the current VARIANT: exact max ("rep_keys0"), layer-shared sums, oracle boosts."""
    rep_keys = store.rep_keys
    if VARIANT.get("rep_keys0"):
        store.rep_keys = 0
    try:
        scores = ORIGINAL_SCORES(store, query, representative, every_key, candidates)
    finally:
        store.rep_keys = rep_keys
    if VARIANT.get("layer_shared"):
        scores = scores.sum(0, keepdim=True).expand_as(scores).clone()
    scores = spread(scores, *VARIANT.get("spread", (0, 0)))
    head = VARIANT.get("head_blocks", 0)  # the prompt's first blocks (the chat template's system turn) forced
    scores[..., :head] = torch.inf
    if VARIANT.get("prompt_blocks") and hasattr(store, "last_chosen"):  # the prompt's last search's blocks forced
        scores = scores.scatter(-1, store.last_chosen, torch.inf)
    layers = VARIANT.get("oracle_layers")
    if layers is not None and store.layer in layers:
        hit = torch.isin(store.tokens[:store.count], VARIANT["needle"]).nonzero()[:, 0] // store.block
        scores[:, hit.unique()] = torch.inf
    return scores


def spread(scores: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Block scores [..., blocks] where each block scores the best of its own and those of the `after` blocks before
    it and the `before` blocks after it: a block found brings the `after` blocks that follow it and the `before` ones
    that precede it along (equal scores)."""
    if not before and not after:
        return scores
    padded = torch.nn.functional.pad(scores, (after, before), value=-torch.inf)
    return padded.unfold(-1, before + after + 1, 1).amax(-1)


def answer_row(name: str, text: str, logprobs: list, word: str, answer_size: int) -> dict:
    """A variant's result: its greedy answer, the teacher-forced (token, log p, argmax) rows, and the needle tokens'
    (`answer_size`, before the final ".") summed log-probability and whether each is the argmax; printed too."""
    word_lp = logprobs[-answer_size - 1:-1]
    row = {"variant": name, "answer": text, "correct": word in text,
           "teacher_forced": logprobs, "digit_logprob_sum": sum(lp for _, lp, _ in word_lp),
           "digits_argmax": all(t == a for t, _, a in word_lp)}
    print(json.dumps({k: v for k, v in row.items() if k != "teacher_forced"}),
          [f"{t!r}:{lp:.2f}/{a!r}" for t, lp, a in logprobs], flush=True)
    return row


def full_attention(model, tokenizer, prompt: torch.Tensor, target: list[int]) -> tuple[str, list]:
    """Full attention's greedy answer (the bench's own trial, `lm.longeval.answer`) and teacher-forced rows for the
    answer `target`."""
    with torch.inference_mode():
        ids = torch.cat([prompt, torch.tensor([target])], 1)
        lp = torch.log_softmax(model(input_ids=ids, logits_to_keep=len(target) + 1).logits[0, :-1].float(), -1)
    return (answer(model, tokenizer, prompt, Full()),
            [(tokenizer.decode(t), float(lp[i, t]), tokenizer.decode(int(lp[i].argmax()))) for i, t in enumerate(target)])


def recording_best(store, query, k, representative, every_key=False, candidates=0):
    """BlockStore.best, keeping a one-group search's blocks [kv, k] as `store.last_chosen` (the prefill's last)."""
    chosen = ORIGINAL_BEST(store, query, k, representative, every_key, candidates)
    if query.dim() == 3:
        store.last_chosen = chosen.clone()
    return chosen


def snapshot(obj) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.copy(v) if isinstance(v, (dict, list, set)) else v
            for k, v in vars(obj).items()}


def restore(obj, saved: dict) -> None:
    for k, v in saved.items():
        setattr(obj, k, v.clone() if isinstance(v, torch.Tensor) else copy.copy(v) if isinstance(v, (dict, list, set))
                else v)


def received(qpre: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, rotate, window: int,
             chunk: int = 256) -> torch.Tensor:
    """Per stored key [kv, n] (float32): the query-key products it receives from the `window` queries after it, at
    their true relative distances, summed over the KV head's query heads and divided by `window` (InfLLM's
    representative score). qpre [heads, N, d] pre-RoPE queries by stream index; keys [kv, n, d] pre-RoPE."""
    heads, _, d = qpre.shape
    kv, n, _ = keys.shape
    g = heads // kv
    out = torch.zeros(kv, n)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        t0, tk = int(tokens[s]), tokens[s:e]
        tq = torch.arange(t0, min(int(tk[-1]) + window + 1, qpre.shape[1]))
        k = rotate(keys[:, s:e].float(), tk - t0)  # [kv, c, d] at local positions
        q = rotate(qpre[:, tq].float(), tq - t0).view(kv, g * len(tq), d)
        logits = (q @ k.transpose(-1, -2)).view(kv, g, len(tq), e - s)
        dist = tq[:, None] - tk[None, :]
        logits = logits.masked_fill(~((dist >= 1) & (dist <= window)), 0)
        out[:, s:e] = logits.sum((1, 2)) / window
    return out


def block_scores(logits: torch.Tensor, att: torch.Tensor, block: int, rule: str) -> torch.Tensor:
    """Scores [kv, g, nb] of the full blocks of `block` stored keys from the per-key frame logits [kv, g, n]
    (products are linear in the key, so a mean key's score is the mean of its keys' scores)."""
    kv, g, n = logits.shape
    nb = n // block
    x = logits[..., :nb * block]
    if rule == "max":
        return x.reshape(kv, g, nb, block).amax(-1)
    r = int(rule[3:])
    if rule.startswith("rep"):
        return x.reshape(kv, g, nb, r, block // r).mean(-1).amax(-1)
    top = att[:, :nb * block].reshape(kv, nb, block).topk(r, -1).indices  # attR: the R most-received keys
    return x.reshape(kv, g, nb, block).gather(3, top[:, None].expand(kv, g, nb, r)).mean(-1)


def ranks(logits: torch.Tensor, att: torch.Tensor, needle_entry: int, block: int, rule: str,
          heads: str) -> list[int]:
    """1-based rank of the block holding store entry `needle_entry`, per KV head."""
    s = block_scores(logits, att, block, rule)
    s = s.sum(1) if heads == "kv" else s.sum((0, 1))[None].expand(s.shape[0], -1)
    b = needle_entry // block
    return [int((row > row[b]).sum()) + 1 for row in s]


def word_span(tokenizer, ids: list[int], word: str) -> tuple[int, int]:
    """(index, token count) of the first run of `ids` that decodes to `word` (spaces ignored); ValueError if none."""
    for i in range(len(ids)):
        piece = tokenizer.decode(ids[i]).strip()
        if piece and word.startswith(piece):
            for end in range(i + 1, min(i + 16, len(ids)) + 1):
                text = tokenizer.decode(ids[i:end]).replace(" ", "")
                if text == word:
                    return i, end - i
                if not word.startswith(text):
                    break
    raise ValueError(f"{word!r} is not in the token ids")


def catalogue(n_layers: int) -> dict[str, tuple[dict, str]]:
    """The decoding variants by name: (what `decode` changes, a description); oracles over `n_layers` layers."""
    early, every = set(range(11)), {"query_group": 1, "decode_group": 1}
    exact = {"decode_group": 1, "decode_every_key": True, "decode_candidates": 0}
    return {
        "exact": ({"config": exact}, "every step, every key (the exact default)"),
        **{f"rerank{c}": ({"config": {**exact, "decode_candidates": c}},
                          f"every step, every key of the {c} best blocks by rep keys") for c in (32, 48, 64, 96, 128, 192, 256)},
        **{f"rerank192-n{n}": ({"config": {**exact, "decode_candidates": 192, "top_blocks": n}},
                               f"every step, every key of the 192 best blocks by rep keys, {n} blocks attended")
           for n in (24, 32, 48)},
        **{f"rerank192-{name}{'' if n == 16 else f'-n{n}'}": (
            {"config": {**exact, "decode_candidates": 192, "top_blocks": n}, "spread": spread},
            f"every step, every key of the 192 best blocks by rep keys, {n} blocks attended, a block scoring as its "
            + f"{spread[0]} before / {spread[1]} after")
           for name, spread in (("after1", (0, 1)), ("before1", (1, 0)), ("around1", (1, 1)), ("after2", (0, 2)))
           for n in (16, 24, 32)},
        **{f"rerank192-{mode}{'' if n == 16 else f'-n{n}'}": (
            {"config": {**exact, "decode_candidates": 192, "top_blocks": n, "positions": mode}},
            f"every step, every key of the 192 best blocks by rep keys, {n} blocks attended, {mode} positions")
           for mode in ("hybrid", "absolute") for n in (16, 32)},
        **{f"rerank192-bias{b}": ({"config": {**exact, "decode_candidates": 192, "mode": "gated"}, "memory_bias": b},
                                  f"every step, every key of the 192 best blocks by rep keys, memory logits + {b}")
           for b in (0.5, 1.0, "trained")},
        **{f"rerank192-head{h}": ({"config": {**exact, "decode_candidates": 192}, "head_blocks": h},
                                  f"every step, every key of the 192 best blocks by rep keys, the first {h} forced")
           for h in (1, 2)},
        **{f"prompt-blocks{'' if n == 16 else f'-n{n}'}": (
            {"config": {**exact, "decode_candidates": 192, "top_blocks": n}, "prompt_blocks": True},
            f"every step, the prompt's last retrieved blocks forced, {n} attended (the rest: rerank 192)")
           for n in (16, 24, 32)},
        "sinks-first": ({"config": {**exact, "decode_candidates": 192, "sink_positions": "below"}},
                        "every step, every key of the 192 best blocks by rep keys, the sinks before the retrieved run"),
        "all-sinks-first": ({"config": {**exact, "top_blocks": 1 << 20, "sink_positions": "below"}},
                            "every step, every block stored attended, the sinks before them"),
        "all": ({"config": {**exact, "top_blocks": 1 << 20}}, "every step, every block stored attended"),
        "main": ({}, "as configured"),
        "every": ({"config": every}, "search every step"),
        "max": ({"config": every, "rep_keys0": True}, "every step, exact max"),
        "shared": ({"config": every, "layer_shared": True}, "every step, layer-shared scores"),
        "n32": ({"config": {**every, "top_blocks": 32}}, "every step, 32 blocks"),
        "max-n32": ({"config": {**every, "top_blocks": 32}, "rep_keys0": True}, "every step, exact max, 32 blocks"),
        "max-n24": ({"config": {**every, "top_blocks": 24}, "rep_keys0": True}, "every step, exact max, 24 blocks"),
        "max-n8": ({"config": {**every, "top_blocks": 8}, "rep_keys0": True}, "every step, exact max, 8 blocks"),
        "oracle": ({"oracle_layers": set(range(n_layers))}, "oracle: needle blocks forced, all layers"),
        "oracle-early": ({"oracle_layers": early}, "oracle: layers 0-10 only"),
        "oracle-late": ({"oracle_layers": set(range(11, n_layers)) }, "oracle: layers 11-29 only"),
    }


@app.command()
def main(length: Annotated[int, typer.Option(min=1)] = 16000,
         depth: Annotated[float, typer.Option(min=0, max=1)] = 0.5, out: str = "needle_diag",
         blocks: int = 32, top_blocks: int = 16, rep_keys: int = 4, query_group: int = 4,
         decode_group: Annotated[int, typer.Option(help="-1: None (as query_group)")] = -1,
         variant_names: Annotated[str, typer.Option("--variants")] = "main,every,max,shared,n32,oracle,oracle-early,"
                                                                      "oracle-late",
         rank_tables: bool = True,
         window: Annotated[int, typer.Option(help="queries after a key that score it (attR)")] = 256,
         page: str = "multiprocessing",
         kind: Annotated[str, typer.Option(help="passcode (4 digits) or passphrase (a word)")] = "passcode",
         prefill_variant: Annotated[str, typer.Option(help="a variant the prefill runs under too")] = "",
         full: Annotated[bool, typer.Option(help="also full attention (no bounded cache)")] = False,
         precision: Annotated[str, typer.Option(help="stored keys and values: float16 or float32")] = "float16") -> None:
    started = time.time()
    check_needle(kind, page)
    unknown = [v for v in [*variant_names.split(","), *filter(None, [prefill_variant])] if v not in catalogue(0)]
    if unknown:
        raise typer.BadParameter(f"unknown variant {unknown[0]!r}; known: {', '.join(catalogue(0))}")
    config = KnnConfig(blocks=blocks, top_blocks=top_blocks, rep_keys=rep_keys, query_group=query_group, precision=precision,
                       decode_group=None if decode_group < 0 else decode_group)
    try:
        check_options(config)
    except InvalidInput as e:
        raise typer.BadParameter(e.message) from None
    word, *planted = needle_of(kind, depth)
    model, tokenizer = load_model()
    prompt = needle_prompt(tokenizer, (DOCS / f"{page}.rst.txt").read_text(), length, depth, word, *planted)
    ids = prompt[0].tolist()
    start, size = word_span(tokenizer, ids, word)
    needle = torch.arange(start, start + size)
    print(f"prompt {len(ids)} tokens; {kind} {word} at stream index {start} ({size} tokens): "
          f"{[tokenizer.decode(ids[j]) for j in range(start - 6, start + size + 1)]}", flush=True)
    target = tokenizer(planted[0].format(word=word), add_special_tokens=False).input_ids  # "The secret ... is WORD."
    answer_size = word_span(tokenizer, target, word)[1]
    print("answer tokens", [tokenizer.decode(t) for t in target], flush=True)

    rows = [answer_row("full attention", *full_attention(model, tokenizer, prompt, target), word, answer_size)
            ] if full else []
    cache = BoundedCache(model, SINKS_POLICY)
    n_layers, budget = len(cache.layers), SINKS_POLICY.budget
    total = len(ids) + max(len(target), 12) + 1
    qpre: dict[int, torch.Tensor] = {}
    with attach(model, cache, config) as session, torch.inference_mode():
        for layer, store in session.stores.items():
            store.layer = layer
        attend = session.attend

        def recording(layer, query, key, value, scaling):
            cl = cache.layers[layer]
            q = query.shape[2]
            if layer not in qpre:
                qpre[layer] = torch.zeros(query.shape[1], total, query.shape[3], dtype=torch.float16)
            qpre[layer][:, cl.view_tokens[-q:]] = cache.rotate(query[0], -cl.view_positions[-q:]).to(torch.float16)
            return attend(layer, query, key, value, scaling)

        session.attend = recording

        def configure(variant: dict) -> None:
            """The session's config and gate under a variant."""
            session.config = replace(config, **variant.get("config", {}))
            bias = variant.get("memory_bias")
            session.gate = None if bias is None else MemoryBias.load(MEMORY_BIAS) if bias == "trained" else MemoryBias(
                torch.full_like(MemoryBias.initial(model).bias, bias))

        if prefill_variant:
            under = catalogue(n_layers)[prefill_variant][0]
            VARIANT.update(under, needle=needle)
            configure(under)
            blocks_module.BlockStore.scores = patched_scores
        blocks_module.BlockStore.best = recording_best
        try:
            prefill = forward(model, prompt, cache, logits_to_keep=1)
        finally:
            blocks_module.BlockStore.scores, blocks_module.BlockStore.best = ORIGINAL_SCORES, ORIGINAL_BEST
            configure({})
        print(f"prefill done {time.time() - started:.0f} s", flush=True)
        saved = ([snapshot(layer) for layer in cache.layers], {k: snapshot(s) for k, s in session.stores.items()},
                 snapshot(session))

        def reset(variant: dict) -> None:
            """The cache and session as the prefill left them, with the variant's config."""
            for layer, s in zip(cache.layers, saved[0], strict=True):
                restore(layer, s)
            for k, s in saved[1].items():
                restore(session.stores[k], s)
            restore(session, saved[2])
            session.reused, session.held = {}, {}
            configure(variant)

        def decode(variant: dict, name: str) -> dict:
            reset(variant)
            VARIANT.clear()
            VARIANT.update(variant, needle=needle)
            blocks_module.BlockStore.scores = patched_scores
            try:
                logits, logprobs = prefill.logits[0, -1], []
                for step, tok in enumerate(target):  # teacher-forced
                    lp = torch.log_softmax(logits.float(), -1)
                    logprobs.append((tokenizer.decode(tok), float(lp[tok]), tokenizer.decode(int(lp.argmax()))))
                    if step < len(target) - 1:
                        logits = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True,
                                       logits_to_keep=1).logits[0, -1]
                answer_tokens = []
                reset(variant)
                logits = prefill.logits[0, -1]
                for _ in range(12):  # greedy, as the bench
                    tok = int(logits.argmax())
                    answer_tokens.append(tok)
                    if tok == tokenizer.eos_token_id:
                        break
                    logits = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True,
                                   logits_to_keep=1).logits[0, -1]
            finally:
                blocks_module.BlockStore.scores = ORIGINAL_SCORES
            return answer_row(name, tokenizer.decode(answer_tokens, skip_special_tokens=True), logprobs, word,
                              answer_size)

        variants = [catalogue(n_layers)[v] for v in variant_names.split(",")]
        rows += [decode(v, name) for v, name in variants]
        print(f"decoding variants done {time.time() - started:.0f} s", flush=True)
        if not rank_tables:
            path = Path(RESULTS) / f"{out}.json"
            path.write_text(json.dumps({"kind": kind, "length": length, "depth": depth, "prompt_tokens": len(ids),
                                        "needle_index": start, "config": repr(config), "variants": rows,
                                        "prefill_variant": prefill_variant,
                                        "seconds": time.time() - started}, indent=1) + "\n")
            print(f"wrote {path}; {time.time() - started:.0f} s")
            return

        # ranks, from the stores as the prefill left them, for the answer's queries
        for layer in range(n_layers):
            qpre[layer][:, len(ids):] = 0
        # re-run the teacher-forced answer with the default to record its queries
        reset({})
        for tok in target[:-1]:
            model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True, logits_to_keep=1)
        for k, s in saved[1].items():
            restore(session.stores[k], s)
        stores = dict(session.stores)  # closing the session replaces them

    steps = {"question (mean of last 16)": list(range(len(ids) - 16, len(ids))),
             "answer first token (prompt end)": [len(ids) - 1]}
    for i in range(len(target) - 1):
        steps[f"query at {tokenizer.decode(target[i])!r}"] = [len(ids) + i]
    rules = ["max", "rep1", "rep2", "rep4", "rep8", "att1", "att4"]
    sizes = [16, 32, 64, 128]
    table: dict = {}
    for layer in range(n_layers):
        store = stores[layer]
        keys, tokens = store.keys[:, :store.count], store.tokens[:store.count]
        entry = int((tokens == start).nonzero()[0, 0])
        att = received(qpre[layer], keys, tokens, cache.rotate, window)
        kv, kf = keys.shape[0], keys.float()
        for step, at in steps.items():
            qf = cache.rotate(qpre[layer][:, at].float(), torch.full((len(at),), budget)).mean(1)
            logits = qf.view(kv, -1, qf.shape[-1]) @ kf.transpose(-1, -2)  # [kv, g, n]
            for block in sizes:
                for rule in rules:
                    if rule.startswith("rep") and block % int(rule[3:]):
                        continue
                    for heads in ("kv", "layer"):
                        table.setdefault(step, {}).setdefault(f"B{block} {rule} {heads}", []).append(
                            ranks(logits, att, entry, block, rule, heads))
    print(f"ranks done {time.time() - started:.0f} s", flush=True)
    summary = {}
    for step, per_rule in table.items():
        print(f"\n### ranks of the needle block, queries: {step}")
        print("| rule | top-(512/B) hits of 90 (layer, KV head) | layers 0-10 hits of 33 | median rank | "
              "median rank layers 0-10 |")
        print("|---|---:|---:|---:|---:|")
        for name, per_layer in per_rule.items():
            block = int(name.split()[0][1:])
            top = 512 // block
            flat = torch.tensor(per_layer).float()
            hits, early_hits = int((flat <= top).sum()), int((flat[:11] <= top).sum())
            summary.setdefault(step, {})[name] = {"hits": hits, "early_hits": early_hits,
                                                  "median": float(flat.median()), "ranks": per_layer}
            print(f"| {name} | {hits} | {early_hits} | {flat.median():.0f} | {flat[:11].median():.0f} |")
    path = Path(RESULTS) / f"{out}.json"
    path.write_text(json.dumps({"kind": kind, "length": length, "depth": depth, "prompt_tokens": len(ids),
                                "needle_index": start,
                                "config": repr(config), "variants": rows, "ranks": summary,
                                "seconds": time.time() - started}, indent=1) + "\n")
    print(f"wrote {path}; {time.time() - started:.0f} s")


if __name__ == "__main__":
    app()
