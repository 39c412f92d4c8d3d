"""Merging policies: older tokens are folded into summary entries instead of dropped.

`moving-average` and `cumulative-average` (means of what left the window), `recurrent` (a gated linear
state) and `compressive` (Rae et al. 2020, "Compressive transformers for long-range sequence modelling":
a FIFO of mean-pooled compressed memories).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from lm.policies.base import DEFAULT_SINKS
from lm.policies.selective import CacheEntries, Selective, SelectiveLayer


@dataclass(frozen=True)
class Merging(Selective):
    """Summaries: the oldest non-sink tokens are folded into the newest summary until it stands for `pool` tokens,
    then a new one opens; beyond `slots` summaries the two oldest merge (overflow "merge") or the oldest is
    dropped ("drop"). A summary's key and value are a weighted mean of what it absorbed (`weights`)."""

    overflow: ClassVar[str] = "merge"

    @property
    def slots(self) -> int:
        """How many summaries the cache holds at most."""
        return self.budget - self.sinks - self.window

    @property
    def min_kept(self) -> int:
        return self.sinks + self.slots

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        """Weights [m] of a group's members (oldest first, each standing for counts[i] tokens): their mean."""
        return counts / counts.sum()

    def compact(self, layer: SelectiveLayer, e: CacheEntries, capacity: int) -> tuple[CacheEntries, torch.Tensor]:
        sinks = e.raw & (e.tokens < self.sinks)
        counts = e.count.tolist()
        groups = [[i] for i in (~e.raw).nonzero().squeeze(1).tolist()]
        recent = (e.raw & ~sinks).nonzero().squeeze(1).tolist()
        n, used = len(e), 0
        while n > capacity:
            i, used = recent[used], used + 1
            if groups and sum(counts[j] for j in groups[-1]) < self.pool:
                groups[-1].append(i)
                n -= 1
            else:
                groups.append([i])
            if len(groups) > self.slots:
                groups[:2] = [groups[0] + groups[1]] if self.overflow == "merge" else [groups[1]]
                n -= 1
        folded = [g for g in groups if len(g) > 1 or bool(e.raw[g[0]])]  # new or grown summaries
        stay = sinks.nonzero().squeeze(1).tolist() + [g[0] for g in groups if g not in folded] + recent[used:]
        kept = e.take(torch.tensor(sorted(stay), dtype=torch.long, device=e.tokens.device))
        if folded:
            kept = kept.cat(self.summarize(e, folded))
        return kept, torch.tensor(recent[:used], dtype=torch.long, device=e.tokens.device)

    def summarize(self, e: CacheEntries, groups: list[list[int]]) -> CacheEntries:
        """One summary entry per group of entry indices (oldest first)."""
        keys, values, tokens, counts = [], [], [], []
        for group in groups:
            index = torch.tensor(group, device=e.tokens.device)
            w = self.weights(e.count[index].to(e.keys.dtype))[:, None]
            keys.append((e.keys[0][:, index] * w).sum(1))
            values.append((e.values[0][:, index] * w).sum(1))
            tokens.append(e.tokens[index].max())
            counts.append(e.count[index].sum())
        m = len(groups)
        return CacheEntries(torch.stack(keys, 1)[None], torch.stack(values, 1)[None], torch.stack(tokens),
                       torch.zeros(m, dtype=torch.bool, device=e.raw.device), torch.stack(counts),
                       e.scores.new_zeros(e.scores.shape[0], m), torch.zeros(m, dtype=torch.bool, device=e.raw.device))


@dataclass(frozen=True)
class MovingAverage(Merging):
    """moving-average: tokens older than the window become one mean key/value per `pool` tokens; when the
    summaries fill their slots (budget - sinks - window) the two oldest merge, so every older token still
    counts, the oldest ones in coarser means."""

    name = "moving-average"
    options = ("budget", "sinks", "window", "pool")
    sinks: int = DEFAULT_SINKS
    window: int = 192
    pool: int = 16


@dataclass(frozen=True)
class Compressive(Merging):
    """compressive (Compressive Transformer): a FIFO of the recent `window` tokens, then a FIFO compressed
    memory of budget - sinks - window entries, each the mean-pool of `pool` older tokens (compression rate
    `pool`); what leaves the compressed memory is dropped."""

    name = "compressive"
    options = ("budget", "sinks", "window", "pool")
    overflow = "drop"
    sinks: int = DEFAULT_SINKS
    window: int = 192
    pool: int = 4


@dataclass(frozen=True)
class CumulativeAverage(Merging):
    """cumulative-average: one slot holding the running mean of every token that left the window,
    Mem_i = ((k_i, v_i) + i * Mem_{i-1}) / (i + 1); the window is budget - sinks - 1."""

    name = "cumulative-average"
    options = ("budget", "sinks")
    sinks: int = DEFAULT_SINKS
    pool: int = sys.maxsize

    @property
    def slots(self) -> int:
        return 1


@dataclass(frozen=True)
class Recurrent(CumulativeAverage):
    """recurrent: one state slot, Mem_i = f((k_i, v_i), Mem_{i-1}) = (1 - a) * Mem_{i-1} + a * (k_i, v_i), a
    gated linear update with a constant gate a = `rate` (not learned: set by hand to 1/8, a memory of about
    8 tokens' worth of recent evictions, exponentially decaying), Mem_0 = the first evicted token."""

    name = "recurrent"
    rate: float = 0.125

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(len(counts) - 1, -1, -1, dtype=counts.dtype, device=counts.device)
        w = self.rate * (1 - self.rate) ** steps
        w[0] = (1 - self.rate) ** (len(counts) - 1)
        return w
