"""What the server tells its operators: JSON log lines carrying a request id, and Prometheus metrics.

- `configure_logging(level)`: one JSON object per line on stderr for every logger (uvicorn's included).
  `memsvc serve` calls it and starts uvicorn with `log_config=None`, so uvicorn leaves it alone.
- `Observe`: ASGI middleware giving each request an id (the caller's `X-Request-ID` when it is a sane
  token, else a new one; sent back in the response header and set in `REQUEST_ID` for every log line of
  the request), one access log line (unless `Settings.access_log` is off), and its latency in the
  histogram under the route *template*.
- `Metrics`: the app's own registry; memory gauges are read from the store at scrape time, not counted
  per request, so they cannot drift from the truth.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import IO, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memsvc.store import Memory

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # anything else (log injection, huge) is replaced
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

access_log = logging.getLogger("memsvc.access")


# --- logs ------------------------------------------------------------------------------------------

class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing `{"level", "logger", "message", "request_id", <extra fields>..., "time"}` lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("{levelname}{name}{message}", style="{", timestamp="time",
                                       rename_fields={"levelname": "level", "name": "logger"},
                                       reserved_attrs=[*RESERVED_ATTRS, "color_message"]))  # uvicorn's ANSI copy
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(level: str = "INFO") -> None:
    """Route every logger to one JSON handler on stderr; uvicorn's access lines give way to memsvc.access."""
    root = logging.getLogger()
    root.handlers[:] = [json_handler()]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


# --- metrics ---------------------------------------------------------------------------------------

class MemoryCollector:
    """Gauges of the memories opened since start, read from them at every scrape."""

    def __init__(self, memories: Callable[[], Iterable[Memory]]):
        self.memories = memories

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "count": GaugeMetricFamily("memsvc_memory_entries", "entries in the memory", labels=["memory"]),
            "log_bytes": GaugeMetricFamily("memsvc_memory_log_bytes", "write-ahead log bytes since the last "
                                           "snapshot (replayed on restart)", labels=["memory"]),
            "train_seconds": GaugeMetricFamily("memsvc_memory_train_seconds", "how long training the memory's "
                                               "ivfpq index took", labels=["memory"]),
            "snapshot_seconds": GaugeMetricFamily("memsvc_memory_snapshot_seconds", "how long the memory's last "
                                                  "snapshot took", labels=["memory"]),
        }
        for mem in self.memories():
            stats = mem.stats()
            for field, gauge in gauges.items():
                if getattr(stats, field) is not None:
                    gauge.add_metric([mem.spec.name], getattr(stats, field))
        yield from gauges.values()


class Metrics:
    """One app's Prometheus registry: request latencies (whose `_count` is the request count) and memories."""

    def __init__(self, memories: Callable[[], Iterable[Memory]]):
        self.registry = CollectorRegistry()
        self.requests = Histogram("memsvc_http_request_duration_seconds", "time to answer a request",
                                  ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(MemoryCollector(memories))
        self._children: dict[tuple[str, str, int], Any] = {}  # bounded: routes are templates, not paths

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request's latency; the labelled child is looked up once per (method, route, status)
        (`labels()` validates and locks on every call)."""
        key = (method, route, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(method, route, str(status))
        child.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- per request -----------------------------------------------------------------------------------

class Observe:
    """ASGI middleware: request id in and out, an access log line (if `access_log`), and the latency by
    route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True):
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        asked = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = asked if SANE_REQUEST_ID.fullmatch(asked) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        status = 500  # what the client gets if the app raises
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router once it matched
            self.metrics.observe(scope["method"], route, status, seconds)
            if self.access_log:
                access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={
                    "method": scope["method"], "path": scope["path"], "route": route, "status": status,
                    "ms": round(seconds * 1000, 3)})
            REQUEST_ID.reset(token)
