"""The catalog's tables as SQLAlchemy 2 typed declarative models. SQL holds the catalog, never vectors.

A new table is a new model here plus a migration in `migrations/versions/`; `tests/test_catalog.py`
checks that the two agree.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, MetaData, String, Text, UniqueConstraint, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from memsvc.contract import MemorySpec

# Deterministic constraint names, so migrations can refer to (and later alter or drop) them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict] = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Timestamped:
    """created_at / updated_at, set by the database."""

    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class MemoryRow(Timestamped, Base):
    """One memory: the fixed fields of its `MemorySpec` as columns, index parameters and metadata as JSON."""

    __tablename__ = "memories"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    dim: Mapped[int]
    metric: Mapped[str] = mapped_column(String(16))
    value_kind: Mapped[str] = mapped_column(String(16))
    value_dim: Mapped[int | None]
    index_kind: Mapped[str] = mapped_column(String(16))
    index_params: Mapped[dict[str, Any]]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")  # `metadata` is taken by SQLAlchemy

    @classmethod
    def from_spec(cls, spec: MemorySpec) -> MemoryRow:
        fields = spec.model_dump()
        return cls(name=fields.pop("name"), dim=fields.pop("dim"), metric=fields.pop("metric"),
                   value_kind=fields.pop("value_kind"), value_dim=fields.pop("value_dim"),
                   index_kind=fields.pop("index"), meta=fields.pop("metadata"), index_params=fields)

    def to_spec(self) -> MemorySpec:
        return MemorySpec(name=self.name, dim=self.dim, metric=self.metric, value_kind=self.value_kind,
                          value_dim=self.value_dim, index=self.index_kind, metadata=self.meta,
                          **self.index_params)


class CollectionRow(Timestamped, Base):
    """A document collection; its chunk vectors live in the memory `memory` (see memsvc.collections)."""

    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    memory: Mapped[str] = mapped_column(String(128))
    context: Mapped[str | None] = mapped_column(String(16))  # contextual chunks: "title", "trail" or none
    # the model and backend its vectors come from (retrievers.encoders.embedder_name); NULL: made before
    # migration 0005, i.e. all-MiniLM-L6-v2 in PyTorch
    embedder: Mapped[str | None] = mapped_column(String(128))


class DocumentRow(Timestamped, Base):
    """One committed version of a document: `content_hash` decides whether an upsert changes it, and
    `partition` names the memory partition holding exactly this version's chunk vectors."""

    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("collection_id", "document_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    document_id: Mapped[str] = mapped_column(String(1024))
    content_hash: Mapped[str] = mapped_column(String(64))
    partition: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")
    chunks: Mapped[list[ChunkRow]] = relationship(order_by="ChunkRow.position", cascade="all, delete-orphan",
                                                  passive_deletes=True)


class ChunkRow(Base):
    """A chunk of a document version: its text for BM25 and answers, the id of its vector and that vector's
    embedding cache key."""

    __tablename__ = "chunks"

    id: Mapped[int] = mapped_column(primary_key=True)
    document_row_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    chunk_id: Mapped[str] = mapped_column(String(1100), index=True)  # a search looks its hits up by chunk id
    position: Mapped[int]
    section: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    vector_id: Mapped[int] = mapped_column(BigInteger)
    # sha256 of the embedder's name and the text embedded (retrievers.dense.embedding_key): the next
    # version of the document copies this vector for a chunk with the same key instead of embedding it
    embed_key: Mapped[str | None] = mapped_column(String(64))
