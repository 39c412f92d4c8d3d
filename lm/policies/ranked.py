"""Ranking policies: keep the sinks, the recent window and the best-scored other entries.

`h2o` (Zhang et al. 2023, "H2O: heavy-hitter oracle"), `vatp` (Guo et al. 2024, "Attention score is not
all you need for token importance indicator in KV cache reduction: value also matters"), `knorm` (Devoto
et al. 2024, "A simple and effective L2 norm-based strategy for KV cache compression"), `snapkv` (Li et
al. 2024, "SnapKV") and `adaptive` (Ge et al. 2024, "Model tells you what to discard: adaptive KV cache
compression", FastGen).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lm.policies.base import DEFAULT_SINKS
from lm.policies.selective import CacheEntries, Selective, SelectiveLayer


@dataclass(frozen=True)
class Ranked(Selective):
    """Keep the sinks, the last `window` entries and the best-scored others (`score`), up to the capacity."""

    def score(self, layer: SelectiveLayer, e: CacheEntries) -> torch.Tensor:
        """[n]: higher stays."""
        raise NotImplementedError

    def compact(self, layer: SelectiveLayer, e: CacheEntries, capacity: int) -> tuple[CacheEntries, torch.Tensor]:
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

    def score(self, layer: SelectiveLayer, e: CacheEntries) -> torch.Tensor:
        return e.scores.sum(0)


@dataclass(frozen=True)
class ValueAware(Ranked):
    """vatp: accumulated attention x the value's L1 norm (per query head, summed), plus sinks and window."""

    name = "vatp"
    options = ("budget", "sinks", "window")
    needs_attention = True
    sinks: int = DEFAULT_SINKS
    window: int = 128

    def score(self, layer: SelectiveLayer, e: CacheEntries) -> torch.Tensor:
        kv, n = e.values.shape[1], len(e)
        norms = e.values[0].abs().sum(-1).float()  # [kv, n]
        return (e.scores.view(kv, -1, n) * norms[:, None]).sum((0, 1))


@dataclass(frozen=True)
class KeyNorm(Ranked):
    """knorm: the keys with the lowest L2 norm (mean over KV heads; RoPE keeps norms), plus the recent window."""

    name = "knorm"
    options = ("budget", "window")
    window: int = 128

    def score(self, layer: SelectiveLayer, e: CacheEntries) -> torch.Tensor:
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

    def score(self, layer: SelectiveLayer, e: CacheEntries) -> torch.Tensor:
        if self.prefill(layer):
            votes = layer.observed[:, -self.window:].sum((0, 1)).float()
            return torch.nn.functional.avg_pool1d(votes[None, None], self.kernel, 1, self.kernel // 2,
                                                  count_include_pad=False)[0, 0]
        return e.tokens.float().masked_fill(e.pinned, torch.inf)

    def prefill(self, layer: SelectiveLayer) -> bool:
        return layer.observed is not None and layer.observed.shape[1] > 1

    def compact(self, layer: SelectiveLayer, e: CacheEntries, capacity: int) -> tuple[CacheEntries, torch.Tensor]:
        prefill = self.prefill(layer)
        kept, gone = super().compact(layer, e, capacity)
        if prefill:
            pinned = torch.ones(len(kept), dtype=torch.bool, device=kept.tokens.device)
            pinned[len(kept) - min(self.window, len(kept)):] = False
            kept = CacheEntries(kept.keys, kept.values, kept.tokens, kept.raw, kept.count, kept.scores, pinned)
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

    def score(self, layer: SelectiveLayer, e: CacheEntries) -> torch.Tensor:
        return e.scores.sum(0)

    def compact(self, layer: SelectiveLayer, e: CacheEntries, capacity: int) -> tuple[CacheEntries, torch.Tensor]:
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

    def profile(self, e: CacheEntries, observed: torch.Tensor) -> torch.Tensor:
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
        return masks[layer.modes, torch.arange(len(layer.modes), device=masks.device)]

