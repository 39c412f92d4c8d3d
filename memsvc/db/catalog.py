"""`Catalog`: which memories exist and how each is configured, in SQLite or PostgreSQL.

Each call is one short transaction. Uniqueness of names is the database's job (a unique constraint),
so two processes creating the same memory at once cannot both succeed.
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from memsvc.contract import AlreadyExists, InvalidInput, MemorySpec, NotFound
from memsvc.db.engine import make_engine, upgrade
from memsvc.db.models import MemoryRow


class Catalog:
    """The memories known to the service; opening one migrates the database to the latest schema."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def create_memory(self, spec: MemorySpec) -> None:
        row = MemoryRow.from_spec(spec.model_copy(update={"metadata": _json_object(spec.metadata)}))
        try:
            with self._session.begin() as session:
                session.add(row)
        except IntegrityError:
            raise AlreadyExists(f"memory '{spec.name}' already exists", "name") from None

    def get_memory(self, name: str) -> MemorySpec:
        with self._session() as session:
            return _row(session, name).to_spec()

    def list_memories(self) -> list[MemorySpec]:
        """All memories by name (sorted here, not in SQL, so the order is the same under any collation)."""
        with self._session() as session:
            specs = [row.to_spec() for row in session.scalars(select(MemoryRow))]
        return sorted(specs, key=lambda spec: spec.name)

    def delete_memory(self, name: str) -> None:
        with self._session.begin() as session:
            session.delete(_row(session, name))

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> MemorySpec:
        """Replace a memory's metadata (the one part of a spec that may change); returns the new spec."""
        metadata = _json_object(metadata)
        with self._session.begin() as session:
            row = _row(session, name)
            row.meta = metadata
            return row.to_spec()

    def update_search_params(self, name: str, **params: int) -> MemorySpec:
        """Set index parameters of a memory (`ef_search`, `nprobe`: the ones a spec may change, already
        checked by the caller); returns the new spec."""
        with self._session.begin() as session:
            row = _row(session, name)
            row.index_params = {**row.index_params, **params}  # a new dict, so SQLAlchemy sees the change
            return row.to_spec()

    def close(self) -> None:
        self.engine.dispose()


def _row(session: Session, name: str) -> MemoryRow:
    row = session.scalar(select(MemoryRow).where(MemoryRow.name == name))
    if row is None:
        raise NotFound(f"memory '{name}' not found", "name")
    return row


def _json_object(metadata: Any) -> dict[str, Any]:
    """`metadata` as it will read back from the database: a JSON object (string keys, no NaN/inf)."""
    if not isinstance(metadata, dict):
        raise InvalidInput(f"metadata must be a JSON object, not {type(metadata).__name__}", "metadata")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"metadata is not JSON: {e}", "metadata") from None
