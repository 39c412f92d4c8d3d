"""Fixed-size KV cache policies beyond window/sinks, every name registered here (`make_policy`, `POLICIES`).

`window` and `sinks` are rules on token indices (`lm.cache.Window`). The policies here are stateful and
content-dependent: after each forward, a layer (`SelectiveLayer`) holds entries that are stream tokens or
summaries of several, and before the next forward of q tokens the policy brings them down to exactly
`budget - q` (`compact`), so that no query ever attends to more than `budget` entries, the q new ones
included. Every stream token a policy drops, or folds into a summary, goes to the cache's `on_evict` as
its pre-RoPE key and value (so `--knn-memory` keeps it searchable); a summary that is dropped goes
nowhere, its tokens having left when they were folded.

Blocks: `lm.cache.stream` runs these policies in blocks of at most `period` tokens (default 16). Before a
block of q the layer shrinks to budget - q: the block's first query sees budget - q + 1 entries, its last
the full budget, and scores (attention, norms) are those of the entries when the block starts. A block
of 1 is exact token-by-token decoding; larger blocks are what token-by-token decoding would give if the
policy only ran every q tokens. `peak_cache_entries` is the most entries any query attended to.

Positions: kept entries, summaries included, are ordered by stream index (a summary by the newest token
it absorbed, so it sits between the sinks and the recent tokens) and re-rotated to consecutive positions
that end just below the next token's, as StreamingLLM does on each shift; keys are summarized and scored
un-rotated (pre-RoPE). Positions never exceed the model's trained context.

Selection is per layer: scores are summed over a layer's query heads and one set of entries is kept for
all of them (rectangular tensors, simple eviction). kvpress selects per head; `adaptive` restricts single
heads to subsets of the shared, budget-bounded set with a per-head mask.

Attention weights: `h2o`, `vatp`, `snapkv` and `adaptive` need them. `lm.attention.attach(model, cache)`
makes the layers compute attention explicitly and report the probabilities to the cache layer (only for
those policies); kNN-memory attention (`lm.memory_attention`) reports its local probabilities the same way.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from transformers.cache_utils import CacheLayerMixin

from lm.cache import DEFAULT_SINKS, DEFAULT_WINDOW, BoundedCache, Full, Policy, Window
from memsvc.contract import InvalidInput

DEFAULT_BUDGET = 260  # window 256 + 4 sinks: the budget of the default `sinks` policy
DEFAULT_BLOCK = 16  # tokens per forward of a stream under these policies


@dataclass(frozen=True)
class Entries:
    """One layer's entries during a compaction, in stream order, keys un-rotated (pre-RoPE)."""

    keys: torch.Tensor  # [1, kv heads, n, head_dim]
    values: torch.Tensor  # [1, kv heads, n, head_dim]
    tokens: torch.Tensor  # [n] stream index; a summary: the newest token it absorbed
    raw: torch.Tensor  # [n] bool: a stream token (False: a summary)
    count: torch.Tensor  # [n] stream tokens an entry stands for
    scores: torch.Tensor  # [query heads, n] attention received so far (zeros unless the policy needs it)
    pinned: torch.Tensor  # [n] bool: chosen at the last prefill selection (snapkv)

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index: torch.Tensor) -> Entries:
        return Entries(self.keys[..., index, :], self.values[..., index, :], self.tokens[index], self.raw[index],
                       self.count[index], self.scores[:, index], self.pinned[index])

    def cat(self, other: Entries) -> Entries:
        """Both sets, sorted by stream index."""
        both = Entries(*(torch.cat([getattr(self, f.name), getattr(other, f.name)], -2 if f.name in ("keys", "values")
                                   else -1) for f in fields(Entries)))
        return both.take(both.tokens.argsort(stable=True))


