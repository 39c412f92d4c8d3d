"""Snapshots of a `Memory`, beside its write-ahead log (`memsvc.store.wal`): `snapshot()` writes the live
state to `snapshot.tmp-N`, fsyncs and renames it to `snapshot-N`, then drops older snapshots and the log
segments before N; opening a memory loads the newest snapshot and replays the segments from N on.

`Snapshots` is mixed into `Memory`, whose columns, shards and locks it reads and fills.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from memsvc.contract import CorruptSnapshot
from memsvc.store import index as fx
from memsvc.store.index import Shard
from memsvc.store.wal import fsync_dir, segment_numbers, segment_path


class Snapshots:
    """Writing and loading a memory's snapshots (see the module docstring)."""

    def snapshot(self) -> None:
        """Write the whole state to a new snapshot directory, then drop the log segments it covers."""
        if self.path is None or self._log is None:
            return
        start = time.perf_counter()
        with self._writer, self._rw.read():
            number = self._log.rotate()
            tmp = self.path / f"snapshot.tmp-{number}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                self._write_snapshot(tmp)
            except BaseException:  # e.g. a full disk: give the space back, the log still has everything
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            final = self.path / f"snapshot-{number:08d}"
            os.rename(tmp, final)
            fsync_dir(self.path)
        for old in self.path.glob("snapshot-*"):
            if old != final:
                shutil.rmtree(old)
        for n in segment_numbers(self.path):
            if n < number:
                segment_path(self.path, n).unlink()
        self.snapshot_seconds = time.perf_counter() - start

    def _write_snapshot(self, tmp: Path) -> None:
        live = self._alive.data
        np.save(tmp / "ids.npy", self._ids.data[live])
        np.save(tmp / "keys.npy", self._keys.data[live])
        np.save(tmp / "parts.npy", self._parts.data[live])
        if self._values is not None:
            np.save(tmp / "values.npy", self._values.data[live])
        payloads = [p for p, m in zip(self._payloads, live) if m]
        state = {"next_id": self._next_id, "names": self._names, "codes": {},
                 "payloads": payloads if any(p is not None for p in payloads) else None}
        if self._template is not None:
            fx.save_index(self._template, str(tmp / "template.faiss"))
        for shard in self._shards.values():
            state["codes"][shard.code] = shard.count
            if self.spec.index != "flat":
                fx.save_index(shard.index, str(tmp / f"index-{shard.code}.faiss"))
        state["crc32"] = {f.name: _crc32(f) for f in sorted(tmp.iterdir())}
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    def _load_snapshot(self) -> int:
        """Load the newest snapshot; returns the first log segment to replay after it."""
        snaps = sorted(self.path.glob("snapshot-*"))
        for tmp in self.path.glob("snapshot.tmp-*"):
            shutil.rmtree(tmp)
        if not snaps:
            return 1
        snap = snaps[-1]
        state = json.loads((snap / "state.json").read_text())
        for name, crc in state.get("crc32", {}).items():  # snapshots from before checksums have none
            # checked before numpy or faiss reads a byte: faiss may abort the process on a damaged index
            if not (snap / name).is_file() or _crc32(snap / name) != crc:
                raise CorruptSnapshot(f"{snap / name} is missing or damaged (checksum mismatch)")
        ids = np.load(snap / "ids.npy")
        self._ids.append(ids)
        self._keys.append(np.load(snap / "keys.npy"))
        self._parts.append(np.load(snap / "parts.npy"))
        self._alive.append(np.ones(len(ids), dtype=bool))
        if self._values is not None:
            self._values.append(np.load(snap / "values.npy"))
        self._any_payloads = state["payloads"] is not None
        self._payloads = state["payloads"] if self._any_payloads else [None] * len(ids)
        self._names = state["names"]
        self._next_id = state["next_id"]
        if (snap / "template.faiss").exists():
            self._template = fx.read_index(str(snap / "template.faiss"))
        for code, count in state["codes"].items():
            code = int(code)
            shard = Shard(code, None)
            path = snap / f"index-{code}.faiss"
            rows = np.flatnonzero(self._parts.data == code)
            shard.index = fx.load_index(str(path), self.spec, self._template is not None, count) \
                if path.exists() else None
            if shard.index is None:  # a flat index (never saved), or one laid out by an older version
                shard.index = self._build(rows)
            shard.count = count
            self._shards[self._names[code]] = shard
        return int(snap.name.split("-")[1])


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc
