"""Request ids, JSON access logs and Prometheus metrics in-process; a SIGTERM during a stream of adds
against a real server loses no acknowledged entry and leaves a snapshot, not a log, to restart from."""
from __future__ import annotations

import io
import json
import logging
import threading
import time

import numpy as np
import pytest
from conftest import ServerProcess
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from memsvc.api.app import create_app
from memsvc.client import MemoryClient
from memsvc.config import Settings
from memsvc.contract import MemsvcError, ServerUnavailable
from memsvc.observability import json_handler

DIM = 8


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path / "data"))) as c:
        yield c


@pytest.fixture
def access_lines():
    """The JSON lines memsvc.access writes while the test runs."""
    stream, logger = io.StringIO(), logging.getLogger("memsvc.access")
    handler = json_handler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)


def samples(client) -> dict[tuple[str, frozenset], float]:
    """The /metrics scrape as {(sample name, labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def requests_of(scrape: dict, method: str, route: str, status: int) -> float:
    labels = frozenset({"method": method, "route": route, "status": str(status)}.items())
    return scrape.get(("memsvc_http_request_duration_seconds_count", labels), 0.0)


def test_request_ids_are_kept_or_made(client):
    assert client.get("/v1/health", headers={"X-Request-ID": "trace-42.a:b"}).headers["X-Request-ID"] == "trace-42.a:b"
    made = {client.get("/v1/health").headers["X-Request-ID"] for _ in range(3)}
    assert len(made) == 3 and all(len(rid) == 32 for rid in made)
    for insane in ("two words", "x" * 129, "new\nline"):
        rid = client.get("/v1/health", headers={"X-Request-ID": insane}).headers["X-Request-ID"]
        assert rid != insane and len(rid) == 32
    assert client.get("/v1/nowhere", headers={"X-Request-ID": "r-404"}).headers["X-Request-ID"] == "r-404"


def test_access_log_is_json_with_request_id_and_route(client, access_lines):
    client.post("/v1/memories", json={"name": "logged", "dim": DIM}, headers={"X-Request-ID": "create-1"})
    client.post("/v1/memories/logged/search", json={"queries": [[0.0] * DIM], "k": 1}, headers={"X-Request-ID": "s-2"})
    response = client.get("/v1/memories/missing")
    create, search, missing = access_lines()
    assert create["request_id"] == "create-1" and create["status"] == 201 and create["route"] == "/v1/memories"
    assert search["request_id"] == "s-2" and search["route"] == "/v1/memories/{name}/search"
    assert search["method"] == "POST" and search["path"] == "/v1/memories/logged/search" and search["ms"] > 0
    assert missing["status"] == 404 and missing["request_id"] == response.headers["X-Request-ID"]
    assert {"time", "level", "logger", "message"} <= set(search) and search["logger"] == "memsvc.access"



def test_access_log_off_writes_no_lines_but_still_counts_and_tags_requests(tmp_path, access_lines):
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", access_log=False))) as quiet:
        assert quiet.post("/v1/memories", json={"name": "q", "dim": DIM}).status_code == 201
        search = quiet.post("/v1/memories/q/search", json={"queries": [[0.0] * DIM], "k": 1},
                            headers={"X-Request-ID": "quiet-1"})
        assert search.status_code == 200 and search.headers["X-Request-ID"] == "quiet-1"
        assert access_lines() == []
        assert requests_of(samples(quiet), "POST", "/v1/memories/{name}/search", 200) == 1

def test_metrics_count_requests_per_route_template_and_read_memories_at_scrape(client):
    assert client.post("/v1/memories", json={"name": "m", "dim": DIM}).status_code == 201
    keys = np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32)
    client.post("/v1/memories/m/entries", json={"keys": keys.tolist()})
    for _ in range(3):
        client.post("/v1/memories/m/search", json={"queries": keys[:2].tolist(), "k": 5})
    client.post("/v1/memories/m/search", json={"queries": keys[:2].tolist(), "k": 0})
    client.get("/v1/memories/no-such-memory")
    client.get("/v1/no/such/route")
    scrape = samples(client)
    assert requests_of(scrape, "POST", "/v1/memories/{name}/search", 200) == 3
    assert requests_of(scrape, "POST", "/v1/memories/{name}/search", 422) == 1
    assert requests_of(scrape, "GET", "/v1/memories/{name}", 404) == 1
    assert requests_of(scrape, "GET", "unmatched", 404) == 1
    assert not any("no-such-memory" in str(labels) or "/v1/no/" in str(labels) for _, labels in scrape)
    assert scrape[("memsvc_memory_entries", frozenset({"memory": "m"}.items()))] == 50

    client.post("/v1/memories/m/delete", json={"ids": list(range(10))})
    mem = client.app.state.service.store.get("m")
    assert samples(client)[("memsvc_memory_log_bytes", frozenset({"memory": "m"}.items()))] == mem.log_bytes > 0
    mem.snapshot()
    scrape = samples(client)
    assert scrape[("memsvc_memory_entries", frozenset({"memory": "m"}.items()))] == 40
    assert scrape[("memsvc_memory_log_bytes", frozenset({"memory": "m"}.items()))] == 0
    assert scrape[("memsvc_memory_snapshot_seconds", frozenset({"memory": "m"}.items()))] > 0


def test_metrics_report_ivfpq_training_time(client):
    spec = {"name": "pq", "dim": DIM, "index": "ivfpq", "nlist": 4, "train_size": 256}
    assert client.post("/v1/memories", json=spec).status_code == 201
    assert ("memsvc_memory_train_seconds", frozenset({"memory": "pq"}.items())) not in samples(client)
    keys = np.random.default_rng(1).standard_normal((300, DIM)).astype(np.float32)
    client.post("/v1/memories/pq/entries", json={"keys": keys.tolist()})
    assert client.app.state.service.store.get("pq").wait_trained(timeout=60)
    assert samples(client)[("memsvc_memory_train_seconds", frozenset({"memory": "pq"}.items()))] > 0


def test_sigterm_finishes_writes_and_restarts_from_a_snapshot(tmp_path):
    srv = ServerProcess(tmp_path / "data").start()
    try:
        MemoryClient(srv.url).create_memory("stream", dim=DIM, value_kind="token")
        acked: dict[int, np.ndarray] = {}  # batch -> ids the server acknowledged
        errors: list[Exception] = []  # anything but the connection going away
        writers = 4

        def write(first: int) -> None:
            mem = MemoryClient(srv.url).memory("stream")
            for batch in range(first, 10**6, writers):
                try:
                    acked[batch] = mem.add(np.full((25, DIM), batch, np.float32), values=np.full(25, batch))
                except ServerUnavailable:  # the server is going away: this batch was not acknowledged
                    return
                except MemsvcError as exc:
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        started = time.monotonic()
        while len(acked) < 10 and time.monotonic() - started < 60:  # the first adds: slower on a loaded machine
            time.sleep(0.05)
        time.sleep(1.5)
        srv.stop()
        for t in threads:
            t.join()
        assert not errors
        log = srv.log.read_text()
        assert "Application shutdown complete" in log  # uvicorn's lifespan shutdown ran: no SIGKILL was needed
        assert len(acked) > 10, "the writers did not get going"

        srv.start()
        mem = MemoryClient(srv.url).memory("stream")
        stats = mem.stats()
        assert stats.log_bytes == 0  # the restart loaded the shutdown's snapshot and replayed nothing
        assert list((tmp_path / "data" / "memories" / "stream").glob("snapshot-*"))
        for batch, ids in acked.items():
            got = mem.get(ids)
            assert got.found.all() and (got.values == batch).all(), f"acknowledged batch {batch} was lost"
        assert stats.count == 25 * len(acked)  # every write the server took in was finished and answered
    finally:
        srv.stop()


def test_lines_logged_inside_a_route_carry_its_request_id(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))

    @app.get("/probe")
    def probe() -> dict:  # a plain def: it runs in the threadpool, as the memory routes do
        logging.getLogger("memsvc.probe").warning("working", extra={"color_message": "\x1b[36mworking\x1b[0m"})
        return {}

    stream, logger = io.StringIO(), logging.getLogger("memsvc.probe")
    logger.addHandler(json_handler(stream))
    try:
        with TestClient(app) as client:
            client.get("/probe", headers={"X-Request-ID": "in-route"})
    finally:
        logger.handlers.clear()
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "in-route" and line["message"] == "working" and line["level"] == "WARNING"
    assert "color_message" not in line
