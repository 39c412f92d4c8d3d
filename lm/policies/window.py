"""`full`, `window` and `sinks`: rules on token indices alone, carried out by `WindowLayer`.

Evict before attend: `update()` first drops what the first new token no longer sees, then returns the
rest plus the new entries. In token-by-token decoding a layer therefore never holds more than
`policy.budget` entries; a block of q tokens holds up to budget + q - 1 during its forward, and its mask
(`block_mask`) lets each query see at most `budget`.

Positions (StreamingLLM; we re-rotate on shift): a token's position is one past the previous token's,
never its raw stream index. When the next position would reach `limit` = budget - 1 + period, the layer
re-bases: the entries the next token will see (budget - 1 of them once the window is full) are
re-rotated to positions 0..n-1 in stream order (sinks first, then the window), so the next `period`
tokens fit below `limit` again. Query-to-window distances stay the true token distances, sinks stay
within `limit` of every query, and no position ever leaves the trained range however long the stream.
Re-basing every `period` tokens, not every token, is what lets a block of up to `period` tokens run in
one forward and give exactly the logits of token-by-token decoding: `lm.cache.stream` does that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lm.cache_specs import check_policy_values
from lm.policies.base import PolicyLayer
from memsvc.contract import InvalidInput


class WindowLayer(PolicyLayer):
    """One layer under a rule on token indices (`Full`, `Window`): keeps exactly what the rule keeps."""

    @staticmethod
    def bounds(policy: Full | Window, max_positions: int, period: int | None) -> tuple[int | None, int | None]:
        if policy.budget is None:
            return period, None
        room = max_positions - policy.budget + 1
        if room <= 1:
            raise InvalidInput(f"window + sinks ({policy.budget}) must be below the model's trained context "
                               f"({max_positions})", "window")
        period = min(policy.budget, room) if period is None else period
        if not 0 < period <= room:
            raise InvalidInput(f"period must be in 1..{room} for this model and budget", "period")
        return period, policy.budget - 1 + period  # a re-base leaves budget - 1 entries: room for one period

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop what the first new token no longer sees, append the new entries, return what to attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        kept = self.kept()
        if not kept.all():
            gone = ~kept
            self.evict(self.tokens[gone], self.rotary.rotate(self.keys[..., gone, :], -self.positions[gone]),
                       self.values[..., gone, :])
            self.keys, self.values = self.keys[..., kept, :], self.values[..., kept, :]
            self.tokens, self.positions = self.tokens[kept], self.positions[kept]
        keys, values = self.append(key_states, value_states)
        attended = len(self.tokens) if q == 1 else int(self.in_view(q).sum(-1).max())
        self.peak = max(self.peak, attended)
        if self.limit is not None and self.next_pos >= self.limit:
            self.rebase()
        return keys, values

    def kept(self) -> torch.Tensor:
        """Bool [n]: which held entries the next token still sees."""
        return self.policy.keep(self.tokens, torch.tensor(self.seen, device=self.tokens.device))

    def rebase(self) -> None:
        """Re-rotate the entries the next token sees to positions 0..n-1 (the others leave at the next update)."""
        stay = self.kept()
        positions = self.positions.clone()
        positions[stay] = torch.arange(int(stay.sum()), device=positions.device)
        self.keys = self.rotary.rotate(self.keys, positions - self.positions)
        self.positions, self.next_pos = positions, int(stay.sum())

    def in_view(self, q: int) -> torch.Tensor:
        return visible(self.policy, self.view_tokens, self.view_tokens[-q:])

    def block_mask(self, q: int) -> torch.Tensor:
        kept = self.tokens[self.kept()]
        tokens = torch.cat([kept, self.seen + torch.arange(q, device=kept.device)])
        return visible(self.policy, tokens, tokens[-q:])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the plain causal mask: all kept entries, then the new ones."""
        kept = int(self.kept().sum())
        return kept + query_length, self.next_pos - kept


@dataclass(frozen=True)
class Full:
    """Keep everything: plain full attention, run through the same cache for comparable numbers."""

    name = "full"
    budget = None
    layer_type: ClassVar[type[PolicyLayer]] = WindowLayer

    def keep(self, tokens: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        """Bool, broadcasting entry token indices against query indices: always true."""
        return torch.ones(torch.broadcast_shapes(tokens.shape, now.shape), dtype=torch.bool, device=tokens.device)


@dataclass(frozen=True)
class Window:
    """The last `window` tokens (the query included) plus the stream's first `sinks` tokens (StreamingLLM,
    Xiao et al. 2024, "Efficient streaming language models with attention sinks")."""

    window: int
    sinks: int = 0
    layer_type: ClassVar[type[PolicyLayer]] = WindowLayer

    def __post_init__(self) -> None:
        """InvalidInput for numbers that do not fit (`lm.cache_specs.check_policy_values`, torch-free)."""
        check_policy_values("window", {"window": self.window, "sinks": self.sinks})

    @property
    def name(self) -> str:
        return "sinks" if self.sinks else "window"

    @property
    def budget(self) -> int:
        return self.window + self.sinks

    def keep(self, tokens: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        """Bool, broadcasting entry token indices against query indices; never drops a token after `now`."""
        return (tokens < self.sinks) | (tokens > now - self.window)


def visible(policy: Full | Window, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Bool [q, n]: which entries (token indices [n]) each query (token indices [q]) attends to."""
    tokens, queries = tokens[None, :], queries[:, None]
    return (tokens <= queries) & policy.keep(tokens, queries)