@dataclass(frozen=True)
class Selective:
    """A fixed-size policy with a budget of entries (the query included); subclasses choose what stays."""

    budget: int = DEFAULT_BUDGET
    sinks: int = 0  # the stream's first tokens, never dropped
    window: int = 0  # the most recent tokens, never dropped (what else it means: see each policy)
    pool: int = 0  # tokens per summary (merging policies)

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]  # what `make_policy` (and the CLI) may set
    needs_attention: ClassVar[bool] = False
    layer_type: ClassVar[type]  # set below to SelectiveLayer

    def __post_init__(self) -> None:
        for option in ("budget", "sinks", "window", "pool"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"{option} must be a non-negative integer, got {value!r}", option)
        if self.budget < self.sinks + 1:
            raise InvalidInput(f"budget ({self.budget}) must be at least sinks + 1 ({self.sinks + 1})", "budget")
        self.check()

    def check(self) -> None:
        """Option constraints of this policy (InvalidInput)."""

    @property
    def min_kept(self) -> int:
        """The fewest entries a compaction may be asked to keep: a block is at most budget - min_kept tokens."""
        return self.sinks + 1

    def compact(self, layer: SelectiveLayer, e: Entries, capacity: int) -> tuple[Entries, torch.Tensor]:
        """(exactly `capacity` entries to keep, indices into e of the stream tokens that leave)."""
        raise NotImplementedError

    def head_mask(self, layer: SelectiveLayer, q: int) -> torch.Tensor | None:
        """Bool [query heads, n] over the layer's view; None: every head sees all of it."""
        return None


def _check_window(policy: Selective) -> None:
    if policy.window + policy.sinks >= policy.budget:
        raise InvalidInput(f"window + sinks ({policy.window + policy.sinks}) must be below the budget "
                           f"({policy.budget})", "window")


@dataclass(frozen=True)
class Ranked(Selective):
    """Keep the sinks, the last `window` entries and the best-scored others (`score`), up to the capacity."""

    def check(self) -> None:
        _check_window(self)

    def score(self, layer: SelectiveLayer, e: Entries) -> torch.Tensor:
        """[n]: higher stays."""
        raise NotImplementedError

    def compact(self, layer: SelectiveLayer, e: Entries, capacity: int) -> tuple[Entries, torch.Tensor]:
        protected = e.raw & (e.tokens < self.sinks)
        recent = min(self.window, capacity - int(protected.sum()))
        if recent > 0:
            protected[-recent:] = True
        score = self.score(layer, e).float().masked_fill(protected, torch.inf)
        keep = torch.zeros(len(e), dtype=torch.bool, device=score.device)
        keep[score.topk(capacity).indices] = True
        return e.take(keep.nonzero().squeeze(1)), (~keep & e.raw).nonzero().squeeze(1)


@dataclass(frozen=True)
class HeavyHitters(Ranked):
    """h2o (H2O): the entries with the most attention accumulated since they entered, plus the recent window."""

    name = "h2o"
    options = ("budget", "window")
    needs_attention = True
    window: int = 128

    def score(self, layer: SelectiveLayer, e: Entries) -> torch.Tensor:
        return e.scores.sum(0)


@dataclass(frozen=True)
class ValueAware(Ranked):
    """vatp: accumulated attention x the value's L1 norm (per query head, summed), plus sinks and window."""

    name = "vatp"
    options = ("budget", "sinks", "window")
    needs_attention = True
    sinks: int = DEFAULT_SINKS
    window: int = 128

    def score(self, layer: SelectiveLayer, e: Entries) -> torch.Tensor:
        kv, n = e.values.shape[1], len(e)
        norms = e.values[0].abs().sum(-1).float()  # [kv, n]
        return (e.scores.view(kv, -1, n) * norms[:, None]).sum((0, 1))


@dataclass(frozen=True)
class KeyNorm(Ranked):
    """knorm: the keys with the lowest L2 norm (mean over KV heads; RoPE keeps norms), plus the recent window."""

    name = "knorm"
    options = ("budget", "window")
    window: int = 128

    def score(self, layer: SelectiveLayer, e: Entries) -> torch.Tensor:
        return -e.keys[0].float().norm(dim=-1).mean(0)


