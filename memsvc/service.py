"""`Service`: the memories and document collections of one data directory and its SQL catalog, in this
process: the embedded face of the `memsvc.contract.Client` interface (`memsvc.client.MemoryClient` is the
REST one).

The catalog is the source of truth for which memories exist: a create inserts the catalog row first
(a duplicate fails there) and removes it again if the store cannot create the memory; a delete removes
the row first, then the files. Opening reconciles the two: memory directories the catalog does not
know (a create interrupted by a crash, or a server pointed at another database) are moved aside to
`orphaned/`, never deleted, and catalog rows without a directory are reported.
So never create memories in the store behind the catalog's back.

Collections (`memsvc.collections`) keep their documents in the catalog's database and their vectors in
memories of this service; their embedder and the language model of `ask` (`Settings.model`) are loaded on
first use.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Self

from memsvc.collections import Collection, Collections, LanguageModel, Lazy
from memsvc.config import Settings
from memsvc.contract import (
    NAME_PATTERN,
    InvalidInput,
    MemoryBackend,
    MemorySpec,
    NotFound,
    check_json,
    check_search_params,
    spec_from,
)
from memsvc.db import Catalog
from memsvc.store import Store
from retrievers.dense import Encoder, encoder_name

if TYPE_CHECKING:
    from memsvc.store.milvus import MilvusStore

log = logging.getLogger(__name__)


class Service:
    """Store + Catalog (+ Collections) of `settings.data_dir`; the embedded twin of `MemoryClient`.

    `encoder` and `language_model` make the collections' embedder and the (model, tokenizer) of `ask`
    when first needed; by default all-MiniLM-L6-v2 run as `settings.embed_backend` says for new collections
    (each collection keeps the embedder it was created with; `retrievers.encoders.make_embedder`, exported
    models kept in `settings.model_cache_dir`) and `lm.model.load_model(settings.model, device=settings.device)`.
    A given `encoder` embeds every collection. A given `Lazy` model is used as it is, so that whoever shares
    it (the app, across its lifespans) shares the loaded model.
    """

    def __init__(self, settings: Settings | None = None, *,
                 encoder: Callable[[], Encoder] | None = None,
                 language_model: Callable[[], LanguageModel] | Lazy[LanguageModel] | None = None):
        self.settings = settings or Settings()
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(self.settings)  # first: its lock says at once when another process holds the dir
        try:
            self.catalog = Catalog(self.settings.catalog_url)
        except BaseException:
            self.store.close()
            raise
        self._reconcile()
        language_model = language_model or (lambda: load_language_model(self.settings))
        if encoder is not None:
            given = Lazy(encoder)
            self.collections = Collections(self.catalog.engine, self, lambda _name: given(), language_model,
                                           lambda: encoder_name(given()))
        else:
            from retrievers.encoders import embedder_name, make_embedder

            cache = self.settings.model_cache_dir / "embedders"
            self.collections = Collections(self.catalog.engine, self, lambda name: make_embedder(name, cache),
                                           language_model, lambda: embedder_name(self.settings.embed_backend))

    def create_memory(self, name: str, dim: int, metric: str = "l2", value_kind: str = "none",
                      value_dim: int | None = None, index: str = "flat", **index_params: Any) -> MemoryBackend:
        """Create a memory (index_params: nlist, pq_m, nprobe, hnsw_m, ... of MemorySpec)."""
        return self.create(spec_from(name=name, dim=dim, metric=metric, value_kind=value_kind,
                                     value_dim=value_dim, index=index, **index_params))

    def create(self, spec: MemorySpec) -> MemoryBackend:
        for field in ("dim", "value_dim"):
            size = getattr(spec, field)
            if size is not None and size > self.settings.max_dim:
                raise InvalidInput(f"{field}={size} is above this server's max_dim={self.settings.max_dim}",
                                   field)
        self.catalog.create_memory(spec)
        try:
            return self.store.create(self.catalog.get_memory(spec.name))  # the spec as the catalog keeps it
        except BaseException:
            self.catalog.delete_memory(spec.name)
            raise

    def memory(self, name: str) -> MemoryBackend:
        if not re.fullmatch(NAME_PATTERN, name):
            raise NotFound(f"memory '{name}' not found", "name")
        return self.store.get(name)

    def list_memories(self) -> list[MemorySpec]:
        return self.catalog.list_memories()

    def delete_memory(self, name: str) -> None:
        self.catalog.delete_memory(name)
        with suppress(NotFound):  # a row without files (reported at start) is gone all the same
            self.store.drop(name)

    def set_metadata(self, name: str, metadata: dict[str, Any]) -> MemorySpec:
        """Replace a memory's free-form metadata in the catalog and in the memory's own spec."""
        check_json(metadata, "metadata")
        spec = self.catalog.update_metadata(name, metadata)
        self.memory(name).set_metadata(spec.metadata)
        return spec

    def set_search_params(self, name: str, ef_search: int | None = None, nprobe: int | None = None) -> MemorySpec:
        """Change a memory's `ef_search` (hnsw) / `nprobe` (ivfpq) in the catalog and in the memory's own
        spec (both kept across restarts); None leaves one as it is. InvalidInput, before anything changes,
        for another index kind or a value out of range."""
        memory = self.memory(name)
        ef_search, nprobe = check_search_params(memory.spec, ef_search, nprobe)
        params = {field: value for field, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value is not None}
        spec = self.catalog.update_search_params(name, **params)
        memory.set_search_params(ef_search, nprobe)
        return spec

    def create_collection(self, name: str) -> Collection:
        return self.collections.create(name)

    def collection(self, name: str) -> Collection:
        return self.collections.get(name)

    def list_collections(self) -> list[str]:
        return self.collections.list()

    def delete_collection(self, name: str) -> None:
        self.collections.delete(name)

    def close(self) -> None:
        self.store.close()
        self.catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reconcile(self) -> None:
        known = {spec.name for spec in self.catalog.list_memories()}
        on_disk = set(self.store.names())
        for name in sorted(on_disk - known):
            moved = self.store.quarantine(name)
            log.warning("memory directory '%s' is not in the catalog (a create interrupted by a crash, or a "
                        "different database): moved to %s", name, moved)
        for name in sorted(known - on_disk):
            log.error("the catalog lists memory '%s' but the %s store has no data for it: its data is lost; "
                      "delete it to reuse the name", name, self.settings.vector_backend)


def open_store(settings: Settings) -> Store | MilvusStore:
    """The vector store the settings select: FAISS in the data dir (default), or Milvus (no fallback)."""
    if settings.vector_backend == "faiss":
        return Store(settings.data_dir, snapshot_bytes=settings.snapshot_bytes)
    from memsvc.store.milvus import MilvusStore  # an optional extra: memsvc[milvus]

    return MilvusStore(settings.milvus_uri or str(settings.data_dir / "milvus.db"), timeout=settings.milvus_timeout)


def load_language_model(settings: Settings) -> LanguageModel:
    """The language model of `ask`: `settings.model` on `settings.device` (default: a GPU when there is one)."""
    from lm.model import load_model

    return load_model(settings.model, dtype=None, device=settings.device)
