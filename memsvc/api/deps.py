"""What the routes share: the service and settings, request bodies in (JSON or npz), responses out."""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse as StarletteJSONResponse

from memsvc.config import Settings
from memsvc.contract import invalid_input, wire
from memsvc.service import Service

M = TypeVar("M", bound=BaseModel)


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def raw_body(request: Request) -> bytes:
    return await request.body()  # limits.BodyLimit stops it at max_body_bytes


def body_of(model: type[M]) -> Callable[..., M]:
    """A dependency giving the request body, JSON or npz, as `model` (decoded in the threadpool)."""

    def parse(request: Request, body: Annotated[bytes, Depends(raw_body)]) -> M:
        fields = wire.decode(body, request.headers.get("content-type"))
        try:
            return model.model_validate(fields)
        except ValidationError as exc:
            raise invalid_input(exc.errors()) from None

    return parse


class JSONResponse(StarletteJSONResponse):
    """orjson: fast, numpy arrays natively, +inf distances as null. A Starlette JSONResponse, so that FastAPI
    documents each route's response model as its JSON schema."""

    media_type = wire.JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def respond(request: Request, fields: dict[str, Any], status_code: int = 200) -> Response:
    """npz when the client accepts it, JSON otherwise; None fields are left out."""
    if wire.NPZ in request.headers.get("accept", ""):
        return Response(wire.encode_npz(fields), status_code, media_type=wire.NPZ)
    return JSONResponse({k: v for k, v in fields.items() if v is not None}, status_code)


def binary_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a route whose body is `model` as JSON or npz (which body_of parses itself)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        wire.JSON: {"schema": schema},
        wire.NPZ: {"schema": {"type": "string", "format": "binary",
                              "description": f"np.savez archive with the fields of {model.__name__}"}}}}}


def binary_response(status: int = 200) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a route that answers `status` with its response model as JSON, or as npz (`respond`)."""
    return {status: {"content": {wire.NPZ: {"schema": {"type": "string", "format": "binary"}}},
                     "description": "JSON, or an npz archive of the same fields with Accept: application/x-npz"}}
