"""Who may call what: bearer keys from `Settings.api_keys`, each confined to a name prefix, some read-only.

Every resource router depends on `authorize`: 401 without a configured key, 403 when the route's `{name}`
path parameter lies outside the key's prefix. Routes that change anything add `WRITE` (403 for a read-only
key). A name that arrives in a body is checked with `check_name`, and listings keep only `key.allows(name)`.
An out-of-prefix name is refused by its spelling alone, whether or not it exists, so nothing leaks.
"""
from __future__ import annotations

from secrets import compare_digest
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from memsvc.config import ApiKey
from memsvc.contract import Forbidden, Unauthorized

ANYONE = ApiKey(secret="", prefix="", read_only=False)  # the caller of a server without keys
bearer = HTTPBearer(auto_error=False, description="one of MEMSVC_API_KEYS, when the server has keys")


def check_name(key: ApiKey, name: str, field: str = "name") -> None:
    if not key.allows(name):
        raise Forbidden(f"this API key may only use names starting with '{key.prefix}'", field)


async def authorize(request: Request,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
    """The caller's key (compared in constant time against every configured key), within its prefix.
    `async`: it does no blocking work, so it runs on the event loop, not in a threadpool hop."""
    keys: list[ApiKey] = request.app.state.settings.api_keys
    if not keys:
        return ANYONE
    sent = (credentials.credentials if credentials else "").encode()
    matched = None
    for key in keys:  # all of them, so the time taken does not tell which one matched
        if compare_digest(sent, key.secret.get_secret_value().encode()):
            matched = key
    if matched is None:
        raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)", "authorization")
    if (name := request.path_params.get("name")) is not None:
        check_name(matched, name)
    return matched


Caller = Annotated[ApiKey, Depends(authorize)]


async def writable(key: Caller) -> ApiKey:
    if key.read_only:
        raise Forbidden("this API key is read-only", "authorization")
    return key


WRITE = Depends(writable)
