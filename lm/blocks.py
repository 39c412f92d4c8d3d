"""Block memory: what the bounded cache evicts is kept in contiguous blocks, retrieved whole, and attended at
positions inside the model's trained range, however long the stream.

After InfLLM (Xiao et al. 2024, "InfLLM: Training-free long-context extrapolation for LLMs with an
efficient context memory"); our own code. A `BlockMemoryAttention` is one session, attached like the
per-token memory (`lm.attention.attach(model, cache, KnnConfig(blocks=B, ...))`):

- Store: at each chosen layer, the evicted entries (pre-RoPE keys and values, `KnnConfig.precision`)
  go into that layer's `BlockStore`, RAM torch tensors [kv heads, n, d]; entry i is in block i // B, so
  blocks are runs of B consecutive evictions (consecutive stream tokens under window + sinks; the newest
  block may be partial and is searchable too).
- Retrieve: once per layer and forward (a block of q queries, or one decoded token), for every KV head
  at once: the queries are put in one frame (as if every memory key sat just past the window, at a
  distance of the cache budget), averaged over the q queries, and scored against each block by its
  representative ("max": the best score over all the block's keys, or over its `rep_keys` representative
  keys, the means of equal runs of its keys; "mean": the score of its mean key),
  summed over the group's query heads; the `top_blocks` best blocks are attended whole. A decoding search
  (`decode_every_key`) ranks by every key, or with `decode_candidates` C only the C best blocks by the
  representative keys (two stages: a fixed C x B keys read exactly, whatever the stream's length).
- Position: the retrieved keys are rotated at attention time (`KnnConfig.positions`):
  "ordered" (InfLLM's fixed distance): the retrieved tokens, in stream order, take the positions just
  before the oldest window entry, contiguous and block-internal order kept: the farthest is at most
  budget + block of queries + retrieved tokens from any query, which `check_block_config` requires to
  be within the trained range; "hybrid": a retrieved token keeps its true distance while that is below
  max_position_embeddings - retrieved tokens (- sinks, "below"), and the farther ones take, in stream order,
  the positions at the range's far edge (next to the sinks, which then take the farthest); "absolute": true
  distances, even past the trained range (for comparison). The view's entries older than all of memory (the
  sinks) stay where the cache keeps them (`KnnConfig.sink_positions` "kept", the default; after a re-base at
  0..n-1, so that an "ordered" run may reach below them) or, "below", are rotated to sit just below the lowest
  position memory uses, as in the stream (`sinks_below`): with all the history retrieved (at in-range
  distances) each mode is then full attention, through the cache's re-bases too.
- Attend: the retrieved tokens join the local entries in one softmax ("joint"), or with a learned
  per-head bias on their logits ("gated", `lm.gate.MemoryBias`; its initial value 0 is exactly joint).

Within a forward of q tokens, entries that later queries of the block no longer see but that are not
yet in memory are attended at their true positions (inside the trained range: the cache re-bases). So
a prefill block sees a little more than token-by-token decoding would, and retrieves once for its q
queries: block memory is not token-exact the way the per-token memory (`lm.memory_attention`) is.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from lm.gate import MemoryBias
from lm.knn_config import KnnConfig, most_blocks
from lm.memory_attention import check_session
from memsvc.contract import InvalidInput

CHUNK_KEYS = 2048  # keys a block search converts and multiplies at a time: 768 KiB with their float16 rows (L2-sized)


class BlockStore:
    """One layer's evicted entries: pre-RoPE keys and values [kv heads, n, d] in `dtype`, stream indices [n];
    entry i belongs to block i // `block`; the mean key of every full block is kept (float32), and with
    `rep_keys` R > 0 the R representative keys of every full block (float32 means of its runs of block / R
    consecutive keys), so that "max" scoring reads n / (block / R) float32 keys instead of converting all n."""

    def __init__(self, block: int, dtype: torch.dtype, rep_keys: int = 0):
        if rep_keys < 0 or (rep_keys and block % rep_keys):
            raise InvalidInput(f"representative keys per block must be 0 or divide the block ({block}), got "
                               f"{rep_keys}", "rep_keys")
        self.block, self.dtype, self.rep_keys = block, dtype, rep_keys
        self.count = 0
        self.last_token = -1  # the newest stream index stored
        self.keys = self.values = self.means = self.reps = None
        self.tokens = torch.zeros(0, dtype=torch.long)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.count / self.block)

    def add(self, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append entries: stream indices [m] (int64), keys and values [kv heads, m, d]."""
        m, (kv, _, d) = len(tokens), keys.shape
        if self.keys is None:
            self._allocate(kv, d, max(4 * self.block, m), keys.device)
        elif self.count + m > self.keys.shape[1]:
            self._allocate(kv, d, max(self.keys.shape[1] * 3 // 2, self.count + m), keys.device)
        end = self.count + m
        self.keys[:, self.count:end] = keys.detach()
        self.values[:, self.count:end] = values.detach()
        self.tokens[self.count:end] = tokens
        full_before, self.count = self.count // self.block, end
        self.last_token = max(self.last_token, int(tokens.max()))
        full = end // self.block
        if full > full_before:
            done = self.keys[:, full_before * self.block:full * self.block].float()
            self.means[:, full_before:full] = done.view(kv, full - full_before, self.block, d).mean(2)
            if self.rep_keys:
                runs = self.rep_keys * (full - full_before)
                self.reps[:, full_before * self.rep_keys:full * self.rep_keys] = done.view(kv, runs, -1, d).mean(2)

    def _allocate(self, kv: int, d: int, capacity: int, device: torch.device) -> None:
        """Grow to `capacity` entries (rounded up to whole blocks); slots not yet stored hold zeros (finite, so a
        partial block's empty tail can be gathered and masked)."""
        capacity = math.ceil(capacity / self.block) * self.block
        keys = torch.zeros(kv, capacity, d, dtype=self.dtype, device=device)
        values, means = torch.zeros_like(keys), torch.empty(kv, capacity // self.block, d, device=device)
        reps = torch.empty(kv, capacity // self.block * self.rep_keys, d, device=device) if self.rep_keys else None
        tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        if self.keys is not None:
            keys[:, :self.count], values[:, :self.count] = self.keys[:, :self.count], self.values[:, :self.count]
            full = self.count // self.block
            means[:, :full], tokens[:self.count] = self.means[:, :full], self.tokens[:self.count]
            if self.rep_keys:
                reps[:, :full * self.rep_keys] = self.reps[:, :full * self.rep_keys]
        self.keys, self.values, self.means, self.reps, self.tokens = keys, values, means, reps, tokens

    def scores(self, query: torch.Tensor, representative: str, every_key: bool = False,
               candidates: int = 0) -> torch.Tensor:
        """Each block's score [kv, blocks] for queries [kv, g, d] (float32), summed over the g query heads:
        "max" = the best query-key product over the block's keys (with `rep_keys`, unless `every_key`: over its
        representative keys; a partial newest block over its keys), "mean" = the product with its mean key.
        `candidates` C > 0 with `every_key` and `rep_keys`: a two-stage search; per KV head only the C best blocks
        by the representative keys get the best product over every key, the others -inf (so C x block keys are
        read whatever the store's size; C >= the blocks stored: every block, as `every_key` alone).
        Queries [kv, G, g, d]: G groups scored each on its own in one batched product, [kv, G, blocks] (not with
        the two-stage search)."""
        if query.dim() == 4:
            if self._two_stage(representative, every_key, candidates):
                raise InvalidInput("the two-stage search scores one group of queries at a time", "query")
            kv, groups, g, d = query.shape
            per_head = self._per_head(query.reshape(kv, groups * g, d), representative, every_key)
            return per_head.view(kv, groups, g, -1).sum(2)
        if self._two_stage(representative, every_key, candidates):
            first, exact = self._rerank(query, candidates)
            return torch.full((query.shape[0], self.num_blocks), -torch.inf, device=query.device).scatter_(1, first, exact)
        return self._per_head(query, representative, every_key).sum(1)

    def _per_head(self, query: torch.Tensor, representative: str, every_key: bool) -> torch.Tensor:
        """`scores` per query head, not summed: [kv, h, blocks] for queries [kv, h, d] (float32)."""
        kv, h, _ = query.shape
        full, nb = self.count // self.block, self.num_blocks
        if representative == "mean":
            reps = self.means[:, :full]
            if nb > full:
                reps = torch.cat([reps, self.keys[:, full * self.block:self.count].float().mean(1, keepdim=True)], 1)
            return query @ reps.transpose(-1, -2)
        if self.rep_keys and not every_key:
            logits = query @ self.reps[:, :full * self.rep_keys].transpose(-1, -2)  # [kv, h, full * R]
            per_head = logits.view(kv, h, full, self.rep_keys).amax(-1)
            if nb > full:
                partial = query @ self.keys[:, full * self.block:self.count].float().transpose(-1, -2)
                per_head = torch.cat([per_head, partial.amax(-1, keepdim=True)], -1)
            return per_head
        return self.block_max(query)

    def best(self, query: torch.Tensor, k: int, representative: str, every_key: bool = False,
             candidates: int = 0) -> torch.Tensor:
        """The min(k, blocks stored) best blocks [kv, k] (int64, ascending per KV head; [kv, G, k] for G groups of
        queries [kv, G, g, d]) by `scores` (same arguments), as `topk` picks them over every block's score (so equal
        scores, e.g. layer 0's keys of equal tokens, are broken the same way at every step)."""
        k = min(k, self.num_blocks)
        return self.scores(query, representative, every_key, candidates).topk(k, -1, sorted=False).indices.sort(-1).values

    def _two_stage(self, representative: str, every_key: bool, candidates: int) -> bool:
        return representative == "max" and every_key and bool(self.rep_keys) and 0 < candidates < self.num_blocks

    def _rerank(self, query: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-stage search (see `scores`): the C best blocks [kv, C] by the representative keys (in no order)
        and their best-key scores [kv, C] (float32, summed over the query heads)."""
        first = self.scores(query, "max").topk(candidates, -1, sorted=False).indices
        return first, self.block_max(query, first).sum(1)

    def block_max(self, query: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The best query-key product over each of blocks [kv, s] (block indices per KV head; None: every block
        stored) for each query head of query [kv, g, d] (float32): [kv, g, s]. The keys are read as whole
        blocks of the store (the empty slots of the partial newest block, zeros, are masked). Up to `CHUNK_KEYS` keys
        (or on an accelerator) in one batched product; more on the CPU, per KV head in chunks of `CHUNK_KEYS` keys
        (gathered, converted to float32, multiplied and reduced while they are in the core's cache): the same
        products and maxima, bit for bit."""
        s = self.num_blocks if blocks is None else blocks.shape[1]
        if s * self.block > CHUNK_KEYS and query.device.type == "cpu":
            return self._block_max_chunked(query, blocks, s)
        kv, g, _ = query.shape
        keys = self.keys[:, :s * self.block] if blocks is None else self._rows(self.keys, self._row_index(blocks), s)
        logits = (query @ keys.float().transpose(-1, -2)).view(kv, g, s, self.block)
        tail = self.count % self.block
        if tail and blocks is None:  # the last block is the partial one
            logits[:, :, -1, tail:] = -torch.inf
        elif tail:
            logits[..., tail:].masked_fill_((blocks == self.count // self.block)[:, None, :, None], -torch.inf)
        return logits.amax(-1)

    def _block_max_chunked(self, query: torch.Tensor, blocks: torch.Tensor | None, s: int) -> torch.Tensor:
        """`block_max` per KV head and chunk of `CHUNK_KEYS` keys (s blocks per KV head)."""
        kv, g, d = query.shape
        per = max(1, CHUNK_KEYS // self.block)  # blocks per chunk
        rows = self.keys.view(-1, self.block, d)  # [kv * capacity / B, B, d]
        capacity = self.keys.shape[1] // self.block
        stored = torch.empty(per * self.block * d, dtype=self.dtype, device=query.device)
        converted = stored if self.dtype == torch.float32 else torch.empty(per * self.block * d, device=query.device)
        products = torch.empty(g * per * self.block, device=query.device)
        maxima = torch.empty(kv, g, s, device=query.device)
        tail, partial = self.count % self.block, self.count // self.block
        where = {}  # KV head -> the partial block's place among its blocks
        if tail:
            where = {k: partial for k in range(kv)} if blocks is None else dict(
                (blocks == partial).nonzero().tolist())
        for k in range(kv):
            for first in range(0, s, per):
                m = min(per, s - first)
                into = stored[:m * self.block * d].view(m, self.block, d)
                if blocks is None:
                    into.copy_(self.keys[k, first * self.block:(first + m) * self.block].view(m, self.block, d))
                else:
                    torch.index_select(rows, 0, blocks[k, first:first + m] + k * capacity, out=into)
                keys = converted[:m * self.block * d].view(m * self.block, d)
                if converted is not stored:
                    keys.copy_(into.view(m * self.block, d))
                logits = torch.mm(query[k], keys.t(), out=products[:g * m * self.block].view(g, m * self.block))
                logits = logits.view(g, m, self.block)
                if first <= where.get(k, -1) < first + m:
                    logits[:, where[k] - first, tail:] = -torch.inf
                torch.amax(logits, -1, out=maxima[k, :, first:first + m])
        return maxima

    def rows(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv, s * B, d] (the store's dtype; zeros in empty slots) of blocks [kv, s] ([kv, G, k]:
        s = G * k, each group's blocks in turn), whole blocks copied as rows of the store (one `index_select` each)."""
        index, s = self._row_index(blocks), blocks[0].numel()
        return self._rows(self.keys, index, s), self._rows(self.values, index, s)

    def entries(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream indices [kv, s * B] (int64) of the slots of blocks [kv, s] and which slots hold an entry [kv, s * B]
        (bool; a partial block's tail does not); [kv, G, k * B] for blocks [kv, G, k]."""
        slots = self._slots(blocks)
        return self.tokens[slots.clamp(max=self.count - 1)], slots < self.count

    def holds_partial(self, blocks: torch.Tensor) -> bool:
        """Whether blocks [kv, s] or [kv, G, k] (ascending per row, as `best` gives them) include the partial newest
        block, i.e. whether some of their slots hold no entry."""
        return bool(self.count % self.block) and bool((blocks[..., -1] == self.count // self.block).any())

    def _row_index(self, blocks: torch.Tensor) -> torch.Tensor:
        """The rows [kv * s] (int64) of blocks [kv, s] (block indices per KV head; or [kv, G, k], s = G * k) in a store
        tensor viewed as [kv * capacity / B, B, d]."""
        capacity = self.keys.shape[1] // self.block
        heads = torch.arange(blocks.shape[0], device=blocks.device).view(-1, *[1] * (blocks.dim() - 1))
        return (blocks + capacity * heads).view(-1)

    def _rows(self, x: torch.Tensor, index: torch.Tensor, s: int) -> torch.Tensor:
        """The whole blocks at rows `index` (`_row_index` of s blocks per KV head) of the store tensor x [kv, capacity,
        d]: [kv, s * B, d], one `index_select`."""
        kv, _, d = x.shape
        return x.view(-1, self.block, d).index_select(0, index).view(kv, s * self.block, d)

    def _slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """The entry indices [kv, s * B] (int64) of blocks [kv, s] ([kv, G, k * B] of blocks [kv, G, k])."""
        return (blocks[..., None] * self.block + torch.arange(self.block, device=blocks.device)).flatten(-2)

    def older(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of the stream indices `tokens` [n] are older than every stored entry (bool [n]): the sinks, in a
        view of window + sinks (the store must hold an entry)."""
        return tokens < self.tokens[0]

    def nbytes(self) -> int:
        """Bytes of the stored entries (keys, values, stream indices; block means and representative keys), not
        counting spare capacity."""
        if self.keys is None:
            return 0
        kv, _, d = self.keys.shape
        return (self.count * (2 * kv * d * self.keys.element_size() + self.tokens.element_size())
                + (self.count // self.block) * (1 + self.rep_keys) * kv * d * 4)


class BlockMemoryAttention:
    """One block-memory session (see the module): the cache's evictions at `config.layers` go into a
    `BlockStore` per layer; those layers attend to the local entries and the retrieved blocks.

    `memory` must be None (the session lives in RAM tensors); `gate` is a `MemoryBias` for mode "gated"
    (default: zeros, exactly joint). InvalidInput on a bad config, gate or cache.
    """

    def __init__(self, model: PreTrainedModel, cache: Cache, memory: object | None, config: KnnConfig,
                 gate: MemoryBias | None = None, session: str | None = None):
        if memory is not None:
            raise InvalidInput("block memory keeps its session in RAM tensors: give no memory backend "
                               "(per-token retrieval, memory blocks 0, uses one)", "memory")
        config = check_block_config(model, cache, config, gate)
        self.cache, self.config = cache, config
        self.session = session or uuid.uuid4().hex[:12]
        self.layers = set(config.layers)
        self.gate = None if config.mode == "joint" else (gate if gate is not None else MemoryBias.initial(model)).to(
            model.device)  # a bias loaded from its file is on the CPU
        dtype = getattr(torch, config.precision)
        self.stores = {layer: BlockStore(config.blocks, dtype, config.rep_keys) for layer in self.layers}
        self.trained = model.config.get_text_config(decoder=True).max_position_embeddings
        self.retrieved = config.blocks * most_blocks(config)  # the most tokens one forward retrieves per KV head
        self.max_distance = 0  # the largest query-key position distance any attention of the session used
        self.reused: dict[int, Retrieval] = {}  # per layer: the last decoding step's retrieval (see `fetch`)
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per layer: its buffers
        self.searches = 0  # block searches run (all layers)
        self.last_position = 0  # the position of the newest query `fetch` served

    @property
    def stored(self) -> dict[int, int]:
        """Entries stored per layer (per KV head)."""
        return {layer: store.count for layer, store in self.stores.items()}

    def nbytes(self) -> int:
        """Bytes the session's stores hold (all layers)."""
        return sum(store.nbytes() for store in self.stores.values())

    def store(self, layer: int, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The cache's eviction callback: stream indices [m], pre-RoPE keys and values [1, kv heads, m, d]."""
        if layer in self.stores:
            self.stores[layer].add(tokens, keys[0], values[0])

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention output [1, q, heads, d] for query [1, heads, q, d] over the local key/value [1, kv, n, d]
        and the blocks retrieved for this forward's queries."""
        b, heads, q, d = query.shape
        if b != 1:
            raise InvalidInput(f"block-memory attention decodes one sequence at a time, got a batch of {b}", "batch")
        if q == 1:
            return self.attend_one(layer, query, key, value, scaling)
        kv, n = key.shape[1], key.shape[2]
        g = heads // kv
        cache_layer = self.cache.layers[layer]
        tokens, positions = cache_layer.view_tokens, cache_layer.view_positions
        group = self.config.query_group or q
        batched = q > group and self.stores[layer].count and batch_groups(query.device)
        if batched:
            mem_logits, grouped_values, nearest = self.retrieve_groups(layer, query[0], positions[-q:], tokens,
                                                                       positions, scaling, group)
        else:
            retrieved = [self.retrieve(layer, query[0, :, start:start + group], positions[-q:][start:start + group],
                                       tokens, positions, scaling) for start in range(0, q, group)]  # each group of queries: logits [kv, g, group, r], values, lowest position
            mem_logits = join([logits for logits, _, _ in retrieved], 2)
            nearest = min(lowest for _, _, lowest in retrieved)
        key = self.sinks_below(layer, key, tokens, positions, nearest)
        seen = cache_layer.in_view(q)  # [q, n]
        pending = (tokens[None, :] <= tokens[-q:, None]) & ~seen  # leaving the window during this forward
        heads_seen = cache_layer.head_mask(q)
        allowed = (seen if heads_seen is None else seen & heads_seen.view(kv, g, 1, n)) | pending
        local = (query[0].reshape(kv, g * q, d) @ key[0].transpose(-1, -2) * scaling).view(kv, g, q, n)
        local = local.masked_fill(~allowed, -torch.inf)
        distance = positions[-q:, None] - positions[None, :]
        self.max_distance = max(self.max_distance, int(distance[seen | pending].max()))
        if self.gate is not None:
            mem_logits = mem_logits + self.gate.bias[layer].view(kv, g, 1, 1).to(mem_logits.dtype)
        weights = torch.cat([local, mem_logits], -1).softmax(-1)
        if batched:
            padded = pad_queries(weights[..., n:], group, 2)  # [kv, g, G, group, r]
            mem_out = torch.einsum("kgnqr,knrd->kgnqd", padded, grouped_values).flatten(2, 3)[:, :, :q]
        else:
            mem_out = join([per_kv_head(w, values) for w, (_, values, _)
                            in zip(weights[..., n:].split(group, 2), retrieved, strict=True)], 2)
        out = per_kv_head(weights[..., :n], value[0]) + mem_out
        if cache_layer.wants_attention:  # the policy ranks entries by the local attention they receive
            cache_layer.observe(weights[..., :n].reshape(heads, q, n))
        return out.reshape(1, heads, q, d).transpose(1, 2).contiguous()

    def attend_one(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scaling: float) -> torch.Tensor:
        """`attend` for one decoding step (query [1, heads, 1, d]): the same products, softmax and sums, with the
        masks that are all true for one token left out (a one-token forward sees every entry of its view,
        `lm.policies.base.PolicyLayer.in_view`; only a policy's `head_mask` may restrict it)."""
        _, heads, _, d = query.shape
        kv, n = key.shape[1], key.shape[2]
        g = heads // kv
        cache_layer = self.cache.layers[layer]
        tokens, positions = cache_layer.view_tokens, cache_layer.view_positions
        mem_logits, values, nearest = self.retrieve(layer, query[0], positions[-1:], tokens, positions, scaling,
                                                    decoding=True)
        key = self.sinks_below(layer, key, tokens, positions, nearest)
        local = (query[0].reshape(kv, g, d) @ key[0].transpose(-1, -2) * scaling).view(kv, g, 1, n)
        heads_seen = cache_layer.head_mask(1)
        if heads_seen is not None:
            local = local.masked_fill(~heads_seen.view(kv, g, 1, n), -torch.inf)
        self.max_distance = max(self.max_distance, int(positions[-1] - positions.min()))
        if self.gate is not None:
            mem_logits = mem_logits + self.gate.bias[layer].view(kv, g, 1, 1).to(mem_logits.dtype)
        weights = torch.cat([local, mem_logits], -1).softmax(-1)
        out = per_kv_head(weights[..., :n], value[0]) + per_kv_head(weights[..., n:], values)
        if cache_layer.wants_attention:
            cache_layer.observe(weights[..., :n].reshape(heads, 1, n))
        return out.view(1, 1, heads, d)

    def retrieve(self, layer: int, query: torch.Tensor, at: torch.Tensor, tokens: torch.Tensor,
                 positions: torch.Tensor, scaling: float, decoding: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Logits [kv, g, q, r] (-inf on empty slots) and values [kv, r, d] of the blocks retrieved for the
        queries [heads, q, d] rotated at positions `at` [q] (some of the view's last positions; `place` frames
        the retrieved keys by the view's `tokens` and `positions`), and the lowest position they use; r = 0
        while memory is empty (the position is then the newest query's). `decoding`: the forward is one decoding
        step (see `fetch`)."""
        heads, q, d = query.shape
        store = self.stores[layer]
        if not store.count:
            kv = self.cache.layers[layer].keys.shape[1]
            return query.new_zeros(kv, heads // kv, q, 0), query.new_zeros(kv, 0, d), int(positions[-1])
        kv = store.keys.shape[0]
        rotated, values, bias, nearest = self.fetch(layer, query, at, tokens, positions, decoding)
        logits = per_kv_head(query.reshape(kv, heads // kv, q, d), rotated.transpose(-1, -2))
        self.max_distance = max(self.max_distance, self.last_position - nearest)
        return torch.add(bias[:, None, None, :], logits, alpha=scaling), values, nearest  # logits * scaling, -inf where empty

    def retrieve_groups(self, layer: int, query: torch.Tensor, at: torch.Tensor, tokens: torch.Tensor,
                        positions: torch.Tensor, scaling: float, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`retrieve` for every group of `group` consecutive queries of a forward at once, queries [heads, q, d] at
        positions `at` [q] (memory not empty): one batched search, gather and rotation for the G = ceil(q / group)
        groups, where the loop of `attend` would wait on each group's search (on an accelerator, `batch_groups`).
        Each group retrieves its own blocks, as in the loop: logits [kv, g, q, r], values [kv, G, r, d] and the
        lowest position any group's keys use."""
        heads, q, d = query.shape
        store = self.stores[layer]
        kv = store.keys.shape[0]
        g = heads // kv
        frames = pad_queries(self.cache.rotate(query, self.cache.policy.budget - at).float(), group, 1)
        sizes = torch.full((frames.shape[1], 1), group, device=query.device)
        sizes[-1] = q - group * (frames.shape[1] - 1)  # the last group may be short: the mean of its own queries
        frames = (frames.sum(2) / sizes).view(kv, g, -1, d).transpose(1, 2)  # [kv, G, g, d]
        chosen = store.best(frames, self.config.top_blocks, self.config.representative)  # [kv, G, k]
        self.searches += chosen.shape[1]
        self.last_position = int(positions[-1])
        keys, values = store.rows(chosen)
        groups, r = chosen.shape[1], keys.shape[1] // chosen.shape[1]
        widens = torch.promote_types(keys.dtype, query.dtype) == query.dtype
        keys = (keys if widens else keys.to(query.dtype)).view(kv, groups, r, d)
        bias = query.new_zeros(kv, groups, 1, r)
        if not store.holds_partial(chosen) and self.config.positions == "ordered":  # one run of positions for all
            nearest = int(positions[tokens > store.last_token].min()) - r
            keys = self.cache.rotary.rotate_from(keys, nearest, dtype=query.dtype)
        else:
            found, valid = store.entries(chosen)  # [kv, G, r]
            placed = self.place(found.view(kv * groups, r), valid.view(kv * groups, r), tokens, positions,
                                store).view(kv, groups, r)
            nearest = int(placed[valid].min())
            keys = self.cache.rotate(keys, placed, dtype=query.dtype)[0]
            bias.masked_fill_(~valid[:, :, None], -torch.inf)
        self.max_distance = max(self.max_distance, self.last_position - nearest)
        logits = torch.einsum("kgnqd,knrd->kgnqr", pad_queries(query.reshape(kv, g, q, d), group, 2), keys)
        logits = torch.add(bias[:, None], logits, alpha=scaling).flatten(2, 3)[:, :, :q]
        return logits, values.view(kv, groups, r, d).to(query.dtype), nearest

    def fetch(self, layer: int, query: torch.Tensor, at: torch.Tensor, tokens: torch.Tensor,
              positions: torch.Tensor, decoding: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The retrieved keys rotated into place [kv, r, d] and values [kv, r, d] (query dtype), a bias [kv, r]
        (query dtype: 0 where a slot holds an entry, -inf where not) and the lowest position used, for queries
        [heads, q, d] (see `retrieve`).

        Decoding (`decoding`: a forward of one token) with "ordered" positions reuses a step's retrieval for the next steps of its query
        group (`config.decode_group` consecutive tokens, by default `query_group`, as a group of queries inside one
        forward shares one; 1 or 0: a search at every step),
        unless the cache re-based in between; the entries stored since that search are added at their true
        positions (the nearest beyond the window: in range, and below none of the retrieved, which sit before
        the window). The retrieved keys then sit up to group - 1 positions farther than at the search, which
        the reach `check_block_config` requires (a group is at most the cache's period) covers; "hybrid"
        places keys at the range's edge, so it searches at every step. A reused retrieval lives in the layer's
        `buffers`: each search rotates the retrieved keys straight into them, and each later step of the group
        rotates only the entries stored since the step before (the RoPE cos/sin come from the cache's tables,
        `lm.rope`, read as one slice where the positions are consecutive)."""
        store, token = self.stores[layer], int(tokens[-1])
        self.last_position = int(positions[-1])
        offset = self.last_position - token
        last = self.reused.get(layer) if decoding else None
        group = decode_steps(self.config)
        group = min(group, self.cache.period or group)
        if (last is not None and last.offset == offset and token - last.token < group
                and store.count - last.count < group):  # the stored since fill slots r .. r + group - 2
            self.add_stored(last, store, query.dtype)
            return last.keys, last.values, last.bias, last.nearest
        heads, q, d = query.shape
        kv = store.keys.shape[0]
        if q == 1:  # as if every key sat just past the window
            frame = self.cache.rotary.rotate_from(query, self.cache.policy.budget - int(at[0]))[:, 0].float()
        else:
            frame = self.cache.rotate(query, self.cache.policy.budget - at).float().mean(1)
        top = self.config.decode_top_blocks if decoding and self.config.decode_top_blocks else self.config.top_blocks
        chosen = store.best(frame.view(kv, heads // kv, d), top, self.config.representative,
                            every_key=decoding and self.config.decode_every_key,
                            candidates=self.config.decode_candidates)
        self.searches += 1
        keys, values = store.rows(chosen)
        r, full = keys.shape[1], not store.holds_partial(chosen)
        reuse = decoding and group > 1 and self.config.positions == "ordered"
        if reuse:  # + group - 1 slots for the entries stored later
            into_keys, into_values, bias = self.buffers(layer, kv, r + group - 1, d, query.dtype)
        else:
            into_keys, into_values, bias = None, None, query.new_zeros(kv, r)
        widens = torch.promote_types(keys.dtype, query.dtype) == query.dtype  # rotate the stored dtype, no copy
        keys = keys if widens else keys.to(query.dtype)
        if full and self.config.positions == "ordered":  # every slot holds an entry: one run of positions
            nearest = int(positions[tokens > store.last_token].min()) - r
            keys = self.cache.rotary.rotate_from(keys, nearest, out=None if into_keys is None else into_keys[:, :r],
                                                 dtype=query.dtype)
        else:
            found, valid = store.entries(chosen)
            placed = self.place(found, valid, tokens, positions, store)  # [kv, r]
            nearest = int(placed[valid].min())
            keys = self.cache.rotate(keys, placed, out=None if into_keys is None else into_keys[None, :, :r],
                                     dtype=query.dtype)[0]
        if not reuse:
            return keys, values.to(query.dtype), bias if full else bias.masked_fill_(~valid, -torch.inf), nearest
        into_values[:, :r] = values
        bias[:, :r] = 0
        if not full:
            bias[:, :r].masked_fill_(~valid, -torch.inf)
        into_keys[:, r:], into_values[:, r:], bias[:, r:] = 0, 0, -torch.inf  # the slots for entries stored later
        self.reused[layer] = Retrieval(token, offset, store.count, r, into_keys, into_values, bias, nearest)
        return into_keys, into_values, bias, nearest

    def add_stored(self, last: Retrieval, store: BlockStore, dtype: torch.dtype) -> None:
        """Put the entries stored since the reused retrieval `last` was last brought up to date (usually one per
        step) into its free slots, rotated to their true positions (stream index + its offset)."""
        done, now = last.count + last.added, store.count
        if now == done:
            return
        at, keys = last.r + last.added, store.keys[:, done:now].to(dtype)
        if now - done == 1:
            first = int(store.tokens[done]) + last.offset
            self.cache.rotary.rotate_from(keys, first, out=last.keys[:, at:at + 1])
        else:
            fresh_at = store.tokens[done:now] + last.offset
            self.cache.rotate(keys, fresh_at, out=last.keys[:, at:at + now - done])
            first = int(fresh_at.min())
        last.values[:, at:at + now - done] = store.values[:, done:now]
        last.bias[:, at:at + now - done] = 0
        last.added, last.nearest = now - last.count, min(last.nearest, first)

    def buffers(self, layer: int, kv: int, slots: int, d: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's decoding buffers for a reused retrieval: keys and values [kv, slots, d] and a bias [kv, slots]
        (`dtype`; see `fetch`); the next search of the layer overwrites them when its shape is
        the same (as soon as memory holds `top_blocks` blocks), instead of allocating new ones."""
        held = self.held.get(layer)
        if held is None or held[0].shape != (kv, slots, d) or held[0].dtype != dtype:
            device = self.stores[layer].keys.device
            held = (torch.empty(kv, slots, d, dtype=dtype, device=device),
                    torch.empty(kv, slots, d, dtype=dtype, device=device),
                    torch.empty(kv, slots, dtype=dtype, device=device))
            self.held[layer] = held
        return held

    def place(self, found: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
              store: BlockStore) -> torch.Tensor:
        """Positions [kv, r] (int64) for the entries of `store` retrieved, stream indices `found` [kv, r] (stream
        order within each row), in the frame of the view's `positions`, per `config.positions` (see the module;
        "hybrid" with the sinks "below" leaves the range's farthest distances to the view's entries older than all of
        memory, the sinks, which `sinks_below` puts there)."""
        offset = int(positions[-1] - tokens[-1])  # position - stream index of this forward's queries
        mode = self.config.positions
        if mode == "absolute":
            return found + offset
        if mode == "ordered":
            base = positions[tokens > store.last_token].min()  # the oldest entry newer than all of memory
            return base - valid.sum(-1, keepdim=True) + valid.cumsum(-1) - 1
        sinks = int(store.older(tokens).sum()) if self.config.sink_positions == "below" else 0
        far = valid & (tokens[-1] - found >= self.trained - self.retrieved - sinks)
        edge = positions[-1] - self.trained + sinks + far.cumsum(-1)  # distances trained - sinks - 1, ... - 2, ...
        return torch.where(far, edge, found + offset)

    def sinks_below(self, layer: int, key: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                    nearest: int) -> torch.Tensor:
        """The local keys [1, kv, n, d] (view stream indices `tokens` and `positions` [n]); with sink positions
        "below", the entries older than all of the layer's memory, the sinks, rotated by one shift so that the
        newest sits just below `nearest`, the lowest position the retrieved keys use, where it sits at or above it
        (a copy; else `key`).

        In the stream the sinks are the farthest tokens; after a re-base the cache keeps them at 0..n-1, and an
        "ordered" run of retrieved tokens, put just before the window, reaches below them, so that the sinks look
        nearer than memory (bench/results/longctx.md section 18: at 8K tokens, every block retrieved, that cost
        full attention's answer). Below the run they stay within the reach `check_block_config` requires (budget
        + period + retrieved counts them), and with every block retrieved "ordered" is full attention again."""
        store = self.stores[layer]
        if self.config.sink_positions == "kept" or not store.count:
            return key
        sinks = store.older(tokens)
        if not sinks.any():
            return key
        shift = nearest - 1 - int(positions[sinks].max())
        if shift >= 0:
            return key
        key = key.clone()
        key[:, :, sinks] = self.cache.rotate(key[:, :, sinks], torch.full((int(sinks.sum()),), shift))
        self.max_distance = max(self.max_distance, int(positions[-1]) - int(positions[sinks].min()) - shift)
        return key

    def close(self) -> None:
        """End the session: drop its stores."""
        self.reused, self.held = {}, {}
        self.stores = {layer: BlockStore(store.block, store.dtype, store.rep_keys) for layer, store in self.stores.items()}


@dataclass
class Retrieval:
    """One decoding step's retrieval at a layer, reused by the next steps of its query group: the query's stream
    index and position - stream index offset, the entries stored then, the r slots retrieved, the rotated keys
    and values [kv, r + group - 1, d] (the last group - 1 slots for entries stored later), the bias [kv, r + group
    - 1] (0 where a slot holds an entry, -inf where not), the lowest position used, and how many entries stored
    since have been added (`BlockMemoryAttention.add_stored`)."""

    token: int
    offset: int
    count: int
    r: int
    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    nearest: int
    added: int = 0


def decode_steps(config: KnnConfig) -> int:
    """How many consecutive decoding steps share one search (`KnnConfig.decode_group`, None: `query_group`; 0 and
    1 both mean every step)."""
    return config.query_group if config.decode_group is None else config.decode_group


def batch_groups(device: torch.device) -> bool:
    """Whether a forward's query groups search memory in one batched pass (`BlockMemoryAttention.retrieve_groups`):
    on an accelerator, where a loop over the groups waits on each small step (82 s for an 8K-token prefill of a
    30-layer model on an H200, bench/results/longctx.md section 16); on the CPU the loop, whose products are
    smaller and stay in cache."""
    return device.type != "cpu"


def pad_queries(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """x with its dimension `dim` (q queries) zero-padded to G = ceil(q / group) groups and split as [..., G, group,
    ...]."""
    q = x.shape[dim]
    padding = [0, 0] * (x.dim() - dim - 1) + [0, -q % group]
    return torch.nn.functional.pad(x, padding).unflatten(dim, (-1, group))


def join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat of parts along dim, without the copy when there is one part (a decoding step's one group)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def per_kv_head(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [kv, g, q, m] @ b [kv, m, d] -> [kv, g, q, d], as one batched matmul per KV head (no broadcast copies)."""
    kv, g, q, m = a.shape
    return (a.reshape(kv, g * q, m) @ b).view(kv, g, q, b.shape[-1])


def check_block_config(model: PreTrainedModel, cache: Cache, config: KnnConfig, gate: MemoryBias | None) -> KnnConfig:
    """The block-memory config with its layers resolved, or InvalidInput before any work is done; in-range
    positions need budget + the cache's period + retrieved tokens <= the model's trained context."""
    config = check_session(model, cache, config)
    if not config.blocks:
        raise InvalidInput("block memory needs memory blocks > 0 (0 is per-token retrieval)", "memory_blocks")
    trained = model.config.get_text_config(decoder=True).max_position_embeddings
    retrieved = config.blocks * most_blocks(config)
    reach = cache.policy.budget + cache.period + retrieved
    if config.positions != "absolute" and reach > trained:
        raise InvalidInput(f"retrieved blocks ({most_blocks(config)} x {config.blocks} tokens) + cache budget "
                           f"({cache.policy.budget}) + period ({cache.period}) = {reach} must fit the model's trained "
                           f"context ({trained})", "top_blocks")
    if gate is not None:
        if not isinstance(gate, MemoryBias):
            raise InvalidInput("block memory's gate is a lm.gate.MemoryBias (a per-head bias on retrieved logits)",
                               "gate")
        gate.check(model)
    return config
