"""`Memory`: one named memory of key vectors (+ values, payloads), in-process.

Entries live in columns (ids, keys, values, payloads, partition code) with amortised growth; each
partition has its own FAISS index, so a partition-scoped search touches only its index and deleting a
partition drops one index without rebuilding the rest. Ids are assigned in increasing order, so the
id column stays sorted and id -> row is a binary search.

With a directory the memory is durable: every add/delete is appended to a write-ahead log and fsync'ed
before the call returns; `snapshot()` writes the state and lets old log segments go; opening loads the
newest snapshot and replays the log after it. Without a directory it lives in RAM only (what a model
session's eviction memory wants).

Concurrency: searches share a read lock and run in parallel (FAISS releases the GIL); writers are
serialised, log their record outside the read/write lock, and hold the write lock only to apply it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memsvc.contract import (
    Entries,
    InvalidInput,
    MemorySpec,
    MemoryStats,
    NotFound,
    Partition,
    SearchResult,
    check_ids,
    check_k,
    check_keys,
    check_partition,
    check_partitions,
    check_payloads,
    check_search_params,
    check_values,
    partition_groups,
)
from memsvc.store import index as fx
from memsvc.store.column import Column
from memsvc.store.index import Shard
from memsvc.store.rwlock import RWLock
from memsvc.store.snapshot import Snapshots
from memsvc.store.wal import SegmentLog, fsync_dir, replay, segment_numbers

log = logging.getLogger(__name__)


class Memory(Snapshots):
    """An in-process memory; durable when opened on a directory (see module docstring)."""

    def __init__(self, spec: MemorySpec, path: str | Path | None = None, *, _log: SegmentLog | None = None):
        self.spec = spec
        self.path = Path(path) if path is not None else None
        self._rw = RWLock()
        self._writer = threading.Lock()
        self._log = _log
        self._template = None  # trained ivfpq index, once there is one
        self._trainer: threading.Thread | None = None
        self.train_seconds: float | None = None
        self.snapshot_seconds: float | None = None  # how long the last snapshot took
        self._next_id = 0
        self._ids = Column(np.int64)
        self._keys = Column(np.float32, (spec.dim,))
        self._values = {"none": None, "token": Column(np.int64),
                        "vector": Column(np.float32, (spec.value_dim or 0,))}[spec.value_kind]
        self._parts = Column(np.int32)
        self._alive = Column(np.bool_)
        self._payloads: list[Any] = []
        self._any_payloads = False  # so searches of payload-free memories skip the payload lookup
        self._names: list[str | None] = []  # partition code -> name
        self._shards: dict[str | None, Shard] = {}
        self._dead = 0
        # One index over every partition, for whole-memory searches; built on the first one that spans
        # several partitions, then kept up to date. Deletes leave their entries in it ("tombstones",
        # skipped at search time by an id bitmap) until they are half of it, then it is dropped and
        # rebuilt on the next whole-memory search: deleting a partition stays one flag per row.
        self._whole: Any = None
        self._whole_dead = 0
        self._bitmap: np.ndarray | None = None  # live ids as bits, for the tombstones; None: to compute

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, spec: MemorySpec, path: str | Path) -> Memory:
        """A new durable memory in an empty directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=False)
        _write_atomic(path / "spec.json", spec.model_dump_json(indent=2).encode())
        return cls(spec, path, _log=SegmentLog(path, 1))

    @classmethod
    def open(cls, path: str | Path) -> Memory:
        """Load the newest snapshot of the memory at `path` and replay the log written after it."""
        path = Path(path)
        if not (path / "spec.json").exists():
            raise NotFound(f"no memory at {path}")
        spec = MemorySpec.model_validate_json((path / "spec.json").read_text())
        mem = cls(spec, path)
        first = mem._load_snapshot()
        with mem._writer:  # a training started by the replay waits until the replay is done
            for meta, arrays in replay(path, first):
                mem._apply(meta, arrays)
        numbers = segment_numbers(path)
        mem._log = SegmentLog(path, max(numbers[-1] if numbers else 1, first))
        return mem

    def close(self, snapshot: bool = True) -> None:
        """Snapshot if the log holds anything (unless `snapshot` is False: the memory is being deleted),
        then release the log."""
        if self._log is not None:
            if snapshot and self._log.size:
                self.snapshot()
            self._log.close()
            self._log = None

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the free-form metadata (e.g. tuned kNN-LM settings) stored with the spec."""
        with self._writer:
            self.spec = self.spec.model_copy(update={"metadata": dict(metadata)})
            if self.path is not None:
                _write_atomic(self.path / "spec.json", self.spec.model_dump_json(indent=2).encode())

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change `spec.ef_search` (hnsw) / `spec.nprobe` (ivfpq) for every later search, kept in spec.json
        (so across restarts) when the memory has a directory; None leaves one as it is. InvalidInput for
        another index kind or a value out of range (`check_search_params`). Searches read the spec at each
        call (`index.search_params`), so no index is rebuilt."""
        ef_search, nprobe = check_search_params(self.spec, ef_search, nprobe)
        update = {name: value for name, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value is not None}
        with self._writer:
            spec = self.spec.model_copy(update=update)
            if self.path is not None:
                _write_atomic(self.path / "spec.json", spec.model_dump_json(indent=2).encode())
            self.spec = spec

    # --- the MemoryBackend calls ----------------------------------------------------------------

    def add(self, keys: Any, values: Any = None, payloads: list[Any] | None = None,
            partition: str | None = None, partitions: Sequence[str | None] | None = None) -> np.ndarray:
        """Store n entries and return their new ids; durable on return when the memory has a directory.
        `partitions`: one partition per key row (a batched add, one log record)."""
        keys = check_keys(keys, self.spec, "keys")
        values = check_values(self.spec, values, len(keys))
        payloads = check_payloads(payloads, len(keys))
        partition = check_partition(partition)
        partitions = check_partitions(partitions, len(keys), partition, "key")
        with self._writer:
            first = self._next_id
            meta = {"op": "add", "first": first, "partition": partition, "payloads": payloads,
                    **({"partitions": partitions} if partitions is not None else {})}
            arrays = {"keys": keys} if values is None else {"keys": keys, "values": values}
            if self._log is not None:
                self._log.append(meta, arrays)
            with self._rw.write():
                self._apply(meta, arrays)
        return np.arange(first, first + len(keys), dtype=np.int64)

    def search(self, queries: Any, k: int, partition: str | None = None,
               partitions: Sequence[str | None] | None = None, *, ef_search: int | None = None,
               nprobe: int | None = None) -> SearchResult:
        """Top-k entries per query [m, dim] (of one partition, or of the whole memory), closest first.

        `partitions`: one partition (or None: the whole memory) per query row, searched in this one call
        (one FAISS search per distinct partition, under one read lock). A whole-memory search of a memory
        with several partitions is one search of the whole-memory index (`_ensure_whole`). `ef_search`
        (hnsw: max(ef_search, k) is used) / `nprobe` (ivfpq) replace the spec's for this call."""
        queries = self._index_view(check_keys(queries, self.spec, "queries"))
        k = check_k(k)
        partition = check_partition(partition)
        partitions = check_partitions(partitions, len(queries), partition)
        ef_search, nprobe = check_search_params(self.spec, ef_search, nprobe)
        groups = [(partition, None)] if partitions is None else partition_groups(partitions)
        if any(name is None for name, _ in groups):
            self._ensure_whole()
        with self._rw.read():
            params = fx.search_params(self.spec, k, self._template is not None, ef_search, nprobe)
            if len(groups) == 1:
                return self._result(*self._search_scope(queries, k, groups[0][0], params))
            ids = np.empty((len(queries), k), dtype=np.int64)
            dist = np.empty((len(queries), k), dtype=np.float32)
            for name, rows in groups:
                ids[rows], dist[rows] = self._search_scope(queries[rows], k, name, params)
            return self._result(ids, dist)

    def _search_scope(self, queries: np.ndarray, k: int, partition: str | None,
                      params: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids, distances) [m, k] of one partition, or of the whole memory; the read lock is held."""
        with fx.threads_for(len(queries)):
            if partition is not None:
                shards = [s for s in (self._shards.get(partition),) if s is not None and s.count]
            elif self._whole is not None and len(self):  # every live entry is in it: one FAISS search
                bitmap = self._alive_bitmap() if self._whole_dead else None
                dist, ids = fx.search_among(self._whole, queries, min(k, len(self)), bitmap, params)
                return _padded(ids, self._as_distance(dist, ids), k)
            else:
                shards = [s for s in self._shards.values() if s.count]
            found = [shard.index.search(queries, min(k, shard.count), params=params) for shard in shards]
            if len(found) == 1:  # one FAISS answer is already sorted, closest first
                dist, ids = found[0]
                return _padded(ids, self._as_distance(dist, ids), k)
            none = [(np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))]
            dist, ids = (np.concatenate(part, axis=1) for part in zip(*(found or none)))
            return _top_k(ids, self._as_distance(dist, ids), k)

    def get(self, ids: Any) -> Entries:
        """The stored entries with these ids; `found` is False (and the row zero/None) where missing."""
        ids = check_ids(ids)
        with self._rw.read():
            rows = self._rows(ids)
            found = rows >= 0
            keys = np.zeros((len(ids), self.spec.dim), dtype=np.float32)
            keys[found] = self._keys.data[rows[found]]
            return Entries(
                ids=ids, found=found, keys=keys,
                values=self._value_rows(rows),
                payloads=[self._payloads[r] if r >= 0 else None for r in rows],
                partitions=[self._names[self._parts.data[r]] if r >= 0 else None for r in rows],
            )

    def delete(self, ids: Any = None, partition: str | None = None) -> int:
        """Delete entries by ids, by partition, or the given ids within a partition; returns how many."""
        if ids is None and partition is None:
            raise InvalidInput("give ids, a partition, or both", "ids")
        ids = None if ids is None else check_ids(ids)
        partition = check_partition(partition)
        with self._writer:
            meta = {"op": "delete", "partition": partition}
            arrays = {} if ids is None else {"ids": ids}
            if self._log is not None:
                self._log.append(meta, arrays)
            with self._rw.write():
                return self._apply(meta, arrays)

    def stats(self) -> MemoryStats:
        with self._rw.read():
            return MemoryStats(
                **self.spec.model_dump(),
                count=int(self._keys.size - self._dead),
                partitions=[Partition(name=n, count=s.count) for n, s in self._shards.items()],
                trained=self.spec.index != "ivfpq" or self._template is not None,
                train_seconds=self.train_seconds,
                snapshot_seconds=self.snapshot_seconds,
                device=fx.device() if self.spec.index != "hnsw" else "cpu",
                durable=self.path is not None,
                log_bytes=self._log.size if self._log is not None else 0,
            )

    def __len__(self) -> int:
        return int(self._keys.size - self._dead)

    @property
    def log_bytes(self) -> int:
        return self._log.size if self._log is not None else 0

    # --- applying log records (live and on replay) -----------------------------------------------

    def _apply(self, meta: dict, arrays: dict[str, np.ndarray]) -> int:
        if meta["op"] == "add":
            return self._apply_add(meta["first"], arrays["keys"], arrays.get("values"),
                                   meta["payloads"], meta["partition"], meta.get("partitions"))
        return self._apply_delete(arrays.get("ids"), meta["partition"])

    def _apply_add(self, first: int, keys: np.ndarray, values: np.ndarray | None,
                   payloads: list | None, partition: str | None, partitions: list[str | None] | None = None) -> int:
        n = len(keys)
        ids = np.arange(first, first + n, dtype=np.int64)
        codes = np.empty(n, dtype=np.int32)
        for name, rows in ([(partition, slice(None))] if partitions is None else partition_groups(partitions)):
            shard = self._shard(name)
            codes[rows] = shard.code
            shard.index.add_with_ids(self._index_view(keys[rows]), ids[rows])
            shard.count += len(ids[rows])
        self._ids.append(ids)
        self._keys.append(keys)
        if self._values is not None:
            self._values.append(values)
        self._parts.append(codes)
        self._alive.append(np.ones(n, dtype=bool))
        self._payloads.extend(payloads if payloads is not None else [None] * n)
        self._any_payloads |= payloads is not None
        if self._whole is not None:
            self._whole.add_with_ids(self._index_view(keys), ids)
            self._bitmap = None
        self._next_id = first + n
        if self.spec.index == "ivfpq" and self._template is None and self._trainer is None \
                and len(self) >= self.spec.train_count:
            live = np.flatnonzero(self._alive.data)[: self.spec.train_count]
            sample = np.array(self._index_view(self._keys.data[live]))
            self._trainer = threading.Thread(target=self._train, args=(sample,), daemon=True,
                                             name=f"memsvc-train-{self.spec.name}")
            self._trainer.start()
        return n

    def _apply_delete(self, ids: np.ndarray | None, partition: str | None) -> int:
        if ids is None:
            shard = self._shards.pop(partition, None)
            if shard is None:
                return 0
            rows = np.flatnonzero(self._alive.data & (self._parts.data == shard.code))
        else:
            rows = self._rows(ids)
            rows = np.unique(rows[rows >= 0])
            if partition is not None:
                code = self._shards[partition].code if partition in self._shards else -1
                rows = rows[self._parts.data[rows] == code]
            for code in np.unique(self._parts.data[rows]):
                shard = self._shards[self._names[code]]
                gone = self._ids.data[rows[self._parts.data[rows] == code]]
                shard.count -= len(gone)
                self._remove_from_index(shard, gone)
        self._alive.data[rows] = False
        self._dead += len(rows)
        if self._whole is not None and len(rows):
            self._whole_dead += len(rows)
            self._bitmap = None
            if self._whole_dead > self._whole.ntotal // 2 or fx.device() == "gpu":  # GPU: no id selectors
                self._whole = None
        if self._dead > max(4096, self._keys.size // 2):
            self._compact()
        return len(rows)

    # --- internals ---------------------------------------------------------------------------

    def _index_view(self, x: np.ndarray) -> np.ndarray:
        """Keys as the index holds them: unit rows for cosine, normalised in float64 (float32 norms overflow
        and underflow); a zero row (only in logs from before zeros were refused) stays zero."""
        if self.spec.metric != "cosine":
            return x
        norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)

    def _as_distance(self, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        """FAISS scores as our distances; float32 rounding can take squared L2 or 1 - cosine below 0."""
        d = d.astype(np.float32)
        if self.spec.metric == "ip":
            d = -d
        elif self.spec.metric == "cosine":
            d = np.clip(1.0 - d, 0.0, 2.0)
        else:
            d = np.maximum(d, 0.0)
        d[i < 0] = np.inf
        return d

    def _shard(self, partition: str | None) -> Shard:
        shard = self._shards.get(partition)
        if shard is None:
            self._names.append(partition)
            shard = self._shards[partition] = Shard(len(self._names) - 1, fx.new_index(self.spec, self._template))
        return shard

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the id is unknown or deleted."""
        col = self._ids.data
        if not len(col):
            return np.full(len(ids), -1, dtype=np.int64)
        rows = np.searchsorted(col, ids).clip(max=len(col) - 1)
        return np.where((col[rows] == ids) & self._alive.data[rows], rows, -1)

    def _value_rows(self, rows: np.ndarray) -> np.ndarray | None:
        if self._values is None:
            return None
        fill = -1 if self.spec.value_kind == "token" else 0
        if not self._values.size:
            return np.full((*rows.shape, *self._values.data.shape[1:]), fill, dtype=self._values.data.dtype)
        out = self._values.data[np.where(rows >= 0, rows, 0)]
        out[rows < 0] = fill
        return out

    def _result(self, ids: np.ndarray, dist: np.ndarray) -> SearchResult:
        rows = self._rows(ids.ravel()).reshape(ids.shape)
        rows[ids < 0] = -1
        payloads = None
        if self._any_payloads:
            payloads = [[self._payloads[r] if r >= 0 else None for r in row] for row in rows]
        return SearchResult(ids=ids, distances=dist, values=self._value_rows(rows), payloads=payloads)

    def _ensure_whole(self) -> None:
        """Build the whole-memory index if a whole-memory search would otherwise search several partitions'
        indexes one by one (a collection keeps a partition per document version: thousands). Holds the
        writer lock (no add or delete meanwhile) and the read lock (searches go on) while building."""
        if self._whole is not None or len(self._shards) < 2:  # len of a dict: atomic, no lock needed
            return
        with self._rw.read():
            if sum(1 for s in self._shards.values() if s.count) < 2:
                return
        with self._writer:
            with self._rw.read():
                if self._whole is not None:
                    return
                whole = self._build(np.flatnonzero(self._alive.data))
            with self._rw.write():
                self._whole, self._whole_dead, self._bitmap = whole, 0, None

    def _alive_bitmap(self) -> np.ndarray:
        """The live ids as a bitmap for `fx.search_among` (computed once after each write)."""
        bitmap = self._bitmap
        if bitmap is None:
            alive = np.zeros(self._next_id, dtype=bool)
            alive[self._ids.data[self._alive.data]] = True
            bitmap = self._bitmap = np.packbits(alive, bitorder="little")
        return bitmap

    def _remove_from_index(self, shard: Shard, ids: np.ndarray) -> None:
        try:
            shard.index.remove_ids(ids)
        except RuntimeError:  # hnsw and some GPU indexes cannot remove: rebuild this partition only
            alive = self._alive.data.copy()
            alive[self._rows(ids)] = False
            rows = np.flatnonzero(alive & (self._parts.data == shard.code))
            shard.index = self._build(rows)

    def _build(self, rows: np.ndarray, template: Any = None) -> Any:
        index = fx.new_index(self.spec, template if template is not None else self._template)
        for start in range(0, len(rows), 65536):
            chunk = rows[start:start + 65536]
            index.add_with_ids(self._index_view(self._keys.data[chunk]), self._ids.data[chunk])
        return index

    def _train(self, sample: np.ndarray) -> None:
        """Train the ivfpq template off the request path, then swap every partition's index for an ivfpq one.

        Until then searches stay exact (flat). Searches never wait; adds wait only while indexes rebuild.
        """
        start = time.perf_counter()
        log.info("training ivfpq for %s on %d entries", self.spec.name, len(sample))
        try:
            template = fx.train_template(self.spec, sample)
            with self._writer:
                with self._rw.read():
                    built = {name: self._build(np.flatnonzero(self._alive.data & (self._parts.data == s.code)),
                                               template) for name, s in self._shards.items()}
                with self._rw.write():
                    for name, index in built.items():
                        self._shards[name].index = index
                    self._template = template
                    self._whole = None  # rebuilt as ivfpq by the next whole-memory search
            self.train_seconds = time.perf_counter() - start
        except Exception:  # keep serving exactly; the next add tries again
            log.exception("ivfpq training of %s failed", self.spec.name)
            self._trainer = None

    def wait_trained(self, timeout: float | None = None) -> bool:
        """Wait for a running ivfpq training (for tests and benchmarks); True once the memory is trained."""
        if self._trainer is not None:
            self._trainer.join(timeout)
        return self.spec.index != "ivfpq" or self._template is not None

    def _compact(self) -> None:
        mask = self._alive.data.copy()
        for col in (self._ids, self._keys, self._values, self._parts, self._alive):
            if col is not None:
                col.keep(mask)
        self._payloads = [p for p, m in zip(self._payloads, mask) if m]
        self._dead = 0


def _top_k(ids: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k closest of the candidates [m, c] of every shard side by side, padded with -1 / +inf.

    One stable sort for all shards, not a merge per shard: a collection's memory has a partition per
    document version, thousands of them (bench/results/retrieval.md). The padding goes last, so a found
    entry always comes before a missing one."""
    m = len(ids)
    ids = np.concatenate([ids, np.full((m, k), -1, dtype=np.int64)], axis=1)
    dist = np.concatenate([dist, np.full((m, k), np.inf, dtype=np.float32)], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


def _padded(ids: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS answer [m, <= k] (sorted, missing neighbours last) padded to k columns with -1 / +inf."""
    if ids.shape[1] == k:
        return ids, dist
    m = len(ids)
    return (np.concatenate([ids, np.full((m, k - ids.shape[1]), -1, dtype=np.int64)], axis=1),
            np.concatenate([dist, np.full((m, k - ids.shape[1]), np.inf, dtype=np.float32)], axis=1))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
