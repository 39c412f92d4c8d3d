"""The tensor frame (`application/x-memsvc-tensors`, memsvc.contract.wire): every dtype and shape edge comes
back bit for bit, arrays start 8-byte aligned, and every malformed frame is an InvalidInput naming the body
(the server answers it with 422; tests/test_api.py checks that over HTTP)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from memsvc.contract import InvalidInput, UnsupportedMediaType
from memsvc.contract.wire import JSON, NPZ, TENSORS, accepted, decode, decode_tensors, encode_tensors

I64 = np.iinfo(np.int64)


def frame(*arrays: tuple[str, bytes, tuple[int, ...], bytes], version: int = 1, pad: bool = True) -> bytes:
    """A frame written by hand from (name, dtype code, shape, raw data), as docs/API.md lays it out."""
    head = b"MSVT" + struct.pack("<HH", version, len(arrays))
    for name, code, shape, _ in arrays:
        head += struct.pack("<B", len(name)) + name.encode() + code + struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
    body = head + bytes(-len(head) % 8 if pad else 0)
    for *_, data in arrays:
        body += data + bytes(-len(data) % 8 if pad else 0)
    return body


def same(a, b) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit for bit: -0.0, inf, NaN payloads
    else:
        assert type(a) is type(b) and a == b


EDGES = {
    "float32 keys": {"keys": np.array([[1.5, -0.0, np.inf, -np.inf, np.float32(3.4e38), 1e-45]], np.float32)},
    "0 rows": {"queries": np.zeros((0, 576), np.float32), "ids": np.zeros(0, np.int64)},
    "k = 0 columns": {"ids": np.zeros((3, 0), np.int64), "distances": np.zeros((3, 0), np.float32)},
    "int64 ids at the extremes": {"ids": np.array([0, -1, I64.max, I64.min], np.int64)},
    "search answer": {"ids": np.arange(6, dtype=np.int64).reshape(2, 3),
                      "distances": np.array([[0, 0.5, np.inf]] * 2, np.float32),
                      "values": np.arange(6, dtype=np.int64).reshape(2, 3) - 1},
    "values vectors [m, k, value_dim]": {"values": np.random.default_rng(0).random((2, 5, 3), np.float32)},
    "odd sizes stay aligned": {"a": np.ones(3, bool), "b": np.ones((1, 3), np.float32), "c": np.ones(1, np.int64)},
    "found bool": {"found": np.array([True, False, True])},
    "scalars and text": {"k": 32, "deleted": 0, "partition": "session-7/layer-20 ✓", "empty": ""},
    "JSON fields": {"payloads": [[{"a": [1, 2.5, None]}, "é"], [None, True]], "partitions": [None, "p"]},
}


@pytest.mark.parametrize("case", list(EDGES))
def test_round_trip(case):
    fields = EDGES[case]
    body = encode_tensors(fields)
    assert len(body) % 8 == 0
    got = decode(body, f"{TENSORS}; charset=binary")
    assert list(got) == list(fields)
    for name, value in fields.items():
        same(value, got[name])
        if isinstance(value, np.ndarray):
            assert got[name].flags.writeable and got[name].flags.c_contiguous
            assert got[name].ctypes.data % 8 == 0


def test_integers_travel_as_int64_and_none_is_left_out():
    got = decode_tensors(encode_tensors({"ids": np.array([1, 2], np.int32), "values": None, "k": np.int16(5)}))
    assert got["ids"].dtype == np.int64 and got["ids"].tolist() == [1, 2] and got == {"ids": got["ids"], "k": 5}


def test_the_layout_is_the_documented_one():
    """docs/API.md: magic, version, count; per array name, dtype code, ndim, shape; zero padding to 8."""
    body = encode_tensors({"k": 7, "queries": np.array([[1.0, 2.0]], np.float32)})
    assert body == frame(("k", b"q", (), struct.pack("<q", 7)),
                         ("queries", b"f", (1, 2), struct.pack("<2f", 1.0, 2.0)))


def test_what_the_frame_cannot_carry_is_refused_by_name():
    with pytest.raises(InvalidInput) as err:
        encode_tensors({"keys": np.ones((1, 2), np.float64)})
    assert err.value.field == "keys" and "float64" in err.value.message
    with pytest.raises(InvalidInput) as err:
        encode_tensors({"payloads": [{1, 2}]})
    assert err.value.field == "payloads"


GOOD = ("k", b"q", (), struct.pack("<q", 3))
MALFORMED = {
    "empty": (b"", "is empty"),
    "wrong magic": (b"MSVX" + frame(GOOD)[4:], "does not start"),
    "npz sent as tensors": (b"PK\x03\x04" + bytes(60), "does not start"),
    "unknown version": (frame(GOOD, version=2), "version 2"),
    "header cut short": (frame(("queries", b"f", (1, 4), bytes(16)))[:20], "cut short"),
    "data cut short": (frame(("queries", b"f", (1, 4), bytes(16)))[:-4], "bytes where its header describes"),
    "trailing bytes": (frame(GOOD) + bytes(8), "bytes where its header describes"),
    "no padding": (frame(("a", b"q", (1,), bytes(8)), ("b", b"?", (1,), b"\x01"), pad=False),
                   "bytes where its header describes"),
    "shape larger than the body": (frame(("queries", b"f", (1 << 40, 1 << 30), b"")), "bytes where"),
    "unknown dtype code": (frame(("queries", b"d", (1, 1), bytes(8))), "unknown dtype code"),
    "bad array name": (frame(("a-b", b"q", (), bytes(8))), "array name"),
    "repeated name": (frame(GOOD, GOOD), "repeats"),
    "too many dimensions": (frame(("x", b"q", (1,) * 9, bytes(8))), "dimensions"),
    "2-D text": (frame(("partition", b"s", (1, 1), b"a")), "dimensions"),
    "bool byte 2": (frame(("found", b"?", (2,), b"\x01\x02")), "0 and 1"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frames_are_invalid_input_naming_the_body(case):
    body, words = MALFORMED[case]
    with pytest.raises(InvalidInput) as err:
        decode(body, TENSORS)
    assert err.value.field == "body" and words in err.value.message, err.value.message


@pytest.mark.parametrize(("fields", "field", "words"), [
    ([("queries", b"q", (1, 2), bytes(16))], "queries", "must be float32"),
    ([("partition", b"s", (2,), b"\xff\xfe")], "partition", "UTF-8"),
    ([("payloads", b"s", (5,), b"{nope")], "payloads", "JSON"),
])
def test_well_formed_frames_with_bad_fields_name_the_field(fields, field, words):
    with pytest.raises(InvalidInput) as err:
        decode(frame(*fields), TENSORS)
    assert err.value.field == field and words in err.value.message


def test_content_negotiation():
    with pytest.raises(UnsupportedMediaType) as err:
        decode(b"keys=1", "text/plain")
    assert err.value.code == "unsupported_media_type" and TENSORS in err.value.message
    assert decode(b'{"k": 1}', None) == {"k": 1} == decode(b'{"k": 1}', "application/json; charset=utf-8")
    assert accepted(None) == accepted("*/*") == accepted("application/json") == JSON
    assert accepted(f"{NPZ}, {TENSORS}") == TENSORS and accepted(NPZ) == NPZ
