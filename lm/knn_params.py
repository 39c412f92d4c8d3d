"""Decoding settings checked without torch: kNN-LM interpolation (`KNNParams`) and sampling (`check_sampling`).
The CLI checks λ, temperature, k and the sampling options here before it imports torch or loads a model.
`lm.knnlm` uses (and re-exports) `KNNParams`, `lm.generate` `check_sampling`."""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memsvc.contract import InvalidInput

__all__ = ["KNNParams", "check_sampling"]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """InvalidInput naming the option unless max_new_tokens >= 0, temperature is finite and >= 0 (0: greedy)
    and top_p in (0, 1]."""
    if max_new_tokens < 0:
        raise InvalidInput(f"max_new_tokens must be >= 0, got {max_new_tokens}", "max_new_tokens")
    if not 0 <= temperature < math.inf:
        raise InvalidInput(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p}", "top_p")


class KNNParams(BaseModel):
    """Interpolation settings: weight λ of p_kNN, softmax temperature over distances, neighbours k."""

    model_config = ConfigDict(extra="ignore")

    lam: float = Field(0.25, ge=0, le=1)
    temp: float = Field(10.0, gt=0, allow_inf_nan=False)
    k: int = Field(64, gt=0, le=1024)

    @classmethod
    def check(cls, **fields: Any) -> KNNParams:
        """KNNParams from the given (non-None) fields, or InvalidInput naming the bad one."""
        try:
            return cls(**{name: value for name, value in fields.items() if value is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0])
            raise InvalidInput(f"{field}: {err['msg']} (got {err['input']!r})", field) from None
