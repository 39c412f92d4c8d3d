"""Fit the memory gate with the model frozen, on long documents streamed through a bounded cache with gated memory
attention; the loss is the next-token loss past the window, where memory can matter. Per-token memory's gate is a
`lm.gate.Gate` (starting nearly closed); block memory's is a `lm.gate.MemoryBias` (starting at 0, exactly joint).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lm.attention import attach
from lm.cache import BoundedCache, stream
from lm.gate import Gate, MemoryBias
from lm.memory_attention import KnnConfig
from lm.policies import Window


def train_gate(model: PreTrainedModel, documents: list[torch.Tensor], *, window: int, sinks: int, k: int = 32,
               positions: str | None = None, epochs: int, lr: float = 0.1, block: int | None = None,
               memory_blocks: int = 0, on_step: Callable[[dict[str, float]], None] | None = None
               ) -> tuple[Gate | MemoryBias, list[dict[str, float]]]:
    """Fit a gate to token streams `documents` ([1, n] each); returns it and its curve (one point per step).

    `memory_blocks` 0: per-token memory (`k` entries per query, `positions` default "absolute"), the gate a `Gate`
    that starts nearly closed (window + sinks behaviour) and opens where retrieval lowers the loss. B > 0: block
    memory in blocks of B with the default `KnnConfig` otherwise (`positions` default "ordered"; `k` unused), the
    gate a `MemoryBias` [layers, heads] on the retrieved logits that starts at 0 (exactly joint attention).

    Each epoch streams every document once; each block with tokens past the window is one step: forward
    with the model frozen, gradient into the gate only (the cache and block memory store detached entries, so
    nothing flows into earlier blocks), one Adam step on the mean next-token loss of those tokens.
    """
    policy = Window(window, sinks)
    if memory_blocks:
        config = KnnConfig(blocks=memory_blocks, mode="gated", positions=positions)
        gate = MemoryBias.initial(model).to(model.device)
    else:
        config = KnnConfig(blocks=0, k=k, mode="gated", positions=positions)
        gate = Gate.initial(model)
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    model.requires_grad_(False)
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(epochs):
        for ids in documents:
            cache = BoundedCache(model, policy)
            with attach(model, cache, config, gate=gate):
                for start, out in stream(model, ids[:, :-1], cache, block):
                    q = out.logits.shape[1]
                    device = out.logits.device
                    scored = torch.arange(start, start + q, device=device) >= window  # memory only matters past the window
                    if not scored.any():
                        continue
                    targets = ids[0, start + 1:start + q + 1].to(device)
                    loss = nn.functional.cross_entropy(out.logits[0, scored], targets[scored])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    curve.append({"step": len(curve), "epoch": epoch, "loss": loss.item(),
                                  "seconds": time.perf_counter() - started})
                    if on_step is not None:
                        on_step(curve[-1])
    memory = {"memory_blocks": config.blocks, "top_blocks": config.top_blocks, "rep_keys": config.rep_keys,
              "query_group": config.query_group} if config.blocks else {"k": k}
    gate.meta = {"window": window, "sinks": sinks, **memory, "positions": config.positions, "epochs": epochs,
                 "lr": lr, "steps": len(curve), "epoch_loss": epoch_means(curve)}
    return gate, curve


def epoch_means(curve: list[dict[str, float]]) -> list[float]:
    """Mean step loss of each epoch (every epoch sees the same blocks, so these are comparable)."""
    epochs = sorted({int(c["epoch"]) for c in curve})
    return [_mean([c["loss"] for c in curve if c["epoch"] == e]) for e in epochs]


def plot_curve(curve: list[dict[str, float]], path: str | Path, smooth: int = 20) -> None:
    """The training curve as a PNG: each step's block loss and each epoch's mean over the same blocks (left), and
    with two or more epochs each later epoch's loss minus the first epoch's on the same block, as a running mean
    over `smooth` blocks (right: the gain, which the blocks' spread hides on the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = sorted({int(c["epoch"]) for c in curve})
    fig, axes = plt.subplots(1, 2 if len(epochs) > 1 else 1, figsize=(11 if len(epochs) > 1 else 6, 3.5),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], alpha=0.35, label="block loss (one step)")
    ends = [max(c["step"] for c in curve if c["epoch"] == e) for e in epochs]
    ax.plot(ends, epoch_means(curve), marker="o", label="epoch mean (same blocks each epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss past the window")
    ax.set_title("memory gate training (model frozen)")
    ax.legend()
    if len(epochs) > 1:
        ax = axes[0, 1]
        first = [c["loss"] for c in curve if c["epoch"] == epochs[0]]
        for e in epochs[1:]:
            diff = [c["loss"] - f for c, f in zip([c for c in curve if c["epoch"] == e], first, strict=False)]
            means = [sum(diff[max(0, i - smooth + 1):i + 1]) / len(diff[max(0, i - smooth + 1):i + 1])
                     for i in range(len(diff))]
            ax.plot(range(len(diff)), means, label=f"epoch {e} - epoch {epochs[0]}")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xlabel("block (same order each epoch)")
        ax.set_ylabel(f"loss change, running mean of {smooth}")
        ax.set_title("gain over the first epoch on the same blocks")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
