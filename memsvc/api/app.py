"""`create_app(settings)`: the FastAPI app, whose lifespan opens and closes the `Service` (its memories and
collections).

Routers are one module per resource; others add theirs to `ROUTERS`. A resource router depends on
`auth.authorize` (and its writing routes on `auth.WRITE`) and names its resource's path parameter `name`.
The language model of ask loads at start in a background thread (`Settings.preload_model`); until it is
ready, ask answers 503 `model_loading` with Retry-After. Closing the service on shutdown (uvicorn runs it on SIGTERM once in-flight requests have finished)
snapshots every memory whose log holds anything, so the next start replays nothing.

`app.state.service` is the running service, absent while the lifespan is not running. A lifespan that starts
again after a shutdown (each `with TestClient(app)`; schemathesis ends an in-process app's lifespan after
every test) opens a new `Service` on the same data directory, but the model of ask belongs to the app: loaded
(or loading) once, it stays so, and ask answers at once rather than 503 while it loads again.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from memsvc.api import collections, errors, health, memories, metrics
from memsvc.api.deps import JSONResponse
from memsvc.api.limits import BodyLimit
from memsvc.collections import LanguageModel, Lazy
from memsvc.config import Settings
from memsvc.observability import Metrics, Observe
from memsvc.service import Service, load_language_model
from memsvc.store import Memory

if TYPE_CHECKING:
    from retrievers.dense import Encoder

ROUTERS = (health.router, metrics.router, memories.router, collections.router)


def open_memories(app: FastAPI) -> list[Memory]:
    """What /metrics reports on: the FAISS memories opened since start (none with Milvus)."""
    return app.state.service.store.loaded()


def create_app(settings: Settings | None = None, *, encoder: Callable[[], Encoder] | None = None,
               language_model: Callable[[], LanguageModel] | None = None) -> FastAPI:
    """The app on `settings`; `encoder` and `language_model` replace the service's embedder and the model
    of `ask` (see `Service`). The model of ask is made at most once per app, whichever lifespan makes it."""
    settings = settings or Settings()
    model = Lazy(language_model or (lambda: load_language_model(settings)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with Service(settings, encoder=encoder, language_model=model) as service:
            app.state.service = service
            try:
                if settings.preload_model:  # in the background: the server answers at once, ask says "loading"
                    model.start()  # nothing to do when a previous lifespan made it
                    service.collections.preload_encoder()  # collections' requests wait for it (a first int8 build)
                yield
            finally:
                del app.state.service  # closed below: nobody reaches it through a stopped app

    # /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN, so they work offline;
    # no validator badge (Swagger UI would send the spec's URL to validator.swagger.io)
    app = FastAPIOffline(title="memsvc", summary="Retrieval-augmented long-context memory for transformer LMs",
                         lifespan=lifespan, default_response_class=JSONResponse,
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.settings = settings
    app.state.metrics = Metrics(lambda: open_memories(app))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Observe, metrics=app.state.metrics,  # added last: outermost, so it times everything
                       access_log=settings.access_log)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
