"""The memory gate of gated kNN-memory attention: g = sigmoid(b_h) and a retrieved-logit scale per layer and head.

`Gate` holds the parameters and reads/writes them as a small JSON file; `train_gate` fits them with the model
frozen, on long documents streamed through a bounded cache with gated memory attention (the loss is the
next-token loss past the window, where memory can matter). The trained SmolLM2 gate ships in
`lm/params/smollm2-gate.json`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from memsvc.errors import InvalidInput, NotFound

PARAMS = Path(__file__).parent / "params"


class Gate(nn.Module):
    """bias [layers, heads] (g = sigmoid(bias)) and log_scale [layers, heads] (retrieved logits x exp(log_scale))."""

    def __init__(self, bias: torch.Tensor, log_scale: torch.Tensor, meta: dict[str, Any] | None = None):
        super().__init__()
        if bias.ndim != 2 or bias.shape != log_scale.shape:
            raise InvalidInput(f"gate bias {list(bias.shape)} and log_scale {list(log_scale.shape)} must be the "
                               "same [layers, heads] shape", "gate")
        self.bias, self.log_scale = nn.Parameter(bias.float()), nn.Parameter(log_scale.float())
        self.meta = dict(meta or {})

    @classmethod
    def zeros(cls, model: PreTrainedModel) -> "Gate":
        """An untrained gate: g = 0.5 and scale 1 everywhere."""
        config = model.config.get_text_config(decoder=True)
        shape = (config.num_hidden_layers, config.num_attention_heads)
        return cls(torch.zeros(shape), torch.zeros(shape))

    def check(self, model: PreTrainedModel) -> None:
        config = model.config.get_text_config(decoder=True)
        expected = (config.num_hidden_layers, config.num_attention_heads)
        if tuple(self.bias.shape) != expected:
            raise InvalidInput(f"gate is for {list(self.bias.shape)} layers x heads, the model has "
                               f"{list(expected)}", "gate")

    def save(self, path: str | Path) -> None:
        data = {"bias": self.bias.tolist(), "log_scale": self.log_scale.tolist(), "meta": self.meta}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Gate":
        """A gate from a JSON file written by `save` (or the name of a shipped one, e.g. "smollm2")."""
        path = Path(path)
        if not path.suffix and (PARAMS / f"{path.name}-gate.json").exists():
            path = PARAMS / f"{path.name}-gate.json"
        if not path.is_file():
            raise NotFound(f"no gate parameters at {path}", "gate")
        try:
            data = json.loads(path.read_text())
            return cls(torch.tensor(data["bias"]), torch.tensor(data["log_scale"]), data.get("meta"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{path} is not a gate parameter file: {exc}", "gate") from None


def train_gate(model: PreTrainedModel, documents: list[torch.Tensor], *, window: int, sinks: int, k: int,
               positions: str, steps: int, lr: float = 0.05, block: int | None = None,
               on_step: Callable[[int, float], None] | None = None) -> tuple[Gate, list[dict[str, float]]]:
    """Fit a gate to token streams `documents` ([1, n] each, cycled for `steps` blocks); returns it and its curve.

    Each step is one block of one document: forward with the model frozen, gradient into the gate only
    (the cache stores detached entries, so nothing flows into earlier blocks), one Adam step. The curve
    records each step's mean next-token loss over the block's scored tokens.
    """
    from lm.cache import BoundedCache, Window, stream
    from lm.memory_attention import KnnConfig, memory_attention

    policy = Window(window, sinks)
    gate = Gate.zeros(model)
    gate.meta = {"window": window, "sinks": sinks, "k": k, "positions": positions}
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    model.requires_grad_(False)
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    config = KnnConfig(k=k, mode="gated", positions=positions)
    while len(curve) < steps:
        for ids in documents:
            cache = BoundedCache(model, policy)
            with memory_attention(model, cache, config=config, gate=gate):
                for start, out in stream(model, ids[:, :-1], cache, block):
                    q = out.logits.shape[1]
                    targets = ids[0, start + 1:start + q + 1]
                    scored = torch.arange(start, start + q) >= window  # memory only matters past the window
                    if not scored.any():
                        continue
                    loss = nn.functional.cross_entropy(out.logits[0, scored], targets[scored])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    curve.append({"step": len(curve), "loss": loss.item(), "seconds": time.perf_counter() - started})
                    if on_step is not None:
                        on_step(len(curve), loss.item())
                    if len(curve) == steps:
                        break
            if len(curve) == steps:
                break
    gate.meta["steps"], gate.meta["final_loss"] = steps, _mean([c["loss"] for c in curve[-10:]])
    return gate, curve


def plot_curve(curve: list[dict[str, float]], path: str | Path) -> None:
    """The training curve (per-step loss and its running mean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [c["step"] for c in curve], [c["loss"] for c in curve]
    window = max(1, len(losses) // 10)
    running = [_mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="block loss")
    ax.plot(steps, running, label=f"running mean ({window} steps)")
    ax.set_xlabel("step (one block of one document)")
    ax.set_ylabel("next-token loss past the window")
    ax.set_title("memory gate training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
