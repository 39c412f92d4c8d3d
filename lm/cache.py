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

A `BoundedCache` makes the forward of the model it is built for exact for it (`exact_forward`): a call that
brings a BoundedCache but no 4D mask of its own, e.g. each call of `model.generate` (whose prefill is one
forward of the whole prompt, and whose position ids count stream tokens), runs as `stream` would, in exact
blocks at the cache's positions. So `model.generate(ids, cache=BoundedCache(...))` gives the tokens of
memsvc's own loop (`lm.generate.stream_tokens`).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import CausalLMOutputWithPast

from lm.policies import EvictCallback, Policy
from lm.rope import Rotary
from memsvc.contract import InvalidInput

FULL_BLOCK = 512  # tokens per forward when nothing bounds the block (full attention)
INNER_FORWARD = "_memsvc_inner_forward"  # the model's forward before `exact_forward` wrapped it


class BoundedCache(Cache):
    """A KV cache whose `policy` bounds what each layer keeps; positions: see `lm.policies.window`.

    `period` (default: the budget, capped by the trained context; 16 for the selective policies) is how many
    tokens may pass between re-bases, hence the largest block `stream` runs in one forward. `on_evict` may be
    set at any time; it is handed to every layer. InvalidInput if the policy does not fit the model.
    Building one makes `model`'s forward exact for bounded caches (`exact_forward`, once per model).
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
        self.reported = False  # whether attention reports to the layers (`lm.attention.attach` sets it)
        self._given_to_generate = False
        exact_forward(model)

    @property
    def _is_user_defined(self) -> bool:
        """Whether a `model.generate` call was given this cache (transformers sets this at each call)."""
        return self._given_to_generate

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        # generate re-reads a given cache's sequence from token get_seq_length() on; once this cache re-based,
        # that is its next position, not the tokens it has seen: refuse rather than re-read tokens
        if value and self.seen != self.layers[0].next_pos:
            raise InvalidInput(f"this BoundedCache holds a sequence of {self.seen} tokens past a re-base: "
                               "model.generate cannot continue it; give generate a fresh cache, or continue with "
                               "lm.generate.stream_tokens", "cache")
        self._given_to_generate = value

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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's `update` (what to attend over); InvalidInput, before anything changes, for a forward that
        cannot be exact: one that crosses a re-base, or one through a policy that ranks entries by the
        attention they receive while nothing reports it (`lm.attention.attach` does)."""
        layer, q = self.layers[layer_idx], key_states.shape[-2]
        room = None if layer.limit is None else layer.limit - layer.next_pos
        if room is not None and q > room:
            raise InvalidInput(f"a forward of {q} tokens crosses this cache's re-base (the next block takes at most "
                               f"{room}); call the model the cache was built for, whose forward takes it in exact "
                               "blocks, or lm.cache.stream", "input_ids")
        if layer.wants_attention and not self.reported:
            raise InvalidInput(f"policy {self.policy.name!r} ranks entries by the attention they receive: run the "
                               "model inside lm.hf.bounded_cache(model, ...) or lm.attention.attach(model, cache)",
                               "policy")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def blocks(self, model: PreTrainedModel, n: int, block: int | None = None,
               batch_size: int = 1) -> Iterator[tuple[int, int, torch.Tensor | None]]:
        """(start, length, mask) of the exact blocks that take n tokens in, each block computed once the
        forward of the one before has run: at most `block` (default: the period) tokens, never across a
        re-base, with the block's exact mask (None where the model's causal mask is exact)."""
        start = 0
        while start < n:
            q = self.next_block(n - start, block)
            yield start, q, self.block_mask(q, model, batch_size) if q > 1 else None
            start += q

    def next_block(self, n: int, block: int | None = None) -> int:
        """How many of n tokens the next exact block takes (see `blocks`)."""
        room = self.room()
        return min(n, block or self.period or FULL_BLOCK, n if room is None else room)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rotate x [..., n, head_dim] by RoPE angles for position offsets delta [n] or [..., n], into `out` if
        given (`lm.rope.Rotary.rotate`)."""
        return self.rotary.rotate(x, delta, out, dtype)

    def block_mask(self, q: int, model: PreTrainedModel, batch_size: int = 1) -> torch.Tensor | None:
        """The exact mask for the next q tokens, in the format the model's attention implementation wants; None
        where every kept entry is seen by the whole block (the model's causal mask is then exact)."""
        allowed = self.layers[0].block_mask(q)
        if allowed is None:
            return None
        allowed = allowed.to(model.device)  # before the first forward a layer's state is on the CPU
        config = model.config.get_text_config(decoder=True)
        return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=batch_size, q_length=q, kv_length=allowed.shape[1], allow_is_causal_skip=False,
            mask_function=lambda b, h, qi, ki: allowed[qi, ki], dtype=model.dtype, device=model.device)