@dataclass(frozen=True)
class SnapKV(Ranked):
    """snapkv: after a prompt block, the block's last `window` queries (the observation window) vote with their
    attention, pooled over neighbouring tokens (kernel 7); the top-voted entries are pinned, the recent
    window stays. After a decoding step (a forward of 1 token) nothing is voted: the pinned entries stay
    and the others slide as a window."""

    name = "snapkv"
    options = ("budget", "window")
    needs_attention = True
    window: int = 32
    kernel: ClassVar[int] = 7

    def check(self) -> None:
        super().check()
        if self.window < 1:
            raise InvalidInput(f"window (the observation window) must be a positive integer, got {self.window}",
                               "window")

    def score(self, layer: SelectiveLayer, e: Entries) -> torch.Tensor:
        if self.prefill(layer):
            votes = layer.observed[:, -self.window:].sum((0, 1)).float()
            return torch.nn.functional.avg_pool1d(votes[None, None], self.kernel, 1, self.kernel // 2,
                                                  count_include_pad=False)[0, 0]
        return e.tokens.float().masked_fill(e.pinned, torch.inf)

    def prefill(self, layer: SelectiveLayer) -> bool:
        return layer.observed is not None and layer.observed.shape[1] > 1

    def compact(self, layer: SelectiveLayer, e: Entries, capacity: int) -> tuple[Entries, torch.Tensor]:
        prefill = self.prefill(layer)
        kept, gone = super().compact(layer, e, capacity)
        if prefill:
            pinned = torch.ones(len(kept), dtype=torch.bool, device=kept.tokens.device)
            pinned[len(kept) - min(self.window, len(kept)):] = False
            kept = Entries(kept.keys, kept.values, kept.tokens, kept.raw, kept.count, kept.scores, pinned)
        return kept, gone


MODES = ("special", "local", "frequency", "full")


@dataclass(frozen=True)
class Adaptive(Ranked):
    """adaptive (FastGen): the shared set is sinks + recent window + heavy hitters (as h2o) within the budget;
    at the first compaction (the prompt reaching the budget) each query head is profiled on the last block's
    attention and gets the first of MODES that recovers `recovery` of its attention mass: special (the sinks),
    local (sinks + the last `window` entries), frequency (sinks + its own `window` heaviest entries) or full
    (the whole shared set). A head then attends only to its mode's entries (and the block's new tokens)."""

    name = "adaptive"
    options = ("budget", "sinks", "window")
    needs_attention = True
    sinks: int = DEFAULT_SINKS
    window: int = 64
    recovery: ClassVar[float] = 0.95

    def score(self, layer: SelectiveLayer, e: Entries) -> torch.Tensor:
        return e.scores.sum(0)

    def compact(self, layer: SelectiveLayer, e: Entries, capacity: int) -> tuple[Entries, torch.Tensor]:
        if layer.modes is None and layer.observed is not None:
            layer.modes = self.profile(e, layer.observed)
        return super().compact(layer, e, capacity)

    def candidates(self, tokens: torch.Tensor, raw: torch.Tensor, scores: torch.Tensor, q: int) -> torch.Tensor:
        """Bool [len(MODES), heads, n]: what each mode lets each head see, the last q entries being the block's."""
        heads, n = scores.shape
        index = torch.arange(n, device=tokens.device)
        old = n - q
        sinks = (raw & (tokens < self.sinks)) | (index >= old)
        local = sinks | (index >= old - self.window)
        frequency = sinks[None].repeat(heads, 1)
        if old > 0:
            top = scores[:, :old].topk(min(self.window, old), dim=-1).indices
            frequency.scatter_(1, top, True)
        return torch.stack([sinks.expand(heads, n), local.expand(heads, n), frequency,
                            torch.ones(heads, n, dtype=torch.bool, device=tokens.device)])

    def profile(self, e: Entries, observed: torch.Tensor) -> torch.Tensor:
        """Each head's mode [heads]: the cheapest that recovers `recovery` of its observed attention mass."""
        mass = observed.sum(1).float()  # [heads, n]
        masks = self.candidates(e.tokens, e.raw, e.scores, observed.shape[1])
        recovered = (masks * mass).sum(-1) / mass.sum(-1).clamp_min(1e-9)  # [modes, heads]
        recovered[-1] = 1.0
        return (recovered >= self.recovery).float().argmax(0)

    def head_mask(self, layer: SelectiveLayer, q: int) -> torch.Tensor | None:
        if layer.modes is None:
            return None
        masks = self.candidates(layer.tokens, layer.raw, layer.scores, q)
        return masks[layer.modes, torch.arange(len(layer.modes))]


