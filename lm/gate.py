"""The parameters of gated memory attention, per layer and head, each read/written as a small JSON file and fitted
by `lm.gate_training`:

- `Gate` (per-token memory, `lm.memory_attention`): g = sigmoid(b_h) and a retrieved-logit scale; the trained
  SmolLM2 gate ships in `lm/params/smollm2-gate.json`.
- `MemoryBias` (block memory, `lm.blocks`): a bias on the retrieved logits inside the joint softmax (0 = joint);
  the trained SmolLM2 bias ships in `lm/params/smollm2-memory-bias.json`.
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


class Params(nn.Module):
    """Per-(layer, head) parameters saved as JSON: the float tensors named in `TENSORS` and a `meta` dict; a shipped
    file is lm/params/NAME-`SUFFIX`.json."""

    TENSORS: tuple[str, ...] = ()
    SUFFIX = ""

    def save(self, path: str | Path) -> None:
        """Write the tensors (as nested lists) and `meta` to the JSON file `path`."""
        data = {name: getattr(self, name).tolist() for name in self.TENSORS}
        Path(path).write_text(json.dumps({**data, "meta": self.meta}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Params:
        """The parameters in a JSON file written by `save`, or the shipped ones of a model name (e.g. "smollm2":
        lm/params/smollm2-SUFFIX.json). NotFound without such a file, InvalidInput if it does not hold them."""
        path = Path(path)
        if not path.suffix and (PARAMS / f"{path.name}-{cls.SUFFIX}.json").exists():
            path = PARAMS / f"{path.name}-{cls.SUFFIX}.json"
        if not path.is_file():
            raise NotFound(f"no {cls.SUFFIX} parameters at {path}", "gate")
        try:
            data = json.loads(path.read_text())
            return cls(*(torch.tensor(data[name]) for name in cls.TENSORS), meta=data.get("meta"))
        except (ValueError, KeyError, TypeError, InvalidInput) as exc:
            raise InvalidInput(f"{path} is not a {cls.SUFFIX} parameter file: {exc}", "gate") from None


class Gate(Params):
    """bias [layers, heads] (g = sigmoid(bias)) and log_scale [layers, heads] (retrieved logits x exp(log_scale))."""

    TENSORS, SUFFIX = ("bias", "log_scale"), "gate"

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


class MemoryBias(Params):
    """The gate of block memory (`lm.blocks`): bias [layers, heads] added to each head's retrieved logits inside
    the joint softmax over local and retrieved entries. 0 is exactly joint attention, the untrained mode;
    a positive bias trusts the (re-positioned) memory more than the local window, a negative one less."""

    TENSORS, SUFFIX = ("bias",), "memory-bias"

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