def stream(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache | None,
           block: int | None = None, **model_kwargs: Any) -> Iterator[tuple[int, CausalLMOutputWithPast]]:
    """Run input_ids [b, n] through the model as token-by-token decoding would; yield (start, outputs) per block.

    With a `BoundedCache` the tokens go in blocks of at most `block` (default: the cache's period) that
    never cross a re-base, each with its exact mask; any other cache gets one plain forward. The ids go to
    the model's device.
    """
    input_ids = input_ids.to(model.device)
    if not isinstance(cache, BoundedCache):
        yield 0, model(input_ids=input_ids, cache=cache, use_cache=True, **model_kwargs)
        return
    for start, q, mask in cache.blocks(model, input_ids.shape[1], block, input_ids.shape[0]):
        yield start, model(input_ids=input_ids[:, start:start + q], cache=cache, attention_mask=mask,
                           use_cache=True, **model_kwargs)


def forward(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache | None,
            **model_kwargs: Any) -> CausalLMOutputWithPast:
    """`stream` to the end; the outputs of the last block (e.g. a prompt's prefill before decoding)."""
    for _, outputs in stream(model, input_ids, cache, **model_kwargs):
        pass
    return outputs


def exact_forward(model: PreTrainedModel) -> None:
    """Make `model`'s forward exact for bounded caches; done once per model (every `BoundedCache` calls it).

    A call whose cache (`cache=` or `past_key_values=`) is a `BoundedCache` and that brings no 4D attention
    mask of its own runs in the cache's exact blocks (`BoundedCache.blocks`), as `stream` does, and returns
    what one forward returns: the logits `logits_to_keep` asks for, hidden states if asked, the cache.
    Positions follow the cache (`get_seq_length()`): position ids given are ignored, since `generate` counts
    stream tokens while the cache re-bases. A 2D attention mask must be all ones (one unpadded sequence).
    Every other call reaches the model's forward unchanged. As accelerate's hooks do, the wrapper is an
    attribute of the instance, and `generate` sees the forward's own signature.
    """
    if INNER_FORWARD in vars(model):
        return
    inner = model.forward
    signature = inspect.signature(inner)
    wrapper = functools.partial(_exact_forward, model, tuple(signature.parameters))
    wrapper.__signature__ = signature
    wrapper.__doc__ = inner.__doc__
    setattr(model, INNER_FORWARD, inner)
    model.forward = wrapper


def _exact_forward(model: PreTrainedModel, parameters: tuple[str, ...], *args: Any, **kwargs: Any) -> Any:
    inner = getattr(model, INNER_FORWARD)
    if args:  # name positional arguments, so a cache among them is seen
        kwargs.update(zip(parameters, args))
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if not isinstance(cache, BoundedCache) or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return inner(**kwargs)
    return _run_in_blocks(inner, model, "logits_to_keep" in parameters, **kwargs)


def _run_in_blocks(inner: Callable[..., Any], model: PreTrainedModel, keeps_logits: bool,
                   input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                   return_dict: bool | None = None, **kwargs: Any) -> Any:
    """One forward's outputs for input_ids [b, n] (or inputs_embeds [b, n, hidden]), run in exact blocks at
    the cache's positions (`position_ids` are dropped)."""
    cache: BoundedCache = kwargs.get("cache", kwargs.get("past_key_values"))
    if attention_mask is not None and not bool(attention_mask.all()):
        raise InvalidInput("a bounded cache reads unpadded sequences: the attention mask has padding (zeros)",
                           "attention_mask")
    name, inputs = (("input_ids", input_ids) if input_ids is not None
                    else ("inputs_embeds", kwargs.pop("inputs_embeds")))
    n = inputs.shape[1]
    first_q = cache.next_block(n)
    if first_q < n:
        for option in ("labels", "output_attentions"):
            if kwargs.get(option) is not None and kwargs[option] is not False:
                raise InvalidInput(f"{option} cannot be combined with a forward of {n} tokens through a bounded "
                                   f"cache, which runs it in blocks of at most {first_q}", option)
        if isinstance(logits_to_keep, torch.Tensor):
            raise InvalidInput("logits_to_keep as indices needs a forward that fits one block of the bounded "
                               "cache; give a count", "logits_to_keep")
    first_kept = n - logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep else 0
    outputs, logits, hidden = None, [], []
    for start, q, mask in cache.blocks(model, n, batch_size=inputs.shape[0]):
        wanted = start + q - max(first_kept, start)  # this block's positions whose logits are returned
        if keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep if q == n else max(wanted, 1)
        outputs = inner(**{name: inputs[:, start:start + q]}, attention_mask=mask, return_dict=True, **kwargs)
        if getattr(outputs, "logits", None) is not None and wanted > 0:
            logits.append(outputs.logits[:, -wanted:])
        if getattr(outputs, "hidden_states", None) is not None:
            hidden.append(outputs.hidden_states)
    if len(logits) > 1:
        outputs.logits = torch.cat(logits, 1)
    if len(hidden) > 1:
        outputs.hidden_states = tuple(torch.cat(layer, 1) for layer in zip(*hidden))
    return outputs if return_dict is not False else outputs.to_tuple()
