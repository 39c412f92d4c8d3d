"""`Store`: the memories of one data directory, opened lazily, snapshotted in the background."""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TextIO

from memsvc.contract import AlreadyExists, DataDirInUse, MemorySpec, MemoryUnavailable, NotFound
from memsvc.store.memory import Memory

log = logging.getLogger(__name__)


_held: dict[Path, TextIO] = {}  # lock files this process took, by data directory (closed ones are stale)


def hold_data_dir(root: str | Path) -> TextIO:
    """The open `root/.lock`, holding an exclusive advisory lock on the data directory until it is closed (or
    the process ends), with the holder's pid written in it; DataDirInUse when it is held already, saying by
    whom: this process (another Store or Service on the same directory, not yet closed) or another one (its
    pid where the lock file gives it). `root` must exist."""
    path = Path(root) / ".lock"
    # Opened without truncating: the pid the holder wrote stays readable to whoever is refused.
    lockfile = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ours = path.resolve() in _held and not _held[path.resolve()].closed
        holder = os.getpid() if ours else lock_holder(lockfile)
        lockfile.close()
        raise DataDirInUse(in_use_message(root, holder, ours), "data_dir", holder, ours) from None
    lockfile.seek(0)
    lockfile.truncate()
    lockfile.write(f"{os.getpid()}\n")
    lockfile.flush()
    _held[path.resolve()] = lockfile
    return lockfile


def lock_holder(lockfile: TextIO) -> int | None:
    """The pid another process holding a data directory wrote into its lock file; None if the file names none
    (a holder that wrote no pid, or not yet) or names this process (what a lock this process gave up left)."""
    lockfile.seek(0)
    text = lockfile.read(32).strip()
    pid = int(text) if text.isascii() and text.isdigit() else None
    return None if pid == os.getpid() else pid


def in_use_message(root: str | Path, holder: int | None, ours: bool) -> str:
    """Why `root` cannot be opened, true to who holds it: this process (`ours`), another one (pid `holder`),
    or one the lock file does not name (`holder` None)."""
    if ours:
        return (f"{root} is already open in this process (pid {holder}): close the Store or Service that holds "
                "it before opening it again")
    if holder is not None:
        return f"{root} is in use by another memsvc process (pid {holder}: a server or an embedded command)"
    return f"{root} is in use by another memsvc process (a server or an embedded command)"


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
