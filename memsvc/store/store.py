"""`Store`: the memories of one data directory, opened lazily, snapshotted in the background."""
from __future__ import annotations

import fcntl
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TextIO

from memsvc.contract import AlreadyExists, DataDirInUse, MemorySpec, MemoryUnavailable, NotFound
from memsvc.store.memory import Memory

log = logging.getLogger(__name__)


def hold_data_dir(root: str | Path) -> TextIO:
    """The open `root/.lock`, holding an exclusive advisory lock on the data directory until it is closed (or
    the process ends); DataDirInUse when another process holds it. `root` must exist."""
    lockfile = open(Path(root) / ".lock", "w")  # noqa: SIM115 (the caller holds it open: that is the lock)
    try:
        fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lockfile.close()
        raise DataDirInUse(f"{root} is in use by another memsvc process (a server or an embedded command)",
                           "data_dir") from None
    return lockfile


class Store:
    """Named durable memories under `root/memories/<name>`; snapshots a memory once its log passes
    `snapshot_bytes` (checked every `interval` seconds) and on close. One process at a time holds a
    data directory (an advisory lock on `root/.lock`). A memory whose files cannot be opened (damaged or
    unreadable) is reported as `MemoryUnavailable` (503) until it is deleted or the process restarts; the
    other memories are served as usual."""

    def __init__(self, root: str | Path, snapshot_bytes: int = 256 << 20, interval: float = 5.0):
        self.root = Path(root) / "memories"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lockfile = hold_data_dir(root)
        self.snapshot_bytes = snapshot_bytes
        self._memories: dict[str, Memory] = {}
        self._unavailable: dict[str, str] = {}  # name -> why its files could not be opened
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._maintain, args=(interval,), daemon=True,
                                        name="memsvc-snapshots")
        self._thread.start()

    def loaded(self) -> list[Memory]:
        """The memories opened since start (a memory is opened on first use)."""
        with self._lock:
            return list(self._memories.values())

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "spec.json").exists())

    def create(self, spec: MemorySpec) -> Memory:
        with self._lock:
            path = self.root / spec.name
            if (path / "spec.json").exists():
                raise AlreadyExists(f"memory '{spec.name}' already exists", "name")
            shutil.rmtree(path, ignore_errors=True)  # what a create interrupted before spec.json left
            mem = self._memories[spec.name] = Memory.create(spec, self.root / spec.name)
            return mem

    def get(self, name: str) -> Memory:
        with self._lock:
            mem = self._memories.get(name)
            if mem is None:
                if not (self.root / name / "spec.json").exists():
                    raise NotFound(f"memory '{name}' not found", "name")
                if name not in self._unavailable:
                    try:
                        mem = self._memories[name] = Memory.open(self.root / name)
                    except Exception as exc:  # one damaged memory must not take the others down
                        log.exception("memory '%s' cannot be opened", name)
                        why = " ".join(str(exc).replace(f"{self.root / name}/", "").split())  # no server paths
                        self._unavailable[name] = f"{type(exc).__name__}: {why[:300]}"
                if mem is None:
                    raise MemoryUnavailable(
                        f"memory '{name}' is unavailable: its files could not be opened "
                        f"({self._unavailable[name]}). The other memories are not affected; restore its "
                        "files and restart the server, or delete the memory.", "name")
            return mem

    def drop(self, name: str) -> None:
        """Delete a memory and its files (renamed away first, so a crash never leaves half a memory)."""
        with self._lock:
            mem = self._memories.pop(name, None)
            self._unavailable.pop(name, None)
            path = self.root / name
            if mem is None and not path.exists():
                raise NotFound(f"memory '{name}' not found", "name")
            if mem is not None:
                mem.close(snapshot=False)
            trash = self.root.parent / f".trash-{uuid.uuid4().hex}"
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def quarantine(self, name: str) -> Path:
        """Move a memory's files aside to `root/../orphaned/` (kept, not deleted) and forget it."""
        with self._lock:
            self._memories.pop(name, None)
            self._unavailable.pop(name, None)
            target = self.root.parent / "orphaned" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            (self.root / name).rename(target)
            return target

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            for mem in self._memories.values():
                mem.close()
            self._memories.clear()
        self._lockfile.close()

    def _maintain(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for mem in list(self._memories.values()):
                if mem.log_bytes > self.snapshot_bytes:
                    try:
                        mem.snapshot()
                    except Exception:  # keep serving; the log still holds everything
                        log.exception("snapshot of %s failed", mem.spec.name)
