"""RoPE (Su et al. 2021, "RoFormer") as a rotation that moves keys between positions.

RoPE rotates each pair of a query's or key's dimensions by position x frequency. Rotations compose
additively, so a key rotated at position p becomes the key at p + delta when rotated by delta, and
rotating by -p gives the pre-RoPE key. Bounded caches re-position kept entries this way, and hand
evicted keys on un-rotated.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import rotate_half

from memsvc.contract import InvalidInput


class Rotary:
    """The model's own rotary embedding, applied as a rotation by position offsets."""

    def __init__(self, model: PreTrainedModel):
        self.rope = model.get_decoder().rotary_emb
        if getattr(self.rope, "attention_scaling", 1.0) != 1.0:
            raise InvalidInput("bounded caches need a plain rotation RoPE (this model scales its attention)", "model")

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x [..., n, head_dim] rotated by the RoPE angles of position offsets delta [n] (int64), same dtype and
        device as x."""
        cos, sin = self.rope(x, delta[None].to(x.device))
        return x * cos + rotate_half(x) * sin
