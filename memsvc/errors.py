"""Errors shared by the store, the REST API and the client, so in-process and remote calls fail alike."""
from __future__ import annotations


class MemsvcError(Exception):
    """Base error: `code` is a stable machine-readable tag, `status` the HTTP status it maps to."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}


class InvalidInput(MemsvcError):
    status, code = 422, "invalid_input"


class NotFound(MemsvcError):
    status, code = 404, "not_found"


class AlreadyExists(MemsvcError):
    status, code = 409, "already_exists"


class TooLarge(MemsvcError):
    status, code = 413, "too_large"


class Unauthorized(MemsvcError):
    status, code = 401, "unauthorized"


class Forbidden(MemsvcError):
    status, code = 403, "forbidden"


class StorageFull(MemsvcError):
    status, code = 507, "insufficient_storage"


class BackendUnavailable(MemsvcError):
    """The vector backend (e.g. Milvus) failed or could not be reached; the failed call stored nothing."""

    status, code = 503, "backend_unavailable"


class MemoryUnavailable(MemsvcError):
    """One memory cannot be opened (its files are damaged or unreadable); the others are served as usual."""

    status, code = 503, "memory_unavailable"


ERRORS_BY_CODE = {cls.code: cls for cls in (InvalidInput, NotFound, AlreadyExists, TooLarge, Unauthorized,
                                            Forbidden, StorageFull, BackendUnavailable, MemoryUnavailable,
                                            MemsvcError)}


def error_from_dict(status: int, body: dict) -> MemsvcError:
    """Rebuild the typed error a server sent (used by the client)."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    cls = ERRORS_BY_CODE.get(err.get("code"), MemsvcError)
    exc = cls(err.get("message", f"HTTP {status}"), err.get("field"))
    exc.status = status
    return exc
