"""Collections: upsert/skip/replace/delete/restart through the embedded `Service`, the REST routes and
`RemoteCollection`, the CLI, and a SIGKILL during ingestion. Unit tests embed with a tiny random BERT
(the MiniLM tokenizer, no weights); the slow tests run a server (the real embedder, SmolLM2 for ask) on real docs."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ServerProcess
from test_retrievers import CountingEncoder

from memsvc.client import MemoryClient
from memsvc.config import Settings
from memsvc.contract import (
    MAX_DOCUMENT_BYTES,
    AlreadyExists,
    CollectionStats,
    Document,
    InvalidInput,
    NotFound,
    TooLarge,
)
from memsvc.service import Service

DOCS = {
    "a.md": "# Generators\n\nA generator is a function that returns an iterator with yield.\n",
    "b.md": "# Decorators\n\nA decorator wraps a function and returns another function.\n",
    "c.txt": "The walrus operator assigns values to names inside expressions.\n",
}


@pytest.fixture
def open_service(tmp_path, tiny_encoder):
    """Open the service of one data dir; call again to 'restart' (the previous one is closed)."""
    opened: list[Service] = []

    def open_() -> Service:
        if opened:
            opened[-1].close()
        opened.append(Service(Settings(data_dir=tmp_path / "data"), encoder=lambda: tiny_encoder))
        return opened[-1]

    yield open_
    opened[-1].close()


def docs(**overrides: str) -> list[Document]:
    return [Document(id, overrides.get(id.replace(".", "_"), text), {"source": id}) for id, text in DOCS.items()]


def ids(hits) -> list[str]:
    return [h.document_id for h in hits]


def test_upsert_skips_unchanged_and_replaces_changed(open_service):
    col = open_service().create_collection("docs")
    first = col.upsert(docs())
    assert (first.added, first.updated, first.unchanged) == (list(DOCS), [], [])
    assert first.chunks == 3 and col.stats() == CollectionStats("docs", documents=3, chunks=3)
    assert col.memory.stats().count == 3

    again = col.upsert(docs())
    assert (again.added, again.updated, again.unchanged, again.chunks) == ([], [], list(DOCS), 0)
    assert col.memory.stats().count == 3  # nothing embedded twice

    changed = col.upsert(docs(b_md="# Context managers\n\nThe with statement calls __enter__ and __exit__.\n"))
    assert (changed.updated, changed.unchanged) == (["b.md"], ["a.md", "c.txt"])
    assert col.memory.stats().count == 3 and len(col.memory.stats().partitions) == 3
    for mode in ("bm25", "dense", "hybrid"):
        hits = col.search("__enter__ with statement", k=3, mode=mode)
        assert len(hits) >= 1 and all(h.text for h in hits)
        assert "wraps" not in " ".join(h.text for h in hits)  # the old version is gone from every mode
    top = col.search("__enter__ with statement", k=1, mode="bm25")[0]
    assert (top.document_id, top.metadata, top.section) == ("b.md", {"source": "b.md"}, "Context managers")
    assert top.chunk_id.startswith("b.md#")


GUIDE = "# Guide\n\nIntro to the guide.\n\n## Install\n\nRun pip install memsvc.\n\n## Use\n\nCall search.\n"


def test_a_changed_document_embeds_only_its_changed_chunks_also_after_restart(tmp_path, tiny_encoder):
    encoder = CountingEncoder(tiny_encoder)
    service = Service(Settings(data_dir=tmp_path / "data"), encoder=lambda: encoder)
    col = service.create_collection("docs")
    col.upsert([Document("guide.md", GUIDE)])
    assert len(encoder.texts) == 3
    encoder.texts.clear()
    edited = GUIDE.replace("Call search.", "Call search or ask.")
    assert col.upsert([Document("guide.md", edited)]).chunks == 3
    assert encoder.texts == ["## Use\n\nCall search or ask."]  # the two unchanged chunks were copied
    assert col.memory.stats().count == 3 and len(col.memory.stats().partitions) == 1
    top = col.search("## Install\n\nRun pip install memsvc.", k=1, mode="dense")[0]  # its copied vector
    assert top.text == "## Install\n\nRun pip install memsvc." and top.score == pytest.approx(1.0, abs=1e-5)
    service.close()
    encoder.texts.clear()
    service = Service(Settings(data_dir=tmp_path / "data"), encoder=lambda: encoder)
    col = service.collection("docs")  # the keys are in the catalog: a restart keeps the cache
    col.upsert([Document("guide.md", "# Guide\n\nA new intro.\n" + edited[len("# Guide\n\nIntro to the guide.\n"):])])
    assert encoder.texts == ["# Guide\n\nA new intro."]
    service.close()


def test_search_by_document_gives_one_hit_per_document(open_service):
    col = open_service().create_collection("docs")
    col.upsert([Document("guide.md", GUIDE.replace("Call search.", "Call pip search.")), *docs()])
    chunks = col.search("pip install", k=10, mode="bm25")
    assert [h.document_id for h in chunks] == ["guide.md", "guide.md"]
    grouped = col.search("pip install", k=10, mode="bm25", group_by="document")
    assert [(h.document_id, h.chunk_id, h.text) for h in grouped] == [("guide.md", chunks[0].chunk_id, chunks[0].text)]
    hybrid = col.search("a generator function", k=2, mode="hybrid", group_by="document", score="sum")
    assert len(hybrid) == 2 and len({h.document_id for h in hybrid}) == 2
    with pytest.raises(InvalidInput) as err:
        col.search("pip", group_by="section")
    assert err.value.field == "group_by"
    for group_by in ("document", None):
        with pytest.raises(InvalidInput) as err:
            col.search("pip", group_by=group_by, score="mean")
        assert err.value.field == "score"


def test_a_contextual_collection_indexes_chunks_with_their_title_and_keeps_the_setting(open_service):
    service = open_service()
    col = service.collections.create("ctx", context="title")
    col.upsert([Document("guide.md", GUIDE)])
    hits = col.search("guide", k=5, mode="bm25")  # only the first chunk says "guide"; the title is in all
    assert len(hits) == 3 and all("Guide\n" not in h.text.split("# Guide")[0] for h in hits)
    assert {h.text for h in hits} == {"# Guide\n\nIntro to the guide.", "## Install\n\nRun pip install memsvc.",
                                      "## Use\n\nCall search."}  # what a search returns stays plain
    plain = service.create_collection("plain")
    plain.upsert([Document("guide.md", GUIDE)])
    assert len(plain.search("guide", k=5, mode="bm25")) == 1
    with pytest.raises(InvalidInput) as err:
        service.collections.create("bad", context="heading")
    assert err.value.field == "context" and "bad" not in service.list_collections()
    reopened = open_service().collection("ctx")
    assert reopened.chunker.context == "title" and len(reopened.search("guide", k=5, mode="bm25")) == 3


def test_collections_with_the_same_documents_answer_from_their_own(open_service):
    """Equal texts give equal chunk ids in two collections: hits carry their own collection's rows."""
    service = open_service()
    service.create_collection("one").upsert(docs())
    two = service.create_collection("two")
    two.upsert([Document(d.id, d.text, {"in": "two"}) for d in docs()])
    for mode in ("bm25", "dense", "hybrid"):
        hits = two.search("generator yield", k=3, mode=mode)
        assert len(hits) == len({h.chunk_id for h in hits}) >= 1
        assert all(h.metadata == {"in": "two"} for h in hits)


