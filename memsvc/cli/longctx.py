"""`memsvc eval-long` and `memsvc train-gate`: plain typer command functions, wired into `memsvc.cli.commands`.

torch and transformers are imported inside the commands; missing files and bad options fail with a one-line
message and exit status 2 before torch is imported (the policies' numbers and the --device name too); whether the
budget fits the model's trained context and whether this machine has the --device, before the model is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from memsvc.cli.options import (
    ApiKeyOption,
    DeviceOption,
    Model,
    SinkPositions,
    Url,
    check_text_files,
    cli_errors,
    need_model_side,
)
from memsvc.cli.sessions import (
    DEFAULT_MEMORY,
    EndSession,
    MemoryName,
    ServerSession,
    SessionOption,
    memory_on_server,
    open_server_session,
)
from memsvc.contract import InvalidInput, NotFound

if TYPE_CHECKING:
    from lm.memory_attention import KnnConfig
    from lm.policies import Policy, Selective

Files = Annotated[list[Path], typer.Argument(help="UTF-8 text files, each evaluated as one stream")]
WindowOption = Annotated[int | None, typer.Option(help="recent tokens every policy keeps (default: the policy's)")]
Sinks = Annotated[int | None, typer.Option(help="first tokens kept for good (default 4 where a policy has them)")]
Budget = Annotated[int | None, typer.Option(help="entries a query attends to at most (default 260; not for "
                                                 "full, window, sinks)")]
Pool = Annotated[int | None, typer.Option(help="tokens per summary (moving-average, compressive)")]
K = Annotated[int, typer.Option("--k", help="memory entries retrieved per query and layer")]
Layers = Annotated[str, typer.Option(help="layers with memory attention: 'all' or e.g. '0,10,20'")]
Positions = Annotated[str | None,
                      typer.Option(help="where retrieved keys sit. Per-token: absolute (stream index), none "
                                        "(distance 0), window (just past the window); default absolute. Block "
                                        "memory: ordered (in stream order just beyond the window), hybrid (exact "
                                        "inside the trained range, beyond it at its edge), absolute; default "
                                        "ordered")]
MemoryBlocks = Annotated[int | None, typer.Option(help="kNN memory in blocks of this many evicted tokens, retrieved "
                                                       "whole (lm.blocks); 0: per-token retrieval. Default 32; "
                                                       "per-token (0) with --url (only per-token memory takes it), "
                                                       "--memory-mode gated or --gate (block memory's trained bias: "
                                                       "give --memory-blocks 32 with them)")]
RetrievedBlocks = Annotated[int, typer.Option(help="block memory: blocks retrieved per group of 4 queries, layer and "
                                                   "KV head")]
RepKeys = Annotated[int, typer.Option(help="block memory: keys ranking a block (means of equal runs of its keys; "
                                           "must divide the block size); 0: every key")]


def parse_layers(layers: str) -> list[int] | None:
    """'all' -> None (every layer), '0,10,20' -> [0, 10, 20]."""
    if layers.strip() == "all":
        return None
    try:
        return [int(x) for x in layers.split(",")]
    except ValueError:
        raise InvalidInput(f"layers must be 'all' or comma-separated integers, got {layers!r}", "layers") from None


def eval_long(files: Files,
              policy: Annotated[str, typer.Option(help="cache policy, e.g. sinks, h2o, snapkv (lm.policies.POLICIES; "
                                                       "an unknown name lists them all)")] = "sinks",
              window: WindowOption = None, sinks: Sinks = None, budget: Budget = None, pool: Pool = None,
              knn_memory: Annotated[bool, typer.Option(help="evicted entries go to a kNN memory that "
                                                             "attention retrieves from")] = False,
              memory_mode: Annotated[Literal["joint", "gated"], typer.Option(help="how memory joins attention")]
              = "joint",
              k: K = 32, layers: Layers = "all", positions: Positions = None, memory_blocks: MemoryBlocks = None,
              retrieved_blocks: RetrievedBlocks = 16, rep_keys: RepKeys = 4, sink_positions: SinkPositions = "kept",
              index: Annotated[Literal["flat", "hnsw"], typer.Option(help="memory index: exact or HNSW")] = "flat",
              gate: Annotated[Path | None, typer.Option(help="gate parameters for --memory-mode gated: per-token "
                                                              "memory's gate, or with --memory-blocks B > 0 block "
                                                              "memory's per-head bias (default: the shipped ones "
                                                              "for smollm2)")] = None,
              max_tokens: Annotated[int | None, typer.Option(help="evaluate at most this many tokens per file")]
              = None,
              skip: Annotated[int, typer.Option(help="perplexity counts tokens past the first SKIP")] = 256,
              url: Url = None, api_key: ApiKeyOption = None, memory: MemoryName = DEFAULT_MEMORY,
              session: SessionOption = None, end_session: EndSession = False, model: Model = "smollm2",
              as_json: Annotated[bool, typer.Option("--json", help="print one JSON object, nothing else")] = False,
              device: DeviceOption = None) -> None:
    """Perplexity of long FILES decoded as streams through a bounded cache (token-by-token semantics).

    With --url the kNN memory is on that server: by default for this run only; `--session new` keeps it
    (one file: its stream), `--session ID` goes on with a kept session's stream (see `memsvc generate`).
    Files, options, the server and the session are checked before torch is imported and the model loads;
    progress (tokens, tok/s) goes to stderr."""
    with cli_errors():
        from lm.cache_specs import check_lengths, policy_options
        from lm.knn_config import KnnConfig, check_options
        from lm.model_source import model_source
        from memsvc.contract import check_device

        check_text_files(files)
        policy_options(policy, window, sinks, budget, pool)  # the names and the numbers
        check_device(device)
        if knn_memory and policy == "full":
            raise InvalidInput("kNN-memory attention needs a bounded cache policy (any but full)", "policy")
        if url is not None and not knn_memory:
            raise InvalidInput("--url applies only to --knn-memory", "url")
        if gate is not None and not (knn_memory and memory_mode == "gated"):
            raise InvalidInput("--gate applies only to --knn-memory --memory-mode gated", "gate")
        if gate is not None and not gate.is_file():
            raise NotFound(f"{gate}: no such file", "gate")
        check_lengths(max_tokens, skip)
        layer_list = parse_layers(layers)
        if memory_blocks is None:  # the default memory, unless an option that only per-token memory takes
            memory_blocks = 0 if url is not None or memory_mode == "gated" or gate is not None else KnnConfig.blocks
        knn = KnnConfig(layers=layer_list, k=k, mode=memory_mode, positions=positions, blocks=memory_blocks,
                        top_blocks=retrieved_blocks, rep_keys=rep_keys, sink_positions=sink_positions)
        check_options(knn)  # torch-free
        if knn_memory and knn.blocks and url is not None:
            raise InvalidInput("--url applies only to per-token memory (--memory-blocks 0); block memory lives in "
                               "RAM", "url")
        if (session is not None or end_session) and url is None:
            raise InvalidInput("--session and --end-session keep memory attention on a server: give its --url",
                               "session")
        if session is not None and len(files) != 1:
            raise InvalidInput(f"a session is one stream: give one file with --session, not {len(files)}", "files")
        need_model_side()
        with ExitStack() as stack:
            where = None
            if url is not None:
                where = open_server_session(url, api_key, memory, session, end_session, positions)
                stack.callback(where.client.close)
                if where.positions is not None:
                    knn = dataclasses.replace(knn, positions=where.positions)
            model_source(model)  # the last check before torch
            from lm.devices import resolve_device  # torch from here on (transformers: after the device)

            resolve_device(device)
            from lm.policies import make_policy

            cache_policy = make_policy(policy, window, sinks, budget, pool)
            knn = knn if knn_memory else None
            result = _eval(files, cache_policy, knn, gate, index, max_tokens, skip, where, model, device)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    typer.echo(f"{policy}: perplexity {result['perplexity']:.3f} over {result['tokens']} tokens, peak cache "
               f"{result['peak_cache_entries']} entries, {result['tokens_per_s']:.1f} tokens/s")


def _eval(files: list[Path], policy: Policy | Selective, knn: KnnConfig | None, gate_path: Path | None, index: str,
          max_tokens: int | None, skip: int, where: ServerSession | None, model_name: str,
          device: str | None = None) -> dict:
    from lm.gate import Gate, MemoryBias
    from lm.longeval import evaluate_files
    from lm.model import load_model

    gate = None
    if knn is not None and knn.mode == "gated":
        gate = (MemoryBias if knn.blocks else Gate).load(gate_path if gate_path is not None else model_name)
    model, tokenizer = load_model(model_name, dtype=None, device=device)
    if knn is None:
        result = evaluate_files(model, tokenizer, files, policy, max_tokens=max_tokens, skip=skip, progress=True)
    else:
        from lm.memory_attention import session_memory

        in_process = None if knn.blocks else session_memory(model, index)  # block memory: RAM tensors of its own
        with memory_on_server(model, where, index) if where is not None else nullcontext(in_process) as memory:
            result = evaluate_files(model, tokenizer, files, policy, knn=knn, memory=memory, gate=gate,
                                    max_tokens=max_tokens, skip=skip, progress=True,
                                    session=None if where is None else where.session,
                                    persist=where is not None and where.persist)
    return {**result, "policy": policy.name, "budget": policy.budget, "window": getattr(policy, "window", None),
            "sinks": getattr(policy, "sinks", None), "pool": getattr(policy, "pool", None),
            "knn_memory": None if knn is None else {"mode": knn.mode, "k": knn.k, "positions": knn.positions,
                                                    "layers": "all" if knn.layers is None else list(knn.layers),
                                                    "index": index, "blocks": knn.blocks,
                                                    "retrieved_blocks": knn.top_blocks, "rep_keys": knn.rep_keys,
                                                    "sink_positions": knn.sink_positions}}


def train_gate(files: Annotated[list[Path], typer.Argument(help="long UTF-8 training documents")],
               out: Annotated[Path, typer.Option(help="where to write the gate parameters (JSON)")],
               epochs: Annotated[int, typer.Option(help="passes over the documents")] = 3,
               window: Annotated[int, typer.Option(help="recent tokens each query sees")] = 256,
               sinks: Annotated[int, typer.Option(help="sink tokens")] = 4,
               k: K = 32, positions: Positions = None,
               memory_blocks: Annotated[int, typer.Option(help="0: per-token memory's gate (lm.gate.Gate, --k); "
                                                               "B > 0: block memory's per-head bias on the "
                                                               "retrieved logits (lm.gate.MemoryBias, starts at 0 = "
                                                               "joint), blocks of B, the default block memory "
                                                               "otherwise")] = 0,
               lr: Annotated[float, typer.Option(help="Adam learning rate")] = 0.1,
               max_tokens: Annotated[int | None, typer.Option(help="use at most this many tokens per file")] = None,
               curve: Annotated[Path | None, typer.Option(help="also write the training curve (PNG)")] = None,
               model: Model = "smollm2", device: DeviceOption = None) -> None:
    """Train the memory gate (model frozen) on long FILES and write its parameters to OUT (progress: one bar
    of steps with the loss, on stderr)."""
    with cli_errors():
        from lm.cache_specs import check_lengths
        from lm.knn_config import KnnConfig, check_options
        from lm.model_source import model_source
        from memsvc.contract import check_device

        check_text_files(files)
        if memory_blocks and k != KnnConfig.k:
            raise InvalidInput("--k applies only to per-token memory (--memory-blocks 0); block memory retrieves "
                               "whole blocks", "k")
        check_options(KnnConfig(blocks=memory_blocks, k=k, mode="gated", positions=positions))
        check_lengths(max_tokens, 0)  # a document of fewer than 2 tokens trains nothing
        check_device(device)
        model_source(model)
        if epochs <= 0 or lr <= 0:
            raise InvalidInput("epochs and lr must be positive", "epochs" if epochs <= 0 else "lr")
        if window <= 0:
            raise InvalidInput(f"window must be a positive integer, got {window}", "window")
        if not 0 <= sinks <= window:
            raise InvalidInput(f"sinks ({sinks}) must be >= 0 and must not exceed the window ({window})", "sinks")
        if not out.parent.is_dir():
            raise NotFound(f"{out.parent}: no such directory for --out", "out")
        need_model_side()
        from lm.devices import resolve_device  # torch from here on (transformers: after the device)

        resolve_device(device)
        from tqdm import tqdm

        from lm.gate_training import plot_curve
        from lm.gate_training import train_gate as fit
        from lm.longeval import read_tokens
        from lm.model import load_model

        model_, tokenizer = load_model(model, dtype=None, device=device)
        documents = [read_tokens(tokenizer, f, max_tokens) for f in files]
        with tqdm(unit="step", desc="train-gate") as bar:
            def step(p: dict[str, float]) -> None:
                bar.set_postfix(epoch=int(p["epoch"]), loss=f"{p['loss']:.4f}", refresh=False)
                bar.update()

            gate, points = fit(model_, documents, window=window, sinks=sinks, k=k, positions=positions,
                               epochs=epochs, lr=lr, memory_blocks=memory_blocks, on_step=step)
        gate.meta.update({"model": model, "files": [f.name for f in files], "curve": points})
        gate.save(out)
        if curve is not None:
            plot_curve(points, curve)
    typer.echo(f"wrote {out} (mean loss per epoch: {', '.join(f'{x:.4f}' for x in gate.meta['epoch_loss'])})")
