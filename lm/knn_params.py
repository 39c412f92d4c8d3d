"""kNN-LM interpolation settings (`KNNParams`), without torch: the CLI checks λ, temperature and k here before
it imports torch or loads a model. `lm.knnlm` uses (and re-exports) it."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memsvc.contract import InvalidInput

__all__ = ["KNNParams"]


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
