"""FAISS index construction: one small factory, GPU when the faiss build and the machine have one."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np

from memsvc.store.base import MemorySpec

QUERIES_PER_THREAD = 16  # below this many queries per OpenMP thread, waking another costs more than it gives


def search_threads(n: int, available: int) -> int:
    """OpenMP threads for a FAISS search of `n` queries: one per QUERIES_PER_THREAD queries, between 1 and
    `available`. A single query stays on the calling thread: FAISS would otherwise wake the whole team
    (IndexIDMap's id translation is an unconditional `omp parallel for`), and on a busy machine the call
    waits until every woken thread has been scheduled (issue 18: 326 -> 1,715 single queries/s)."""
    return max(1, min(available, n // QUERIES_PER_THREAD))


@contextmanager
def threads_for(n: int) -> Iterator[int]:
    """Run the FAISS calls inside on `search_threads(n, current)` OpenMP threads; yields that count.

    OpenMP's thread count (nthreads-var) is a data-environment ICV: `omp_set_num_threads` sets it for the
    calling thread only (libgomp keeps it per thread; tested in tests/test_search_threads.py), so this
    changes nothing for searches running in other threads at the same time. The caller's own setting
    (OMP_NUM_THREADS, faiss.omp_set_num_threads) is the upper bound and is restored on exit. OpenSearch's
    k-NN plugin sets one OpenMP thread for its FAISS queries for the same reason (opensearch-project/k-NN#965)."""
    before = faiss.omp_get_max_threads()
    use = search_threads(n, before)
    if use != before:
        faiss.omp_set_num_threads(use)
    try:
        yield use
    finally:
        if use != before:
            faiss.omp_set_num_threads(before)

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
