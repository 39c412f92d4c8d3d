"""Sessions of kNN-memory attention that outlive a process: a long conversation's memory kept in a memory
(in-process or on a memsvc server) and resumed by id from a later process.

A session's evicted entries live in its partitions "{id}/l{layer}/h{kv_head}" (`lm.memory_attention`). A kept
session also records its state in the memory's metadata, under `SESSIONS`, keyed by id (`SessionState`):
how many stream tokens it has taken in (`tokens`), how retrieved keys are positioned, which layers store.
That is all a later process needs to go on:
- its stream continues at index `tokens`: with positions "absolute", new keys are stored and queries search
  at their true distance from every earlier token (`KnnMemoryAttention.offset`);
- the earlier process flushed what its cache still held (sinks and window) into the partitions when it
  ended, so every token it took in is searchable; the new process's cache starts empty, its first tokens
  are its own attention sinks (sinks and window are not restored).
Ending a session (`end_session`) deletes its partitions and its state.

Torch-free, so a command line can look a session up, or end one, before (or without) loading a model.
Metadata is read, changed and written back whole (`MemoryBackend.set_metadata`): two processes that save
sessions of one memory at the same instant may lose one record (its partitions stay, `end_session` still
deletes them); give concurrent conversations separate memories.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from memsvc.contract import NAME_PATTERN, InvalidInput, MemoryBackend, MemorySpec, NotFound

SESSIONS = "attention_sessions"  # the memory metadata key holding {id: SessionState fields}
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SessionState:
    """What a kept session records: `tokens` stream tokens taken in (all stored in its partitions), the
    `positions` mode its keys were stored with, the `layers` that store, and the model (informative)."""

    id: str
    tokens: int
    positions: str
    layers: list[int]
    model: str = ""

    def fields(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if name != "id"}


RECORD_FIELDS = frozenset(name for name in SessionState.__dataclass_fields__ if name != "id")


def check_memory_name(name: str) -> str:
    """The name of a memory to hold sessions, or InvalidInput (field "memory") if no memory can have it."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInput(f"memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or "
                           f"digit), got {name!r}", "memory")
    return name


def check_session_memory(spec: MemorySpec, dim: int | None = None) -> None:
    """InvalidInput (field "memory") unless the memory can hold attention keys and values of `dim` (a model's
    head size) dims: metric 'ip', value_kind 'vector', value_dim = dim. Without `dim` (no model loaded yet)
    the value_dim must equal the memory's own dim."""
    need_dim = spec.dim if dim is None else dim
    if spec.dim != need_dim or spec.value_kind != "vector" or spec.value_dim != need_dim or spec.metric != "ip":
        need = ("metric='ip', value_kind='vector' and value_dim equal to its dim" if dim is None
                else f"dim={dim}, metric='ip', value_kind='vector' and value_dim={dim}")
        raise InvalidInput(f"memory '{spec.name}' must have {need} for this model; it has dim={spec.dim}, "
                           f"metric='{spec.metric}', value_kind='{spec.value_kind}', value_dim={spec.value_dim}",
                           "memory")