@dataclass(frozen=True)
class Merging(Selective):
    """Summaries: the oldest non-sink tokens are folded into the newest summary until it stands for `pool` tokens,
    then a new one opens; beyond `slots` summaries the two oldest merge (overflow "merge") or the oldest is
    dropped ("drop"). A summary's key and value are a weighted mean of what it absorbed (`weights`)."""

    overflow: ClassVar[str] = "merge"

    def check(self) -> None:
        if self.pool < 1:
            raise InvalidInput(f"pool must be a positive integer, got {self.pool}", "pool")
        if "window" in self.options and self.window < 1:
            raise InvalidInput(f"window must be a positive integer, got {self.window}", "window")
        if self.slots < 1:
            _check_window(self)

    @property
    def slots(self) -> int:
        """How many summaries the cache holds at most."""
        return self.budget - self.sinks - self.window

    @property
    def min_kept(self) -> int:
        return self.sinks + self.slots

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        """Weights [m] of a group's members (oldest first, each standing for counts[i] tokens): their mean."""
        return counts / counts.sum()

    def compact(self, layer: SelectiveLayer, e: Entries, capacity: int) -> tuple[Entries, torch.Tensor]:
        sinks = e.raw & (e.tokens < self.sinks)
        counts = e.count.tolist()
        groups = [[i] for i in (~e.raw).nonzero().squeeze(1).tolist()]
        recent = (e.raw & ~sinks).nonzero().squeeze(1).tolist()
        n, used = len(e), 0
        while n > capacity:
            i, used = recent[used], used + 1
            if groups and sum(counts[j] for j in groups[-1]) < self.pool:
                groups[-1].append(i)
                n -= 1
            else:
                groups.append([i])
            if len(groups) > self.slots:
                groups[:2] = [groups[0] + groups[1]] if self.overflow == "merge" else [groups[1]]
                n -= 1
        folded = [g for g in groups if len(g) > 1 or bool(e.raw[g[0]])]  # new or grown summaries
        stay = sinks.nonzero().squeeze(1).tolist() + [g[0] for g in groups if g not in folded] + recent[used:]
        kept = e.take(torch.tensor(sorted(stay), dtype=torch.long, device=e.tokens.device))
        if folded:
            kept = kept.cat(self.summarize(e, folded))
        return kept, torch.tensor(recent[:used], dtype=torch.long, device=e.tokens.device)

    def summarize(self, e: Entries, groups: list[list[int]]) -> Entries:
        """One summary entry per group of entry indices (oldest first)."""
        keys, values, tokens, counts = [], [], [], []
        for group in groups:
            index = torch.tensor(group, device=e.tokens.device)
            w = self.weights(e.count[index].to(e.keys.dtype))[:, None]
            keys.append((e.keys[0][:, index] * w).sum(1))
            values.append((e.values[0][:, index] * w).sum(1))
            tokens.append(e.tokens[index].max())
            counts.append(e.count[index].sum())
        m = len(groups)
        return Entries(torch.stack(keys, 1)[None], torch.stack(values, 1)[None], torch.stack(tokens),
                       torch.zeros(m, dtype=torch.bool, device=e.raw.device), torch.stack(counts),
                       e.scores.new_zeros(e.scores.shape[0], m), torch.zeros(m, dtype=torch.bool, device=e.raw.device))


@dataclass(frozen=True)
class MovingAverage(Merging):
    """moving-average: tokens older than the window become one mean key/value per `pool` tokens; when the
    summaries fill their slots (budget - sinks - window) the two oldest merge, so every older token still
    counts, the oldest ones in coarser means."""

    name = "moving-average"
    options = ("budget", "sinks", "window", "pool")
    sinks: int = DEFAULT_SINKS
    window: int = 192
    pool: int = 16


@dataclass(frozen=True)
class Compressive(Merging):
    """compressive (Compressive Transformer): a FIFO of the recent `window` tokens, then a FIFO compressed
    memory of budget - sinks - window entries, each the mean-pool of `pool` older tokens (compression rate
    `pool`); what leaves the compressed memory is dropped."""

    name = "compressive"
    options = ("budget", "sinks", "window", "pool")
    overflow = "drop"
    sinks: int = DEFAULT_SINKS
    window: int = 192
    pool: int = 4


@dataclass(frozen=True)
class CumulativeAverage(Merging):
    """cumulative-average: one slot holding the running mean of every token that left the window,
    Mem_i = ((k_i, v_i) + i * Mem_{i-1}) / (i + 1); the window is budget - sinks - 1."""

    name = "cumulative-average"
    options = ("budget", "sinks")
    sinks: int = DEFAULT_SINKS
    pool: int = sys.maxsize

    @property
    def slots(self) -> int:
        return 1


