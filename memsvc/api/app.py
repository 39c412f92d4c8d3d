"""`create_app(settings)`: the FastAPI app, whose lifespan opens and closes the `Service`.

Routers are one module per resource; others add theirs to `ROUTERS`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from memsvc.api import errors, health, memories
from memsvc.api.deps import JSONResponse
from memsvc.api.limits import BodyLimit
from memsvc.config import Settings
from memsvc.service import Service

ROUTERS = (health.router, memories.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with Service(settings) as service:
            app.state.service = service
            yield

    app = FastAPI(title="memsvc", summary="Retrieval-augmented long-context memory for transformer LMs",
                  lifespan=lifespan, default_response_class=JSONResponse)
    app.state.settings = settings
    app.state.api_keys = [k.strip() for k in (settings.api_keys or "").split(",") if k.strip()]
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
