"""Bounded KV caches on the transformers v5 Cache API: a policy decides which cached entries stay.

A `BoundedCache` keeps, per layer, the keys and values its `Policy` keeps, and for each entry its token
index (its place in the stream) and its position (the RoPE angle its key is rotated by). Every entry the
policy drops goes to `on_evict(layer_idx, tokens, keys, values)` with its key un-rotated (pre-RoPE), so
whoever stores it (the kNN memory of `lm.memory_attention`) decides how to position it.

Evict before attend: `update()` first drops what the first new token no longer sees, then returns the
rest plus the new entries. In token-by-token decoding a layer therefore never holds more than
`policy.budget` entries; a block of q tokens holds up to budget + q - 1 during its forward, and its mask
(`block_mask`) lets each query see at most `budget`.

Positions (StreamingLLM; we re-rotate on shift): a token's position is one past the previous token's,
never its raw stream index. When the next position would reach `limit` = budget - 1 + period, the cache
re-bases: the entries the next token will see (budget - 1 of them once the window is full) are
re-rotated to positions 0..n-1 in stream order (sinks first, then the window), so the next `period`
tokens fit below `limit` again. Query-to-window distances stay the true token distances, sinks stay
within `limit` of every query, and no position ever leaves the trained range however long the stream.
Re-basing every `period` tokens, not every token, is what lets a block of up to `period` tokens run in
one forward and give exactly the logits of token-by-token decoding: `stream()` does that.

These rules (`Full`, `Window`) decide from token indices alone. The stateful, content-dependent policies
(attention scores, key norms, summaries) live in `lm.policies`: each brings its own layer type
(`policy.layer_type`) to this cache, and `lm.policies.make_policy` is where every policy name is registered.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import rotate_half

from memsvc.contract import InvalidInput

DEFAULT_WINDOW, DEFAULT_SINKS = 256, 4
FULL_BLOCK = 512  # tokens per forward when nothing bounds the block (full attention)

EvictCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Policy(Protocol):
    """Which cached entries a query at stream index `now` attends to."""

    name: str
    budget: int | None  # the most entries one query attends to (itself included); None: unbounded

    def keep(self, tokens: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        """Bool, broadcasting entry token indices against query indices; never drops a token after `now`."""
        ...


@dataclass(frozen=True)
class Full:
    """Keep everything: plain full attention, run through the same cache for comparable numbers."""

    name = "full"
    budget = None

    def keep(self, tokens: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(tokens.shape, now.shape), dtype=torch.bool, device=tokens.device)


@dataclass(frozen=True)
class Window:
    """The last `window` tokens (the query included) plus the stream's first `sinks` tokens (StreamingLLM)."""

    window: int
    sinks: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window <= 0:
            raise InvalidInput(f"window must be a positive integer, got {self.window!r}", "window")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise InvalidInput(f"sinks must be a non-negative integer, got {self.sinks!r}", "sinks")
        if self.sinks > self.window:
            raise InvalidInput(f"sinks ({self.sinks}) must not exceed the window ({self.window})", "sinks")

    @property
    def name(self) -> str:
        return "sinks" if self.sinks else "window"

    @property
    def budget(self) -> int:
        return self.window + self.sinks

    def keep(self, tokens: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        return (tokens < self.sinks) | (tokens > now - self.window)


def visible(policy: Policy, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Bool [q, n]: which entries (token indices [n]) each query (token indices [q]) attends to."""
    tokens, queries = tokens[None, :], queries[:, None]
    return (tokens <= queries) & policy.keep(tokens, queries)


class BoundedLayer(CacheLayerMixin):
    """One layer's entries: keys (rotated at `positions`), values, and their stream `tokens`."""

    is_sliding = False
    needs_block_mask = True  # a block's queries see different entries: `BoundedCache.block_mask` says which
    wants_attention = False  # the policy ranks nothing by attention (see `lm.policies`)

    @staticmethod
    def bounds(policy: Policy, max_positions: int, period: int | None) -> tuple[int | None, int | None]:
        """(period, limit): tokens between re-bases and the position that triggers one; InvalidInput if none fit."""
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

    def __init__(self, cache: BoundedCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.seen = 0  # stream tokens this layer has taken in
        self.next_pos = 0  # the position the next token gets
        self.tokens = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.view_tokens = self.view_positions = self.tokens  # of the entries the last update returned
        self.peak = 0  # the most entries one query has attended to

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.tokens = self.positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop what the first new token no longer sees, append the new entries, return what to attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        policy, q = self.cache.policy, key_states.shape[-2]
        kept = policy.keep(self.tokens, torch.tensor(self.seen))
        if not kept.all():
            self._evict(~kept)
        arange = torch.arange(q, device=self.tokens.device)
        self.view_tokens = torch.cat([self.tokens, self.seen + arange])
        self.view_positions = torch.cat([self.positions, self.next_pos + arange])
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        # Stored detached: a block's gradient (gate training) never reaches back into earlier blocks.
        self.keys, self.values = keys.detach(), values.detach()
        self.tokens, self.positions = self.view_tokens, self.view_positions
        self.seen, self.next_pos = self.seen + q, self.next_pos + q
        attended = len(self.tokens) if q == 1 else int(visible(policy, self.tokens, self.tokens[-q:]).sum(-1).max())
        self.peak = max(self.peak, attended)
        if self.cache.limit is not None and self.next_pos >= self.cache.limit:
            self._rebase()
        return keys, values

    def in_view(self, q: int) -> torch.Tensor:
        """Bool [q, n]: which entries of the last update's view each of its q queries attends to."""
        return visible(self.cache.policy, self.view_tokens, self.view_tokens[-q:])

    def head_mask(self, q: int) -> torch.Tensor | None:
        """Bool [heads, n] restricting single query heads within the view; None: every head sees the view."""
        return None

    def _evict(self, gone: torch.Tensor) -> None:
        if self.cache.on_evict is not None:
            raw = self.cache.rotate(self.keys[..., gone, :], -self.positions[gone])
            self.cache.on_evict(self.layer_idx, self.tokens[gone], raw, self.values[..., gone, :])
        kept = ~gone
        self.keys, self.values = self.keys[..., kept, :], self.values[..., kept, :]
        self.tokens, self.positions = self.tokens[kept], self.positions[kept]

    def _rebase(self) -> None:
        """Re-rotate the entries the next token sees to positions 0..n-1 (the others leave at the next update)."""
        stay = self.cache.policy.keep(self.tokens, torch.tensor(self.seen))
        positions = self.positions.clone()
        positions[stay] = torch.arange(int(stay.sum()), device=positions.device)
        self.keys = self.cache.rotate(self.keys, positions - self.positions)
        self.positions, self.next_pos = positions, int(stay.sum())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the plain causal mask: all kept entries, then the new ones."""
        kept = int(self.cache.policy.keep(self.tokens, torch.tensor(self.seen)).sum())
        return kept + query_length, self.next_pos - kept

    def get_seq_length(self) -> int:
        """The position the next token gets (what the model derives its position ids from)."""
        return self.next_pos

    def get_max_length(self) -> int:
        return -1 if self.cache.policy.budget is None else self.cache.policy.budget


class BoundedCache(Cache):
    """A KV cache whose `policy` bounds what each layer keeps; see the module docstring for positions.

    `period` (default: the budget, capped by the trained context) is how many tokens pass between
    re-bases, hence the largest block `stream` runs in one forward. `on_evict` may be set at any time.
    """

    def __init__(self, model: PreTrainedModel, policy: Policy, period: int | None = None,
                 on_evict: EvictCallback | None = None):
        config = model.config.get_text_config(decoder=True)
        self.rope = model.get_decoder().rotary_emb
        if getattr(self.rope, "attention_scaling", 1.0) != 1.0:
            raise InvalidInput("bounded caches need a plain rotation RoPE (this model scales its attention)", "model")
        self.policy, self.on_evict = policy, on_evict
        self.heads = config.num_attention_heads
        layer_type = getattr(policy, "layer_type", BoundedLayer)
        self.period, self.limit = layer_type.bounds(policy, config.max_position_embeddings, period)
        super().__init__(layers=[layer_type(self, i) for i in range(config.num_hidden_layers)])

    @property
    def seen(self) -> int:
        """Stream tokens taken in so far."""
        return self.layers[0].seen

    @property
    def peak_entries(self) -> int:
        """The most entries any query has attended to (at most `policy.budget`)."""
        return max(layer.peak for layer in self.layers)

    def entries(self) -> int:
        """Entries held now, summed over layers (memory use = entries x kv heads x head_dim x 2 x dtype size)."""
        return sum(len(layer.tokens) for layer in self.layers)

    def room(self) -> int | None:
        """How many tokens the next forward may carry and stay exact; None: no limit."""
        return None if self.limit is None else self.limit - self.layers[0].next_pos

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., n, head_dim] by RoPE angles for position offsets delta [n] (RoPE composes additively)."""
        cos, sin = self.rope(x, delta[None].to(x.device))
        return x * cos + rotate_half(x) * sin

    def block_mask(self, q: int, model: PreTrainedModel, batch_size: int = 1) -> torch.Tensor | None:
        """The exact mask for the next q tokens, in the format the model's attention implementation wants; None
        where every kept entry is seen by the whole block (the model's causal mask is then exact)."""
        layer = self.layers[0]
        if not layer.needs_block_mask:
            return None
        kept = layer.tokens[self.policy.keep(layer.tokens, torch.tensor(layer.seen))]
        tokens = torch.cat([kept, layer.seen + torch.arange(q, device=kept.device)])
        allowed = visible(self.policy, tokens, tokens[-q:])
        config = model.config.get_text_config(decoder=True)
        return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=batch_size, q_length=q, kv_length=len(tokens), allow_is_causal_skip=False,
            mask_function=lambda b, h, qi, ki: allowed[qi, ki], dtype=model.dtype, device=model.device)


def stream(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache | None,
           block: int | None = None, **model_kwargs: Any) -> Iterator[tuple[int, CausalLMOutputWithPast]]:
    """Run input_ids [b, n] through the model as token-by-token decoding would; yield (start, outputs) per block.

    With a `BoundedCache` the tokens go in blocks of at most `block` (default: the cache's period) that
    never cross a re-base, each with its exact mask; any other cache gets one plain forward.
    """
    n = input_ids.shape[1]
    if not isinstance(cache, BoundedCache):
        yield 0, model(input_ids=input_ids, cache=cache, use_cache=True, **model_kwargs)
        return
    start = 0
    while start < n:
        room = cache.room()
        q = min(n - start, block or cache.period or FULL_BLOCK, n if room is None else room)
        mask = cache.block_mask(q, model, input_ids.shape[0]) if q > 1 else None
        yield start, model(input_ids=input_ids[:, start:start + q], cache=cache, attention_mask=mask,
                           use_cache=True, **model_kwargs)
        start += q


def forward(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache | None,
            **model_kwargs: Any) -> CausalLMOutputWithPast:
    """`stream` to the end; the outputs of the last block (e.g. a prompt's prefill before decoding)."""
    for _, outputs in stream(model, input_ids, cache, **model_kwargs):
        pass
    return outputs
