"""Long-context benchmark with SmolLM2-135M on the Python 3.11 library docs: bounded caches and kNN memory.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_longctx.py perplexity
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_longctx.py needle
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_longctx.py decode
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_longctx.py gate
    .venv/bin/python bench/bench_longctx.py prompt needle.txt --length 32000 --depth 0.7

`perplexity`: eval-long (token-by-token semantics, run in exact blocks) of each cache/memory setting on
>= 3K-token docs pages; the share of the window+sinks -> full gap that memory recovers; tokens/s; a plot
of perplexity against position. `needle`: a passphrase planted at several depths of 1K..12K-token prompts,
asked at the end (greedy, chat template). `decode`: token-by-token decode speed and cache bytes as the
stream grows to 32K tokens, with and without memory (`--url`: the per-token memory on a running memsvc server,
settings named NAME@server; the time spent in memory calls per token is recorded either way). `prompt`: writes one needle trial's text for `memsvc generate --prompt-file`. `gate`: trains the gated-mode gate on other docs pages
and writes lm/params/smollm2-gate.json and its curve. Each prints a markdown table and writes a JSON (and
PNGs) under bench/results/.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import matplotlib
import numpy as np
import psutil
import torch
import typer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lm.attention import attach
from lm.cache import BoundedCache, forward
from lm.devices import resolve_device
from lm.gate import PARAMS, Gate, MemoryBias
from lm.gate_training import plot_curve, train_gate
from lm.longeval import (
    NEEDLE,
    PASSCODE_NEEDLE,
    PASSCODE_QUESTION,
    QUESTION,
    answer,
    evaluate_stream,
    needle_prompt,
    needle_text,
    read_tokens,
)
from lm.memory_attention import KnnConfig, head_dim, session_memory
from lm.model import load_model, load_tokenizer
from lm.policies import Full, Policy, Window
from memsvc.client import MemoryClient
from memsvc.contract import InvalidInput

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
RESULTS = Path(__file__).parent / "results"
TEST_FILES = ["heapq", "zlib", "cmd", "uuid"]  # 3.2K-3.7K tokens each
GATE_FILES = ["bisect", "mmap", "bz2", "base64", "readline", "compileall"]  # training only, never evaluated
# block memory's bias (issue 14): streams of two concatenated pages each, 10-11K tokens (past the 8,192 trained
# positions); none of them is evaluated (TEST_FILES, the needle's multiprocessing, decode's stdtypes/os/datetime)
BIAS_STREAMS = "contextlib+bisect,tarfile+mmap,zipfile+base64"
MEMORY_BIAS = PARAMS / "smollm2-memory-bias.json"
WINDOW, SINKS = 256, 4
EVERY_THIRD = list(range(0, 30, 3))
HEAD_DIM = 64  # SmolLM2-135M
NEEDLE_WORDS = {0.1: "tangerine-47", 0.5: "copper-falcon", 0.9: "violet-9312", 0.25: "marble-otter",
                0.75: "juniper-66"}  # one word per depth, whichever run plants it (others: amber-<depth>)
PASSCODES = {0.1: "4817", 0.3: "2956", 0.5: "7342", 0.7: "6083", 0.9: "1529"}
NEEDLE_KINDS = ("passphrase", "passcode")  # needle --kind: NEEDLE_WORDS or PASSCODES



@dataclass(frozen=True)
class Setting:
    policy: Policy
    knn: KnnConfig | None = None
    index: str = "flat"  # of the session's in-process memory

    def memory(self, model):
        return session_memory(model, self.index) if self.knn is not None and not self.knn.blocks else None

    def gate(self) -> Gate | MemoryBias | None:
        if self.knn is None or self.knn.mode != "gated":
            return None
        if self.knn.blocks:  # the trained per-head bias of block memory (`gate --memory-blocks 32`)
            return MemoryBias.load(MEMORY_BIAS)
        return Gate.load(PARAMS / f"smollm2-gate{'' if self.knn.positions == 'absolute' else '-nopos'}.json")


SINKS_POLICY = Window(WINDOW, SINKS)
AS_MEASURED = {"decode_group": None, "decode_every_key": False}  # decoding as before section 10 (a search per query group)
SETTINGS: dict[str, Setting] = {
    "full": Setting(Full()),
    "window": Setting(Window(WINDOW)),
    "sinks": Setting(SINKS_POLICY),
    "memory": Setting(SINKS_POLICY, KnnConfig()),  # the default memory (= memory-rerank192 since section 11; memory-d1-dmax in section 10; block-b32n16-r4 before)
    "knn": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32)),
    "knn-k8": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=8)),
    "knn-k128": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=128)),
    "knn-every3": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32, layers=EVERY_THIRD)),
    "knn-hnsw": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32), index="hnsw"),
    "knn-nopos": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32, positions="none")),
    "knn-edge": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32, positions="window")),
    "knn-gated": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32, mode="gated")),
    "knn-gated-nopos": Setting(SINKS_POLICY, KnnConfig(blocks=0, k=32, mode="gated", positions="none")),
    # block memory (lm.blocks), every key ranking its block (rep_keys 0): 64-token blocks, 4 retrieved per forward
    # (or per 4 queries: -g4), layer and KV head (256 tokens), max representative, ordered positions
    "block": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=4, query_group=0, rep_keys=0)),
    "block-g4": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=4, query_group=4, rep_keys=0, **AS_MEASURED)),
    "block-mean": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=4, representative="mean", query_group=0)),
    "block-hybrid": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=4, positions="hybrid", query_group=0,
                                                    rep_keys=0)),
    "block-abs": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=4, positions="absolute", query_group=0,
                                                 rep_keys=0)),
    "block-n8": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=8, query_group=0, rep_keys=0)),
    "block-b32": Setting(SINKS_POLICY, KnnConfig(blocks=32, top_blocks=8, query_group=0, rep_keys=0)),
    "block-b16-g4": Setting(SINKS_POLICY, KnnConfig(blocks=16, top_blocks=16, rep_keys=0, **AS_MEASURED)),
    # 4 representative keys per block (means of runs of B / 4 keys): the old default's shape, and the new default
    # (blocks of 32, 16 retrieved per 4 queries: 512 tokens; KnnConfig() / --memory-blocks 32)
    "block-r4": Setting(SINKS_POLICY, KnnConfig(blocks=64, top_blocks=4, rep_keys=4, **AS_MEASURED)),
    "block-b32n16-r4": Setting(SINKS_POLICY, KnnConfig(blocks=32, top_blocks=16, rep_keys=4, **AS_MEASURED)),
    # issue 14, section 10: the default, searching at every decoding step (-d1), ranking by every key (-max)
    "memory-d1": Setting(SINKS_POLICY, KnnConfig(decode_group=1)),
    # section 19: the default with the sinks rotated below the retrieved run (as in the stream)
    "memory-sinks-below": Setting(SINKS_POLICY, KnnConfig(sink_positions="below")),
    "memory-gated-sinks-below": Setting(SINKS_POLICY, KnnConfig(mode="gated", sink_positions="below")),
    "memory-n128-sinks-below": Setting(SINKS_POLICY, KnnConfig(top_blocks=128, sink_positions="below")),
    # section 20: the default memory with a wider local window (1,024 tokens + 4 sinks); at 16K and 32K the window
    # holds no needle depth of the grid (the nearest, 0.9 of 16K, is ~1.6K tokens back)
    "memory-w1024": Setting(Window(1024, SINKS), KnnConfig()),
    "memory-d1-max": Setting(SINKS_POLICY, KnnConfig(decode_group=1, rep_keys=0)),
    "memory-d1-r8": Setting(SINKS_POLICY, KnnConfig(decode_group=1, rep_keys=8)),
    "memory-d1-dmax": Setting(SINKS_POLICY, KnnConfig(decode_group=1, decode_every_key=True, decode_candidates=0)),
    # section 11: every key of the C best blocks by the representative keys (a two-stage decoding search)
    "memory-rerank32": Setting(SINKS_POLICY, KnnConfig(decode_group=1, decode_every_key=True, decode_candidates=32)),
    "memory-rerank64": Setting(SINKS_POLICY, KnnConfig(decode_group=1, decode_every_key=True, decode_candidates=64)),
    "memory-rerank128": Setting(SINKS_POLICY, KnnConfig(decode_group=1, decode_every_key=True, decode_candidates=128)),
    "memory-rerank192": Setting(SINKS_POLICY, KnnConfig(decode_group=1, decode_every_key=True, decode_candidates=192)),
    "memory-rerank256": Setting(SINKS_POLICY, KnnConfig(decode_group=1, decode_every_key=True, decode_candidates=256)),
    # issue 14, section 16: more blocks retrieved (24 or 32 of 32 tokens), or 8 representative keys (means of 4 keys)
    "memory-n24": Setting(SINKS_POLICY, KnnConfig(top_blocks=24)),
    "memory-n32": Setting(SINKS_POLICY, KnnConfig(top_blocks=32)),
    "memory-r8": Setting(SINKS_POLICY, KnnConfig(rep_keys=8)),
    # issue 14, section 12: the default with the trained per-head bias on the retrieved logits (MEMORY_BIAS)
    "memory-gated": Setting(SINKS_POLICY, KnnConfig(mode="gated")),
    "memory-gated-exact": Setting(SINKS_POLICY, KnnConfig(mode="gated", decode_candidates=0)),
}

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


class BlockTimes:
    """CPU seconds (`time.process_time`) a block-memory session spends per part, counted by wrapping its methods on the
    instance: `attend` (all of memory attention), `fetch` split into `search` (steps that search, gather and rotate
    the retrieved blocks) and `reuse` (steps that reuse a search and add the newly stored entry), and `store` (the
    cache's evictions into the blocks)."""

    def __init__(self, session):
        self.session = session
        self.reset()
        for name in ("attend", "fetch", "store"):
            setattr(session, name, self._timed(name, getattr(session, name)))
        session.cache.on_evict = session.store  # the cache was handed the unwrapped method when attached

    def reset(self) -> None:
        self.seconds = {"attend": 0.0, "search": 0.0, "reuse": 0.0, "store": 0.0}

    def _timed(self, name, method):
        def timed(*args, **kwargs):
            searches, started = self.session.searches, time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                part = name if name != "fetch" else "search" if self.session.searches > searches else "reuse"
                self.seconds[part] += time.process_time() - started
        return timed


class Timed:
    """A MemoryBackend that adds up the wall seconds its add and search calls take (the memory's share of a
    decode step: the search, and with a server the request, transfer and the durable add too)."""

    def __init__(self, memory):
        self.memory, self.spec = memory, memory.spec
        self.reset()

    def reset(self) -> None:
        self.seconds = {"add": 0.0, "search": 0.0}
        self.calls = 0

    def add(self, *args, **kwargs):
        return self._timed("add", *args, **kwargs)

    def search(self, *args, **kwargs):
        return self._timed("search", *args, **kwargs)

    def _timed(self, name, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(self.memory, name)(*args, **kwargs)
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self.memory, name)


def names(value: str) -> list[str]:
    chosen = [n.strip() for n in value.split(",")]
    unknown = [n for n in chosen if n not in SETTINGS]
    if unknown:
        raise typer.BadParameter(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    return chosen


def numbers(value: str, kind: type, valid: Callable[[float], bool], rule: str) -> list:
    """Comma-separated numbers of `kind` (int or float), each `valid`; BadParameter "`rule`, got VALUE" otherwise."""
    try:
        parsed = [kind(n) for n in value.split(",")]
    except ValueError:
        parsed = []
    if not parsed or not all(valid(n) for n in parsed):
        raise typer.BadParameter(f"{rule}, got {value}")
    return parsed


def token_lengths(value: str) -> list[int]:
    """Stream/prompt lengths in tokens, whole numbers > 0."""
    return numbers(value, int, lambda n: n > 0, "lengths must be whole numbers of tokens > 0")


def needle_depths(value: str) -> list[float]:
    """Needle depths in [0, 1] (0 = the start of the haystack)."""
    return numbers(value, float, lambda d: 0 <= d <= 1, "depths must be in [0, 1]")


def check_needle(kind: str, page: str) -> None:
    """A needle kind of NEEDLE_KINDS and a docs page that exists, else BadParameter (before the model loads)."""
    if kind not in NEEDLE_KINDS:
        raise typer.BadParameter(f"unknown kind {kind!r}; known: {', '.join(NEEDLE_KINDS)}")
    if not (DOCS / f"{page}.rst.txt").is_file():
        raise typer.BadParameter(f"no docs page {page!r} ({DOCS / f'{page}.rst.txt'} is not a file)")


def needle_of(kind: str, depth: float) -> tuple[str, str, str]:
    """(word, needle sentence, question) planted at `depth` for a needle kind: NEEDLE_WORDS or PASSCODES."""
    if kind == "passcode":
        return PASSCODES.get(depth, f"{1000 + round(8999 * depth)}"), PASSCODE_NEEDLE, PASSCODE_QUESTION
    return NEEDLE_WORDS.get(depth, f"amber-{round(1000 * depth)}"), NEEDLE, QUESTION


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


@app.command()
def perplexity(settings: Annotated[str, typer.Option(help="comma-separated settings")]
               = "full,window,sinks,memory,knn,knn-nopos,knn-k8,knn-k128,knn-every3",
               files: Annotated[str, typer.Option(help="docs pages (library/NAME.rst.txt)")] = ",".join(TEST_FILES),
               skip: int = 256, out: str = "longctx_perplexity",
               merge: Annotated[bool, typer.Option(help="add to the settings already saved in OUT")] = False) -> None:
    """Perplexity past the first SKIP tokens, tokens/s, peak entries, recovered gap, per-position curves."""
    model, tokenizer = load_model()
    chosen, pages = names(settings), files.split(",")
    results: dict[str, dict[str, dict]] = {}
    if merge:
        saved = json.loads((RESULTS / f"{out}.json").read_text())
        if saved["files"] != pages or saved["skip"] != skip:
            raise typer.BadParameter(f"{out}.json has files {saved['files']} and skip {saved['skip']}")
        results = {name: per_file for name, per_file in saved["results"].items() if name not in chosen}
    for page in pages:
        ids = read_tokens(tokenizer, DOCS / f"{page}.rst.txt")
        for name in chosen:
            setting = SETTINGS[name]
            r = evaluate_stream(model, ids, setting.policy, knn=setting.knn, memory=setting.memory(model),
                                gate=setting.gate())
            results.setdefault(name, {})[page] = {"perplexity": r.perplexity(skip), "tokens": len(r.nll),
                                                  "tokens_per_s": len(r.nll) / r.seconds,
                                                  "peak": r.peak_cache_entries, "nll": r.nll.tolist()}
            print(f"{page:8s} {name:16s} ppl {r.perplexity(skip):7.3f}  {len(r.nll) / r.seconds:6.1f} tok/s",
                  flush=True)
    save(out, {"skip": skip, "files": pages, "results": results})
    report_perplexity(results, pages, skip, out)


def pooled(per_file: dict[str, dict], skip: int) -> float:
    nll = np.concatenate([np.asarray(f["nll"][skip:]) for f in per_file.values()])
    return math.exp(nll.mean())


def report_perplexity(results: dict, pages: list[str], skip: int, out: str) -> None:
    ppl = {name: pooled(per_file, skip) for name, per_file in results.items()}
    base, full = ppl.get("sinks"), ppl.get("full")
    print(f"\n| setting | {' | '.join(pages)} | pooled | gap recovered | tokens/s |")
    print(f"|---|{'---|' * len(pages)}---|---|---|")
    for name, per_file in results.items():
        cells = " | ".join(f"{per_file[p]['perplexity']:.2f}" for p in pages)
        recovered = f"{100 * (base - ppl[name]) / (base - full):.0f}%" \
            if base is not None and full is not None and name.startswith(("knn", "block", "memory")) else ""
        speed = np.mean([per_file[p]["tokens_per_s"] for p in pages])
        print(f"| {name} | {cells} | {ppl[name]:.2f} | {recovered} | {speed:.0f} |")
    fig, ax = plt.subplots(figsize=(7, 4))
    length = min(len(f["nll"]) for per_file in results.values() for f in per_file.values())
    bins = np.arange(0, length + 1, 256)
    for name, per_file in results.items():
        nll = np.mean([np.asarray(f["nll"][:length]) for f in per_file.values()], axis=0)
        ax.plot(bins[1:], [math.exp(nll[a:b].mean()) for a, b in pairwise(bins)], marker=".", label=name)
    ax.set_xlabel("position in the stream (end of 256-token bin)")
    ax.set_ylabel("perplexity (mean over files)")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M, window {WINDOW}, sinks {SINKS}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


@app.command()
def needle(settings: Annotated[str, typer.Option()] = "full,sinks,memory,knn",
           lengths: Annotated[str, typer.Option(help="prompt lengths in tokens")] = "1000,3000,8000,12000",
           depths: Annotated[str, typer.Option(help="needle depths in [0, 1]")] = "0.1,0.5,0.9",
           page: str = "multiprocessing", out: str = "longctx_needle",
           kind: Annotated[str, typer.Option(help="passphrase (a word) or passcode (4 digits)")] = "passphrase",
           merge: Annotated[bool, typer.Option(help="add to the trials already saved in OUT")] = False,
           device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (the model in float32 either way)")] = "cpu",
           ) -> None:
    """Answer accuracy for a passphrase (or a 4-digit passcode: --kind passcode) planted at each depth of each prompt
    length (greedy, chat template). A bad kind, length, depth, page or device fails before the model loads."""
    chosen = names(settings)
    check_needle(kind, page)
    try:
        resolve_device(device)
    except InvalidInput as e:
        raise typer.BadParameter(e.message) from None
    prompt_lengths, needle_at = token_lengths(lengths), needle_depths(depths)
    trials = {(name, n, d) for name in chosen for n in prompt_lengths for d in needle_at}
    rows = []
    if merge:
        saved = json.loads((RESULTS / f"{out}.json").read_text())
        if saved["page"] != page:
            raise typer.BadParameter(f"{out}.json used the page {saved['page']}")
        if {r.get("kind", "passphrase") for r in saved["rows"]} - {kind}:
            raise typer.BadParameter(f"{out}.json holds trials of another kind than {kind!r}")
        rows = [r for r in saved["rows"] if (r["setting"], r["length"], r["depth"]) not in trials]
    model, tokenizer = load_model(device=device, dtype=torch.float32)
    haystack = (DOCS / f"{page}.rst.txt").read_text()
    for length in prompt_lengths:
        for depth in needle_at:
            for name in chosen:
                rows.append(needle_trial(model, tokenizer, haystack, name, kind, length, depth))
                print(json.dumps(rows[-1]), flush=True)
                save(out, {"page": page, "rows": rows})  # a run cut short keeps the trials it finished
    all_lengths = sorted({r["length"] for r in rows})
    print("\n| setting | " + " | ".join(f"{n} tokens" for n in all_lengths) + " |")
    print("|---|" + "---|" * len(all_lengths))
    for name in dict.fromkeys(r["setting"] for r in rows):
        cells = []
        for length in all_lengths:
            hits = [r["correct"] for r in rows if r["setting"] == name and r["length"] == length]
            cells.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
        print(f"| {name} | {' | '.join(cells)} |")


def needle_trial(model, tokenizer, haystack: str, name: str, kind: str, length: int, depth: float) -> dict:
    """One needle trial: the `kind` needle planted at `depth` of a `length`-token prompt of `haystack`, answered
    greedily (12 tokens) with the setting `name`; its row for the results (correct: the needle's word in the answer)."""
    word, *planted = needle_of(kind, depth)
    prompt = needle_prompt(tokenizer, haystack, length, depth, word, *planted)
    setting = SETTINGS[name]
    started = time.perf_counter()
    text = answer(model, tokenizer, prompt, setting.policy, knn=setting.knn, memory=setting.memory(model),
                  gate=setting.gate())
    return {"setting": name, "kind": kind, "length": length, "prompt_tokens": prompt.shape[1], "depth": depth,
            "word": word, "answer": text, "correct": word in text, "seconds": time.perf_counter() - started}


@app.command()
def prompt(out: Annotated[Path, typer.Argument(help="the text file to write")],
           length: Annotated[int, typer.Option(min=1, help="haystack tokens")] = 32000,
           depth: Annotated[float, typer.Option(min=0, max=1, help="needle depth in [0, 1]")] = 0.5,
           page: str = "multiprocessing",
           kind: Annotated[str, typer.Option(help="passphrase (a word) or passcode (4 digits)")] = "passcode") -> None:
    """Write one needle trial's user turn as plain text, to run it end to end with
    `memsvc generate --prompt-file OUT --cache window:256,sinks:4 --memory-attention` (chat template, as `needle`)."""
    check_needle(kind, page)
    word, *planted = needle_of(kind, depth)
    tokenizer = load_tokenizer()
    text = needle_text(tokenizer, (DOCS / f"{page}.rst.txt").read_text(), length, depth, word, *planted)
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(tokenizer(text).input_ids)} tokens, the {kind} {word!r} at depth {depth} of {page}")


def server_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) the process `pid` has used so far; 0 without a pid."""
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def label(name: str, url: str | None) -> str:
    """A decode setting's name in the results: NAME@server when its per-token memory is on the --url server."""
    knn = SETTINGS[name].knn
    return f"{name}@server" if url is not None and knn is not None and not knn.blocks else name


