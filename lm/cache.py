"""Bounded KV caches on the transformers v5 Cache API: a policy decides which cached entries stay.

A `BoundedCache` is one transformers `Cache` whose layers are of the type its policy brings
(`policy.layer_type`, see `lm.policies`). Each layer keeps, per entry, its key and value, its token index
(its place in the stream) and its position (the RoPE angle its key is rotated by); `get_seq_length()` is
the position the next token gets and `get_mask_sizes()` sizes the model's mask over what `update()` returns.
Every entry a layer drops goes to `on_evict(layer_idx, tokens, keys, values)` with its key un-rotated
(pre-RoPE), so whoever stores it (the kNN memory of `lm.memory_attention`) decides how to position it.

`stream()` runs a long input through the cache in blocks that give exactly the logits of token-by-token
decoding (each block within a layer's `period` and with the exact mask `block_mask`); `forward()` is a
prompt's prefill.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import CausalLMOutputWithPast

from lm.policies import EvictCallback, Policy
from lm.rope import Rotary

FULL_BLOCK = 512  # tokens per forward when nothing bounds the block (full attention)


class BoundedCache(Cache):
    """A KV cache whose `policy` bounds what each layer keeps; positions: see `lm.policies.window`.

    `period` (default: the budget, capped by the trained context; 16 for the selective policies) is how many
    tokens may pass between re-bases, hence the largest block `stream` runs in one forward. `on_evict` may be
    set at any time; it is handed to every layer. InvalidInput if the policy does not fit the model.
    """

    def __init__(self, model: PreTrainedModel, policy: Policy, period: int | None = None,
                 on_evict: EvictCallback | None = None):
        config = model.config.get_text_config(decoder=True)
        self.policy, self.rotary = policy, Rotary(model)
        self.period, self.limit = policy.layer_type.bounds(policy, config.max_position_embeddings, period)
        super().__init__(layers=[policy.layer_type(policy, i, rotary=self.rotary, period=self.period,
                                                   limit=self.limit, heads=config.num_attention_heads)
                                 for i in range(config.num_hidden_layers)])
        self.on_evict = on_evict

    @property
    def on_evict(self) -> EvictCallback | None:
        """Where every layer hands the entries it drops (pre-RoPE keys and values); None: nowhere."""
        return self._on_evict

    @on_evict.setter
    def on_evict(self, callback: EvictCallback | None) -> None:
        self._on_evict = callback
        for layer in self.layers:
            layer.on_evict = callback

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
        """Rotate x [..., n, head_dim] by RoPE angles for position offsets delta [n] (`lm.rope.Rotary`)."""
        return self.rotary.rotate(x, delta)

    def block_mask(self, q: int, model: PreTrainedModel, batch_size: int = 1) -> torch.Tensor | None:
        """The exact mask for the next q tokens, in the format the model's attention implementation wants; None
        where every kept entry is seen by the whole block (the model's causal mask is then exact)."""
        allowed = self.layers[0].block_mask(q)
        if allowed is None:
            return None
        config = model.config.get_text_config(decoder=True)
        return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=batch_size, q_length=q, kv_length=allowed.shape[1], allow_is_causal_skip=False,
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
