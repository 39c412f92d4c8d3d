"""`MilvusMemory` and `MilvusStore`: the memory store on Milvus, for memories that outgrow one machine.

The same calls and the same results as `Memory` / `Store` (exact search gives the same ids and
distances), on a Milvus server or cluster, or on milvus-lite (a local `.db` path) for tests.

One memory is one collection, `memsvc_` + the base32 of its name (Milvus names allow only letters,
digits and '_'):

    id       INT64 primary key         assigned here, increasing, never reused (as in `Memory`)
    key      FLOAT_VECTOR[dim]         the searched field: FLAT, HNSW or IVF_PQ; L2, IP or COSINE
    part     VARCHAR, partition key    the partition name; "" for entries added without one
    value    INT64 | ARRAY[FLOAT]      only when the spec stores values (token id / value vector)
    payload  VARCHAR                   the payload as JSON text ("null" when none)

Value vectors are an ARRAY of FLOAT (at most 4096 elements), not a second vector field: Milvus before
2.4 allows one vector field per collection ("multiple vector fields is not supported"), and an ARRAY
works the same on Milvus 2.3 to 2.6 and on milvus-lite. Collections made by earlier versions with a
FLOAT_VECTOR value field read and write the same way (both take and give lists of floats).

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

The timeout bounds a whole call (an add, search, get or delete), however many Milvus requests it
takes, so the service answers 503 in time rather than a client giving up first. Searches go in
batches: on a server up to Milvus' 16,384 queries and 64 MiB of request or expected result per
request. milvus-lite searches in Python and NumPy: every request walks its unsealed buffer row by
row (0.4 s per request at 20,000 entries of dim 64), and its exact L2 materialises a
[queries, entries, dim] array. So on milvus-lite a search first seals a buffer of more than
`LITE_FLUSH_ROWS` entries (`flush`), and sends as many queries per request as keep that array
within `LITE_SEARCH_BYTES` (for ip and cosine, the [queries, entries] product).
"""
from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
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
    check_partitions,
    check_payloads,
    check_search_params,
    check_values,
    partition_groups,
)

if TYPE_CHECKING:
    from memsvc.store.memory import Memory

PREFIX = "memsvc_"
SPEC, NEXT_ID, PAYLOADS = "memsvc.spec", "memsvc.next_id", "memsvc.payloads"  # collection properties
METRICS = {"l2": "L2", "ip": "IP", "cosine": "COSINE"}
MAX_PAYLOAD_BYTES = 65535  # the longest Milvus VARCHAR
MAX_NQ = 16384  # the most queries Milvus takes in one search
MAX_VALUE_DIM = 4096  # the longest Milvus ARRAY
REQUEST_BYTES = 64 << 20  # a search request (queries) or its expected result stays within about this size
LITE_SEARCH_BYTES = 64 << 20  # milvus-lite: the distance array one search request may materialise
LITE_FLUSH_ROWS = 4096  # milvus-lite: a search first seals more unsealed entries than this
INSERT_BYTES = 64 << 20  # larger adds are sent as several inserts of about this size
ID_BATCH = 16384  # ids per get/delete filter expression
OVERRUN_SLACK = 0.05  # s: Milvus may give up on a call this much before its deadline


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
    def errors(self, what: str, end: float = math.inf) -> Iterator[None]:
        """Milvus and gRPC errors as `BackendUnavailable`. Any error that arrives once the call's time is up
        (monotonic `end`, less OVERRUN_SLACK) is the overrun, whatever Milvus called it: gRPC's
        DEADLINE_EXCEEDED, pymilvus' "Retry timeout", the server's "context Done"."""
        try:
            yield
        except (grpc.RpcError, MilvusException) as exc:
            deadline_code = isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if deadline_code or time.monotonic() >= end - OVERRUN_SLACK:
                raise self.overrun(what) from exc
            if isinstance(exc, grpc.RpcError):  # the codes pymilvus does not retry
                raise BackendUnavailable(f"Milvus {what} failed: {exc.code().name} {exc.details()}") from exc
            raise BackendUnavailable(f"Milvus {what} failed: {exc.message}") from exc

    def overrun(self, what: str) -> BackendUnavailable:
        """The error of a call that ran past the timeout, whether we or gRPC noticed first."""
        return BackendUnavailable(f"Milvus {what} failed: the call ran past its {self.timeout:g} s timeout")

    def deadline(self) -> float:
        """The monotonic time by which a call that starts now must end."""
        return time.monotonic() + self.timeout

    def __call__(self, method: str, *args: Any, deadline: float | None = None, **kwargs: Any) -> Any:
        """client.method(*args, **kwargs) within the timeout, or within what is left until `deadline`
        (a `deadline()` taken at the start of a call made of several requests)."""
        timeout = self.timeout if deadline is None else deadline - time.monotonic()
        if timeout <= 0:
            raise self.overrun(method)
        with self.errors(method, time.monotonic() + timeout):
            return getattr(self.client, method)(*args, timeout=timeout, **kwargs)

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
        s.add_field("value", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=spec.value_dim)
    s.add_field("payload", DataType.VARCHAR, max_length=MAX_PAYLOAD_BYTES)
    return s


