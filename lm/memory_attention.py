"""kNN-memory attention: what the bounded cache evicts stays searchable, and chosen layers attend to it again.

A `KnnMemoryAttention` is one session, attached to a model and its cache with `lm.attention.attach(model,
cache, KnnConfig(...), memory)`. While attached, every entry the cache evicts at the chosen layers is added
to `memory` (any `MemoryBackend`: in-process `Memory` or `RemoteMemory`) under the partition
"{session}/l{layer}/h{kv_head}" (`store`: one batched add per layer), and those layers' attention also
attends to the top-k entries retrieved for each query from its KV head's partition (`retrieve`, `attend`;
GQA: a group's query heads search together; one batched search per layer per forward, each KV head's
queries in its partition). Closing the session deletes its partitions, or with `persist` keeps them for a
later process (`lm.sessions`: what is flushed, recorded and restored).

- joint: retrieved keys/values join the local keys in one softmax;
- gated: out = g * A_mem + (1 - g) * A_local, g = sigmoid(b_h) per head (Memorizing Transformers), with a
  learned per-head scale on the retrieved logits (`lm.gate.Gate`).

Positions of retrieved keys ("positions"): "absolute" stores keys rotated at their stream index and searches
with queries rotated at theirs, so q.k is exactly the full-attention logit (RoPE is relative), whatever
distance that is; "none" stores un-rotated (pre-RoPE) keys and searches with un-rotated queries (both sides
at one position: distance 0); "window" stores the same un-rotated keys but scores them as if they sat just
past the window (at a distance of the cache budget, window + sinks, from every query).
`bench/results/longctx.md` measures all three.

Block memory (`KnnConfig.blocks` > 0, positions kept inside the trained range) is `lm.blocks`.

Any bounded policy works (`lm.policies` too): whatever it drops or folds into a summary is stored, and for
policies that rank by attention (h2o, vatp, snapkv, adaptive) `attend` reports its local attention
probabilities to the cache layer and applies the policy's per-head mask.

Within a block of q tokens (see `lm.cache.stream`), entries a later query no longer sees but an earlier
one did are still in the local tensor, not yet in memory: they are scored there and compete with the
retrieved ones, so a block retrieves exactly what token-by-token decoding would.
"""
from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from lm.cache import BoundedCache
from lm.gate import Gate
from lm.knn_config import KnnConfig, Mode, Positions, check_options
from lm.sessions import SessionState, check_session_memory, end_session, kept_session, save_session
from memsvc.contract import IndexKind, InvalidInput, MemoryBackend, MemorySpec
from memsvc.store import Memory

__all__ = ["KnnConfig", "KnnMemoryAttention", "Mode", "Positions", "check_config", "check_session", "head_dim",
           "session_memory"]  # Mode, Positions: re-exported from lm.knn_config


def session_memory(model: PreTrainedModel, index: IndexKind = "flat") -> Memory:
    """An in-process, RAM-only memory shaped for the model's attention heads (flat: exact; hnsw: sub-linear)."""
    dim = head_dim(model)
    return Memory(MemorySpec(name="knn-attention", dim=dim, metric="ip", value_kind="vector", value_dim=dim,
                             index=index))