@dataclass(frozen=True)
class Recurrent(CumulativeAverage):
    """recurrent: one state slot, Mem_i = f((k_i, v_i), Mem_{i-1}) = (1 - a) * Mem_{i-1} + a * (k_i, v_i), a
    gated linear update with a constant gate a = `rate` (not learned: set by hand to 1/8, a memory of about
    8 tokens' worth of recent evictions, exponentially decaying), Mem_0 = the first evicted token."""

    name = "recurrent"
    rate: float = 0.125

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(len(counts) - 1, -1, -1, dtype=counts.dtype, device=counts.device)
        w = self.rate * (1 - self.rate) ** steps
        w[0] = (1 - self.rate) ** (len(counts) - 1)
        return w


SELECTIVE: dict[str, type[Selective]] = {cls.name: cls for cls in (
    MovingAverage, CumulativeAverage, Recurrent, Compressive, HeavyHitters, ValueAware, KeyNorm, SnapKV, Adaptive)}
OPTIONS: dict[str, tuple[str, ...]] = {"full": (), "window": ("window",), "sinks": ("window", "sinks"),
                                       **{name: cls.options for name, cls in SELECTIVE.items()}}
POLICIES = tuple(OPTIONS)


def make_policy(name: str, window: int | None = None, sinks: int | None = None, budget: int | None = None,
                pool: int | None = None) -> Policy | Selective:
    """The policy `name` (one of POLICIES) with the options given; an option that does not apply is an error."""
    if name not in OPTIONS:
        raise InvalidInput(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}", "policy")
    given = {k: v for k, v in (("window", window), ("sinks", sinks), ("budget", budget), ("pool", pool))
             if v is not None}
    wrong = [k for k in given if k not in OPTIONS[name]]
    if wrong:
        takes = ", ".join(OPTIONS[name]) or "no options"
        raise InvalidInput(f"policy {name!r} takes no {wrong[0]} (it takes: {takes})", wrong[0])
    if name == "full":
        return Full()
    if name in ("window", "sinks"):
        return Window(given.get("window", DEFAULT_WINDOW), given.get("sinks", DEFAULT_SINKS if name == "sinks" else 0))
    return SELECTIVE[name](**given)


def parse_cache_spec(spec: str) -> Policy | Selective:
    """A policy from a spec like "window:256,sinks:4", "window:256", "full" or "policy:h2o,budget:260" (`--cache`)."""
    if spec.strip() == "full":
        return Full()
    options: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.strip().partition(":")
        if key not in ("policy", "window", "sinks", "budget", "pool") or key in options:
            raise InvalidInput(f"bad cache spec {spec!r}: expected 'window:W[,sinks:S]', 'full' or "
                               f"'policy:NAME[,budget:B,window:W,sinks:S,pool:P]'", "cache")
        try:
            options[key] = value if key == "policy" else int(value)
        except ValueError:
            raise InvalidInput(f"bad cache spec {spec!r}: {key} must be an integer", "cache") from None
    if "policy" not in options and "window" not in options:
        raise InvalidInput(f"bad cache spec {spec!r}: the window is required", "cache")
    name = options.pop("policy", "sinks" if options.get("sinks") else "window")
    if name == "window" and options.get("sinks") == 0:
        del options["sinks"]
    return make_policy(name, **options)


