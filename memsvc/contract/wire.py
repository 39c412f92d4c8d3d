"""How bodies travel: JSON, or an uncompressed npz archive (`application/x-npz`) for speed.

One module for the server and the client, so both sides read and write the same bytes. An npz body's
members are the JSON body's fields: arrays stay arrays (keys/queries float32 [n, d], values, ids int64),
strings are 0-d unicode arrays, integers (k) 0-d integer arrays, and `payloads`/`partitions` are 0-d
unicode arrays holding JSON. Nothing is ever unpickled. In JSON, +inf distances travel as null.

JSON is read with orjson where it is installed, which is always on the server (`memsvc[server]`; strict:
no NaN, no lone surrogates, only UTF-8); a light client without it reads the server's answers with the
standard library.

A streamed answer travels as server-sent events (`text/event-stream`, the WHATWG format): `sse_event` writes
one, `read_sse` reads them back from the body's lines.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from memsvc.contract.errors import InvalidInput
from memsvc.contract.types import Entries, SearchResult

NPZ = "application/x-npz"
JSON = "application/json"
SSE = "text/event-stream"
FLOAT32_FIELDS = ("keys", "queries")  # binary bodies carry these as float32, nothing else
JSON_FIELDS = ("payloads", "partitions")  # JSON text, read and written with `json` exactly as the store does

try:
    import orjson
except ImportError:  # a light client
    orjson = None


def loads_json(body: bytes) -> Any:
    """The value of JSON bytes; ValueError if they are not JSON (NaN and infinity are not JSON numbers)."""
    if orjson is not None:
        return orjson.loads(body)
    return json.loads(body, parse_constant=_not_a_number)


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def decode(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The fields of a JSON or npz body, or InvalidInput naming what is wrong with it."""
    kind = media_type(content_type)
    if not body:
        raise InvalidInput("the request body is empty", "body")
    if kind == NPZ:
        return decode_npz(body)
    if kind not in (JSON, ""):
        raise InvalidInput(f"unsupported Content-Type {kind!r}: send {JSON} or {NPZ}", "body")
    try:
        fields = loads_json(body)
    except ValueError as exc:
        raise InvalidInput(f"the body is not valid JSON (NaN and infinity are not JSON numbers): {exc}",
                           "body") from None
    if not isinstance(fields, dict):
        raise InvalidInput("the body must be a JSON object", "body")
    return fields


def encode_npz(fields: dict[str, Any]) -> bytes:
    """An npz body holding `fields`; None fields are left out."""
    members = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name in JSON_FIELDS:
            try:
                value = json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"{name} must be JSON-serialisable: {exc}", name) from None
        array = np.asarray(value)
        if array.dtype.kind == "O":
            raise InvalidInput(f"{name} must hold numbers or text, not Python objects", name)
        members[name] = array
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def decode_npz(body: bytes) -> dict[str, Any]:
    """The fields of an npz body; keys/queries must be float32, members stored uncompressed."""
    if not body.startswith(b"PK"):
        raise InvalidInput(f"malformed {NPZ} body: not an npz archive (write one with np.savez)", "body")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            if any(info.compress_type != zipfile.ZIP_STORED for info in archive.zip.infolist()):
                raise ValueError("members must be stored uncompressed (np.savez, not np.savez_compressed)")
            members = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"malformed {NPZ} body: {exc}", "body") from None
    return {name: _field(name, array) for name, array in members.items()}


def _field(name: str, array: np.ndarray) -> Any:
    if name in FLOAT32_FIELDS and array.dtype != np.float32:
        raise InvalidInput(f"{name} must be float32 in a binary body, got {array.dtype}", name)
    if name in JSON_FIELDS:
        if array.ndim or array.dtype.kind != "U":
            raise InvalidInput(f"{name} must be a 0-d unicode array holding JSON", name)
        try:
            return json.loads(str(array))
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{name} is not valid JSON: {exc}", name) from None
    return array.item() if array.ndim == 0 else array


# --- the fields of each vector response, and back (server writes, client reads) -----------------

def search_fields(result: SearchResult) -> dict[str, Any]:
    return {"ids": result.ids, "distances": result.distances, "values": result.values,
            "payloads": result.payloads}


def search_result(fields: dict[str, Any]) -> SearchResult:
    """A SearchResult from npz or JSON fields (where null distances stand for +inf)."""
    distances = np.asarray(fields["distances"], dtype=np.float64)
    distances = np.where(np.isnan(distances), np.inf, distances).astype(np.float32)
    return SearchResult(ids=np.asarray(fields["ids"], dtype=np.int64), distances=distances,
                        values=_values(fields.get("values")), payloads=fields.get("payloads"))


def entries_fields(entries: Entries) -> dict[str, Any]:
    return {"ids": entries.ids, "found": entries.found, "keys": entries.keys, "values": entries.values,
            "payloads": entries.payloads, "partitions": entries.partitions}


def entries_result(fields: dict[str, Any]) -> Entries:
    return Entries(ids=np.asarray(fields["ids"], dtype=np.int64), found=np.asarray(fields["found"], dtype=bool),
                   keys=np.asarray(fields["keys"], dtype=np.float32), values=_values(fields.get("values")),
                   payloads=fields.get("payloads"), partitions=fields.get("partitions"))


def _values(values: Any) -> np.ndarray | None:
    """Token ids stay int64; value vectors are float32 (JSON would give float64)."""
    if values is None:
        return None
    values = np.asarray(values)
    return values.astype(np.float32) if values.dtype.kind == "f" else values.astype(np.int64)


# --- server-sent events ------------------------------------------------------------------------

def sse_event(event: str, data: bytes) -> bytes:
    """One event named `event` whose data is `data`, one line of JSON (JSON text escapes its newlines)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def read_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each event in the lines of a text/event-stream body, as the WHATWG
    specification parses them: `field: value` lines, a blank line ends an event, `:` lines are comments,
    several `data` lines join with newlines, an event without a name is a `message`."""
    name, data = "", []
    for line in lines:
        if not line:
            if data:
                yield name or "message", "\n".join(data)
            name, data = "", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
