"""`MilvusMemory` and `MilvusStore`: the memory store on Milvus, for memories that outgrow one machine.

The same calls and the same results as `Memory` / `Store` (exact search gives the same ids and
distances), on a Milvus server or cluster, or on milvus-lite (a local `.db` path) for tests.

One memory is one collection, `memsvc_` + the base32 of its name (Milvus names allow only letters,
digits and '_'):

    id       INT64 primary key         assigned here, increasing, never reused (as in `Memory`)
    key      FLOAT_VECTOR[dim]         the searched field: FLAT, HNSW or IVF_PQ; L2, IP or COSINE
    part     VARCHAR, partition key    the partition name; "" for entries added without one
    value    INT64 | FLOAT_VECTOR      only when the spec stores values (token id / value vector)
    payload  VARCHAR                   the payload as JSON text ("null" when none)

Partitions are a partition-key field, not Milvus partitions: sessions come and go by the thousand,
while Milvus caps partitions per collection (1024 by default) and creates and drops each one through
its coordinator. A partition key hashes any number of names onto a fixed set of physical partitions; a
partition-scoped search filters `part == name` and touches only that name's physical partition;
deleting a partition is a delete by that filter (tombstones, compacted later): nothing is rebuilt.

The spec and the id counter live in the collection's properties. The counter is written before the
insert, so a failed or timed-out insert never makes an id be handed out twice, nor does a restart.

Milvus returns squared L2, and inner-product and cosine *similarities*; they become memsvc distances
(smaller is closer) here. Collections use Strong consistency: a search sees every acknowledged add.
Any Milvus failure raises `BackendUnavailable` (HTTP 503), and an add that fails is rolled back.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient
from pymilvus.exceptions import MilvusException
from pymilvus.milvus_client import IndexParams

from memsvc.contract import (
    MAX_PARTITION_LEN,
    AlreadyExists,
    BackendUnavailable,
    Entries,
    InvalidInput,
    MemorySpec,
    MemoryStats,
    NotFound,
    Partition,
    SearchResult,
    TooLarge,
    check_ids,
    check_k,
    check_keys,
    check_partition,
    check_payloads,
    check_values,
)

if TYPE_CHECKING:
    from memsvc.store.memory import Memory

PREFIX = "memsvc_"
SPEC, NEXT_ID, PAYLOADS = "memsvc.spec", "memsvc.next_id", "memsvc.payloads"  # collection properties
METRICS = {"l2": "L2", "ip": "IP", "cosine": "COSINE"}
MAX_PAYLOAD_BYTES = 65535  # the longest Milvus VARCHAR
MAX_NQ = 16384  # the most queries Milvus takes in one search
INSERT_BYTES = 64 << 20  # larger adds are sent as several inserts of about this size
ID_BATCH = 16384  # ids per get/delete filter expression


class Connection:
    """A MilvusClient whose calls time out after `timeout` seconds and fail as `BackendUnavailable`."""

    def __init__(self, uri: str, timeout: float):
        self.uri = uri
        self.timeout = timeout
        with self.errors(f"connection to {uri!r}"):
            self.client = MilvusClient(uri, timeout=timeout)
            self.version = self.client.get_server_version(timeout=timeout)
        self.lite = self.version.startswith("milvus_lite")

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:  # the codes pymilvus does not retry (deadline exceeded, ...)
            raise BackendUnavailable(f"Milvus {what} failed: {exc.code().name} {exc.details()}") from exc
        except MilvusException as exc:
            raise BackendUnavailable(f"Milvus {what} failed: {exc.message}") from exc

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.errors(method):
            return getattr(self.client, method)(*args, timeout=self.timeout, **kwargs)

    def close(self) -> None:
        self.client.close()
        if self.uri.endswith(".db"):  # stop the embedded milvus-lite server: it fsyncs and unlocks the file
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)


def collection_name(name: str) -> str:
    return PREFIX + base64.b32encode(name.encode()).decode().rstrip("=").lower()


def memory_name(collection: str) -> str:
    code = collection[len(PREFIX):].upper()
    return base64.b32decode(code + "=" * (-len(code) % 8)).decode()


def where(ids: np.ndarray | None = None, partition: str | None = None) -> str:
    """A filter expression for these ids and/or this partition; "" matches everything."""
    clauses = []
    if ids is not None:
        clauses.append(f"id in {ids.tolist()}")
    if partition is not None:  # a JSON string is a valid Milvus string literal
        clauses.append(f"part == {json.dumps(partition, ensure_ascii=False)}")
    return " and ".join(clauses)


def schema(spec: MemorySpec) -> CollectionSchema:
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("id", DataType.INT64, is_primary=True)
    s.add_field("key", DataType.FLOAT_VECTOR, dim=spec.dim)
    s.add_field("part", DataType.VARCHAR, max_length=4 * MAX_PARTITION_LEN, is_partition_key=True)
    if spec.value_kind == "token":
        s.add_field("value", DataType.INT64)
    elif spec.value_kind == "vector":
        s.add_field("value", DataType.FLOAT_VECTOR, dim=spec.value_dim)
    s.add_field("payload", DataType.VARCHAR, max_length=MAX_PAYLOAD_BYTES)
    return s


def index_params(spec: MemorySpec) -> IndexParams:
    """The key index the spec asks for; a value vector field gets FLAT (Milvus loads only indexed vectors)."""
    kind, params = {
        "flat": ("FLAT", {}),
        "hnsw": ("HNSW", {"M": spec.hnsw_m, "efConstruction": 40}),  # faiss' default efConstruction
        "ivfpq": ("IVF_PQ", {"nlist": spec.nlist, "m": spec.pq_sub_quantizers, "nbits": 8}),
    }[spec.index]
    p = MilvusClient.prepare_index_params()
    p.add_index("key", index_type=kind, metric_type=METRICS[spec.metric], params=params)
    if spec.value_kind == "vector":
        p.add_index("value", index_type="FLAT", metric_type="L2")
    return p


def payload_texts(payloads: list[Any] | None, n: int) -> list[str]:
    """Checked payloads as JSON text ("null" where none); TooLarge past what a Milvus VARCHAR holds."""
    if payloads is None:
        return ["null"] * n
    texts = [json.dumps(p, ensure_ascii=False) for p in payloads]
    for i, text in enumerate(texts):
        if len(text.encode()) > MAX_PAYLOAD_BYTES:
            raise TooLarge(f"payload {i} is larger than {MAX_PAYLOAD_BYTES} bytes of JSON, the most "
                           "the Milvus backend stores per entry", "payloads")
    return texts


class MilvusMemory:
    """One memory as one Milvus collection; the `MemoryBackend` calls of `Memory`, with its results."""

    def __init__(self, milvus: Connection, spec: MemorySpec, next_id: int = 0, any_payloads: bool = False):
        self.spec = spec
        self._milvus = milvus
        self._collection = collection_name(spec.name)
        self._next_id = next_id
        self._any_payloads = any_payloads  # so searches of payload-free memories skip the payload field
        self._writer = threading.Lock()

    @classmethod
    def open(cls, milvus: Connection, name: str) -> MilvusMemory:
        collection = collection_name(name)
        props = milvus("describe_collection", collection)["properties"]
        milvus("load_collection", collection)  # a no-op when loaded; milvus-lite starts released
        return cls(milvus, MemorySpec.model_validate_json(props[SPEC]), int(props[NEXT_ID]),
                   props.get(PAYLOADS) == "true")

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the free-form metadata stored with the spec."""
        with self._writer:
            spec = self.spec.model_copy(update={"metadata": dict(metadata)})
            self._milvus("alter_collection_properties", self._collection, properties={SPEC: spec.model_dump_json()})
            self.spec = spec

    # --- the MemoryBackend calls ----------------------------------------------------------------

    def add(self, keys: Any, values: Any = None, payloads: list[Any] | None = None,
            partition: str | None = None) -> np.ndarray:
        """Store n entries and return their new ids; stored (with Strong consistency) on return."""
        keys = check_keys(keys, self.spec, "keys")
        values = check_values(self.spec, values, len(keys))
        partition = check_partition(partition)
        texts = payload_texts(check_payloads(payloads, len(keys)), len(keys))
        n = len(keys)
        with self._writer:
            first = self._next_id
            props = {NEXT_ID: str(first + n), **({PAYLOADS: "true"} if payloads is not None else {})}
            self._milvus("alter_collection_properties", self._collection, properties=props)
            self._next_id = first + n
            self._any_payloads |= payloads is not None
            columns = {"id": range(first, first + n), "key": keys, "part": [partition or ""] * n, "payload": texts}
            if values is not None:
                columns["value"] = values.tolist() if self.spec.value_kind == "token" else values
            rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
            size = keys.nbytes + (0 if values is None else values.nbytes) + sum(map(len, texts))
            step = max(1, n * INSERT_BYTES // size)
            try:
                for start in range(0, n, step):
                    self._milvus("insert", self._collection, rows[start:start + step])
            except BackendUnavailable:  # take back what may have been stored (also a timed-out insert)
                with suppress(BackendUnavailable):
                    self._milvus("delete", self._collection, filter=f"id >= {first} and id < {first + n}")
                raise
        return np.arange(first, first + n, dtype=np.int64)

    def search(self, queries: Any, k: int, partition: str | None = None) -> SearchResult:
        """Top-k entries per query (of one partition, or of the whole memory), closest first."""
        queries = check_keys(queries, self.spec, "queries")
        k = check_k(k)
        partition = check_partition(partition)
        fields = [name for name, wanted in (("value", self.spec.value_kind != "none"),
                                            ("payload", self._any_payloads)) if wanted]
        # milvus-lite's exact L2 materialises an [nq, entries, dim] array: 15 GB for 64 queries over 100K
        # entries of dim 576. One query per call keeps it at one [entries, dim] array (and is faster).
        step = 1 if self._milvus.lite else MAX_NQ
        hits = []
        for start in range(0, len(queries), step):
            hits += self._milvus("search", self._collection, data=queries[start:start + step], limit=k,
                                 anns_field="key", filter=where(partition=partition), output_fields=fields,
                                 search_params=self._search_params(k))
        m = len(queries)
        ids = np.full((m, k), -1, dtype=np.int64)
        dist = np.full((m, k), np.inf, dtype=np.float32)
        values = self._empty_values((m, k))
        payloads = [[None] * k for _ in range(m)] if self._any_payloads else None
        for i, row in enumerate(hits):
            for j, hit in enumerate(row):
                ids[i, j], dist[i, j] = hit["id"], hit["distance"]
                if values is not None:
                    values[i, j] = hit["entity"]["value"]
                if payloads is not None:
                    payloads[i][j] = json.loads(hit["entity"]["payload"])
        found = ids >= 0
        if self.spec.metric == "ip":
            dist[found] = -dist[found]
        elif self.spec.metric == "cosine":  # float32 rounding can take a similarity past 1, as in Memory
            dist[found] = np.clip(1.0 - dist[found], 0.0, 2.0)
        return SearchResult(ids=ids, distances=dist, values=values, payloads=payloads)

    def get(self, ids: Any) -> Entries:
        """The stored entries with these ids; `found` is False (and the row zero/None) where missing."""
        ids = check_ids(ids)
        fields = ["key", "part", "payload"] + (["value"] if self.spec.value_kind != "none" else [])
        rows = {}
        unique = np.unique(ids)
        for start in range(0, len(unique), ID_BATCH):
            for row in self._milvus("query", self._collection, filter=where(unique[start:start + ID_BATCH]),
                                    output_fields=fields):
                rows[row["id"]] = row
        n = len(ids)
        found = np.zeros(n, dtype=bool)
        keys = np.zeros((n, self.spec.dim), dtype=np.float32)
        values = self._empty_values((n,))
        payloads: list[Any] = [None] * n
        partitions: list[str | None] = [None] * n
        for j, i in enumerate(ids.tolist()):
            row = rows.get(i)
            if row is not None:
                found[j] = True
                keys[j] = row["key"]
                if values is not None:
                    values[j] = row["value"]
                payloads[j] = json.loads(row["payload"])
                partitions[j] = row["part"] or None
        return Entries(ids=ids, found=found, keys=keys, values=values, payloads=payloads, partitions=partitions)

    def delete(self, ids: Any = None, partition: str | None = None) -> int:
        """Delete entries by ids, by partition, or the given ids within a partition; returns how many."""
        if ids is None and partition is None:
            raise InvalidInput("give ids, a partition, or both", "ids")
        ids = None if ids is None else np.unique(check_ids(ids))
        partition = check_partition(partition)
        batches = [None] if ids is None else [ids[s:s + ID_BATCH] for s in range(0, len(ids), ID_BATCH)]
        deleted = 0
        with self._writer:
            for batch in batches:
                expr = where(batch, partition)
                count = self._count(expr)  # Milvus' own delete count does not check that ids exist
                if count:
                    self._milvus("delete", self._collection, filter=expr)
                deleted += count
        return deleted

    def stats(self) -> MemoryStats:
        """The spec, the entry count and each partition's count (a scan of the partition field)."""
        parts: Counter[str] = Counter()
        scan = self._milvus("query_iterator", self._collection, batch_size=ID_BATCH, output_fields=["part"])
        with self._milvus.errors("query_iterator"):
            while batch := scan.next():
                parts.update(row["part"] for row in batch)
            scan.close()
        return MemoryStats(
            **self.spec.model_dump(),
            count=sum(parts.values()),
            partitions=[Partition(name=name or None, count=count) for name, count in parts.items()],
            trained=True,
            device=f"milvus ({self._milvus.version})",
            durable=True,
            log_bytes=0,
        )

    def __len__(self) -> int:
        return self._count("")

    def flush(self) -> None:
        """Seal buffered entries into indexed segments now (Milvus does it in the background; milvus-lite
        also fsyncs its log here)."""
        self._milvus("flush", self._collection)

    # --- internals ---------------------------------------------------------------------------

    def _count(self, expr: str) -> int:
        return self._milvus("query", self._collection, filter=expr, output_fields=["count(*)"])[0]["count(*)"]

    def _search_params(self, k: int) -> dict[str, Any]:
        if self.spec.index == "hnsw":
            return {"params": {"ef": max(self.spec.ef_search, k)}}  # Milvus requires ef >= k
        if self.spec.index == "ivfpq":
            return {"params": {"nprobe": self.spec.nprobe}}
        return {}

    def _empty_values(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Values of missing entries, as `Memory` returns them: token -1, vector zeros."""
        if self.spec.value_kind == "token":
            return np.full(shape, -1, dtype=np.int64)
        if self.spec.value_kind == "vector":
            return np.zeros((*shape, self.spec.value_dim), dtype=np.float32)
        return None


class MilvusStore:
    """The named memories of one Milvus (a milvus-lite `.db` path or a server URI); the calls of `Store`.

    Raises `BackendUnavailable` at once when Milvus cannot be reached: there is no fallback.
    """

    def __init__(self, uri: str, timeout: float = 60.0):
        self._milvus = Connection(uri, timeout)
        self._memories: dict[str, MilvusMemory] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(memory_name(c) for c in self._milvus("list_collections") if c.startswith(PREFIX))

    def loaded(self) -> list[Memory]:
        """The in-process memories for /metrics to report on: none (Milvus has its own metrics)."""
        return []

    def create(self, spec: MemorySpec) -> MilvusMemory:
        collection = collection_name(spec.name)
        with self._lock:
            if self._milvus("has_collection", collection):
                raise AlreadyExists(f"memory '{spec.name}' already exists", "name")
            if spec.index == "ivfpq" and self._milvus.lite:
                raise InvalidInput("milvus-lite has no IVF_PQ index: use flat or hnsw, or a Milvus server", "index")
            self._milvus("create_collection", collection, schema=schema(spec), consistency_level="Strong",
                         properties={SPEC: spec.model_dump_json(), NEXT_ID: "0"})
            try:
                self._milvus("create_index", collection, index_params(spec))
                self._milvus("load_collection", collection)
            except BackendUnavailable:  # no half-made memory: it has no data yet
                with suppress(BackendUnavailable):
                    self._milvus("drop_collection", collection)
                raise
            mem = self._memories[spec.name] = MilvusMemory(self._milvus, spec)
            return mem

    def get(self, name: str) -> MilvusMemory:
        with self._lock:
            mem = self._memories.get(name)
            if mem is None:
                if not self._milvus("has_collection", collection_name(name)):
                    raise NotFound(f"memory '{name}' not found", "name")
                mem = self._memories[name] = MilvusMemory.open(self._milvus, name)
            return mem

    def drop(self, name: str) -> None:
        with self._lock:
            self._memories.pop(name, None)
            if not self._milvus("has_collection", collection_name(name)):
                raise NotFound(f"memory '{name}' not found", "name")
            self._milvus("drop_collection", collection_name(name))

    def quarantine(self, name: str) -> str:
        """Rename a memory's collection out of this store's sight (kept, not deleted); returns the new name."""
        with self._lock:
            self._memories.pop(name, None)
            target = f"orphaned_{collection_name(name)}_{time.strftime('%Y%m%dT%H%M%S')}"
            self._milvus("rename_collection", collection_name(name), target)
            return target

    def close(self) -> None:
        with self._lock:
            self._memories.clear()
            self._milvus.close()
