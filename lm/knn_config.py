"""What a kNN-memory attention session is asked to do (`KnnConfig`), checked without torch or a model.

`check_options` validates everything that needs no model, so a command line can refuse bad options
before torch or the model loads; `lm.memory_attention.check_config` adds the checks against the model
and cache (layer indices, the trained range).

Two memories share this config; the default is block memory, blocks of 32 tokens, 16 retrieved per group of
4 queries, each block ranked by 4 representative keys, ordered positions (bench/results/longctx.md section 9:
94% of the window+sinks -> full perplexity gap at 3K tokens, positions inside the trained range at any length);
in decoding a search at every step ranking by every key the 192 best blocks by the representative keys (section 11:
the passcode needle at 4 of 5 depths at 16K and 3 of 5 at 32K, against 3 and 2 when every block is ranked by every
key, section 10, and 0 of 5 at 16K when a search served 4 steps by the representative keys):
- per-token (`blocks` = 0, `lm.memory_attention.KnnMemoryAttention`): each query retrieves its top-`k`
  entries from a `MemoryBackend`; positions "absolute", "none" or "window";
- block memory (`blocks` = B > 0, `lm.blocks.BlockMemoryAttention`): evicted entries grouped into
  contiguous blocks of B tokens; each block of queries retrieves its `top_blocks` best blocks whole
  (ranked by `representative`: "max" = the best query-key score over all the block's keys, "mean" = the
  score of the block's mean key; with `rep_keys` R > 0, "max" scores each block by R representative keys
  ("mean" ignores R),
  the means of its R runs of B / R consecutive keys, so a search costs N / (B / R) products instead of N;
  every `query_group` queries of a forward retrieve anew, 0: once; in decoding every `decode_group` steps, by
  default `query_group`, and with `decode_every_key` those searches rank by every key, with `decode_candidates`
  C > 0 only the C best blocks by the representative keys, and attend `decode_top_blocks` blocks, by default
  `top_blocks`); positions "ordered" (InfLLM's fixed distance: retrieved blocks in
  stream order, contiguous, just beyond the local window), "hybrid" (exact while the true distance is
  inside the trained range, the farther ones at the range's far edge) or "absolute" (true distances,
  unbounded: for comparison); the sinks' positions (`sink_positions`) "kept" where the cache keeps them (after a
  re-base 0..n-1, so that a long retrieved run may sit below them) or "below" the retrieved run, as in the stream
  (every block retrieved is then full attention; section 19: 95.2% of the 3K perplexity gap against 94.2%, but 4 of
  the 60 needle prompts at 3K-16K lost and none gained with the default 16 blocks, so "kept" stays the default).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from memsvc.contract import InvalidInput, check_k

Mode = Literal["joint", "gated"]
Positions = Literal["absolute", "none", "window", "ordered", "hybrid"]
Representative = Literal["max", "mean"]
Precision = Literal["float16", "float32"]
SinkPositions = Literal["kept", "below"]

MODES = ("joint", "gated")
TOKEN_POSITIONS = ("absolute", "none", "window")  # per-token retrieval
BLOCK_POSITIONS = ("ordered", "hybrid", "absolute")  # block memory
POSITIONS = ("absolute", "none", "window", "ordered", "hybrid")
REPRESENTATIVES = ("max", "mean")
PRECISIONS = ("float16", "float32")
SINK_POSITIONS = ("kept", "below")
# block memory's decoding searches by name (`memsvc generate --decode-search`): (decode_group, decode_every_key,
# decode_candidates). "rerank" (the default): a search at every step ranking the 192 best blocks by the
# representative keys again by every key (section 11: the needle at depths 0.3-0.9 of 16K, 0.3-0.7 of 32K; the exact
# part reads 192 x 32 keys whatever the stream, only the rep-key stage grows, N / 8 keys; not <= 1.3x window + sinks);
# "exact": every block by every key (section 10: the 16K needle at 3/5 depths; its cost grows with the stream);
# "grouped": one search per 4 steps by the representative keys (sections 9f, 10f: flat cost, 1.17-1.33x window +
# sinks from 1K to 32K alone on the machine; the 16K needle at 0/5).
# block memory's options and their CLI flags: per-token memory refuses them set off their defaults
BLOCK_ONLY = {"top_blocks": "--retrieved-blocks", "rep_keys": "--rep-keys", "decode_group": "--decode-search",
              "decode_every_key": "--decode-search", "decode_candidates": "--decode-search",
              "decode_top_blocks": "--decode-blocks", "sink_positions": "--sink-positions"}
DECODE_CANDIDATES = 192  # the default decoding search's candidates ("rerank"; section 11)
DECODE_SEARCHES: dict[str, tuple[int | None, bool, int]] = {"exact": (1, True, 0),
                                                            "rerank": (1, True, DECODE_CANDIDATES),
                                                            "grouped": (None, False, 0)}


@dataclass(frozen=True)
class KnnConfig:
    """Which layers retrieve, how much, how it combines, and how retrieved keys are positioned (see above)."""

    layers: Sequence[int] | None = None  # None: every layer
    k: int = 32  # per-token retrieval (blocks = 0): entries per query
    mode: Mode = "joint"
    positions: Positions | None = None  # None: "absolute" for per-token retrieval, "ordered" for block memory
    blocks: int = 32  # tokens per memory block; 0: per-token retrieval
    top_blocks: int = 16  # block memory: blocks retrieved per group of queries, per layer and KV head
    representative: Representative = "max"  # block memory: how a block is ranked
    precision: Precision = "float16"  # block memory: dtype of the stored keys and values
    query_group: int = 4  # block memory: queries of a forward that share one retrieval; 0: the whole forward
    rep_keys: int = 4  # block memory, "max": keys representing a block (means of equal runs); 0: every key
    decode_group: int | None = 1  # block memory: decoding steps sharing one search (0 or 1: every step); None: query_group
    decode_every_key: bool = True  # block memory, "max": decoding searches rank blocks by every key, not by rep_keys
    decode_candidates: int = DECODE_CANDIDATES  # with decode_every_key and rep_keys: only the C best blocks by
    # rep_keys are ranked by every key (a two-stage search of fixed exact cost; section 11); 0: every block; else at
    # least top_blocks (and decode_top_blocks)
    decode_top_blocks: int | None = None  # block memory: blocks a decoding search attends; None: top_blocks
    sink_positions: SinkPositions = "kept"  # block memory: the sinks where the cache keeps them, or below memory

    def __post_init__(self) -> None:
        if self.positions is None:
            blocks = _whole(self.blocks) and self.blocks > 0
            object.__setattr__(self, "positions", "ordered" if blocks else "absolute")


def check_options(config: KnnConfig) -> None:
    """InvalidInput (with the option's field) for any option that is bad whatever the model; None if all are fine."""
    check_k(config.k)
    if config.layers is not None:
        if isinstance(config.layers, str | bytes) or not isinstance(config.layers, Sequence) or not config.layers:
            raise InvalidInput("give at least one layer for kNN-memory attention", "layers")
        bad = [layer for layer in config.layers if not _whole(layer) or layer < 0]
        if bad:
            raise InvalidInput(f"unknown layer index {bad[0]!r}: layer indices are integers from 0", "layers")
    if config.mode not in MODES:
        raise InvalidInput(f"memory mode must be 'joint' or 'gated', got {config.mode!r}", "memory_mode")
    if config.positions not in POSITIONS:
        raise InvalidInput(f"positions must be one of {', '.join(POSITIONS)}; got {config.positions!r}", "positions")
    if not _whole(config.blocks) or config.blocks < 0:
        raise InvalidInput(f"memory blocks must be a positive number of tokens (0: per-token retrieval), got "
                           f"{config.blocks!r}", "memory_blocks")
    if config.blocks == 0:
        if config.positions not in TOKEN_POSITIONS:
            raise InvalidInput(f"positions {config.positions!r} need block memory (memory blocks > 0); per-token "
                               f"retrieval takes {', '.join(TOKEN_POSITIONS)}", "positions")
        changed = [name for name in BLOCK_ONLY if getattr(config, name) != KnnConfig.__dataclass_fields__[name].default]
        if changed:  # a block option given to per-token memory would do nothing
            raise InvalidInput(f"{changed[0]} ({BLOCK_ONLY[changed[0]]}) applies only to block memory (memory blocks "
                               f"> 0); per-token retrieval takes k", changed[0])
        return
    if config.positions not in BLOCK_POSITIONS:
        raise InvalidInput(f"block memory takes positions {', '.join(BLOCK_POSITIONS)}; got {config.positions!r}",
                           "positions")
    if not _whole(config.top_blocks) or config.top_blocks <= 0:
        raise InvalidInput(f"retrieved blocks must be a positive integer, got {config.top_blocks!r}", "top_blocks")
    if config.representative not in REPRESENTATIVES:
        raise InvalidInput(f"block representative must be 'max' or 'mean', got {config.representative!r}",
                           "representative")
    if not _whole(config.query_group) or config.query_group < 0:
        raise InvalidInput(f"query group must be a non-negative integer (0: the whole forward), got "
                           f"{config.query_group!r}", "query_group")
    if not _whole(config.rep_keys) or config.rep_keys < 0 or (config.rep_keys and config.blocks % config.rep_keys):
        raise InvalidInput(f"representative keys per block must be 0 (every key) or divide the block size "
                           f"({config.blocks}), got {config.rep_keys!r}", "rep_keys")
    if config.decode_group is not None and (not _whole(config.decode_group) or config.decode_group < 0):
        raise InvalidInput(f"decode group must be a non-negative integer (0 or 1: a search at every decoding step), "
                           f"got {config.decode_group!r}", "decode_group")
    if not isinstance(config.decode_every_key, bool):
        raise InvalidInput(f"decode every key must be true or false, got {config.decode_every_key!r}",
                           "decode_every_key")
    if config.decode_top_blocks is not None and (not _whole(config.decode_top_blocks) or config.decode_top_blocks <= 0):
        raise InvalidInput(f"decoding's retrieved blocks must be a positive integer, got {config.decode_top_blocks!r}",
                           "decode_top_blocks")
    most = most_blocks(config)
    if not _whole(config.decode_candidates) or config.decode_candidates < 0 or 0 < config.decode_candidates < most:
        raise InvalidInput(f"decode candidates must be 0 (every block) or at least the retrieved blocks "
                           f"({most}), got {config.decode_candidates!r}", "decode_candidates")
    if config.sink_positions not in SINK_POSITIONS:
        raise InvalidInput(f"sink positions must be 'kept' or 'below', got {config.sink_positions!r}",
                           "sink_positions")
    if config.precision not in PRECISIONS:
        raise InvalidInput(f"block memory precision must be 'float16' or 'float32', got {config.precision!r}",
                           "precision")


def most_blocks(config: KnnConfig) -> int:
    """The most blocks one search retrieves: `top_blocks`, or `decode_top_blocks` in decoding if that is more."""
    return max(config.top_blocks, config.decode_top_blocks or 0)


def decode_search_options(name: str) -> dict[str, int | bool | None]:
    """The `KnnConfig` fields (decode_group, decode_every_key, decode_candidates) of a decoding search named in
    `DECODE_SEARCHES`; InvalidInput (field "decode_search") for another name. Torch-free, so the CLI checks it before
    the model loads."""
    if name not in DECODE_SEARCHES:
        raise InvalidInput(f"decode search must be one of {', '.join(DECODE_SEARCHES)}, got {name!r}", "decode_search")
    group, every_key, candidates = DECODE_SEARCHES[name]
    return {"decode_group": group, "decode_every_key": every_key, "decode_candidates": candidates}


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
