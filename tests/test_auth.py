"""API keys: 401 without a valid key on every route but health, tenants confined to their name prefix,
read-only keys refused on every write, and keys never echoed or logged."""
from __future__ import annotations

import logging
import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from memsvc.api.app import create_app
from memsvc.config import ApiKey, Settings, parse_api_keys

ADMIN, TENANT_A, A_READER, READER, TENANT_B = "admin-key", "key-of-a", "a-reader-key", "reader-key", "key-of-b"
API_KEYS = f"{ADMIN}, {TENANT_A}=a-, {A_READER}=a-:ro, {READER}:ro, {TENANT_B}=b-"
OPEN = {("GET", "/v1/health")}
QUERIES = {("POST", "/v1/memories/{name}/search"), ("POST", "/v1/memories/{name}/get"),  # reads sent as POST
           ("POST", "/v1/collections/{name}/search"), ("POST", "/v1/collections/{name}/ask")}
DIM = 4


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("auth"), api_keys=API_KEYS))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        for name in ("a-notes", "b-secret"):
            assert c.post("/v1/memories", json={"name": name, "dim": DIM}, headers=bearer(ADMIN)).status_code == 201
            assert c.post(f"/v1/memories/{name}/entries", json={"keys": [[1, 0, 0, 0]]},
                          headers=bearer(ADMIN)).status_code == 201
        yield c


def routes(app) -> list[tuple[str, str]]:
    """Every (method, path template) of the OpenAPI spec: a route added later is covered too."""
    return [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]


def url(path: str, name: str) -> str:
    return re.sub(r"\{[^}]+\}", "0", path.replace("{name}", name))


def count(client, name: str) -> int:
    return client.get(f"/v1/memories/{name}", headers=bearer(ADMIN)).json()["count"]


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_api_keys_format():
    keys = parse_api_keys(" k1 ,k2=tenant-a-, k3:ro,k4=t.b_:ro,,")
    assert [(k.secret.get_secret_value(), k.prefix, k.read_only) for k in keys] == [
        ("k1", "", False), ("k2", "tenant-a-", False), ("k3", "", True), ("k4", "t.b_", True)]
    assert parse_api_keys("") == [] and Settings(api_keys="").api_keys == []
    assert ApiKey(secret="x", prefix="a-").allows("a-1") and not ApiKey(secret="x", prefix="a-").allows("b-1")


def test_api_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMSVC_API_KEYS", "s3cret=team-:ro")
    (key,) = Settings().api_keys
    assert key.prefix == "team-" and key.read_only and "s3cret" not in repr(Settings())
    monkeypatch.setenv("MEMSVC_API_KEYS", "")  # what docker-compose passes when the variable is unset
    assert Settings().api_keys == []


@pytest.mark.parametrize("value", ["ok,bad s3cr3t", "s3cr3t=", "s3cr3t=a/b", "s3cr3t:rw", "=s3cr3t", "s3cr3t,s3cr3t"])
def test_bad_api_keys_fail_without_showing_them(value):
    with pytest.raises(ValidationError) as err:
        Settings(api_keys=value)
    assert "api_keys" in str(err.value) and "s3cr3t" not in str(err.value)


def test_every_route_but_health_needs_a_key(app, client):
    for method, path in routes(app):
        if (method, path) in OPEN:
            assert client.request(method, path).status_code == 200
            continue
        for headers in ({}, bearer("wrong"), bearer(ADMIN[:-1]), bearer(ADMIN + "x"), {"Authorization": ADMIN},
                        {"Authorization": "Bearer k\xe9y".encode("latin-1")}):
            response = client.request(method, url(path, "a-notes"), headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert count(client, "a-notes") == 1


def test_a_tenant_sees_and_touches_only_its_prefix(app, client):
    listed = {m["name"] for m in client.get("/v1/memories", headers=bearer(TENANT_A)).json()["memories"]}
    assert listed == {"a-notes"}
    assert {m["name"] for m in client.get("/v1/memories", headers=bearer(ADMIN)).json()["memories"]} == {
        "a-notes", "b-secret"}
    assert client.get("/v1/memories", headers=bearer(TENANT_B)).json()["memories"] == [
        m for m in client.get("/v1/memories", headers=bearer(ADMIN)).json()["memories"] if m["name"] == "b-secret"]

    for method, path in routes(app):
        if "{name}" not in path:
            continue
        # another tenant's memory and a name that does not exist are refused alike: nothing is revealed
        existing = client.request(method, url(path, "b-secret"), headers=bearer(TENANT_A))
        missing = client.request(method, url(path, "b-nothing"), headers=bearer(TENANT_A))
        assert_error(existing, 403, "forbidden")
        assert existing.json() == missing.json()
    assert count(client, "b-secret") == 1

    assert_error(client.post("/v1/memories", json={"name": "b-mine", "dim": DIM}, headers=bearer(TENANT_A)),
                 403, "forbidden")
    assert client.post("/v1/memories", json={"name": "a-new", "dim": DIM}, headers=bearer(TENANT_A)).status_code == 201
    added = client.post("/v1/memories/a-new/entries", json={"keys": [[0, 1, 0, 0]]}, headers=bearer(TENANT_A))
    assert added.status_code == 201
    found = client.post("/v1/memories/a-new/search", json={"queries": [[0, 1, 0, 0]], "k": 1},
                        headers=bearer(TENANT_A))
    assert found.json()["ids"] == [[0]]
    assert "a-new" not in {m["name"] for m in client.get("/v1/memories", headers=bearer(TENANT_B)).json()["memories"]}


def test_read_only_keys_may_read_but_not_write(app, client):
    for method, path in routes(app):
        if (method, path) in OPEN:
            continue
        for key in (READER, A_READER):
            response = client.request(method, url(path, "a-notes"), headers=bearer(key))
            if path == "/metrics":
                assert response.status_code == (200 if key == READER else 403)  # A_READER has a prefix
            elif method == "GET" or (method, path) in QUERIES:
                assert response.status_code not in (401, 403), (key, method, path, response.text)
            else:
                assert_error(response, 403, "forbidden")
                assert "read-only" in response.json()["error"]["message"]
    stats = client.get("/v1/memories/a-notes", headers=bearer(READER))
    assert stats.status_code == 200 and stats.json()["count"] == 1  # nothing was written or deleted
    found = client.post("/v1/memories/a-notes/search", json={"queries": [[1, 0, 0, 0]], "k": 1},
                        headers=bearer(A_READER))
    assert found.json()["ids"] == [[0]]


def test_metrics_need_an_unscoped_key(client):
    assert client.get("/metrics", headers=bearer(READER)).status_code == 200
    assert_error(client.get("/metrics", headers=bearer(TENANT_A)), 403, "forbidden")


def test_keys_are_never_echoed_or_logged(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    responses = [client.get("/v1/memories", headers=bearer("guess-" + ADMIN)),
                 client.get("/v1/memories/b-secret", headers=bearer(TENANT_A)),
                 client.post("/v1/memories/a-notes/entries", json={"keys": [[1, 1, 1, 1]]}, headers=bearer(READER)),
                 client.get("/v1/memories", headers=bearer(ADMIN))]
    seen = "".join(r.text + str(r.headers) for r in responses) + caplog.text + repr(app.state.settings)
    for key in (ADMIN, TENANT_A, READER):
        assert key not in seen
