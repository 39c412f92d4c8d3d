"""`connect(url, data_dir)`: the one place that picks a face of the `memsvc.contract.Client` interface.

With a url it is a `memsvc.client.MemoryClient` of that server (light: the floor and httpx), otherwise the
embedded `memsvc.service.Service` on `data_dir` (FAISS, SQL). Commands are written once against `Client`.
"""
from __future__ import annotations

from pathlib import Path

from memsvc.contract import Client


def connect(url: str | None, data_dir: Path, api_key: str | None = None, timeout: float = 60.0,
            device: str | None = None) -> Client:
    """A client of the server at `url` (waiting up to `timeout` seconds per request), or, without a url,
    the embedded service on `data_dir` (DataDirInUse when a server or another command holds it), whose
    `ask` runs the language model on `device` (default: the settings', MEMSVC_DEVICE)."""
    if url:
        from memsvc.client import MemoryClient

        return MemoryClient(url, api_key=api_key, timeout=timeout)
    from memsvc.config import Settings
    from memsvc.service import Service

    return Service(Settings(data_dir=data_dir, **({"device": device} if device is not None else {})))
