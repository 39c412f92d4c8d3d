"""FAISS index construction: one small factory, GPU when the faiss build and the machine have one."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from memsvc.contract import MemorySpec

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
    k-NN plugin sets one OpenMP thread for its FAISS queries for the same reason
    (opensearch-project/k-NN#965)."""
    before = faiss.omp_get_max_threads()
    use = search_threads(n, before)
    if use != before:
        faiss.omp_set_num_threads(use)
    try:
        yield use
    finally:
        if use != before:
            faiss.omp_set_num_threads(before)

def search_params(spec: MemorySpec, k: int, trained: bool, ef_search: int | None = None,
                  nprobe: int | None = None) -> faiss.SearchParameters | None:
    """FAISS search parameters for one search of a memory's partitions: hnsw searches with efSearch =
    max(ef_search or the spec's, k) (Milvus' rule, so both backends search alike), a trained ivfpq memory
    probes `nprobe` or the spec's lists; None for exact (flat) indexes, an untrained ivfpq's included.
    Passed per call rather than set on the indexes, so concurrent searches with different values do not
    interfere and a changed spec applies to indexes read back from older snapshots too."""
    if spec.index == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(ef_search or spec.ef_search, k))
    if spec.index == "ivfpq" and trained:
        return faiss.SearchParametersIVF(nprobe=nprobe or spec.nprobe)
    return None


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
    """An empty index for one partition that takes our ids (`add_with_ids`) and can lose them (`remove_ids`).

    ivfpq memories search exactly (flat) until `template`, the trained ivfpq index, exists; from then on a
    partition is a bare clone of it. An IVF index stores the ids in its inverted lists itself, and its
    `remove_ids` reorders those lists, so it must not sit inside an `IndexIDMap2`, whose id table follows
    the inner index's positions: there, removals shift every later id by one and the second one fails a
    C++ assertion that aborts the process (faiss wiki "Special operations on indexes"; faiss issues
    #1643, #4535, #4655). Flat and HNSW number their entries by position, so they get the id map.
    """
    if spec.index == "ivfpq" and template is not None:
        return _to_device(faiss.clone_index(template), spec)
    if spec.index == "hnsw":
        inner = faiss.IndexHNSWFlat(spec.dim, spec.hnsw_m, faiss_metric(spec))
        inner.hnsw.efSearch = spec.ef_search
    else:
        inner = faiss.IndexFlat(spec.dim, faiss_metric(spec))
    return _to_device(faiss.IndexIDMap2(inner), spec)


def _has_layout(index: faiss.Index, spec: MemorySpec, trained: bool) -> bool:
    """Whether an index read back from a snapshot is built the way `new_index` builds one now (snapshots
    written before ivfpq left the id map hold an `IndexIDMap2` around an IVF index: those are rebuilt)."""
    if spec.index == "ivfpq" and trained:
        return isinstance(index, faiss.IndexIVFPQ)
    inner = faiss.IndexHNSWFlat if spec.index == "hnsw" else faiss.IndexFlat
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), inner)


def train_template(spec: MemorySpec, sample: np.ndarray) -> faiss.Index:
    """Train the ivfpq quantizers of a memory on a sample of its keys (already normalised for cosine)."""
    quantizer = faiss.IndexFlat(spec.dim, faiss_metric(spec))
    index = faiss.IndexIVFPQ(quantizer, spec.dim, spec.nlist, spec.pq_sub_quantizers, 8, faiss_metric(spec))
    index.own_fields = True
    quantizer.this.disown()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = spec.nprobe
    return index


def search_among(index: faiss.Index, queries: np.ndarray, k: int, bitmap: np.ndarray | None,
                 params: faiss.SearchParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search(queries, k)` -> (distances, ids) [m, k] with `params` (from `search_params`),
    counting only the ids whose bit is set in `bitmap` (uint8, little-endian bit order: id i is bit i % 8
    of byte i // 8; None: every id). FAISS applies the `IDSelectorBitmap` inside the scan (flat, HNSW and
    IVF honour `SearchParameters.sel`; an `IndexIDMap2` translates it to its positions), so excluded
    entries never take a result slot. `params` is copied, not changed."""
    if bitmap is None:
        return index.search(queries, k, params=params)
    selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    if isinstance(params, faiss.SearchParametersHNSW):
        scoped = faiss.SearchParametersHNSW(sel=selector, efSearch=params.efSearch)
    elif isinstance(params, faiss.SearchParametersIVF):
        scoped = faiss.SearchParametersIVF(sel=selector, nprobe=params.nprobe)
    else:
        scoped = faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=scoped)


def read_index(path: str) -> faiss.Index:
    return faiss.read_index(path)


def load_index(path: str, spec: MemorySpec, trained: bool, count: int) -> faiss.Index | None:
    """Read a partition's index and place it on the device the memory's indexes live on; None when it is
    not laid out as `new_index` lays one out or does not hold `count` entries (the caller rebuilds it)."""
    index = faiss.read_index(path)
    if not _has_layout(index, spec, trained) or index.ntotal != count:
        return None
    return _to_device(index, spec)


def save_index(index: faiss.Index, path: str) -> None:
    faiss.write_index(to_cpu(index), path)


class Shard:
    """One partition: its FAISS index and how many live entries it has."""

    def __init__(self, code: int, index: Any):
        self.code = code
        self.index = index
        self.count = 0