def new_session_id() -> str:
    """A fresh random session id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def check_session_id(session: str) -> str:
    """The id, or InvalidInput: letters, digits, '.', '_', '-', at most 64, not starting with a symbol."""
    if not isinstance(session, str) or not SESSION_ID.match(session):
        raise InvalidInput(f"session id must be 1..64 letters, digits, '.', '_' or '-' (starting with a letter or "
                           f"digit), got {session!r}", "session")
    return session


def sessions(memory: MemoryBackend) -> dict[str, SessionState]:
    """The kept sessions of `memory`, by id, read fresh from the memory (a server's current metadata).
    InvalidInput naming the memory (and the session) when its metadata under `SESSIONS` is not a set of
    session records (metadata is anyone's to PATCH)."""
    name = memory.spec.name
    return {sid: _state(name, sid, fields) for sid, fields in _records(name, memory.stats().metadata).items()}


def _records(name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The raw {id: fields} under `SESSIONS` in a memory's metadata ({} if none), or InvalidInput."""
    saved = metadata.get(SESSIONS, {})
    if not isinstance(saved, dict):
        raise InvalidInput(f"memory '{name}' has metadata '{SESSIONS}' that is not an object of session records "
                           f"(a {type(saved).__name__}); fix or drop it with PATCH /v1/memories/{name}", "memory")
    return saved


def _state(name: str, sid: str, fields: Any) -> SessionState:
    """A SessionState from a stored record, or InvalidInput saying what is wrong with it and how to end it."""
    why = None
    if not isinstance(fields, dict) or set(fields) - RECORD_FIELDS or set(RECORD_FIELDS) - set(fields) - {"model"}:
        why = f"its fields must be {', '.join(sorted(RECORD_FIELDS))}"
    elif not _count(fields["tokens"]):
        why = f"tokens must be a non-negative integer, got {fields['tokens']!r}"
    elif not isinstance(fields["positions"], str):
        why = f"positions must be a string, got {fields['positions']!r}"
    elif not isinstance(fields["layers"], list) or not all(_count(layer) for layer in fields["layers"]):
        why = f"layers must be a list of non-negative integers, got {fields['layers']!r}"
    elif not isinstance(fields.get("model", ""), str):
        why = f"model must be a string, got {fields['model']!r}"
    if why is not None:
        raise InvalidInput(f"session '{sid}' in memory '{name}' has a malformed record ({why}); end it with: "
                           f"memsvc session end {sid}", "session")
    return SessionState(id=sid, **fields)


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def kept_session(memory: MemoryBackend, session: str) -> SessionState | None:
    """The state of kept session `session`, None if the memory keeps no such session; InvalidInput when its
    record (or the memory's `SESSIONS` metadata as a whole) is malformed. Other sessions' records are not read."""
    saved = _records(memory.spec.name, memory.stats().metadata)
    return _state(memory.spec.name, session, saved[session]) if session in saved else None


def find_session(memory: MemoryBackend, session: str) -> SessionState:
    """The state of kept session `session`, or NotFound naming the memory and the sessions it has."""
    found = kept_session(memory, session)
    if found is None:
        known = ", ".join(sorted(_records(memory.spec.name, memory.stats().metadata))) or "none"
        raise NotFound(f"unknown session '{session}' in memory '{memory.spec.name}' (its sessions: {known})",
                       "session")
    return found


def save_session(memory: MemoryBackend, state: SessionState) -> None:
    """Record (or replace) a kept session's state in the memory's metadata (InvalidInput, changing nothing,
    when that metadata is not an object of session records)."""
    metadata = dict(memory.stats().metadata)
    metadata[SESSIONS] = {**_records(memory.spec.name, metadata), state.id: state.fields()}
    memory.set_metadata(metadata)


def partition_prefix(session: str) -> str:
    """Every partition of `session` starts with this."""
    return f"{session}/"


def end_session(memory: MemoryBackend, session: str, missing_ok: bool = False) -> int:
    """Delete the session's partitions and its recorded state (malformed or not); the number of entries
    deleted. NotFound when the memory has neither (unless `missing_ok`); InvalidInput, deleting nothing, when
    the memory's metadata under `SESSIONS` is not an object of session records."""
    stats = memory.stats()
    prefix = partition_prefix(session)
    parts = [p.name for p in stats.partitions if p.name is not None and p.name.startswith(prefix)]
    saved = _records(memory.spec.name, stats.metadata)
    if not parts and session not in saved and not missing_ok:
        raise NotFound(f"unknown session '{session}' in memory '{memory.spec.name}'", "session")
    deleted = sum(memory.delete(partition=name) for name in parts)
    if session in saved:
        metadata = dict(memory.stats().metadata)
        metadata[SESSIONS] = {sid: fields for sid, fields in _records(memory.spec.name, metadata).items()
                              if sid != session}
        memory.set_metadata(metadata)
    return deleted
