"""Stateful, content-dependent fixed-size policies: `Selective` and the cache layer it brings, `SelectiveLayer`.

After each forward, a layer holds entries that are stream tokens or summaries of several, and before the
next forward of q tokens the policy brings them down to exactly `budget - q` (`compact`), so that no query
ever attends to more than `budget` entries, the q new ones included. Every stream token a policy drops, or
folds into a summary, goes to the layer's `on_evict` as its pre-RoPE key and value (so `--knn-memory` keeps
it searchable); a summary that is dropped goes nowhere, its tokens having left when they were folded.

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
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from lm.cache_specs import DEFAULT_BUDGET, check_policy_values
from lm.policies.base import PolicyLayer
from memsvc.contract import InvalidInput

DEFAULT_BLOCK = 16  # tokens per forward of a stream under these policies


@dataclass(frozen=True)
class CacheEntries:
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

    def take(self, index: torch.Tensor) -> CacheEntries:
        return CacheEntries(self.keys[..., index, :], self.values[..., index, :], self.tokens[index],
                            self.raw[index], self.count[index], self.scores[:, index], self.pinned[index])

    def cat(self, other: CacheEntries) -> CacheEntries:
        """Both sets, sorted by stream index."""
        both = CacheEntries(*(torch.cat([getattr(self, f.name), getattr(other, f.name)],
                                        -2 if f.name in ("keys", "values") else -1) for f in fields(CacheEntries)))
        return both.take(both.tokens.argsort(stable=True))


class SelectiveLayer(PolicyLayer):
    """One layer's entries under a `Selective` policy: keys rotated at consecutive `positions`, their stream
    `tokens` (a summary: the newest token it absorbed), and what the policy tracks: `raw`, `count`, `scores`
    (attention received, [heads, n]), `pinned`, `observed` (the last forward's attention probabilities
    [heads, q, n]) and `modes` (adaptive: each query head's index into `lm.policies.ranked.MODES`)."""

    def __init__(self, policy: Selective, layer_idx: int, **geometry: Any):
        super().__init__(policy, layer_idx, **geometry)
        self.wants_attention = policy.needs_attention
        self.observed: torch.Tensor | None = None
        self.modes: torch.Tensor | None = None

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
        super().lazy_initialization(key_states, value_states)
        device = key_states.device
        self.count = torch.zeros(0, dtype=torch.long, device=device)
        self.raw = self.pinned = torch.zeros(0, dtype=torch.bool, device=device)
        self.scores = torch.zeros(self.heads, 0, device=device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact to budget - q (the policy's choice), append the q new entries, return what to attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q, device = key_states.shape[-2], key_states.device
        if q > self.period:
            raise InvalidInput(f"a forward of {q} tokens exceeds this cache's block ({self.period}); "
                               "stream longer inputs with lm.cache.stream", "input_ids")
        if len(self.tokens) > self.policy.budget - q:
            self.compact(self.policy.budget - q)
        keys, values = self.append(key_states, value_states)
        self.raw = torch.cat([self.raw, torch.ones(q, dtype=torch.bool, device=device)])
        self.pinned = torch.cat([self.pinned, torch.zeros(q, dtype=torch.bool, device=device)])
        self.count = torch.cat([self.count, torch.ones(q, dtype=torch.long, device=device)])
        self.scores = torch.cat([self.scores, self.scores.new_zeros(self.scores.shape[0], q)], -1)
        self.peak = max(self.peak, len(self.tokens))
        if self.next_pos + self.period > self.limit:
            self.shift()
        return keys, values

    def compact(self, capacity: int) -> None:
        """Keep exactly `capacity` entries, the policy's choice, at consecutive positions ending at `next_pos`."""
        raw_keys = self.rotary.rotate(self.keys, -self.positions)
        e = CacheEntries(raw_keys, self.values, self.tokens, self.raw, self.count, self.scores, self.pinned)
        kept, gone = self.policy.compact(self, e, capacity)
        if len(kept) != capacity:
            raise RuntimeError(f"policy {self.policy.name} kept {len(kept)} entries, not {capacity}")
        self.evict(e.tokens[gone], raw_keys[..., gone, :], e.values[..., gone, :])
        self.positions = self.next_pos - capacity + torch.arange(capacity, device=kept.tokens.device)
        self.keys = self.rotary.rotate(kept.keys, self.positions)
        self.values, self.tokens, self.raw, self.count = kept.values, kept.tokens, kept.raw, kept.count
        self.scores, self.pinned = kept.scores, kept.pinned
        self.observed = None  # it described the entries before this compaction

    def shift(self) -> None:
        """Move every entry down to positions 0..n-1 (RoPE is relative: attention does not change)."""
        delta = self.next_pos - len(self.tokens)
        self.keys = self.rotary.rotate(self.keys, torch.full_like(self.positions, -delta))
        self.positions, self.next_pos = self.positions - delta, self.next_pos - delta

    def in_view(self, q: int) -> torch.Tensor:
        """Bool [q, n]: causal over the view (every kept entry precedes the block)."""
        return self.view_tokens[None, :] <= self.view_tokens[-q:, None]

    def head_mask(self, q: int) -> torch.Tensor | None:
        return self.policy.head_mask(self, q)

    def observe(self, probs: torch.Tensor) -> None:
        """The attention probabilities [heads, q, n] the view just received: accumulated into `scores`."""
        self.scores = self.scores + probs.detach().sum(1).float()
        self.observed = probs.detach()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the causal mask: the entries kept through the next compaction, then the new."""
        kept = min(len(self.tokens), self.policy.budget - query_length)
        return kept + query_length, self.next_pos - kept


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
    layer_type: ClassVar[type[PolicyLayer]] = SelectiveLayer

    def __post_init__(self) -> None:
        """InvalidInput for numbers that do not fit: `lm.cache_specs.check_policy_values`, the torch-free rule
        the CLI applies before it loads a model."""
        check_policy_values(self.name, {"budget": self.budget, "sinks": self.sinks, "window": self.window,
                                        "pool": self.pool})

    @property
    def min_kept(self) -> int:
        """The fewest entries a compaction may be asked to keep: a block is at most budget - min_kept tokens."""
        return self.sinks + 1

    def compact(self, layer: SelectiveLayer, e: CacheEntries, capacity: int) -> tuple[CacheEntries, torch.Tensor]:
        """(exactly `capacity` entries to keep, indices into e of the stream tokens that leave)."""
        raise NotImplementedError

    def head_mask(self, layer: SelectiveLayer, q: int) -> torch.Tensor | None:
        """Bool [query heads, n] over the layer's view; None: every head sees all of it."""
        return None
