"""Append-only, checksummed, fsync'ed segment files: the write-ahead log of one memory.

A record is `magic | body length | crc32(body) | body`, where the body is a JSON header followed by
the raw bytes of the arrays it names. An append returns only after the record is on disk. On
replay, a torn record at the tail of the newest segment (a crash mid-write, never acknowledged) is
cut off; damage anywhere else is reported, not skipped.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memsvc.contract import CorruptLog, StorageFull

log = logging.getLogger(__name__)

MAGIC = b"MSW1"
HEADER = struct.Struct("<4sII")
META_LEN = struct.Struct("<I")


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"wal-{number:08d}.log"


def segment_numbers(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("wal-*.log"))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One record, ready to append."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    meta = {**meta, "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}
    head = json.dumps(meta, separators=(",", ":")).encode()
    body = b"".join([META_LEN.pack(len(head)), head, *(a.tobytes() for a in arrays.values())])
    return HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def decode(body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    (head_len,) = META_LEN.unpack_from(body)
    meta = json.loads(body[META_LEN.size:META_LEN.size + head_len])
    offset, arrays = META_LEN.size + head_len, {}
    for name, dtype, shape in meta.pop("arrays"):
        a = np.frombuffer(body, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        arrays[name] = a.reshape(shape)
        offset += a.nbytes
    return meta, arrays


class SegmentLog:
    """The writer: appends to the current segment and rotates to a new one at snapshot time."""

    def __init__(self, directory: Path, number: int):
        self.directory = directory
        self.number = number
        self._file = open(segment_path(directory, number), "ab", buffering=0)  # noqa: SIM115 - held open, closed by rotate/close
        fsync_dir(directory)

    @property
    def size(self) -> int:
        return self._file.tell()

    def append(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Write one record and fsync; on failure (disk full) cut the partial record off and raise."""
        record = encode(meta, arrays)
        start = self._file.tell()
        try:
            view = memoryview(record)
            while view:  # a raw write may be short (e.g. the disk fills mid-record): finish or fail
                view = view[self._file.write(view):]
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._file.truncate(start)
            self._file.seek(start)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("no space left on the data volume; nothing was stored") from exc
            raise

    def rotate(self) -> int:
        """Close this segment and start the next; returns the new segment's number."""
        self._file.close()
        self.number += 1
        self._file = open(segment_path(self.directory, self.number), "ab", buffering=0)  # noqa: SIM115 - as in __init__
        fsync_dir(self.directory)
        return self.number

    def close(self) -> None:
        self._file.close()


def replay(directory: Path, first: int) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """Yield the records of segments >= first in order, cutting a torn tail off the newest segment."""
    numbers = [n for n in segment_numbers(directory) if n >= first]
    for number in numbers:
        path = segment_path(directory, number)
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            bad = len(data) - offset < HEADER.size
            if not bad:
                magic, length, crc = HEADER.unpack_from(data, offset)
                body = data[offset + HEADER.size: offset + HEADER.size + length]
                bad = magic != MAGIC or len(body) != length or zlib.crc32(body) != crc
            if bad:
                if number != numbers[-1]:
                    raise CorruptLog(f"{path} is damaged at byte {offset}")
                log.warning("cutting a torn record off %s at byte %d", path, offset)
                with open(path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                break
            yield decode(body)
            offset += HEADER.size + length
