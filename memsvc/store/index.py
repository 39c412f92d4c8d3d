"""FAISS index construction: one small factory, GPU when the faiss build and the machine have one."""
from __future__ import annotations

import functools
from typing import Any

import faiss
import numpy as np

from memsvc.contract import MemorySpec


@functools.cache
def gpu_resources():
    """Shared GPU resources, or None when faiss has no GPU support or sees no GPU."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def device() -> str:
    return "gpu" if gpu_resources() is not None else "cpu"


def faiss_metric(spec: MemorySpec) -> int:
    return faiss.METRIC_L2 if spec.metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _to_device(index: faiss.Index, spec: MemorySpec) -> faiss.Index:
    res = gpu_resources()
    if res is None or spec.index == "hnsw":  # faiss has no GPU HNSW
        return index
    return faiss.index_cpu_to_gpu(res, 0, index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if gpu_resources() is not None else index


def new_index(spec: MemorySpec, template: faiss.Index | None = None) -> faiss.Index:
    """An empty id-mapped index for one partition.

    ivfpq memories search exactly (flat) until `template`, the trained ivfpq index, exists.
    """
    if spec.index == "hnsw":
        inner = faiss.IndexHNSWFlat(spec.dim, spec.hnsw_m, faiss_metric(spec))
        inner.hnsw.efSearch = spec.ef_search
    elif spec.index == "ivfpq" and template is not None:
        inner = faiss.clone_index(template)
    else:
        inner = faiss.IndexFlat(spec.dim, faiss_metric(spec))
    return _to_device(faiss.IndexIDMap2(inner), spec)


def train_template(spec: MemorySpec, sample: np.ndarray) -> faiss.Index:
    """Train the ivfpq quantizers of a memory on a sample of its keys (already normalised for cosine)."""
    quantizer = faiss.IndexFlat(spec.dim, faiss_metric(spec))
    index = faiss.IndexIVFPQ(quantizer, spec.dim, spec.nlist, spec.pq_sub_quantizers, 8, faiss_metric(spec))
    index.own_fields = True
    quantizer.this.disown()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = spec.nprobe
    return index


def read_index(path: str) -> faiss.Index:
    return faiss.read_index(path)


def load_index(path: str, spec: MemorySpec) -> faiss.Index:
    """Read an index and place it on the device the memory's indexes live on."""
    return _to_device(faiss.read_index(path), spec)


def save_index(index: faiss.Index, path: str) -> None:
    faiss.write_index(to_cpu(index), path)


class Shard:
    """One partition: its FAISS index and how many live entries it has."""

    def __init__(self, code: int, index: Any):
        self.code = code
        self.index = index
        self.count = 0
