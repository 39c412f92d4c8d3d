"""`GET /metrics`: Prometheus text format. With API keys configured it needs an unscoped key (prefix ""),
read-only is enough: the memory gauges name every tenant's memories."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from memsvc.api.auth import Caller
from memsvc.api.errors import error_responses
from memsvc.contract import Forbidden

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"},
                       **error_responses("unauthorized", "forbidden")})
def metrics(request: Request, key: Caller) -> Response:
    if key.prefix:
        raise Forbidden("metrics name every memory: they need an API key without a name prefix", "authorization")
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
