"""memsvc's attention, registered with transformers once, and `attach`: the one way to wire a model to a cache.

transformers runs a model's attention through the function registered under `config._attn_implementation`.
memsvc registers one, `ATTENTION` ("memsvc"). While `attach(model, cache, knn, ...)` is open the model runs
on it, and each decoder layer's attention module knows what it attends through:
- a layer with kNN memory (`knn` given and the layer among `knn.layers`): `KnnMemoryAttention.attend`, the
  local entries and the ones retrieved from memory (`lm.memory_attention`), or with `knn.blocks` > 0
  `BlockMemoryAttention.attend` (`lm.blocks`);
- a layer whose cache policy ranks entries by the attention they receive (h2o, vatp, snapkv, adaptive):
  `reported_attention`, explicit attention that reports its probabilities to the cache layer;
- any other layer: transformers' SDPA.
When neither memory nor the policy needs it, `attach` leaves the model's attention as it is. Closing it
restores the model and ends the memory session (its partitions are deleted).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lm.blocks import BlockMemoryAttention
from lm.cache import BoundedCache
from lm.gate import Gate, MemoryBias
from lm.memory_attention import KnnConfig, KnnMemoryAttention
from lm.policies import PolicyLayer
from memsvc.contract import InvalidInput, MemoryBackend

ATTENTION = "memsvc"
ATTACHED = "memsvc_attached"  # the attribute `attach` sets on each decoder layer's attention module


@dataclass(frozen=True)
class Attached:
    """What one attention module attends through: its cache layer, and the memory session if it retrieves."""

    layer: PolicyLayer
    knn: KnnMemoryAttention | BlockMemoryAttention | None


def reported_attention(layer: PolicyLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """Attention output [b, q, heads, d] for query [b, heads, q, d] and key/value [b, kv heads, n, d] (GQA),
    each query restricted to what the cache layer lets it see (`layer.allowed`); the probabilities
    [heads, q, n] of the first sequence go to `layer.observe`."""
    b, heads, q, d = query.shape
    kv, n = key.shape[1], key.shape[2]
    logits = query.view(b, kv, heads // kv, q, d) @ key[:, :, None].transpose(-1, -2) * scaling
    logits = logits.view(b, heads, q, n).masked_fill(~layer.allowed(q), -torch.inf)
    probs = logits.float().softmax(-1).to(query.dtype)
    layer.observe(probs[0])
    out = (probs.view(b, kv, heads // kv, q, n) @ value[:, :, None]).view(b, heads, q, d)
    return out.transpose(1, 2).contiguous()


def memsvc_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for `ATTENTION`: memory, reported, or plain SDPA (see above)."""
    attached: Attached | None = getattr(module, ATTACHED, None)
    if attached is not None and attached.knn is not None:
        return attached.knn.attend(module.layer_idx, query, key, value, kwargs["scaling"]), None
    if attached is not None and attached.layer.wants_attention:
        return reported_attention(attached.layer, query, key, value, kwargs["scaling"]), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, memsvc_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextmanager
def attach(model: PreTrainedModel, cache: Cache, knn: KnnConfig | None = None, memory: MemoryBackend | None = None,
           gate: Gate | MemoryBias | None = None, session: str | None = None,
           persist: bool = False) -> Iterator[KnnMemoryAttention | BlockMemoryAttention | None]:
    """Wire `model` to `cache` while open: attention reported to the cache policy where it ranks by it, and with
    `knn` kNN-memory attention over `memory` (default: a RAM-only `session_memory`) for one session, or with
    `knn.blocks` > 0 block memory (`lm.blocks`: RAM tensors, no `memory`; `gate` a `MemoryBias`). A `session`
    id the memory has kept is resumed; `persist` keeps the session when it closes (`lm.sessions`; per-token
    memory only).

    Yields the memory session (None without `knn`). InvalidInput before anything changes on a bad `knn`,
    memory, gate or cache (memory attention needs a bounded cache).
    """
    if knn is not None and knn.blocks:
        if persist:
            raise InvalidInput("block memory lives in RAM tensors: a session that outlives the process needs "
                               "per-token memory (memory blocks 0)", "persist")
        knn_session = BlockMemoryAttention(model, cache, memory, knn, gate, session)
    else:
        knn_session = None if knn is None else KnnMemoryAttention(model, cache, memory, knn, gate, session, persist)
    reports = isinstance(cache, BoundedCache) and any(layer.wants_attention for layer in cache.layers)
    if knn_session is None and not reports:
        yield None
        return
    modules = [layer.self_attn for layer in model.get_decoder().layers]
    for i, (module, layer) in enumerate(zip(modules, cache.layers, strict=True)):
        setattr(module, ATTACHED, Attached(layer, knn_session if knn_session and i in knn_session.layers else None))
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    if knn_session is not None:
        cache.on_evict = knn_session.store
    cache.reported = True
    try:
        yield knn_session
    finally:
        cache.reported = False
        model.set_attn_implementation(previous)
        for module in modules:
            delattr(module, ATTACHED)
        if knn_session is not None:
            cache.on_evict = None
            knn_session.close()
