"""`GET /v1/health`: the server is up and its store and catalog are open."""
from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter

from memsvc.api.errors import error_responses
from memsvc.api.schemas import Health

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health", response_model=Health, responses=error_responses())
async def health() -> Health:
    return Health(status="ok", version=version("memsvc"))
