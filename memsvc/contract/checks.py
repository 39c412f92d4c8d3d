"""Input checks every side shares (in-process memories, the REST API, the client), so every backend
rejects the same input with the same typed error naming the field at fault."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from memsvc.contract.errors import InvalidInput

try:  # what the server writes JSON with (always installed there); a light client checks with json alone
    import orjson
except ImportError:
    orjson = None

if TYPE_CHECKING:
    from memsvc.contract.spec import MemorySpec

MAX_K = 2048  # the largest k faiss searches on every device
MAX_PARTITION_LEN = 256
MAX_EF_SEARCH = 1 << 20  # hnsw search breadth, per memory and per query
MAX_NPROBE = 1 << 20  # ivfpq inverted lists probed, per memory and per query
# The L2 norms a key or query may have (besides 0): FAISS, Milvus and the GPU compute distances in float32
# (largest 2^128, smallest normal 2^-126). Within these, squared L2 distances stay below (2 * 2^60)^2 =
# 2^122, inner products below 2^120, every partial sum of the norm and distance kernels too, and the
# squares of differences at float32's resolution of the smallest vectors (2^-63) stay normal numbers.
MAX_NORM = 2.0 ** 60  # about 1.15e18
MIN_NORM = 2.0 ** -40  # about 9.09e-13
REQUEST_PARTS = ("body", "query", "path", "header")


def invalid_input(errors: Sequence[dict[str, Any]]) -> InvalidInput:
    """The first of pydantic's errors as an InvalidInput whose field is the error's location."""
    err = errors[0]
    loc = [str(part) for part in err["loc"]]
    field = ".".join(loc[1:] if loc and loc[0] in REQUEST_PARTS else loc) or None
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    return InvalidInput(f"{field}: {msg}" if field else msg, field)


def check_json(value: Any, field: str) -> None:
    """JSON that every reader takes back as it was: finite numbers, integers within 64 bits, valid Unicode
    (so a stored payload or metadata can never make a later JSON response fail)."""
    try:
        json.dumps(value, allow_nan=False)
        if orjson is not None:
            orjson.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{field} must be JSON (finite numbers, 64-bit integers, valid Unicode): {exc}",
                           field) from None


def lone_surrogate(value: Any) -> str | None:
    """What is wrong if a string in `value` holds a lone UTF-16 surrogate (U+D800..U+DFFF), else None.

    Strings are searched, and so are the items of lists and tuples, the keys and values of dicts and the
    strings of numpy unicode arrays (an npz body's text fields). Such a code point comes in through a JSON
    escape ("\\ud800") or a UTF-32 array, but no UTF-8 text holds it: SQL, tokenizers and JSON responses
    fail on it. The answer reads "holds a lone UTF-16 surrogate (U+D800 at character 4 of [1]['k']), ..."."""
    found = _surrogate(value, "")
    if found is None:
        return None
    path, code_point, at = found
    return (f"holds a lone UTF-16 surrogate (U+{code_point:04X} at character {at}{' of ' + path if path else ''}), "
            "which is not valid Unicode: send UTF-8 text (a surrogate pair only as a whole pair)")


def _surrogate(value: Any, path: str) -> tuple[str, int, int] | None:
    """(path, code point, index) of the first lone surrogate in `value`, or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, ord(value[exc.start]), exc.start
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _surrogate(key, f"{path} key {key!r}".lstrip()) or _surrogate(item, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return _surrogate(value.item(), path) if value.ndim == 0 else _surrogate(value.ravel().tolist(), path)
    if isinstance(value, (list, tuple)):
        for n, item in enumerate(value):
            found = _surrogate(item, f"{path}[{n}]")
            if found is not None:
                return found
    return None


def check_unicode(value: Any, field: str) -> Any:
    """`value` unchanged if no string in it holds a lone UTF-16 surrogate (`lone_surrogate`), else
    InvalidInput naming the field. REST request bodies run it on every field (`memsvc.api.schemas.Body`);
    collections on the text and queries they are given in-process."""
    wrong = lone_surrogate(value)
    if wrong is not None:
        raise InvalidInput(f"{field} {wrong}", field)
    return value


def check_vectors(x: Any, dim: int, field: str) -> np.ndarray:
    """A non-empty [n, dim] finite float matrix as C-contiguous float32, or InvalidInput naming the field.

    Nested lists of whole numbers count as float, as they do in a REST JSON body (`[[0, 0, 1, 0]]`); an
    integer numpy array is refused (float32 is asked for explicitly, as in a binary body)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise InvalidInput(f"{field} must be floating point numbers, got dtype {a.dtype}", field)
    if a.dtype.kind != "f" and not isinstance(x, np.ndarray):
        a = a.astype(np.float64)  # exact for whole numbers up to 2^53; float32 below as for any float input
    if a.dtype.kind != "f":
        raise InvalidInput(f"{field} must be floating point (float32), got integers ({a.dtype})", field)
    if a.ndim != 2:
        raise InvalidInput(f"{field} must be a 2-D array [n, {dim}], got shape {list(a.shape)}", field)
    if a.shape[0] == 0:
        raise InvalidInput(f"{field} is an empty batch", field)
    if a.shape[1] != dim:
        raise InvalidInput(f"{field} has dimension {a.shape[1]}, this memory expects {dim}", field)
    with np.errstate(over="ignore"):  # numbers beyond float32 become inf, reported below
        f32 = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(f32).all():
        if np.isfinite(a).all():
            raise InvalidInput(f"{field} has numbers beyond float32's range (about ±3.4e38)", field)
        raise InvalidInput(f"{field} contains NaN or infinity", field)
    return f32


def check_keys(x: Any, spec: MemorySpec, field: str) -> np.ndarray:
    """Keys or queries of a memory: `check_vectors`, and each row's L2 norm is 0 or within
    [MIN_NORM, MAX_NORM], so every distance is finite and ordered on every backend; a zero row has no
    cosine similarity, so a cosine memory refuses it. Returns C-contiguous float32 [n, dim]."""
    a = check_vectors(x, spec.dim, field)
    norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))  # float32 squares overflow past 1.8e19
    zero = norms == 0
    tiny = (norms < MIN_NORM) & (~zero | (spec.metric == "cosine"))
    bad = np.flatnonzero((norms > MAX_NORM) | tiny)
    if len(bad):
        i, norm = int(bad[0]), float(norms[bad[0]])
        if norm == 0:
            why = "is all zeros, which has no cosine similarity to anything"
        elif norm > MAX_NORM:
            why = (f"has L2 norm {norm:.3g}, above the largest accepted {MAX_NORM:.3g} "
                   "(float32 distances would overflow)")
        else:
            why = (f"has L2 norm {norm:.3g}, below the smallest accepted nonzero norm {MIN_NORM:.3g} "
                   "(float32 distances would underflow): scale it up" + ("" if spec.metric == "cosine" else
                                                                          ", or send zeros"))
        raise InvalidInput(f"{field} row {i} {why}", field)
    return a


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= MAX_K:
        raise InvalidInput(f"k must be an integer in 1..{MAX_K}, got {k!r}", "k")
    return int(k)


def check_search_params(spec: MemorySpec, ef_search: Any = None, nprobe: Any = None) -> tuple[int | None, int | None]:
    """`(ef_search, nprobe)` as ints (None where not given), or InvalidInput naming the field: each an integer
    in 1..MAX_EF_SEARCH / 1..MAX_NPROBE, and only for the memory's own index kind (ef_search for hnsw,
    nprobe for ivfpq), so a parameter that would silently do nothing is refused."""
    checked = []
    for field, value, kind, bound in (("ef_search", ef_search, "hnsw", MAX_EF_SEARCH),
                                      ("nprobe", nprobe, "ivfpq", MAX_NPROBE)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value <= bound:
                raise InvalidInput(f"{field} must be an integer in 1..{bound}, got {value!r}", field)
            if spec.index != kind:
                raise InvalidInput(f"{field} applies only to {kind} memories; this memory's index is "
                                   f"'{spec.index}'", field)
            value = int(value)
        checked.append(value)
    return checked[0], checked[1]


def check_partition(partition: Any) -> str | None:
    if partition is None:
        return None
    if not isinstance(partition, str) or not 0 < len(partition) <= MAX_PARTITION_LEN \
            or not partition.isprintable():
        raise InvalidInput(f"partition must be a printable string of 1..{MAX_PARTITION_LEN} characters", "partition")
    return partition


def check_partitions(partitions: Any, n: int, partition: str | None = None,
                     per: str = "query") -> list[str | None] | None:
    """The per-row partitions of a batched search of `n` queries (or a batched add of `n` keys, `per`
    "key"): one name (or None: the whole memory; unpartitioned for an add) per row, as a list; None when
    not given. InvalidInput (field "partitions") when it is not a sequence of `n` such names, or when
    `partition` is given too."""
    if partitions is None:
        return None
    if partition is not None:
        raise InvalidInput("give partition or partitions, not both", "partitions")
    if isinstance(partitions, np.ndarray) and partitions.ndim == 1 and partitions.dtype.kind in "UO":
        partitions = partitions.tolist()
    if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Sequence) or len(partitions) != n:
        raise InvalidInput(f"partitions must be a list of one partition name (or null) per {per}, {n} in all",
                           "partitions")
    try:
        return [check_partition(name) for name in partitions]
    except InvalidInput as exc:
        raise InvalidInput(exc.message, "partitions") from None


def partition_groups(partitions: list[str | None]) -> list[tuple[str | None, np.ndarray]]:
    """The rows of each distinct partition of a batched search (or add), in order of first appearance:
    [(name, rows int64)]; a backend searches (adds to) each group once."""
    rows: dict[str | None, list[int]] = {}
    for i, name in enumerate(partitions):
        rows.setdefault(name, []).append(i)
    return [(name, np.asarray(r, dtype=np.int64)) for name, r in rows.items()]


def check_values(spec: MemorySpec, values: Any, n: int) -> np.ndarray | None:
    """Values for n entries as the memory stores them (int64 token ids or float32 vectors), or None."""
    kind = spec.value_kind
    if kind == "none":
        if values is not None:
            raise InvalidInput("this memory stores no values (value_kind 'none')", "values")
        return None
    if values is None:
        raise InvalidInput(f"values are required: this memory's value_kind is '{kind}'", "values")
    if kind == "vector":
        values = check_vectors(values, spec.value_dim, "values")
    else:
        values = np.asarray(values)
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise InvalidInput("values must be a 1-D list of integer token ids", "values")
        if values.dtype.kind == "u" and values.size and values.max() > np.iinfo(np.int64).max:
            raise InvalidInput("values must be token ids below 2^63", "values")
        values = values.astype(np.int64)
        if values.size and values.min() < 0:  # search answers -1 for a missing neighbour's value
            raise InvalidInput(f"values must be token ids >= 0 (-1 marks a missing neighbour), got "
                               f"{int(values.min())}", "values")
    if len(values) != n:
        raise InvalidInput(f"values has {len(values)} rows for {n} keys", "values")
    return values


def check_payloads(payloads: Any, n: int) -> list[Any] | None:
    """None, or a list of n JSON payloads."""
    if payloads is None:
        return None
    if not isinstance(payloads, list) or len(payloads) != n:
        raise InvalidInput(f"payloads must be a list of {n} items, one per key", "payloads")
    check_json(payloads, "payloads")
    return payloads


def check_ids(ids: Any) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InvalidInput("ids must be a 1-D list of integers", "ids")
    return a.astype(np.int64)


DEVICE_TYPES = ("cpu", "cuda", "mps")  # what a model runs on (torch.device takes more names)
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(0|[1-9][0-9]*))?")  # as torch.device spells them: no sign, no spaces


def parse_device(name: Any) -> tuple[str, int | None]:
    """(type, index) of a device name: "cpu", "cuda", "cuda:N" or "mps" (index None where not given), exactly
    as `torch.device` reads it; InvalidInput (field "device") for anything else. Torch-free: a model command's
    `--device` and the server's MEMSVC_DEVICE are checked before torch is imported; whether this machine has
    the device is `lm.devices.resolve_device`'s question."""
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InvalidInput(f"unknown device {str(name)!r}: give cpu, cuda, cuda:N or mps", "device")
    return match[1], None if match[2] is None else int(match[2])


def check_device(name: str | None) -> str | None:
    """`name` unless it names no device (InvalidInput, see `parse_device`); None (the default device) passes."""
    if name is not None:
        parse_device(name)
    return name
