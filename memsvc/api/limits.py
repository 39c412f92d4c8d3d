"""The server's limits from Settings: body size (413), rows per request (413) and k (422)."""
from __future__ import annotations

from typing import Any

import numpy as np
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memsvc.config import Settings
from memsvc.contract import InvalidInput, TooLarge


class BodyLimit:
    """413 for a request body over `limit` bytes: by its Content-Length up front, else counted as it
    streams in (raised as an HTTPException so that FastAPI's own body parsing passes it on)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = HTTPException(413, f"the request body is larger than this server's max_body_bytes={self.limit}")
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large
            return message

        await self.app(scope, limited, send)


def check_batch(x: Any, field: str, settings: Settings) -> None:
    """At most `max_batch` rows per request (what the rows hold is the memory's to check)."""
    n = len(x) if np.ndim(x) else 0
    if n > settings.max_batch:
        raise TooLarge(f"{field} has {n} rows; this server takes at most max_batch={settings.max_batch}", field)


def check_max_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise InvalidInput(f"k={k} is above this server's max_k={settings.max_k}", "k")
