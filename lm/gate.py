"""The parameters of gated kNN-memory attention: g = sigmoid(b_h) and a retrieved-logit scale per layer and head.

`Gate` holds them and reads/writes them as a small JSON file; `lm.gate_training` fits them. The trained
SmolLM2 gate ships in `lm/params/smollm2-gate.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from memsvc.contract import InvalidInput, NotFound

PARAMS = Path(__file__).parent / "params"
INITIAL_BIAS = -4.0


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
    def initial(cls, model: PreTrainedModel) -> Gate:
        """An untrained gate: nearly closed (g = sigmoid(INITIAL_BIAS) ~ 0.02, memory barely used), scale 1."""
        config = model.config.get_text_config(decoder=True)
        shape = (config.num_hidden_layers, config.num_attention_heads)
        return cls(torch.full(shape, INITIAL_BIAS, device=model.device), torch.zeros(shape, device=model.device))

    def check(self, model: PreTrainedModel) -> None:
        _check_shape(self.bias, model, "gate")

    def save(self, path: str | Path) -> None:
        data = {"bias": self.bias.tolist(), "log_scale": self.log_scale.tolist(), "meta": self.meta}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Gate:
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


class MemoryBias(nn.Module):
    """The gate of block memory (`lm.blocks`): bias [layers, heads] added to each head's retrieved logits inside
    the joint softmax over local and retrieved entries. 0 is exactly joint attention, the untrained mode;
    a positive bias trusts the (re-positioned) memory more than the local window, a negative one less."""

    def __init__(self, bias: torch.Tensor, meta: dict[str, Any] | None = None):
        super().__init__()
        if bias.ndim != 2:
            raise InvalidInput(f"memory bias must be [layers, heads], got {list(bias.shape)}", "gate")
        self.bias = nn.Parameter(bias.float())
        self.meta = dict(meta or {})

    @classmethod
    def initial(cls, model: PreTrainedModel) -> MemoryBias:
        """Zero bias: exactly joint attention."""
        return cls(torch.zeros(_layers_heads(model)))

    def check(self, model: PreTrainedModel) -> None:
        """InvalidInput unless the bias is shaped [layers, heads] for `model`."""
        _check_shape(self.bias, model, "memory bias")


def _layers_heads(model: PreTrainedModel) -> tuple[int, int]:
    config = model.config.get_text_config(decoder=True)
    return config.num_hidden_layers, config.num_attention_heads


def _check_shape(bias: torch.Tensor, model: PreTrainedModel, what: str) -> None:
    expected = _layers_heads(model)
    if tuple(bias.shape) != expected:
        raise InvalidInput(f"{what} is for {list(bias.shape)} layers x heads, the model has {list(expected)}", "gate")
