"""The error family shared by every layer, so in-process and remote calls fail alike.

Each error has a stable machine-readable `code` (what travels in `{"error": {code, message, field}}`);
which HTTP status a code maps to is decided at the edge (`memsvc.api.errors`), never here.
"""
from __future__ import annotations


class MemsvcError(Exception):
    """Base error: `code` is a stable tag, `field` the input at fault (None when no single one is)."""

    code = "bad_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        """The error as the REST API sends it: {"error": {code, message, field?}}."""
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}


class InvalidInput(MemsvcError):
    code = "invalid_input"


class UnsupportedMediaType(InvalidInput):
    """A body in a format the server does not read (HTTP 415)."""

    code = "unsupported_media_type"


class NotFound(MemsvcError):
    code = "not_found"


class AlreadyExists(MemsvcError):
    code = "already_exists"


class TooLarge(MemsvcError):
    code = "too_large"


class Unauthorized(MemsvcError):
    code = "unauthorized"


class Forbidden(MemsvcError):
    code = "forbidden"


class StorageFull(MemsvcError):
    """The disk is full: the failed write was rolled back and nothing was acknowledged."""

    code = "insufficient_storage"


class BackendUnavailable(MemsvcError):
    """The vector backend (e.g. Milvus) failed or could not be reached; the failed call stored nothing."""

    code = "backend_unavailable"


class ServerUnavailable(MemsvcError):
    """The client could not reach the server (nothing listens at the URL, the connection broke, or no answer
    came within the timeout); `memsvc.client` raises it in place of httpx's transport errors."""

    code = "server_unavailable"


class ModelLoading(MemsvcError):
    """The server is still loading its language model (503 with a Retry-After header of `retry_after`
    seconds); nothing was done, so the client sends the call again."""

    code = "model_loading"

    def __init__(self, message: str, field: str | None = None, retry_after: int = 2):
        super().__init__(message, field)
        self.retry_after = retry_after


class MemoryUnavailable(MemsvcError):
    """One memory cannot be opened (its files are damaged or unreadable); the others are served as usual."""

    code = "memory_unavailable"


class CorruptSnapshot(MemsvcError):
    """A snapshot file does not hold what was written (its checksum in state.json differs, or it is gone)."""

    code = "corrupt_snapshot"


class CorruptLog(MemsvcError):
    """A memory's write-ahead log is damaged somewhere other than a torn tail (the newest record)."""

    code = "corrupt_log"


class DataDirInUse(MemsvcError):
    """The data directory is held: by another process (a running server, another CLI; `ours` False) or by this
    one (a Store or Service on it not yet closed; `ours` True). `holder` is the holder's pid where known."""

    code = "data_dir_in_use"

    def __init__(self, message: str, field: str | None = None, holder: int | None = None, ours: bool = False):
        super().__init__(message, field)
        self.holder, self.ours = holder, ours


ERRORS_BY_CODE = {cls.code: cls for cls in (InvalidInput, UnsupportedMediaType, NotFound, AlreadyExists, TooLarge, Unauthorized,
                                            Forbidden, StorageFull, BackendUnavailable, MemoryUnavailable,
                                            CorruptSnapshot, CorruptLog, ServerUnavailable, ModelLoading,
                                            DataDirInUse, MemsvcError)}


def error_from_dict(body: dict) -> MemsvcError:
    """Rebuild the typed error a server sent as {"error": {code, message, field?}} (used by the client)."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    cls = ERRORS_BY_CODE.get(err.get("code"), MemsvcError)
    return cls(err.get("message", "unknown error"), err.get("field"))
