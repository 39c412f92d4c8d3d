"""`create_app(settings)`: the FastAPI app, whose lifespan opens and closes the `Service`.

Routers are one module per resource; others add theirs to `ROUTERS`. A resource router depends on
`auth.authorize` (and its writing routes on `auth.WRITE`) and names its resource's path parameter `name`.
Closing the service on shutdown (uvicorn runs it on SIGTERM once in-flight requests have finished)
snapshots every memory whose log holds anything, so the next start replays nothing.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from memsvc.api import collections, errors, health, memories, metrics
from memsvc.api.deps import JSONResponse
from memsvc.api.limits import BodyLimit
from memsvc.config import Settings
from memsvc.observability import Metrics, Observe
from memsvc.service import Service
from memsvc.store import Memory, Store

ROUTERS = (health.router, metrics.router, memories.router, collections.router)


def open_memories(app: FastAPI) -> list[Memory]:
    """What /metrics reports on: the FAISS memories opened since start (Milvus has its own metrics)."""
    store = app.state.service.store
    return store.loaded() if isinstance(store, Store) else []


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with Service(settings) as service:
            app.state.service = service
            yield

    # /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN, so they work offline;
    # no validator badge (Swagger UI would send the spec's URL to validator.swagger.io)
    app = FastAPIOffline(title="memsvc", summary="Retrieval-augmented long-context memory for transformer LMs",
                         lifespan=lifespan, default_response_class=JSONResponse,
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.settings = settings
    app.state.metrics = Metrics(lambda: open_memories(app))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Observe, metrics=app.state.metrics)  # added last: outermost, so it times everything
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