def test_delete_document_and_collection(open_service):
    service = open_service()
    col = service.create_collection("docs")
    col.upsert(docs())
    col.delete("a.md")
    assert "a.md" not in ids(col.search("generator yield iterator", k=3, mode="bm25"))
    assert "a.md" not in ids(col.search("generator yield iterator", k=3, mode="dense"))
    assert col.memory.stats().count == 2 and col.stats().documents == 2
    with pytest.raises(NotFound):
        col.delete("a.md")
    service.delete_collection("docs")
    assert service.list_collections() == []
    assert "col.docs" not in [s.name for s in service.list_memories()]
    with pytest.raises(NotFound):
        service.collection("docs")
    service.create_collection("docs")  # the name is free again


def test_everything_survives_restart(open_service):
    col = open_service().create_collection("docs")
    col.upsert(docs())
    col.delete("c.txt")
    before = {mode: col.search("function returns", k=3, mode=mode) for mode in ("bm25", "dense", "hybrid")}

    reopened = open_service()
    assert reopened.list_collections() == ["docs"]
    col = reopened.collection("docs")
    assert col.stats() == CollectionStats("docs", documents=2, chunks=2)
    for mode, hits in before.items():
        after = col.search("function returns", k=3, mode=mode)
        assert ids(after) == ids(hits) and np.allclose([h.score for h in after], [h.score for h in hits])
    assert col.upsert(docs()).added == ["c.txt"] and col.upsert(docs()).unchanged == list(DOCS)


