"""`memsvc knnlm build|eval|tune` (the `knnlm_app` typer sub-app) and `memsvc generate` (`generate`).

Each command talks to a server with `--url`, otherwise to the embedded store in `--data-dir`. torch and
transformers are imported inside the commands, so importing this module (as `memsvc serve` does) stays
fast. Bad input exits non-zero with a one-line message on stderr, before the model is loaded where it can.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from memsvc.cli.options import (
    DEFAULT_DATA_DIR,
    ApiKeyOption,
    DataDir,
    DeviceOption,
    Model,
    SinkPositions,
    Url,
    cli_errors,
    need_model_side,
)
from memsvc.cli.sessions import (
    DEFAULT_MEMORY,
    NEW,
    EndSession,
    MemoryName,
    SessionOption,
    memory_on_server,
    open_server_session,
)
from memsvc.contract import InvalidInput, NotFound

if TYPE_CHECKING:
    from lm.knnlm import KNNLM

knnlm_app = typer.Typer(help="kNN-LM: build a datastore from text, evaluate perplexity, tune λ and temperature.",
                        no_args_is_help=True)

MemoryOption = Annotated[str, typer.Option("--memory", "-m", help="name of the datastore memory")]
Files = Annotated[list[Path], typer.Argument(help="UTF-8 text files (directories: every file inside)")]
Lam = Annotated[float | None, typer.Option("--lam", help="weight of p_kNN in [0, 1]; default: tuned")]
Temp = Annotated[float | None, typer.Option("--temp", help="softmax temperature over distances; default: tuned")]
K = Annotated[int | None, typer.Option("--k", help="neighbours per token; default: tuned")]
Continuous = Annotated[bool, typer.Option(help="also retrieve from the document's own earlier windows")]


def read_texts(paths: list[Path]) -> list[str]:
    """The texts of the files (directories recurse, sorted); InvalidInput for missing, empty or non-UTF-8."""
    files = [f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]
    if not files:
        raise InvalidInput("no files given", "files")
    texts = []
    for f in files:
        if not f.is_file():
            raise NotFound(f"{f}: no such file", "files")
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})", "files") from None
        if not text.strip():
            raise InvalidInput(f"{f}: empty file", "files")
        texts.append(text)
    return texts


def check_settings(lam: float | None = None, temp: float | None = None, k: int | None = None) -> None:
    """Fail on bad λ, temperature or k before anything is loaded (torch-free)."""
    from lm.knn_params import KNNParams

    KNNParams.check(lam=lam, temp=temp, k=k)


@contextmanager
def open_knnlm(memory: str, url: str | None, data_dir: Path, api_key: str | None, model_name: str,
               key: str | None = None, lam: float | None = None, temp: float | None = None,
               k: int | None = None, device: str | None = None) -> Iterator[KNNLM]:
    """A KNNLM over an existing memory (NotFound if there is none), the model on `device` (see `load_model`).
    λ, temperature, k and the device's name, the server or data dir (its lock) and the memory are checked, in that
    order, before torch is imported; then whether this machine has the device, before the model loads."""
    from lm.model_source import model_source
    from lm.sessions import check_memory_name
    from memsvc.connect import connect
    from memsvc.contract import check_device

    check_memory_name(memory)
    check_settings(lam, temp, k)
    check_device(device)
    model_source(model_name)
    need_model_side()
    with connect(url, data_dir, api_key) as client:  # a held data dir or a bad URL fails fast
        mem = client.memory(memory)
        from lm.devices import resolve_device  # torch, not yet transformers: a device this machine lacks

        resolve_device(device)
        from lm.knnlm import KNNLM
        from lm.model import load_model

        model, tokenizer = load_model(model_name, dtype=None, device=device)
        yield KNNLM(model, tokenizer, mem, key=key)


@knnlm_app.command()
def build(files: Files, memory: MemoryOption, url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR,
          api_key: ApiKeyOption = None, model: Model = "smollm2",
          key: Annotated[Literal["final-norm", "mlp-input"] | None,
                         typer.Option(help="hidden state used as key (default: the memory's, else mlp-input)")]
          = None,
          index: Annotated[Literal["flat", "ivfpq", "hnsw"] | None,
                           typer.Option(help="index of a new memory (default: hnsw)")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="print one JSON object, nothing else")] = False,
          device: DeviceOption = None) -> None:
    """Add (key, next token) entries for every token of FILES to memory M, creating it if needed (hnsw:
    near-exact neighbours at a few ms per lookup, see bench/results/knnlm.md).

    Documents already in the memory are skipped; rerunning an interrupted build finishes it. Files, the
    server or data dir and the memory's index are checked before the model loads; progress on stderr.
    """
    with cli_errors():
        from lm.model_source import model_source
        from lm.sessions import check_memory_name
        from memsvc.contract import check_device

        texts = read_texts(files)
        check_memory_name(memory)  # the name a new memory would get: before the store opens
        check_device(device)
        model_source(model)
        need_model_side()
        from memsvc.connect import connect

        with connect(url, data_dir, api_key) as client:  # before torch: a held data dir or a bad URL fails fast
            try:
                mem = client.memory(memory)
            except NotFound:
                mem = None
            if index is not None and mem is not None and mem.spec.index != index:
                raise InvalidInput(f"memory '{memory}' already exists with index '{mem.spec.index}'", "index")
            from lm.devices import resolve_device  # torch, not yet transformers: a device this machine lacks

            resolve_device(device)
            from lm.knnlm import KNNLM, datastore_spec, tokenize_documents
            from lm.model import load_model

            model_, tokenizer = load_model(model, dtype=None, device=device)
            tokenize_documents(tokenizer, texts)
            if mem is None:
                mem = client.create_memory(**datastore_spec(memory, model_, index or "hnsw"))
            start = time.perf_counter()
            added = KNNLM(model_, tokenizer, mem, key=key).build(texts)
            seconds = time.perf_counter() - start
            result = {"memory": memory, "added": added, "count": mem.stats().count, "seconds": round(seconds, 3),
                      "tokens_per_s": round(added / seconds, 1) if seconds else None}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        typer.echo(f"added {added} entries to '{memory}' ({result['count']} in all) in {seconds:.0f}s "
                   f"({result['tokens_per_s']} tokens/s)")


@knnlm_app.command("eval")
def evaluate(files: Files, memory: MemoryOption, url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR,
             api_key: ApiKeyOption = None, model: Model = "smollm2", lam: Lam = None, temp: Temp = None, k: K = None,
             continuous: Continuous = False,
             as_json: Annotated[bool, typer.Option("--json", help="print one JSON object, nothing else")] = False,
             device: DeviceOption = None) -> None:
    """Base and kNN-LM perplexity of FILES with datastore M (λ, temperature, k default to the tuned ones)."""
    with cli_errors():
        texts = read_texts(files)
        with open_knnlm(memory, url, data_dir, api_key, model, lam=lam, temp=temp, k=k, device=device) as knn:
            result = knn.perplexity(texts, lam=lam, temp=temp, k=k, continuous=continuous)
    if as_json:
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
    else:
        cut = 100 * (1 - result.knnlm_ppl / result.base_ppl)
        typer.echo(f"{result.tokens} tokens: base perplexity {result.base_ppl:.3f}, kNN-LM {result.knnlm_ppl:.3f} "
                   f"({cut:+.1f}% cut) with λ={result.lam:g} temperature={result.temp:g} k={result.k}")


@knnlm_app.command()
def tune(files: Files, memory: MemoryOption, url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR,
         api_key: ApiKeyOption = None, model: Model = "smollm2", k: K = None, continuous: Continuous = False,
         as_json: Annotated[bool, typer.Option("--json", help="print one JSON object, nothing else")] = False,
         device: DeviceOption = None) -> None:
    """Pick λ and temperature on validation FILES (never the test files) and store them with memory M."""
    with cli_errors():
        texts = read_texts(files)
        with open_knnlm(memory, url, data_dir, api_key, model, k=k, device=device) as knn:
            tuned, ppl = knn.tune(texts, k=k, continuous=continuous)
    if as_json:
        sys.stdout.write(json.dumps({"memory": memory, "lam": tuned.lam, "temp": tuned.temp, "k": tuned.k,
                                     "validation_perplexity": ppl}) + "\n")
        return
    typer.echo(f"stored with '{memory}': λ={tuned.lam:g} temperature={tuned.temp:g} k={tuned.k} "
               f"(validation perplexity {ppl:.3f})")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """PROMPT or the text of --prompt-file, exactly one of them (a long prompt does not fit a command line)."""
    if (prompt is None) == (prompt_file is None):
        raise InvalidInput("give either PROMPT or --prompt-file", "prompt")
    if prompt_file is None:
        return prompt
    if not prompt_file.is_file():
        raise NotFound(f"{prompt_file}: no such file", "prompt_file")
    return read_texts([prompt_file])[0]


def generate(prompt: Annotated[str | None, typer.Argument(help="text to continue, or a question with --chat")]
             = None,
             prompt_file: Annotated[Path | None, typer.Option(help="read the prompt from this UTF-8 file instead")]
             = None,
             knn_memory: Annotated[str | None, typer.Option(help="kNN-LM datastore memory to decode with")] = None,
             cache: Annotated[str | None, typer.Option(help="bounded KV cache, e.g. 'window:256,sinks:4' or "
                                                             "'policy:h2o,budget:260' (default: full attention)")]
             = None,
             memory_attention: Annotated[bool, typer.Option(help="with --cache: what the cache evicts goes to an "
                                                                 "in-process memory every layer attends to (block "
                                                                 "memory by default, see bench/results/longctx.md)")]
             = False,
             memory_blocks: Annotated[int | None, typer.Option(help="with --memory-attention: memory in blocks of "
                                                                    "this many evicted tokens, retrieved whole "
                                                                    "(lm.blocks; default 32, per-token with "
                                                                    "--url); 0: per-token")] = None,
             retrieved_blocks: Annotated[int, typer.Option(help="block memory: blocks retrieved per group of 4 "
                                                                "queries, layer and KV head")] = 16,
             decode_blocks: Annotated[int | None, typer.Option(help="block memory: blocks a decoding step attends "
                                                                    "(default: --retrieved-blocks)")] = None,
             rep_keys: Annotated[int, typer.Option(help="block memory: keys ranking a block (means of equal runs "
                                                        "of its keys; must divide the block size); 0: every "
                                                        "key")] = 4,
             decode_search: Annotated[str, typer.Option(help="block memory, decoding: 'rerank' (a search at every "
                                                            "step by every key of the 192 best blocks by the "
                                                            "representative keys: finds a needle, bounded cost), "
                                                            "'exact' (every block by every key: cost grows with "
                                                            "the stream) or 'grouped' (one search per 4 steps by "
                                                            "the representative keys: cheapest, misses needles)")]
             = "rerank",
             positions: Annotated[str | None, typer.Option(help="with --memory-attention: where retrieved keys sit "
                                                                "(see memsvc eval-long --help)")] = None,
             sink_positions: SinkPositions = "kept",
             url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR, api_key: ApiKeyOption = None,
             memory: MemoryName = DEFAULT_MEMORY, session: SessionOption = None, end_session: EndSession = False,
             model: Model = "smollm2",
             max_new_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 128,
             temperature: Annotated[float, typer.Option(help="sampling temperature; 0 = greedy")] = 0.0,
             top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
             chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = True,
             seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
             lam: Lam = None, temp: Temp = None, k: K = None, device: DeviceOption = None) -> None:
    """Stream a continuation of PROMPT to stdout; with --knn-memory, decode with kNN-LM; with --cache, through a
    bounded KV cache (and --memory-attention: with the kNN memory of what it evicted).

    With --memory-attention and --url, that memory is a session on the server (memory --memory), kept when
    the run ends: its id goes to stderr, and `--session ID` from a later run goes on with its stream (every
    token the earlier runs took in searchable; the cache itself starts empty). `--end-session` ends it with
    this run; `memsvc session end ID` ends it later (its partitions are deleted). The server, the memory and
    the session are checked before the model loads."""
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                               "chat": chat, "seed": seed}
    with cli_errors(), ExitStack() as stack:
        from lm.cache_specs import parse_cache_options
        from lm.knn_config import KnnConfig, check_options, decode_search_options
        from lm.knn_params import check_sampling
        from lm.model_source import model_source
        from lm.sessions import check_memory_name
        from memsvc.contract import check_device

        text = read_prompt(prompt, prompt_file)  # the prompt file, --cache (its numbers too), --device before torch
        if cache is not None:
            parse_cache_options(cache)
        check_device(device)
        if knn_memory is not None:
            check_memory_name(knn_memory)
        if memory_attention and cache is None:
            raise InvalidInput("--memory-attention needs a bounded --cache", "memory_attention")
        if memory_blocks is None:  # the default memory; on a server only per-token memory
            blocks = 0 if memory_attention and url is not None else KnnConfig.blocks
        else:
            blocks = memory_blocks
        memory_config = KnnConfig(blocks=blocks, top_blocks=retrieved_blocks, positions=positions, rep_keys=rep_keys,
                                  decode_top_blocks=decode_blocks, sink_positions=sink_positions,
                                  **decode_search_options(decode_search))
        check_options(memory_config)  # torch-free
        if not memory_attention and (memory_blocks is not None or positions is not None or decode_search != "rerank"
                                     or decode_blocks is not None or sink_positions != "kept"):
            raise InvalidInput("--memory-blocks, --positions, --decode-search, --decode-blocks and --sink-positions "
                               "apply only to --memory-attention", "memory_blocks")
        if url is not None and knn_memory is not None:
            from memsvc.client import check_url

            check_url(url)
        if (session is not None or end_session) and not (memory_attention and url is not None):
            raise InvalidInput("--session and --end-session keep memory attention on a server: give "
                               "--memory-attention and its --url", "session")
        if memory_attention and url is not None and memory_blocks:
            raise InvalidInput("--url applies only to per-token memory (--memory-blocks 0); block memory lives in "
                               "RAM", "url")
        check_settings(lam, temp, k)
        check_sampling(max_new_tokens, temperature, top_p)
        need_model_side()
        where = None
        if memory_attention and url is not None:  # before torch: the server, the memory, the session
            where = open_server_session(url, api_key, memory, NEW if session is None else session, end_session,
                                        positions)
            stack.callback(where.client.close)
            if where.positions is not None:
                memory_config = dataclasses.replace(memory_config, positions=where.positions)
        model_source(model)  # the last check before torch
        from lm.devices import resolve_device  # torch, not yet transformers: a device this machine lacks

        resolve_device(device)
        from tqdm import tqdm

        from lm.attention import attach
        from lm.cache import BoundedCache
        from lm.generate import encode_prompt
        from lm.generate import generate as decode
        from lm.model import load_model
        from lm.policies import parse_cache_spec

        policy = parse_cache_spec(cache) if cache is not None else None
        knn = stack.enter_context(open_knnlm(knn_memory, url, data_dir, api_key, model, lam=lam, temp=temp, k=k,
                                             device=device)) \
            if knn_memory is not None else None
        model_, tokenizer = load_model(model, dtype=None, device=device) if knn is None \
            else (knn.model, knn.tokenizer)
        if policy is not None:
            options["cache"] = bounded = BoundedCache(model_, policy)
            remote = stack.enter_context(memory_on_server(model_, where, "flat")) if where is not None else None
            stack.enter_context(attach(model_, bounded, memory_config if memory_attention else None, remote,
                                       session=None if where is None else where.session,
                                       persist=where is not None and where.persist))
        pieces = decode(model_, tokenizer, text, **options) if knn is None \
            else knn.generate(text, lam=lam, temp=temp, k=k, **options)
        # a long --prompt-file takes a while before the first token: its prefill as a bar on stderr
        prefill = tqdm(total=encode_prompt(tokenizer, text, chat).shape[1], unit="tok", desc="prefill") \
            if prompt_file is not None else None
        for piece in pieces:
            if prefill is not None:
                prefill.update(prefill.total)
                prefill.close()
                prefill = None
            typer.echo(piece, nl=False)
        if prefill is not None:
            prefill.close()
    typer.echo()
