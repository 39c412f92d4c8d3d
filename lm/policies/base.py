"""What every cache policy shares: the `Policy` protocol and `PolicyLayer`, the cache layer a policy brings.

As in transformers' `cache_utils` (a layer type per cache behaviour, e.g. `DynamicSlidingWindowLayer`), a
layer owns its state: keys (rotated at `positions`), values, the stream index (`tokens`) of each entry,
and how far the stream has gone (`seen`, `next_pos`). It is built with everything it needs (its policy,
RoPE, the re-basing bounds) and never reaches back into the cache that holds it. Whatever it drops goes to
its `on_evict` as pre-RoPE keys and values.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from transformers.cache_utils import CacheLayerMixin

from lm.cache_specs import DEFAULT_SINKS, DEFAULT_WINDOW
from lm.rope import Rotary

__all__ = ["DEFAULT_SINKS", "DEFAULT_WINDOW", "EvictCallback", "Policy", "PolicyLayer"]

EvictCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Policy(Protocol):
    """Which entries a bounded cache keeps; `layer_type` is the cache layer that carries it out."""

    name: str
    budget: int | None  # the most entries one query attends to (itself included); None: unbounded
    layer_type: ClassVar[type[PolicyLayer]]


class PolicyLayer(CacheLayerMixin):
    """One layer's entries under `policy`: keys [b, kv heads, n, d] rotated at `positions` [n], values, and their
    stream indices `tokens` [n]; `view_tokens`/`view_positions` describe what the last `update` returned.

    Subclasses decide what stays (`update`) and say what each query sees (`in_view`, `head_mask`).
    """

    is_sliding = False
    wants_attention = False  # whether the policy ranks entries by the attention they receive (see `observe`)

    def __init__(self, policy: Any, layer_idx: int, rotary: Rotary, period: int | None, limit: int | None,
                 heads: int):
        super().__init__()
        self.policy, self.layer_idx, self.rotary = policy, layer_idx, rotary
        self.period, self.limit, self.heads = period, limit, heads
        self.on_evict: EvictCallback | None = None
        self.seen = 0  # stream tokens this layer has taken in
        self.next_pos = 0  # the position the next token gets
        self.peak = 0  # the most entries one query has attended to
        self.tokens = self.positions = torch.zeros(0, dtype=torch.long)
        self.view_tokens = self.view_positions = self.tokens

    @staticmethod
    def bounds(policy: Any, max_positions: int, period: int | None) -> tuple[int | None, int | None]:
        """(period, limit) for `policy` on a model trained on `max_positions`: the largest block one forward may
        carry, and the position that triggers a re-base; InvalidInput if the policy does not fit."""
        raise NotImplementedError

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.tokens = self.positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add q new entries [b, kv heads, q, d] at the next stream indices and positions; all keys and values."""
        q = key_states.shape[-2]
        arange = torch.arange(q, device=self.tokens.device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        # Stored detached: a block's gradient (gate training) never reaches back into earlier blocks.
        self.keys, self.values = keys.detach(), values.detach()
        self.tokens = self.view_tokens = torch.cat([self.tokens, self.seen + arange])
        self.positions = self.view_positions = torch.cat([self.positions, self.next_pos + arange])
        self.seen, self.next_pos = self.seen + q, self.next_pos + q
        return keys, values

    def evict(self, tokens: torch.Tensor, raw_keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hand entries that leave to `on_evict`: stream indices [n], pre-RoPE keys and values [b, kv heads, n, d]."""
        if self.on_evict is not None and len(tokens):
            self.on_evict(self.layer_idx, tokens, raw_keys, values)

    def in_view(self, q: int) -> torch.Tensor:
        """Bool [q, n]: which entries of the last update's view each of its q queries attends to; for a one-token
        forward (q = 1) all of them (`update` returns exactly what the token attends to; `lm.blocks` relies on it)."""
        raise NotImplementedError

    def head_mask(self, q: int) -> torch.Tensor | None:
        """Bool [heads, n] restricting single query heads within the view; None: every head sees the view."""
        return None

    def allowed(self, q: int) -> torch.Tensor:
        """Bool [heads or 1, q, n]: what each query (of each head) attends to."""
        mask, heads = self.in_view(q)[None], self.head_mask(q)
        return mask if heads is None else mask & heads[:, None, :]

    def block_mask(self, q: int) -> torch.Tensor | None:
        """Bool [q, n] over the entries the next q tokens' forward will attend (kept ones, then the new); None where
        every one of them is seen by the whole block (the model's causal mask is then exact)."""
        return None

    def get_seq_length(self) -> int:
        """The position the next token gets (what the model derives its position ids from)."""
        return self.next_pos

    def get_max_length(self) -> int:
        return -1 if self.policy.budget is None else self.policy.budget
