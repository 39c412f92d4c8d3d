"""/docs and /redoc work without a network: every asset they reference is served by the app itself."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from memsvc.api.app import create_app
from memsvc.config import Settings

ASSET = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*'([^']+)'""")
TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("data")))) as c:
        yield c


@pytest.mark.parametrize("page, expected", [
    ("/docs", {"swagger-ui.css", "swagger-ui-bundle.js", "favicon.png", "openapi.json"}),
    ("/redoc", {"redoc.standalone.js", "favicon.png", "openapi.json"}),
])
def test_docs_pages_reference_only_local_assets_that_answer(client, page, expected):
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert re.findall(r"(?:https?:)?//[\w.-]+", html.text) == []  # no CDN, no fonts, no other host
    urls = {a or b for a, b in ASSET.findall(html.text)}
    assert {u.rsplit("/", 1)[-1] for u in urls} == expected
    for url in urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert TYPES[url[url.rindex("."):]] in asset.headers["content-type"], url
        assert len(asset.content) > 1000, url


def test_swagger_ui_sends_the_spec_to_no_validator(client):
    assert '"validatorUrl": null' in client.get("/docs").text