def test_uncommitted_vectors_are_dropped_on_open(open_service, monkeypatch):
    """A failure between writing vectors and committing SQL stores nothing; a crash there (vectors left
    behind) is cleaned when the collection opens."""
    service = open_service()
    col = service.create_collection("docs")
    col.upsert(docs()[:1])
    monkeypatch.setattr("memsvc.collections.DocumentRow.__init__", _fail)
    with pytest.raises(RuntimeError, match="boom"):
        col.upsert(docs(a_md="# Generators\n\nChanged text.\n"))
    monkeypatch.undo()
    assert col.memory.stats().count == 1 and col.stats().documents == 1

    col.memory.add(np.ones((2, col.encoder.dim), np.float32), payloads=["x#0", "x#1"], partition="crashed")
    col = open_service().collection("docs")
    assert col.memory.stats().count == 1
    assert [p.name for p in col.memory.stats().partitions] != ["crashed"]
    assert ids(col.search("generator", k=5, mode="dense")) == ["a.md"]


def _fail(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("documents, error, field", [
    ([], InvalidInput, "documents"),
    ([Document("e", " \n ")], InvalidInput, "documents[0].text"),
    ([Document("", "text")], InvalidInput, "documents[0].document_id"),
    ([Document("a", "x"), Document("a", "y")], InvalidInput, "documents[1].id"),
    ([Document("a", "x", {"n": float("nan")})], InvalidInput, "documents[0].metadata"),
    ([Document("a", "x"), Document("big", "x" * (MAX_DOCUMENT_BYTES + 1))], TooLarge, "documents[1].text"),
])
def test_bad_documents_store_nothing(open_service, documents, error, field):
    col = open_service().create_collection("docs")
    col.upsert(docs())
    with pytest.raises(error) as info:
        col.upsert(documents + docs(a_md="changed") if documents else documents)
    assert info.value.field == field
    assert col.memory.stats().count == 3 and col.stats().documents == 3
    assert col.upsert(docs()).unchanged == list(DOCS)


def test_bad_names_and_queries(open_service):
    service = open_service()
    col = service.create_collection("docs")
    col.upsert(docs())
    with pytest.raises(AlreadyExists):
        service.create_collection("docs")
    for name in ("", "../x", "a" * 125, "-x"):
        with pytest.raises(InvalidInput):
            service.create_collection(name)
    with pytest.raises(NotFound):
        service.collection("nope")
    for kwargs, field in (({"k": 0}, "k"), ({"k": -1}, "k"), ({"mode": "fuzzy"}, "mode")):
        with pytest.raises(InvalidInput) as info:
            col.search("generator", **kwargs)
        assert info.value.field == field
    with pytest.raises(InvalidInput):
        col.search("  ")


# --- REST and RemoteCollection --------------------------------------------------------------------

@pytest.fixture
def api(tmp_path, tiny_encoder):
    """The app (keys: an admin, a tenant confined to 't-', a read-only reader) with the tiny encoder and a
    tiny random LM, and a `MemoryClient` (admin) that talks to it in-process."""
    from fastapi.testclient import TestClient

    from lm.model import tiny_llama
    from memsvc.api.app import create_app

    app = create_app(Settings(data_dir=tmp_path / "api", api_keys="admin,tenant=t-,reader:ro"),
                     encoder=lambda: tiny_encoder, language_model=tiny_llama)
    with TestClient(app, headers={"Authorization": "Bearer admin"}) as http:
        client = MemoryClient("http://testserver")
        client.http = http
        yield http, client


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_rest_round_trip_through_remote_collection(api):
    _, client = api
    col = client.create_collection("docs")
    result = col.add_documents([{"id": d.id, "text": d.text, "metadata": d.metadata} for d in docs()])
    assert result.added == list(DOCS) and col.add_documents(docs()).unchanged == list(DOCS)
    assert client.list_collections() == ["docs"] and col.stats() == CollectionStats("docs", documents=3, chunks=3)
    local = client.http.app.state.service.collection("docs")
    for mode in ("bm25", "dense", "hybrid"):
        assert col.search("function returns", k=2, mode=mode) == local.search("function returns", 2, mode)
    hit = col.search("walrus operator", k=1, mode="bm25")[0]
    assert (hit.document_id, hit.metadata) == ("c.txt", {"source": "c.txt"})

    col.add_documents([Document("dir/sub/d.md", "# Slices\n\nA slice selects a range of a sequence.\n")])
    assert col.search("slice range sequence", k=1, mode="bm25")[0].document_id == "dir/sub/d.md"
    col.delete("dir/sub/d.md")  # ids with slashes travel in the path
    assert "dir/sub/d.md" not in ids(col.search("slice range sequence", k=5, mode="bm25"))

    answer = col.ask("What is a generator?", k=2, max_new_tokens=8)
    assert isinstance(answer.answer, str)
    assert [c.n for c in answer.citations] == [1, 2]
    assert answer.citations[0].chunk_id == col.search("What is a generator?", k=1)[0].chunk_id
    assert answer == local.ask("What is a generator?", k=2, max_new_tokens=8)  # the embedded face, same wiring
    client.delete_collection("docs")
    assert client.list_collections() == []


def test_rest_bad_input(api):
    http, client = api
    client.create_collection("docs").add_documents(docs())
    assert error(http.post("/v1/collections", json={"name": "docs"}), 409)["code"] == "already_exists"
    assert error(http.post("/v1/collections", json={"name": "a/b"}), 422)["field"] == "name"
    assert error(http.post("/v1/collections/nope/search", json={"query": "x"}), 404)["code"] == "not_found"
    assert error(http.post("/v1/collections/nope/documents", json={"documents": []}), 404)["field"] == "name"
    for body, field in (({"query": "x", "k": 0}, "k"), ({"query": "x", "k": -3}, "k"),
                        ({"query": "x", "k": 100000}, "k"), ({"query": "x", "mode": "fuzzy"}, "mode"),
                        ({"query": " "}, "query"), ({"k": 3}, "query"), ({"query": "x", "extra": 1}, "extra")):
        assert error(http.post("/v1/collections/docs/search", json=body), 422)["field"] == field, body
    bad_docs = ([{"id": "e", "text": ""}], [{"id": "e", "text": "x", "metadata": [1]}], [{"text": "no id"}])
    for documents in bad_docs:
        body = {"documents": [{"id": "a.md", "text": "changed"}, *documents]}
        assert error(http.post("/v1/collections/docs/documents", json=body), 422)["field"].startswith("documents")
    big = {"documents": [{"id": "big", "text": "word " * (MAX_DOCUMENT_BYTES // 5 + 1)}]}
    assert "MiB" in error(http.post("/v1/collections/docs/documents", json=big), 413)["message"]
    assert error(http.delete("/v1/collections/docs/documents/nope"), 404)["field"] == "document_id"
    assert error(http.post("/v1/collections/docs/ask", json={"question": "", "k": 2}), 422)["field"] == "question"
    assert error(http.post("/v1/collections/docs/ask", json={"question": "x", "k": 0}), 422)["field"] == "k"
    assert http.get("/v1/collections/docs").json() == {"name": "docs", "documents": 3, "chunks": 3}


def test_rest_oversized_and_undecodable_documents_store_nothing(api):
    """A 50 MB document is refused whole with its limit named (413), before anything is embedded;
    a body over max_body_bytes is refused by the server's body limit; a JSON body that is not UTF-8 is 400
    (`memsvc ingest` decodes files itself and names the offending byte)."""
    http, client = api
    client.create_collection("docs").add_documents(docs())
    fifty_mb = {"documents": [{"id": "a.md", "text": "changed"}, {"id": "big", "text": "word " * 10_000_000}]}
    err = error(http.post("/v1/collections/docs/documents", json=fifty_mb), 413)
    assert err["field"] == "documents[1].text" and f"larger than {MAX_DOCUMENT_BYTES >> 20} MiB" in err["message"]
    over_body = b'{"documents": [{"id": "big", "text": "' + b"x" * (Settings().max_body_bytes + 1) + b'"}]}'
    err = error(http.post("/v1/collections/docs/documents", content=over_body,
                          headers={"Content-Type": "application/json"}), 413)
    assert "max_body_bytes" in err["message"]
    latin1 = '{"documents": [{"id": "latin1", "text": "caf\xe9"}]}'.encode("latin-1")
    assert error(http.post("/v1/collections/docs/documents", content=latin1,
                           headers={"Content-Type": "application/json"}), 400)["code"] == "bad_request"
    assert http.get("/v1/collections/docs").json() == {"name": "docs", "documents": 3, "chunks": 3}
    assert client.memory("col.docs").stats().count == 3


def test_rest_collection_memories_change_only_through_their_collection(api):
    """`col.<name>` memories hold collections' vectors: the memories API reads them but refuses to
    create, change or delete them, so no vector disappears behind its collection's back."""
    http, client = api
    client.create_collection("docs").add_documents(docs())
    create = {"name": "col.other", "dim": 32, "metric": "cosine"}
    assert "reserved" in error(http.post("/v1/memories", json=create), 422)["message"]
    writes = (("DELETE", "/v1/memories/col.docs", None), ("PATCH", "/v1/memories/col.docs", {"metadata": {}}),
              ("POST", "/v1/memories/col.docs/entries", {"keys": [[0.5] * 32]}),
              ("POST", "/v1/memories/col.docs/delete", {"ids": [0]}))
    for method, path, body in writes:
        err = error(http.request(method, path, json=body), 403)
        assert (err["field"], "/v1/collections/docs" in err["message"]) == ("name", True), path
    assert http.get("/v1/memories/col.docs").json()["count"] == 3
    assert len(client.collection("docs").search("generator", k=3, mode="dense")) == 3
    client.delete_collection("docs")  # which deletes its memory
    assert "col.docs" not in [spec.name for spec in client.list_memories()]


def test_rest_keys_scope_collections(api):
    http, client = api
    client.create_collection("t-docs").add_documents(docs())
    client.create_collection("other")
    tenant, reader = {"Authorization": "Bearer tenant"}, {"Authorization": "Bearer reader"}
    assert http.get("/v1/collections", headers=tenant).json() == {"collections": ["t-docs"]}
    assert error(http.post("/v1/collections", json={"name": "x"}, headers=tenant), 403)["code"] == "forbidden"
    assert error(http.post("/v1/collections/other/search", json={"query": "x"}, headers=tenant), 403)
    assert http.post("/v1/collections/t-docs/search", json={"query": "generator"}, headers=tenant).json()["hits"]
    assert http.post("/v1/collections/t-docs/search", json={"query": "generator"}, headers=reader).json()["hits"]
    for method, path in (("POST", "/v1/collections/t-docs/documents"), ("DELETE", "/v1/collections/t-docs"),
                         ("DELETE", "/v1/collections/t-docs/documents/a.md")):
        response = http.request(method, path, json={"documents": [{"id": "z", "text": "z"}]}, headers=reader)
        assert "read-only" in error(response, 403)["message"]
    assert http.get("/v1/collections/t-docs", headers=reader).json()["documents"] == 3


# --- through a running server (the real embedder; ask loads SmolLM2 in the server) -----------------

LIBRARY = Path("/usr/share/doc/python3.11/html/_sources/library")
SMALL_DOCS = ("copy.rst.txt", "fnmatch.rst.txt", "atexit.rst.txt", "tomllib.rst.txt")


def run_cli(*args: str):
    from typer.testing import CliRunner

    from memsvc.cli.commands import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_cli_ingest_search_ask_through_a_server(tmp_path):
    docs_dir = tmp_path / "docs"
    (docs_dir / "lib").mkdir(parents=True)
    for name in SMALL_DOCS:
        (docs_dir / "lib" / name).write_bytes((LIBRARY / name).read_bytes())
    (docs_dir / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs_dir / "empty.txt").write_text("\n")
    (docs_dir / "big.txt").write_text("word " * 10_000_000)  # 50 MB: refused whole, the rest ingested
    with ServerProcess(tmp_path / "data") as server:
        url = ("--url", server.url, "--collection", "py")
        first = run_cli("ingest", str(docs_dir), *url)
        assert first.exit_code == 1, first.output
        assert "skipped latin1.txt" not in first.stdout and "latin1.txt: not UTF-8" in first.stderr
        assert "skipped empty.txt" in first.stderr
        assert f"skipped big.txt: document 'big.txt' is larger than {MAX_DOCUMENT_BYTES >> 20} MiB" in first.stderr
        assert first.stdout.startswith("4 added, 0 updated, 0 unchanged, 3 skipped")
        again = run_cli("ingest", str(docs_dir), *url)
        assert again.stdout.startswith("0 added, 0 updated, 4 unchanged, 3 skipped, 0 chunks")
        for name in ("latin1.txt", "empty.txt", "big.txt"):
            (docs_dir / name).unlink()
        with open(docs_dir / "lib" / "fnmatch.rst.txt", "a") as f:
            f.write("\nA new closing paragraph about wildcards.\n")
        edited = run_cli("ingest", str(docs_dir), *url)
        assert edited.exit_code == 0 and edited.stdout.startswith("0 added, 1 updated, 3 unchanged, 0 skipped")

        found = run_cli("search", "shallow and deep copy operations", "--mode", "hybrid", "--k", "3", "--json", *url)
        hits = json.loads(found.stdout)["hits"]
        assert found.exit_code == 0 and len(hits) == 3
        assert hits[0]["document_id"] == "lib/copy.rst.txt" and "copy" in hits[0]["text"]
        toml = run_cli("search", "parse TOML", "--mode", "bm25", "--k", "1", "--json", *url)
        assert json.loads(toml.stdout)["hits"][0]["document_id"] == "lib/tomllib.rst.txt"
        missing = run_cli("search", "x", "--url", server.url, "--collection", "nope")
        assert missing.exit_code == 2 and "collection 'nope' not found" in missing.stderr
        bad_k = run_cli("search", "x", "--k", "0", *url)
        assert bad_k.exit_code == 2 and "k" in bad_k.stderr

        answer = run_cli("ask", "Which function of the atexit module registers a function to be called at "
                         "interpreter exit?", "--k", "2", "--max-new-tokens", "48", "--json", *url)
        assert answer.exit_code == 0, answer.output
        body = json.loads(answer.stdout)
        assert "register" in body["answer"] and [c["n"] for c in body["citations"]] == [1, 2]
        assert body["citations"][0]["document_id"] == "lib/atexit.rst.txt"

        server.kill()
        server.start()
        after = run_cli("search", "shallow and deep copy operations", "--mode", "hybrid", "--k", "3", "--json", *url)
        assert json.loads(after.stdout)["hits"] == hits


@pytest.mark.slow
def test_sigkill_during_ingestion_leaves_nothing_half_ingested(tmp_path):
    """Kill the server while batches of documents are being embedded and stored; after a restart every
    document is whole (its chunks in SQL, exactly its vectors in the memory) or absent."""
    files = sorted(LIBRARY.glob("*.rst.txt"), key=lambda path: path.stat().st_size)[40:60]  # 2-4 KB each
    documents = [Document(path.name, path.read_text()) for path in files]
    with ServerProcess(tmp_path / "data") as server, MemoryClient(server.url, timeout=600) as client:
        col = client.create_collection("py")
        col.upsert(documents[:2])
        failures: list[Exception] = []

        def ingest() -> None:
            try:
                for start in range(2, len(documents), 4):
                    col.upsert(documents[start:start + 4])
            except httpx.TransportError as exc:  # the server dies under it
                failures.append(exc)

        writer = threading.Thread(target=ingest)
        writer.start()
        vectors, chunks = 0, 0
        while writer.is_alive() and vectors <= chunks:  # until vectors exist that no committed document has
            time.sleep(0.02)
            vectors, chunks = client.memory("col.py").stats().count, col.stats().chunks
        server.kill()
        assert vectors > chunks  # killed mid-upsert, with uncommitted vectors on disk
        writer.join()
        assert failures

        server.start()
        stats = col.stats()
        memory = client.memory("col.py").stats()
        assert stats.documents >= 2 and memory.count == stats.chunks
        assert len(memory.partitions) == stats.documents
        result = col.upsert(documents)
        assert len(result.unchanged) == stats.documents and len(result.added) == len(documents) - stats.documents
        assert client.memory("col.py").stats().count == col.stats().chunks