@app.command()
def decode(settings: Annotated[str, typer.Option()] = "sinks,memory,knn,knn-hnsw,knn-every3",
           lengths: Annotated[str, typer.Option()] = "1024,2048,4096,8192,16384,32768",
           steps: Annotated[int, typer.Option(help="decode steps timed at each length")] = 32,
           out: str = "longctx_decode",
           merge: Annotated[bool, typer.Option(help="add to the settings already saved in OUT")] = False,
           url: Annotated[str | None, typer.Option(help="keep the per-token memory on this memsvc server")] = None,
           server_pid: Annotated[int | None, typer.Option(help="with --url: the server's process id, to record "
                                                               "its CPU time per token too")] = None,
           ) -> None:
    """Token-by-token decode time per token and cache bytes at growing stream lengths (the stream is prefilled in
    exact blocks between measurements; the timed steps decode real docs tokens one at a time)."""
    chosen, marks = names(settings), token_lengths(lengths)
    rows = []
    if merge:
        saved = json.loads((RESULTS / f"{out}.json").read_text())
        if saved["steps"] != steps:
            raise typer.BadParameter(f"{out}.json was measured with {saved['steps']} steps")
        labels = {label(name, url) for name in chosen}
        rows = [r for r in saved["rows"] if r["setting"] not in labels]
    model, tokenizer = load_model()
    text = "\n".join((DOCS / f"{p}.rst.txt").read_text() for p in ("stdtypes", "os", "datetime"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :marks[-1] + steps]
    client = MemoryClient(url, timeout=600) if url is not None else None
    for name in chosen:
        setting = SETTINGS[name]
        cache = BoundedCache(model, setting.policy)
        remote = label(name, url) != name
        memory = setting.memory(model)
        if remote:
            dim = head_dim(model)
            memory = client.create_memory(f"bench-decode-{uuid.uuid4().hex[:8]}", dim=dim, metric="ip",
                                          value_kind="vector", value_dim=dim, index=setting.index)
        memory = Timed(memory) if memory is not None else None
        context = attach(model, cache, setting.knn, memory, setting.gate()) \
            if setting.knn is not None else nullcontext()
        begun = time.perf_counter()
        with context as session, torch.inference_mode():
            parts = BlockTimes(session) if setting.knn is not None and setting.knn.blocks else None
            done = 0
            for mark in marks:
                forward(model, ids[:, done:mark], cache, logits_to_keep=1)
                if memory is not None:
                    memory.reset()
                if parts is not None:
                    parts.reset()
                server_started = server_cpu(server_pid)
                started, cpu_started = time.perf_counter(), time.process_time()
                for i in range(mark, mark + steps):
                    model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
                seconds = (time.perf_counter() - started) / steps
                cpu_seconds = (time.process_time() - cpu_started) / steps  # what other load on the machine hides
                server_seconds = (server_cpu(server_pid) - server_started) / steps if remote and server_pid else None
                done = mark + steps
                layer = cache.layers[0]
                entries = cache.entries()
                cache_bytes = entries * layer.keys.shape[1] * layer.keys.shape[-1] * 2 * layer.keys.element_size()
                evicted = cache.seen - len(layer.tokens)  # per layer and KV head: in memory when knn is on
                block_bytes = session.nbytes() if parts is not None else None  # block memory: its stores, all layers
                rows.append({"setting": label(name, url), "length": mark, "ms_per_token": 1000 * seconds,
                             "tokens_per_s": 1 / seconds, "cpu_ms_per_token": 1000 * cpu_seconds,
                             "cache_entries": entries, "cache_bytes": cache_bytes, "evicted_per_kv_head": evicted,
                             "memory_entries": 0 if memory is None else memory.stats().count,
                             **({} if memory is None else {f"memory_{call}_ms_per_token": 1000 * t / steps
                                                             for call, t in memory.seconds.items()}),
                             "memory_calls_per_token": None if memory is None else memory.calls / steps,
                             **({} if parts is None else {f"{part}_cpu_ms_per_token": 1000 * t / steps
                                                          for part, t in parts.seconds.items()}),
                             "block_memory_bytes": block_bytes,
                             "rss_bytes": psutil.Process().memory_info().rss,
                             "server_cpu_ms_per_token": None if server_seconds is None else 1000 * server_seconds,
                             "seconds_so_far": time.perf_counter() - begun})
                print(json.dumps(rows[-1]), flush=True)
                save(out, {"steps": steps, "rows": rows})  # a run cut short keeps the lengths it finished
        if remote:
            client.delete_memory(memory.spec.name)
    report_decode(rows, out)


def memory_bytes(row: dict) -> int:
    """Bytes of a decode row's memory: block memory's stores as measured, per-token memory's keys + values in float32
    (computed from its entries)."""
    measured = row.get("block_memory_bytes")
    return measured if measured is not None else row.get("memory_entries", 0) * 2 * HEAD_DIM * 4


def report_decode(rows: list[dict], out: str) -> None:
    """The decode table (CPU ms per token and its parts, cache and memory MiB, the process's RSS) and its plot."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    print("\n| setting | stream length | decode ms/token | CPU ms/token | of which memory attention / search / reuse "
          "/ store | tokens/s | cache MiB | memory MiB | memory B per stored token | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        parts = " / ".join(f"{r[f'{p}_cpu_ms_per_token']:.1f}" for p in ("attend", "search", "reuse", "store")) \
            if "attend_cpu_ms_per_token" in r else ""
        stored = r["evicted_per_kv_head"]
        per_token = f"{memory_bytes(r) / stored:,.0f}" if memory_bytes(r) and stored else ""
        print(f"| {r['setting']} | {r['length']} | {r['ms_per_token']:.1f} | {r.get('cpu_ms_per_token', math.nan):.1f} "
              f"| {parts} | {r['tokens_per_s']:.1f} | {r['cache_bytes'] / 2**20:.1f} | {memory_bytes(r) / 2**20:.0f} "
              f"| {per_token} | {r.get('rss_bytes', 0) / 2**20:.0f} |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in settings:
        mine = [r for r in rows if r["setting"] == name]
        lengths = [r["length"] for r in mine]
        ax1.plot(lengths, [r.get("cpu_ms_per_token", math.nan) for r in mine], marker="o", label=f"{name} (CPU time)")
        ax1.plot(lengths, [r["ms_per_token"] for r in mine], marker="x", linestyle=":",
                 color=ax1.lines[-1].get_color(), label=f"{name} (wall)")
        ax2.plot(lengths, [(r["cache_bytes"] + memory_bytes(r)) / 2**20 for r in mine], marker="o",
                 label=f"{name}: cache + memory")
        if any("rss_bytes" in r for r in mine):
            ax2.plot(lengths, [r.get("rss_bytes", math.nan) / 2**20 for r in mine], marker="x", linestyle=":",
                     color=ax2.lines[-1].get_color(), label=f"{name}: process RSS")
    for ax, label in ((ax1, "ms per decoded token"), (ax2, "resident MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stream length (tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M token-by-token decode, window {WINDOW} + {SINKS} sinks (1 CPU thread)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


@app.command()
def gate(epochs: int = 3, positions: str | None = None, lr: float = 0.1,
         max_tokens: Annotated[int, typer.Option(help="tokens per training page (stream)")] = 1536,
         memory_blocks: Annotated[int, typer.Option(help="0: per-token memory's gate on GATE_FILES; B > 0: block "
                                                         "memory's per-head bias (blocks of B) on --streams")] = 0,
         streams: Annotated[str, typer.Option(help="with --memory-blocks: training streams, each pages joined "
                                                   "by '+'")] = BIAS_STREAMS) -> None:
    """Train the gated-mode gate on pages disjoint from every evaluation page; ship it with its curve."""
    model, tokenizer = load_model()
    if memory_blocks:
        pages = [s.split("+") for s in streams.split(",")]
        evaluated = set(TEST_FILES) | {"multiprocessing", "stdtypes", "os", "datetime"}
        if evaluated & {p for s in pages for p in s}:
            raise typer.BadParameter(f"training pages must not be evaluation pages ({sorted(evaluated)})")
        texts = ["\n\n".join((DOCS / f"{p}.rst.txt").read_text() for p in s) for s in pages]
        documents = [tokenizer(t, return_tensors="pt").input_ids[:, :max_tokens] for t in texts]
        path, curve_png, files = MEMORY_BIAS, RESULTS / "longctx_memory_bias_curve.png", streams
    else:
        documents = [read_tokens(tokenizer, DOCS / f"{p}.rst.txt", max_tokens) for p in GATE_FILES]
        suffix = "" if positions in (None, "absolute") else "-nopos"
        path, curve_png, files = PARAMS / f"smollm2-gate{suffix}.json", RESULTS / f"longctx_gate{suffix}.png", GATE_FILES
    print(f"streams of {[d.shape[1] for d in documents]} tokens", flush=True)
    trained, curve = train_gate(model, documents, window=WINDOW, sinks=SINKS, k=32, positions=positions,
                                epochs=epochs, lr=lr, memory_blocks=memory_blocks,
                                on_step=lambda p: print(json.dumps(p), flush=True))
    trained.meta.update({"model": "smollm2", "files": files, "max_tokens": max_tokens,
                         "stream_tokens": [d.shape[1] for d in documents], "curve": curve})
    trained.save(path)
    plot_curve(curve, curve_png)
    print(f"epoch mean losses {trained.meta['epoch_loss']}")
    if memory_blocks:
        b = trained.bias.detach()
        print(f"bias: mean {b.mean():.3f}, min {b.min():.3f}, max {b.max():.3f}; per layer mean "
              f"{[round(x, 2) for x in b.mean(1).tolist()]}")
    else:
        g = torch.sigmoid(trained.bias).detach()
        print(f"gate g: mean {g.mean():.3f}, min {g.min():.3f}, max {g.max():.3f}; scale mean "
              f"{trained.log_scale.exp().mean():.3f}")


if __name__ == "__main__":
    app()
