"""Every error leaves as `{"error": {"code", "message", "field"?}}`: ours, FastAPI's and Starlette's."""
from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from memsvc.api.deps import JSONResponse
from memsvc.contract import MemsvcError, ModelLoading, Unauthorized, invalid_input

# The HTTP status of each error code: decided here, at the edge, not by the error classes.
STATUS_BY_CODE = {
    "bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404, "already_exists": 409,
    "data_dir_in_use": 409, "too_large": 413, "invalid_input": 422, "corrupt_log": 500, "corrupt_snapshot": 500,
    "backend_unavailable": 503, "memory_unavailable": 503, "model_loading": 503, "insufficient_storage": 507,
}
CODE_BY_STATUS = {status: code for code, status in reversed(STATUS_BY_CODE.items())}  # 409: already_exists


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