class KnnMemoryAttention:
    """One session: the cache's evictions go into `memory`, and the attached layers attend to what they retrieve.

    `memory` defaults to a RAM-only `session_memory`, `session` (the partitions' prefix) to a random id. A
    session id the memory has kept (`lm.sessions`) is resumed: its stream goes on at the recorded token count
    (`offset`) and its stored entries are searchable from the first token. `persist`: closing keeps the
    session (its cache's held entries flushed into memory, its state recorded) instead of deleting it.
    InvalidInput on a bad config, memory, gate or cache, or a config other than the resumed session's.
    """

    def __init__(self, model: PreTrainedModel, cache: Cache, memory: MemoryBackend | None, config: KnnConfig,
                 gate: Gate | None = None, session: str | None = None, persist: bool = False):
        memory = session_memory(model) if memory is None else memory
        config = check_config(model, cache, memory, config, gate)
        self.cache, self.memory, self.config, self.persist = cache, memory, config, persist
        self.model_name = model.config.name_or_path
        self.kv_heads = model.config.get_text_config(decoder=True).num_key_value_heads
        self.resumed = kept_session(memory, session) if session is not None else None
        self.session = session or uuid.uuid4().hex[:12]
        self.layers = set(config.layers)
        self.offset = 0  # stream tokens the session took in before this process (its stored keys' indices)
        if self.resumed is not None:
            _check_resumed(self.resumed, config)
            self.offset = self.resumed.tokens
        self.gate = None if config.mode == "joint" else gate.to(model.device) if gate is not None \
            else Gate.initial(model)  # float32 on the model's device (Module.to moves it in place)
        self.stored = {layer: self.offset for layer in self.layers}  # entries per KV head partition
        self.distance = cache.policy.budget if config.positions == "window" else 0  # for un-rotated keys

    def partition(self, layer: int, kv_head: int) -> str:
        return f"{self.session}/l{layer}/h{kv_head}"

    def store(self, layer: int, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The cache's eviction callback: add pre-RoPE keys [1, kv heads, n, d] (positioned per config) and values."""
        if layer not in self.layers:
            return
        if self.config.positions == "absolute":
            keys = self.cache.rotate(keys, tokens + self.offset)
        kv, n, d = keys.shape[1:]
        partitions = [self.partition(layer, h) for h in range(kv) for _ in range(n)]
        self.memory.add(_numpy(keys[0]).reshape(kv * n, d), values=_numpy(values[0]).reshape(kv * n, -1),
                        partitions=partitions)  # one batched add per layer: each KV head's rows in its partition
        self.stored[layer] += n

    def retrieve(self, layer: int, queries: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k logits [kv, g, q, k] and values [kv, g, q, k, d] for grouped queries [kv, g, q, d]: one
        batched search for the layer, each KV head's g * q query rows in its own partition."""
        kv, g, q, d = queries.shape
        k = self.config.k
        if not self.stored[layer]:
            return queries.new_full((kv, g, q, k), -torch.inf), queries.new_zeros((kv, g, q, k, d))
        partitions = [self.partition(layer, h) for h in range(kv) for _ in range(g * q)]
        found = self.memory.search(_numpy(queries).reshape(kv * g * q, d), k, partitions=partitions)
        logits = -torch.from_numpy(found.distances).view(kv, g, q, k) * scaling
        values = torch.from_numpy(found.values).view(kv, g, q, k, d)
        return logits.to(queries), values.to(queries)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention output [1, q, heads, d] over the local entries and the retrieved ones."""
        b, heads, q, d = query.shape
        if b != 1:
            raise InvalidInput(f"kNN-memory attention decodes one sequence at a time, got a batch of {b}", "batch")
        kv, g, n = key.shape[1], heads // key.shape[1], key.shape[2]
        cache_layer = self.cache.layers[layer]
        tokens, positions = cache_layer.view_tokens, cache_layer.view_positions
        seen = cache_layer.in_view(q)  # [q, n]
        left = (tokens[None, :] <= tokens[-q:, None]) & ~seen
        cols = left.any(0).nonzero().squeeze(1)  # entries leaving the window during this block (none if q == 1)
        left = left[:, cols]
        grouped = query[0].view(kv, g, q, d)
        local = grouped @ key[0, :, None].transpose(-1, -2) * scaling  # [kv, g, q, n]

        absolute = self.config.positions == "absolute"
        search = self.cache.rotate(query[0], tokens[-q:] + self.offset - positions[-q:] if absolute
                                   else self.distance - positions[-q:])  # un-rotated keys: a fixed distance
        mem_logits, mem_values = self.retrieve(layer, search.view(kv, g, q, d), scaling)
        if absolute:  # queries and entries in view share a frame: these are the true-distance logits
            left_logits = local[..., cols]
        else:
            raw = self.cache.rotate(key[0][:, cols], -positions[cols])
            left_logits = search.view(kv, g, q, d) @ raw[:, None].transpose(-1, -2) * scaling
        retrieved = torch.cat([left_logits.masked_fill(~left, -torch.inf), mem_logits], -1)  # [kv, g, q, c + k]
        if len(cols):
            retrieved = _top(retrieved, self.config.k)
        if self.gate is not None:
            retrieved = _scale(retrieved, self.gate.log_scale[layer].exp().view(kv, g, 1, 1).to(retrieved.dtype))

        heads_seen = cache_layer.head_mask(q)  # per-head restrictions of the policy (adaptive)
        local = local.masked_fill(~(seen if heads_seen is None else seen & heads_seen.view(kv, g, 1, n)), -torch.inf)
        values, left_values = value[0, :, None], value[0, :, None, cols]  # [kv, 1, n or c, d]
        if self.config.mode == "joint":
            weights = torch.cat([local, retrieved], -1).softmax(-1)
            local_weights = weights[..., :n]
            out = (local_weights @ values + weights[..., n:n + len(cols)] @ left_values
                   + _weigh(weights[..., n + len(cols):], mem_values))
        else:
            found = retrieved.isfinite().any(-1, keepdim=True)
            weights = retrieved.masked_fill(~found, 0.0).softmax(-1)
            mem_out = weights[..., :len(cols)] @ left_values + _weigh(weights[..., len(cols):], mem_values)
            gate = torch.sigmoid(self.gate.bias[layer]).view(kv, g, 1, 1).to(mem_out.dtype) * found
            local_weights = local.softmax(-1)
            out = gate * mem_out + (1 - gate) * (local_weights @ values)
        if cache_layer.wants_attention:  # the policy ranks entries by the local attention they receive
            cache_layer.observe(local_weights.reshape(heads, q, n))
        return out.reshape(1, heads, q, d).transpose(1, 2).contiguous()

    def close(self) -> None:
        """End the session: delete its partitions (and its recorded state, if it had one); with `persist`, keep
        it: flush what the cache still holds at the session's layers into memory and record the session's state."""
        if self.persist:
            self.flush()
            save_session(self.memory, SessionState(self.session, self.offset + self.cache.seen,
                                                   self.config.positions, sorted(self.layers), self.model_name))
            return
        if self.resumed is not None:
            end_session(self.memory, self.session, missing_ok=True)
        else:
            for layer, count in self.stored.items():
                if count:
                    for h in range(self.kv_heads):
                        self.memory.delete(partition=self.partition(layer, h))
        self.stored = dict.fromkeys(self.stored, 0)

    def flush(self) -> None:
        """Store every entry the cache holds at the session's layers (sinks and window): after it, every token
        the stream has taken in is in memory."""
        for layer in self.layers:
            held = self.cache.layers[layer]
            if held.is_initialized and len(held.tokens):
                self.store(layer, held.tokens, self.cache.rotate(held.keys, -held.positions), held.values)


def check_config(model: PreTrainedModel, cache: Cache, memory: MemoryBackend, config: KnnConfig,
                 gate: Gate | None) -> KnnConfig:
    """The config with its layers resolved, or InvalidInput before any work is done."""
    config = check_session(model, cache, config)
    if config.blocks:
        raise InvalidInput("block memory runs in lm.blocks.BlockMemoryAttention (lm.attention.attach picks it)",
                           "memory_blocks")
    check_session_memory(memory.spec, head_dim(model))
    if gate is not None:
        gate.check(model)
    return config


def check_session(model: PreTrainedModel, cache: Cache, config: KnnConfig) -> KnnConfig:
    """What every memory session checks (options, layers, a bounded cache): the config with its layers resolved."""
    check_options(config)  # layers: at least one, integers >= 0
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    layers = sorted(set(range(num_layers) if config.layers is None else config.layers))
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        raise InvalidInput(f"unknown layer index {bad[0]!r}: the model has layers 0..{num_layers - 1}", "layers")
    if not isinstance(cache, BoundedCache) or cache.policy.budget is None:
        raise InvalidInput("kNN-memory attention needs a bounded cache policy (any but full)", "policy")
    return dataclasses.replace(config, layers=layers)


def _check_resumed(state: SessionState, config: KnnConfig) -> None:
    """InvalidInput unless `config` stores and positions keys as the resumed session did."""
    if state.positions != config.positions:
        raise InvalidInput(f"session '{state.id}' stored its keys with positions '{state.positions}'; resume it "
                           f"with those, not '{config.positions}'", "positions")
    if list(state.layers) != list(config.layers):
        raise InvalidInput(f"session '{state.id}' stores layers {state.layers}; resume it with those", "layers")


def head_dim(model: PreTrainedModel) -> int:
    """The model's attention head dimension: what a memory's keys and values must have."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


def _top(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest logits of each row; -inf elsewhere."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return logits.masked_fill(~torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True), -torch.inf)


def _scale(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """logits x scale, leaving -inf (missing neighbours) as is and out of the gradient (no 0 x inf)."""
    finite = logits.isfinite()
    return torch.where(finite, logits.masked_fill(~finite, 0.0) * scale, logits)


def _weigh(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weights [..., k] times per-query values [..., k, d]."""
    return (weights[..., None, :] @ values).squeeze(-2)