def index_params(spec: MemorySpec) -> IndexParams:
    """The key index the spec asks for."""
    kind, params = {
        "flat": ("FLAT", {}),
        "hnsw": ("HNSW", {"M": spec.hnsw_m, "efConstruction": 40}),  # faiss' default efConstruction
        "ivfpq": ("IVF_PQ", {"nlist": spec.nlist, "m": spec.pq_sub_quantizers, "nbits": 8}),
    }[spec.index]
    p = MilvusClient.prepare_index_params()
    p.add_index("key", index_type=kind, metric_type=METRICS[spec.metric], params=params)
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
        self._unsealed = next_id if milvus.lite else 0  # milvus-lite: entries added since the last flush

    @classmethod
    def open(cls, milvus: Connection, name: str) -> MilvusMemory:
        collection = collection_name(name)
        props = milvus("describe_collection", collection)["properties"]
        milvus("load_collection", collection)  # a no-op when loaded; milvus-lite starts released
        mem = cls(milvus, MemorySpec.model_validate_json(props[SPEC]), int(props[NEXT_ID]),
                  props.get(PAYLOADS) == "true")
        mem._recover()
        return mem

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the free-form metadata stored with the spec."""
        with self._writer:
            spec = self.spec.model_copy(update={"metadata": dict(metadata)})
            self._milvus("alter_collection_properties", self._collection, properties={SPEC: spec.model_dump_json()})
            self.spec = spec

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change `spec.ef_search` (hnsw) / `spec.nprobe` (ivfpq), kept with the spec in the collection's
        properties; Milvus takes them per search (`ef`, `nprobe`), so the index stays as it is."""
        ef_search, nprobe = check_search_params(self.spec, ef_search, nprobe)
        update = {name: value for name, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value is not None}
        with self._writer:
            spec = self.spec.model_copy(update=update)
            self._milvus("alter_collection_properties", self._collection, properties={SPEC: spec.model_dump_json()})
            self.spec = spec

    # --- the MemoryBackend calls ----------------------------------------------------------------

    def add(self, keys: Any, values: Any = None, payloads: list[Any] | None = None,
            partition: str | None = None, partitions: Sequence[str | None] | None = None) -> np.ndarray:
        """Store n entries and return their new ids; stored (with Strong consistency) on return. `partitions`:
        one partition per key row."""
        keys = check_keys(keys, self.spec, "keys")
        values = check_values(self.spec, values, len(keys))
        partition = check_partition(partition)
        partitions = check_partitions(partitions, len(keys), partition, "key")
        texts = payload_texts(check_payloads(payloads, len(keys)), len(keys))
        n = len(keys)
        with self._writer:
            first = self._next_id
            props = {NEXT_ID: str(first + n), **({PAYLOADS: "true"} if payloads is not None else {})}
            self._milvus("alter_collection_properties", self._collection, properties=props)
            self._next_id = first + n
            self._any_payloads |= payloads is not None
            parts = [partition or ""] * n if partitions is None else [name or "" for name in partitions]
            columns = {"id": range(first, first + n), "key": keys, "part": parts, "payload": texts}
            if values is not None:
                columns["value"] = values.tolist()  # token ids, or value vectors as lists for the ARRAY
            rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
            size = keys.nbytes + (0 if values is None else values.nbytes) + sum(map(len, texts))
            step = max(1, n * INSERT_BYTES // size)
            deadline = self._milvus.deadline()
            try:
                for start in range(0, n, step):
                    self._milvus("insert", self._collection, rows[start:start + step], deadline=deadline)
            except BackendUnavailable:  # take back what may have been stored (also a timed-out insert)
                with suppress(BackendUnavailable):
                    self._milvus("delete", self._collection, filter=f"id >= {first} and id < {first + n}")
                raise
            if self._milvus.lite:
                self._unsealed += n
        return np.arange(first, first + n, dtype=np.int64)

    def search(self, queries: Any, k: int, partition: str | None = None,
               partitions: Sequence[str | None] | None = None, *, ef_search: int | None = None,
               nprobe: int | None = None) -> SearchResult:
        """Top-k entries per query (of one partition, or of the whole memory), closest first.

        `partitions`: one partition (or None) per query row. Milvus takes one filter per search request,
        so each distinct partition is one request (its rows batched), all within this call's timeout.
        `ef_search` (hnsw) / `nprobe` (ivfpq) replace the spec's for this call (Milvus' `ef` / `nprobe`)."""
        queries = check_keys(queries, self.spec, "queries")
        k = check_k(k)
        partition = check_partition(partition)
        partitions = check_partitions(partitions, len(queries), partition)
        ef_search, nprobe = check_search_params(self.spec, ef_search, nprobe)
        search_params = self._search_params(k, ef_search, nprobe)
        fields = [name for name, wanted in (("value", self.spec.value_kind != "none"),
                                            ("payload", self._any_payloads)) if wanted]
        deadline = self._milvus.deadline()
        if self._milvus.lite and self._unsealed > LITE_FLUSH_ROWS:
            self._seal(deadline)
        step = self._search_batch(k)
        groups = [(partition, np.arange(len(queries)))] if partitions is None else partition_groups(partitions)
        hits: list[Any] = [None] * len(queries)
        for name, rows in groups:
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                found = self._milvus("search", self._collection, data=queries[chunk], limit=k, anns_field="key",
                                     filter=where(partition=name), output_fields=fields,
                                     search_params=search_params, deadline=deadline)
                for i, row in zip(chunk, found):
                    hits[i] = row
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
        deadline = self._milvus.deadline()
        for start in range(0, len(unique), ID_BATCH):
            for row in self._milvus("query", self._collection, filter=where(unique[start:start + ID_BATCH]),
                                    output_fields=fields, deadline=deadline):
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
            deadline = self._milvus.deadline()
            for batch in batches:
                expr = where(batch, partition)
                count = self._count(expr, deadline)  # Milvus' own delete count does not check that ids exist
                if count:
                    self._milvus("delete", self._collection, filter=expr, deadline=deadline)
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
        self._seal(self._milvus.deadline())

    # --- internals ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """Check the id counter and the payload flag against the stored entries. A Milvus server that is
        killed loses the most recent change of a collection's properties, while the inserts that followed
        it survive (seen on 2.3.5 with SIGKILL): ids continue after the largest one stored, and payloads
        are returned wherever some are stored."""
        while rows := self._milvus("query", self._collection, filter=f"id >= {self._next_id}",
                                   output_fields=["id"], limit=ID_BATCH):
            self._next_id = max(row["id"] for row in rows) + 1
        if not self._any_payloads:
            self._any_payloads = bool(self._milvus("query", self._collection, filter='payload != "null"',
                                                   output_fields=["id"], limit=1))

    def _count(self, expr: str, deadline: float | None = None) -> int:
        rows = self._milvus("query", self._collection, filter=expr, output_fields=["count(*)"], deadline=deadline)
        return rows[0]["count(*)"]

    def _seal(self, deadline: float) -> None:
        """Flush: Milvus seals the buffered entries into segments (milvus-lite also fsyncs its log)."""
        with self._writer:
            self._milvus("flush", self._collection, deadline=deadline)
            self._unsealed = 0

    def _search_batch(self, k: int) -> int:
        """Queries per search request: within Milvus' limit and REQUEST_BYTES of queries and of expected
        hits; on milvus-lite also within LITE_SEARCH_BYTES of distances over at most `_next_id` entries."""
        hit_bytes = 16 + {"none": 0, "token": 8, "vector": 4 * (self.spec.value_dim or 0)}[self.spec.value_kind]
        step = min(MAX_NQ, REQUEST_BYTES // (4 * self.spec.dim), REQUEST_BYTES // (k * hit_bytes))
        if self._milvus.lite:
            per_query = 4 * max(self._next_id, 1) * (self.spec.dim if self.spec.metric == "l2" else 1)
            step = min(step, LITE_SEARCH_BYTES // per_query)
        return max(1, step)

    def _search_params(self, k: int, ef_search: int | None = None, nprobe: int | None = None) -> dict[str, Any]:
        if self.spec.index == "hnsw":
            return {"params": {"ef": max(ef_search or self.spec.ef_search, k)}}  # Milvus requires ef >= k
        if self.spec.index == "ivfpq":
            return {"params": {"nprobe": nprobe or self.spec.nprobe}}
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
            if (spec.value_dim or 0) > MAX_VALUE_DIM:
                raise InvalidInput(f"the Milvus backend stores value vectors of at most {MAX_VALUE_DIM} dims "
                                   f"(a Milvus ARRAY field), not {spec.value_dim}", "value_dim")
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
