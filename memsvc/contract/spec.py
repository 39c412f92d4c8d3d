"""What a memory is: `MemorySpec`, its metric, value and index kinds, and the limits on its name.

Distances are always "smaller is closer": squared L2 for `l2`, the negated inner product for `ip`,
and 1 - cosine similarity for `cosine`. Missing neighbours have id -1 and distance +inf.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memsvc.contract.checks import MAX_EF_SEARCH, MAX_NPROBE, check_json, invalid_input
from memsvc.contract.errors import InvalidInput

Metric = Literal["l2", "ip", "cosine"]
ValueKind = Literal["none", "vector", "token"]
IndexKind = Literal["flat", "ivfpq", "hnsw"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Sub-quantizer counts that faiss' GPU IVFPQ supports; the default pq_m is chosen among them.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)


def default_pq_m(dim: int) -> int:
    """The largest GPU-compatible sub-quantizer count dividing dim with at least 8 dims each."""
    fits = [m for m in GPU_PQ_M if dim % m == 0 and dim // m >= 8]
    return max(fits) if fits else 1


class MemorySpec(BaseModel):
    """What a memory is: fixed at creation, except `metadata` and the search parameters `ef_search` and
    `nprobe`, which callers may change (`set_metadata`, `set_search_params`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'; at most 128")
    dim: int = Field(gt=0, le=65536, description="key dimension")
    metric: Metric = "l2"
    value_kind: ValueKind = "none"
    value_dim: int | None = Field(default=None, gt=0, le=65536, description="required for value_kind=vector")
    index: IndexKind = "flat"
    nlist: int = Field(default=1024, gt=0, le=1 << 20, description="ivfpq: inverted lists")
    pq_m: int | None = Field(default=None, gt=0, le=65536,
                             description="ivfpq: sub-quantizers (must divide dim); default about dim/8")
    train_size: int | None = Field(default=None, gt=0, le=1 << 30,
                                   description="ivfpq: entries to train on; default 64*nlist")
    nprobe: int = Field(default=16, gt=0, le=MAX_NPROBE,
                        description="ivfpq: lists probed per query (changeable, and per search)")
    hnsw_m: int = Field(default=32, gt=1, le=1024, description="hnsw: links per node")
    ef_search: int = Field(default=128, gt=0, le=MAX_EF_SEARCH,
                           description="hnsw: search breadth, at least k is used (changeable, and per search)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form, e.g. tuned kNN-LM settings")

    @field_validator("metadata")
    @classmethod
    def _json_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        try:
            check_json(metadata, "metadata")
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
        return metadata

    @model_validator(mode="after")
    def _check(self) -> MemorySpec:
        if self.value_kind == "vector" and self.value_dim is None:
            raise ValueError("value_dim is required when value_kind is 'vector'")
        if self.value_kind != "vector" and self.value_dim is not None:
            raise ValueError("value_dim applies only to value_kind 'vector'")
        if self.index == "ivfpq" and self.dim % self.pq_sub_quantizers:
            raise ValueError(f"pq_m={self.pq_sub_quantizers} must divide dim={self.dim}")
        if self.index == "ivfpq" and self.train_count < max(self.nlist, 256):
            raise ValueError(f"train_size={self.train_count} must be at least max(nlist, 256)")
        return self

    @property
    def pq_sub_quantizers(self) -> int:
        if self.pq_m is not None:
            return self.pq_m
        return default_pq_m(self.dim)

    @property
    def train_count(self) -> int:
        return self.train_size or 64 * self.nlist


def spec_from(**fields: Any) -> MemorySpec:
    """A MemorySpec, or InvalidInput naming the bad field (the same error in-process and over REST)."""
    try:
        return MemorySpec(**fields)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None