class SelectiveLayer(CacheLayerMixin):
    """One layer's entries under a `Selective` policy: keys rotated at consecutive `positions`, their stream
    `tokens` (a summary: the newest token it absorbed), and what the policy tracks (`scores`, `count`, ...)."""

    is_sliding = False
    needs_block_mask = False  # every kept entry is seen by the whole block: the causal mask is exact

    def __init__(self, cache: BoundedCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx, self.policy = cache, layer_idx, cache.policy
        self.wants_attention = self.policy.needs_attention
        self.seen = self.next_pos = self.peak = 0
        self.tokens = self.positions = self.view_tokens = self.view_positions = torch.zeros(0, dtype=torch.long)
        self.observed: torch.Tensor | None = None  # the last forward's attention probabilities [heads, q, n]
        self.modes: torch.Tensor | None = None  # adaptive: each query head's index into MODES

    @staticmethod
    def bounds(policy: Selective, max_positions: int, period: int | None) -> tuple[int, int]:
        """(period, limit): the largest block and the position that triggers a shift back to 0."""
        most = policy.budget - policy.min_kept
        period = min(DEFAULT_BLOCK, most) if period is None else period
        if not 0 < period <= most:
            raise InvalidInput(f"the block must be in 1..{most} for policy {policy.name!r} with budget "
                               f"{policy.budget}", "period")
        if policy.budget + period > max_positions:
            raise InvalidInput(f"budget + block ({policy.budget + period}) must be within the model's trained "
                               f"context ({max_positions})", "budget")
        return period, max_positions

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        device = key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.tokens = self.positions = self.count = torch.zeros(0, dtype=torch.long, device=device)
        self.raw = self.pinned = torch.zeros(0, dtype=torch.bool, device=device)
        self.scores = torch.zeros(self.cache.heads, 0, device=device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact to budget - q (the policy's choice), append the q new entries, return what to attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q, device = key_states.shape[-2], key_states.device
        if q > self.cache.period:
            raise InvalidInput(f"a forward of {q} tokens exceeds this cache's block ({self.cache.period}); "
                               "stream longer inputs with lm.cache.stream", "input_ids")
        if len(self.tokens) > self.policy.budget - q:
            self._compact(self.policy.budget - q)
        arange = torch.arange(q, device=device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys.detach(), values.detach()
        self.tokens = self.view_tokens = torch.cat([self.tokens, self.seen + arange])
        self.positions = self.view_positions = torch.cat([self.positions, self.next_pos + arange])
        self.raw = torch.cat([self.raw, torch.ones(q, dtype=torch.bool, device=device)])
        self.pinned = torch.cat([self.pinned, torch.zeros(q, dtype=torch.bool, device=device)])
        self.count = torch.cat([self.count, torch.ones(q, dtype=torch.long, device=device)])
        self.scores = torch.cat([self.scores, self.scores.new_zeros(self.scores.shape[0], q)], -1)
        self.seen, self.next_pos = self.seen + q, self.next_pos + q
        self.peak = max(self.peak, len(self.tokens))
        if self.next_pos + self.cache.period > self.cache.limit:
            self._shift()
        return keys, values

    def _compact(self, capacity: int) -> None:
        raw_keys = self.cache.rotate(self.keys, -self.positions)
        e = Entries(raw_keys, self.values, self.tokens, self.raw, self.count, self.scores, self.pinned)
        kept, gone = self.policy.compact(self, e, capacity)
        if len(kept) != capacity:
            raise RuntimeError(f"policy {self.policy.name} kept {len(kept)} entries, not {capacity}")
        if self.cache.on_evict is not None and len(gone):
            self.cache.on_evict(self.layer_idx, e.tokens[gone], raw_keys[..., gone, :], e.values[..., gone, :])
        self.positions = self.next_pos - capacity + torch.arange(capacity, device=kept.tokens.device)
        self.keys = self.cache.rotate(kept.keys, self.positions)
        self.values, self.tokens, self.raw, self.count = kept.values, kept.tokens, kept.raw, kept.count
        self.scores, self.pinned = kept.scores, kept.pinned
        self.observed = None  # it described the entries before this compaction

    def _shift(self) -> None:
        """Move every entry down to positions 0..n-1 (RoPE is relative: attention does not change)."""
        delta = self.next_pos - len(self.tokens)
        self.keys = self.cache.rotate(self.keys, torch.full_like(self.positions, -delta))
        self.positions, self.next_pos = self.positions - delta, self.next_pos - delta

    def in_view(self, q: int) -> torch.Tensor:
        """Bool [q, n]: causal over the view (every kept entry precedes the block)."""
        return self.view_tokens[None, :] <= self.view_tokens[-q:, None]

    def head_mask(self, q: int) -> torch.Tensor | None:
        return self.policy.head_mask(self, q)

    def allowed(self, q: int) -> torch.Tensor:
        """Bool [heads or 1, q, n]: what each query (of each head) attends to."""
        mask, heads = self.in_view(q)[None], self.head_mask(q)
        return mask if heads is None else mask & heads[:, None, :]

    def observe(self, probs: torch.Tensor) -> None:
        """The attention probabilities [heads, q, n] the view just received: accumulated into `scores`."""
        self.scores = self.scores + probs.detach().sum(1).float()
        self.observed = probs.detach()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the causal mask: the entries kept through the next compaction, then the new."""
        kept = min(len(self.tokens), self.policy.budget - query_length)
        return kept + query_length, self.next_pos - kept

    def get_seq_length(self) -> int:
        return self.next_pos

    def get_max_length(self) -> int:
        return self.policy.budget


Selective.layer_type = SelectiveLayer
