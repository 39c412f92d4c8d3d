"""How bodies travel: JSON, the binary tensor frame (`application/x-memsvc-tensors`, the fastest), or an
uncompressed npz archive (`application/x-npz`).

One module for the server and the client, so both sides read and write the same bytes. A tensor frame
(`encode_tensors` / `decode_tensors`, layout in docs/API.md) is a small header naming each array's name,
dtype and shape, then the raw little-endian arrays, each 8-byte aligned: decoding is one copy of the
body and a view per array. Its fields, and an npz body's
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
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from memsvc.contract.errors import InvalidInput, UnsupportedMediaType
from memsvc.contract.types import Entries, SearchResult

NPZ = "application/x-npz"
JSON = "application/json"
TENSORS = "application/x-memsvc-tensors"
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
    """The fields of a JSON, tensor-frame or npz body, or InvalidInput naming what is wrong with it
    (UnsupportedMediaType, an InvalidInput answered with 415, for any other Content-Type)."""
    kind = media_type(content_type)
    if kind not in (JSON, "", TENSORS, NPZ):
        raise UnsupportedMediaType(f"unsupported Content-Type {kind!r}: send {JSON}, {TENSORS} or {NPZ}", "body")
    if not body:
        raise InvalidInput("the request body is empty", "body")
    if kind == TENSORS:
        return decode_tensors(body)
    if kind == NPZ:
        return decode_npz(body)
    try:
        fields = loads_json(body)
    except ValueError as exc:
        raise InvalidInput(f"the body is not valid JSON (NaN and infinity are not JSON numbers): {exc}",
                           "body") from None
    if not isinstance(fields, dict):
        raise InvalidInput("the body must be a JSON object", "body")
    return fields


def accepted(accept: str | None) -> str:
    """The media type to answer a request with `accept` (its Accept header): the tensor frame or npz when
    the client lists it, JSON otherwise (no quality values: a client asks for the binary one it reads)."""
    accept = accept or ""
    if TENSORS in accept:
        return TENSORS
    return NPZ if NPZ in accept else JSON


def _json_text(name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} must be JSON-serialisable: {exc}", name) from None


def encode_npz(fields: dict[str, Any]) -> bytes:
    """An npz body holding `fields`; None fields are left out."""
    members = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name in JSON_FIELDS:
            value = _json_text(name, value)
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


# --- the tensor frame (application/x-memsvc-tensors) -------------------------------------------------

MAGIC = b"MSVT"
VERSION = 1
# dtype codes (struct's format characters): the only dtypes a frame carries, all little-endian
TENSOR_DTYPES = {b"f"[0]: np.dtype("<f4"), b"q"[0]: np.dtype("<i8"), b"?"[0]: np.dtype("?"),
                 b"s"[0]: np.dtype("u1")}  # s: UTF-8 text, a 1-D byte array
TEXT = b"s"[0]
MAX_ARRAYS = 64
MAX_NDIM = 8
ARRAY_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HEAD = struct.Struct("<4sHH")  # magic, version, number of arrays


def _pad8(n: int) -> int:
    return -n % 8


def _tensor(name: str, value: Any) -> tuple[int, np.ndarray]:
    """(dtype code, C-contiguous little-endian array) of one field: text as UTF-8 bytes, integers as int64."""
    if name in JSON_FIELDS:
        value = _json_text(name, value)
    if isinstance(value, str):
        try:
            return TEXT, np.frombuffer(value.encode("utf-8"), np.uint8)
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{name} is not valid Unicode: {exc}", name) from None
    array = np.asarray(value)
    kind = array.dtype.kind
    if kind == "b":
        code = b"?"[0]
    elif kind in "iu":
        code = b"q"[0]
    elif array.dtype == np.float32:
        code = b"f"[0]
    else:
        raise InvalidInput(f"{name} must be float32, integers, booleans or text in a {TENSORS} body, "
                           f"got {array.dtype}", name)
    return code, np.asarray(array, dtype=TENSOR_DTYPES[code], order="C")  # (ascontiguousarray makes 0-d 1-d)


def encode_tensors(fields: dict[str, Any]) -> bytes:
    """A tensor frame holding `fields` (None fields are left out): float32 arrays stay float32, integers
    become int64, booleans bool, strings and the JSON fields (payloads, partitions) UTF-8 text; every
    array is written in C order, little-endian, starting at a multiple of 8 bytes (layout: docs/API.md)."""
    arrays = [(name, *_tensor(name, value)) for name, value in fields.items() if value is not None]
    head = [_HEAD.pack(MAGIC, VERSION, len(arrays))]
    for name, code, array in arrays:
        raw = name.encode("ascii")
        head.append(struct.pack(f"<B{len(raw)}sBB{array.ndim}Q", len(raw), raw, code, array.ndim, *array.shape))
    size = sum(map(len, head))
    parts: list[Any] = [*head, bytes(_pad8(size))]
    for _, _, array in arrays:
        parts.append(memoryview(array).cast("B") if array.size else b"")
        parts.append(bytes(_pad8(array.nbytes)))
    return b"".join(parts)


def decode_tensors(body: bytes) -> dict[str, Any]:
    """The fields of a tensor frame, or InvalidInput (field "body") saying what is malformed. Arrays come
    back writable (one copy of the body, then a view per array); 0-d arrays as Python scalars; text as
    str, and the JSON fields (payloads, partitions) parsed; keys/queries must be float32."""
    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"malformed {TENSORS} body: {why}", "body")

    if len(body) < _HEAD.size or body[:4] != MAGIC:
        raise bad(f"it does not start with {MAGIC!r} (see docs/API.md)")
    _, version, count = _HEAD.unpack_from(body)
    if version != VERSION:
        raise bad(f"version {version}; this server reads version {VERSION}")
    if count > MAX_ARRAYS:
        raise bad(f"{count} arrays, at most {MAX_ARRAYS}")
    at, specs = _HEAD.size, []
    try:
        for _ in range(count):
            (length,) = struct.unpack_from("<B", body, at)
            name = body[at + 1:at + 1 + length]
            if len(name) != length or not ARRAY_NAME.fullmatch(name):
                raise bad(f"array name {name!r} is not 1-64 letters, digits or '_'")
            code, ndim = struct.unpack_from("<BB", body, at + 1 + length)
            if code not in TENSOR_DTYPES:
                raise bad(f"array {name.decode()!r} has unknown dtype code {bytes([code])!r} "
                          "(f float32, q int64, ? bool, s UTF-8 text)")
            if ndim > MAX_NDIM or (code == TEXT and ndim != 1):
                raise bad(f"array {name.decode()!r} has {ndim} dimensions")
            shape = struct.unpack_from(f"<{ndim}Q", body, at + 3 + length)
            specs.append((name.decode(), code, shape))
            at += 3 + length + 8 * ndim
    except struct.error:
        raise bad("the header is cut short") from None
    if len({name for name, _, _ in specs}) != len(specs):
        raise bad("an array name repeats")
    at += _pad8(at)
    sizes = [int(np.prod(shape, dtype=object)) * TENSOR_DTYPES[code].itemsize for _, code, shape in specs]
    expected = at + sum(size + _pad8(size) for size in sizes)
    if len(body) != expected:
        raise bad(f"{len(body)} bytes where its header describes {expected}")
    buffer = bytearray(body)
    fields = {}
    for (name, code, shape), size in zip(specs, sizes):
        array = np.frombuffer(buffer, TENSOR_DTYPES[code], size // TENSOR_DTYPES[code].itemsize, at).reshape(shape)
        at += size + _pad8(size)
        fields[name] = _tensor_field(name, code, array)
    return fields


def _tensor_field(name: str, code: int, array: np.ndarray) -> Any:
    if code == TEXT:
        try:
            text = array.tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{name} is not valid UTF-8: {exc}", name) from None
        if name in JSON_FIELDS:
            try:
                return loads_json(text.encode())
            except ValueError as exc:
                raise InvalidInput(f"{name} is not valid JSON: {exc}", name) from None
        return text
    if code == b"?"[0] and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"malformed {TENSORS} body: bool array {name!r} holds bytes other than 0 and 1", "body")
    if name in FLOAT32_FIELDS and code != b"f"[0]:
        raise InvalidInput(f"{name} must be float32 in a binary body, got {TENSOR_DTYPES[code]}", name)
    return array.item() if array.ndim == 0 else array


# --- the fields of each vector response, and back (server writes, client reads) -----------------

def search_fields(result: SearchResult) -> dict[str, Any]:
    return {"ids": result.ids, "distances": result.distances, "values": result.values,
            "payloads": result.payloads}


def search_result(fields: dict[str, Any]) -> SearchResult:
    """A SearchResult from npz or JSON fields (where null distances stand for +inf)."""
    distances = fields["distances"]
    if not (isinstance(distances, np.ndarray) and distances.dtype == np.float32):  # JSON: null is +inf
        distances = np.asarray(distances, dtype=np.float64)
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
