"""Every error leaves as `{"error": {"code", "message", "field"?}}` (`schemas.ErrorBody`): ours, FastAPI's and
Starlette's. `error_responses(...)` documents a route's errors in the OpenAPI spec from the codes it can raise."""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from memsvc.api.deps import JSONResponse
from memsvc.api.schemas import ErrorBody
from memsvc.contract import MemsvcError, ModelLoading, Unauthorized, invalid_input

# The HTTP status of each error code: decided here, at the edge, not by the error classes.
STATUS_BY_CODE = {
    "bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404, "already_exists": 409,
    "data_dir_in_use": 409, "too_large": 413, "unsupported_media_type": 415, "invalid_input": 422,
    "corrupt_log": 500, "corrupt_snapshot": 500,
    "backend_unavailable": 503, "memory_unavailable": 503, "model_loading": 503, "insufficient_storage": 507,
}
CODE_BY_STATUS = {status: code for code, status in reversed(STATUS_BY_CODE.items())}  # 409: already_exists


# the codes routes share: every resource route checks the API key, most the `{name}` it touches
AUTH = ("unauthorized",)  # routes without a name (listings): a missing or wrong key
NAMED = ("unauthorized", "forbidden")  # a name outside the key's prefix, or a read-only key on a writing route
MEMORY = (*NAMED, "not_found", "memory_unavailable", "backend_unavailable")  # routes that open a memory
BODY = ("invalid_input", "too_large")  # routes with a request body (max_body_bytes, max_batch)
JSON_BODY = ("bad_request", *BODY)  # a body FastAPI parses: 400 when it is not JSON at all (or not UTF-8)
BINARY_BODY = (*BODY, "unsupported_media_type")  # a vector route's body (JSON, tensor frame or npz), parsed by us


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can fail with these error codes: each status they map to (as
    `STATUS_BY_CODE` sends it) with the `ErrorBody` schema and its codes in the description, plus `default`
    (the same body) for what any route may answer (500 internal_error). Declaring 422 or `default` also keeps
    FastAPI from documenting its own HTTPValidationError, which this server never sends."""
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(STATUS_BY_CODE[code], []).append(code)
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": f"{HTTPStatus(status).phrase}: {', '.join(names)}"}
        for status, names in sorted(by_status.items())}
    responses["default"] = {"model": ErrorBody, "description": "any other error (500 internal_error, "
                                                               "corrupt_log, corrupt_snapshot), with the same body"}
    return responses


def http_status(exc: MemsvcError) -> int:
    """The HTTP status an error answers with (400 for a code without its own)."""
    return STATUS_BY_CODE.get(exc.code, 400)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"code": code, "message": message, **({"field": field} if field is not None else {})}
    return JSONResponse({"error": body}, status, headers=headers)


async def memsvc_error(request: Request, exc: MemsvcError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None  # as RFC 6750 asks
    if isinstance(exc, ModelLoading):
        headers = {"Retry-After": str(exc.retry_after)}  # seconds (RFC 9110); the client waits and resends
    return error_response(http_status(exc), exc.code, exc.message, exc.field, headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = invalid_input(exc.errors())
    return error_response(http_status(err), err.code, err.message, err.field)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) and the body limit's 413."""
    status = exc.status_code
    code = CODE_BY_STATUS.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    if status == 413:
        return error_response(status, code, exc.detail, "body")
    return error_response(status, code, f"{exc.detail}: {request.method} {request.url.path}", headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the body says little; Starlette re-raises the exception afterwards for the server's log."""
    return error_response(500, "internal_error", f"internal server error ({type(exc).__name__})")


def install(app: FastAPI) -> None:
    app.add_exception_handler(MemsvcError, memsvc_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
