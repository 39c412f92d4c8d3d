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
    """The model's own rotary embedding, applied as a rotation by position offsets.

    With a plain ("default") RoPE the cos/sin of every offset in [-max_position_embeddings,
    max_position_embeddings) are computed once per device and dtype, by the model's own rotary module, and
    looked up afterwards: the same values as computing them per call (each angle is one product, position x
    frequency), without recomputing them at every rotation. Offsets outside that range, and RoPE types that
    change their frequencies with the input (dynamic, longrope), are computed per call.
    """

    def __init__(self, model: PreTrainedModel):
        self.rope = model.get_decoder().rotary_emb
        if getattr(self.rope, "attention_scaling", 1.0) != 1.0:
            raise InvalidInput("bounded caches need a plain rotation RoPE (this model scales its attention)", "model")
        self.reach = model.config.get_text_config(decoder=True).max_position_embeddings
        self.cached = getattr(self.rope, "rope_type", "default") == "default"
        self.tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rotate(self, x: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., n, head_dim] rotated by the RoPE angles of position offsets delta [n] (int64; or [..., n], one
        offset per row of x), in `dtype` (default x's; a wider one gives x.to(dtype) rotated, the same floats
        without the copy) on x's device; the result has shape broadcast(x, [1, *delta.shape, head_dim]) and is
        written to `out` if given (of that shape)."""
        if dtype is not None and dtype != x.dtype and not self.cached:
            x = x.to(dtype)
        cos, sin = self.angles(x, delta.to(x.device), dtype)
        return torch.add(x * cos, rotate_half(x) * sin, out=out)

    def rotate_from(self, x: torch.Tensor, start: int, out: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., n, head_dim] rotated by the consecutive offsets start, start + 1, ..., start + n - 1, in `dtype`
        (as `rotate`), into `out` if given (x's shape): `rotate` with delta = arange(start, start + n), the cos/sin
        read as one slice of the tables (no index), so the same values bit for bit."""
        n, low = x.shape[-2], start + self.reach
        if not (self.cached and 0 <= low and start + n <= self.reach):
            rotated = self.rotate(x, torch.arange(start, start + n, device=x.device), dtype=dtype).view(x.shape)
            return rotated if out is None else out.copy_(rotated)
        cos, sin = self.table(x, dtype)
        return torch.add(x * cos[low:low + n], rotate_half(x) * sin[low:low + n], out=out)

    def angles(self, x: torch.Tensor, delta: torch.Tensor,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, *delta.shape, head_dim] (`dtype`, default x's) of the RoPE angles of offsets delta
        (int64, x's device), as the model's rotary module computes them."""
        if self.cached and delta.numel():
            low, high = (int(v) for v in torch.aminmax(delta))
            if -self.reach <= low and high < self.reach:
                cos, sin = self.table(x, dtype)
                rows = (delta + self.reach).reshape(-1)
                shape = (1, *delta.shape, cos.shape[-1])
                return cos.index_select(0, rows).view(shape), sin.index_select(0, rows).view(shape)
        return self.rope(x if dtype is None else x.to(dtype), delta[None])

    def table(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [2 * reach, head_dim] (`dtype`, default x's; x's device) of offsets -reach .. reach - 1,
        built once."""
        key = (x.device, dtype or x.dtype)
        if key not in self.tables:
            offsets = torch.arange(-self.reach, self.reach, device=x.device)
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable with autograd too
                cos, sin = self.rope(torch.empty(0, dtype=key[1], device=x.device), offsets[None])
            self.tables[key] = (cos[0], sin[0])
        return self.tables[key]
