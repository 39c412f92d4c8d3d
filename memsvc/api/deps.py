"""What the routes share: the service and settings, request bodies in (JSON, tensor frame or npz),
responses out.

The hot path (issue 18): dependencies that do no blocking work are `async`, so FastAPI runs them on the
event loop instead of sending each one to the threadpool, and a vector route makes one hop to a worker
thread (`vector_call`) that decodes the body, runs the memory call and encodes the answer. Vector routes
take the service and settings from `app_state(request)` rather than as dependencies: FastAPI solves each
dependency on every request, and those two cost a measurable share of a batch-1 search (bench/RESULTS.md).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse as StarletteJSONResponse

from memsvc.config import Settings
from memsvc.contract import invalid_input, wire
from memsvc.service import Service

M = TypeVar("M", bound=BaseModel)


def app_state(request: Request) -> tuple[Service, Settings]:
    """The app's service and settings (set by `memsvc.api.app.create_app`)."""
    state = request.app.state
    return state.service, state.settings


async def get_service(request: Request) -> Service:
    return app_state(request)[0]


async def get_settings(request: Request) -> Settings:
    return app_state(request)[1]


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def parse(model: type[M], body: bytes, content_type: str | None) -> M:
    """A JSON, tensor-frame or npz body as `model`; InvalidInput (422) naming the field, 415 for another
    Content-Type."""
    fields = wire.decode(body, content_type)
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


async def vector_call(request: Request, model: type[M],
                      work: Callable[[M, Service, Settings], dict[str, Any]], status_code: int = 200) -> Response:
    """Read the body on the event loop, then one hop to a worker thread that parses it as `model`, runs
    `work(body, service, settings)` (the blocking memory call, returning the answer's fields) and encodes
    the answer as the client accepts it (`respond`)."""
    body = await request.body()  # limits.BodyLimit stops it at max_body_bytes
    content_type, accept = request.headers.get("content-type"), request.headers.get("accept")
    service, settings = app_state(request)

    def run() -> Response:
        return respond(accept, work(parse(model, body, content_type), service, settings), status_code)

    return await run_in_threadpool(run)


class JSONResponse(StarletteJSONResponse):
    """orjson: fast, numpy arrays natively, +inf distances as null. A Starlette JSONResponse, so that FastAPI
    documents each route's response model as its JSON schema."""

    media_type = wire.JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def respond(accept: str | None, fields: dict[str, Any], status_code: int = 200) -> Response:
    """The answer's fields as the client's Accept header asks (`wire.accepted`): tensor frame, npz, or
    JSON; None fields are left out."""
    kind = wire.accepted(accept)
    if kind == wire.TENSORS:
        return Response(wire.encode_tensors(fields), status_code, media_type=kind)
    if kind == wire.NPZ:
        return Response(wire.encode_npz(fields), status_code, media_type=kind)
    return JSONResponse({k: v for k, v in fields.items() if v is not None}, status_code)


def binary_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a route whose body is `model` as JSON, tensor frame or npz (which the route parses
    itself)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        wire.JSON: {"schema": schema},
        wire.TENSORS: {"schema": {"type": "string", "format": "binary",
                                  "description": f"tensor frame (docs/API.md) with the fields of {model.__name__}"}},
        wire.NPZ: {"schema": {"type": "string", "format": "binary",
                              "description": f"np.savez archive with the fields of {model.__name__}"}}}}}


def binary_response(status: int = 200) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a route that answers `status` with its response model as JSON, or as a tensor frame or
    npz (`respond`)."""
    return {status: {"content": {wire.TENSORS: {"schema": {"type": "string", "format": "binary"}},
                                 wire.NPZ: {"schema": {"type": "string", "format": "binary"}}},
                     "description": "JSON, or the same fields as a tensor frame (Accept: "
                                    "application/x-memsvc-tensors) or an npz archive (Accept: application/x-npz)"}}
