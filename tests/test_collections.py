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
from conftest import ServerProcess, talking_llama
from test_retrievers import CountingEncoder

from memsvc.client import MemoryClient, RemoteCollection
from memsvc.config import Settings
from memsvc.contract import (
    MAX_DOCUMENT_BYTES,
    AlreadyExists,
    CollectionStats,
    Document,
    InvalidInput,
    MemsvcError,
    NotFound,
    ServerUnavailable,
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


def test_a_collection_keeps_its_embedder_and_the_cache_keys_name_the_backend(tmp_path, tiny_encoder, monkeypatch):
    """A collection records the embedder (model + backend) it was created with and keeps embedding its
    chunks and queries with it after MEMSVC_EMBED_BACKEND changes; new collections get the new one; a
    collection from before the record (NULL) is all-MiniLM-L6-v2 in PyTorch. The same text gets a different
    embedding cache key under each embedder."""
    from sqlalchemy import select, update
    from sqlalchemy.orm import Session

    from memsvc.db.models import ChunkRow, CollectionRow, DocumentRow
    from retrievers import encoders
    from retrievers.dense import embedding_key

    made: dict[str, CountingEncoder] = {}
    monkeypatch.setattr(encoders, "missing_packages", lambda backend: [])
    monkeypatch.setattr(encoders, "make_embedder",
                        lambda name, cache_dir: made.setdefault(name, CountingEncoder(tiny_encoder, name)))
    torch_name, int8_name = "all-MiniLM-L6-v2", "all-MiniLM-L6-v2+openvino-int8"
    with Service(Settings(data_dir=tmp_path / "data", embed_backend="torch")) as service:
        service.create_collection("old").upsert([Document("guide.md", GUIDE)])
    with Service(Settings(data_dir=tmp_path / "data", embed_backend="openvino-int8")) as service:
        old, new = service.collection("old"), service.create_collection("new")
        new.upsert([Document("guide.md", GUIDE)])
        old.upsert([Document("notes.md", "Some notes.")])
        old.search("notes", k=1, mode="dense")
        assert made[torch_name].texts[-2:] == ["Some notes.", "notes"] and len(made[torch_name].texts) == 5
        assert len(made[int8_name].texts) == 3
        with Session(service.catalog.engine) as session:
            assert dict(session.execute(select(CollectionRow.name, CollectionRow.embedder)).tuples().all()) == {
                "old": torch_name, "new": int8_name}
            keys = {row.id: set(session.scalars(select(ChunkRow.embed_key).join(DocumentRow)
                                                .where(DocumentRow.collection_id == row.id)))
                    for row in session.scalars(select(CollectionRow))}
            session.execute(update(CollectionRow).where(CollectionRow.name == "old").values(embedder=None))
            session.commit()
        texts = ["# Guide\n\nIntro to the guide.", "## Install\n\nRun pip install memsvc.", "## Use\n\nCall search."]
        assert keys[new.row_id] == {embedding_key(int8_name, t) for t in texts}
        assert keys[old.row_id] == {embedding_key(torch_name, t) for t in [*texts, "Some notes."]}
    made.clear()
    with Service(Settings(data_dir=tmp_path / "data", embed_backend="openvino-int8")) as service:
        assert service.collection("old").search("notes", k=1, mode="dense")[0].document_id == "notes.md"
        assert list(made) == [torch_name]


def test_preload_makes_the_embedder_of_new_collections_in_the_background_once(tmp_path, tiny_encoder, monkeypatch):
    """What `memsvc serve` does at start (MEMSVC_PRELOAD_MODEL): the embedder is made in a thread, and the
    first collection uses that one (made once)."""
    from retrievers import encoders

    made = []

    def slow_make(name, cache_dir):
        time.sleep(1.0)  # a first int8 build takes minutes
        made.append(name)
        return CountingEncoder(tiny_encoder, name)

    monkeypatch.setattr(encoders, "make_embedder", slow_make)
    with Service(Settings(data_dir=tmp_path / "data", embed_backend="torch")) as service:
        started = time.perf_counter()
        service.collections.preload_encoder()
        assert time.perf_counter() - started < 0.5 and made == []
        col = service.create_collection("docs")  # waits for the one being made
        assert made == ["all-MiniLM-L6-v2"] and col.encoder.name == "all-MiniLM-L6-v2"


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
    ([Document("a\tb", "text")], InvalidInput, "documents[0].document_id"),  # what ingest --prefix let through
    ([Document("x" * 1025, "text")], InvalidInput, "documents[0].document_id"),
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

    from memsvc.api.app import create_app

    app = create_app(Settings(data_dir=tmp_path / "api", api_keys="admin,tenant=t-,reader:ro"),
                     encoder=lambda: tiny_encoder, language_model=talking_llama)
    with TestClient(app, headers={"Authorization": "Bearer admin"}) as http:
        app.state.service.collections.language_model()  # the model the lifespan preloads: ready, ask is never 503
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


def test_ask_answers_loading_while_the_model_loads_at_start(tmp_path, tiny_encoder):
    """The model of ask loads in the background from the server's start; meanwhile ask is 503 model_loading
    with Retry-After (bad input is still 422 first), then it answers. A load that fails is reported once as
    503 backend_unavailable (no Retry-After), and the next ask loads again."""
    from fastapi.testclient import TestClient

    from lm.model import tiny_llama
    from memsvc.api.app import create_app

    started, release, fail = threading.Event(), threading.Event(), [True]

    def slow_model():
        started.set()
        assert release.wait(30)
        if fail.pop() if fail else False:
            raise OSError("no such model file")
        return tiny_llama()

    app = create_app(Settings(data_dir=tmp_path / "api"), encoder=lambda: tiny_encoder, language_model=slow_model)
    with TestClient(app) as http:
        assert started.wait(10)  # loading before any ask
        http.post("/v1/collections", json={"name": "docs"})
        http.post("/v1/collections/docs/documents", json={"documents": [{"id": "a", "text": "Generators yield."}]})
        assert error(http.post("/v1/collections/docs/ask", json={"question": " "}), 422)["field"] == "question"
        loading = http.post("/v1/collections/docs/ask", json={"question": "What yields?", "max_new_tokens": 4})
        assert (loading.status_code, loading.headers["retry-after"]) == (503, "2")
        assert loading.json()["error"]["code"] == "model_loading"
        model = app.state.service.collections.language_model
        release.set()  # the first load fails
        while model.error is None:
            time.sleep(0.01)
        failed = http.post("/v1/collections/docs/ask", json={"question": "What yields?", "max_new_tokens": 4})
        assert (failed.status_code, "retry-after" in failed.headers) == (503, False)
        assert failed.json()["error"] == {"code": "backend_unavailable", "field": "model", "message":
                                          "the language model could not be loaded: OSError: no such model file"}
        assert error(http.post("/v1/collections/docs/ask", json={"question": "What yields?"}), 503)["code"] \
            == "model_loading"  # loading again
        deadline = time.monotonic() + 30
        while not model.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = http.post("/v1/collections/docs/ask", json={"question": "What yields?", "max_new_tokens": 4})
        assert answer.status_code == 200 and answer.json()["citations"][0]["document_id"] == "a"


def test_a_lifespan_that_starts_again_keeps_the_model_of_ask(tmp_path, tiny_encoder):
    """An app whose lifespan ends and starts again (each `with TestClient(app)`; schemathesis's pytest plugin
    after every test) opens a new service on the same data, but keeps the model of ask it loaded: the next
    ask answers 200 at once (before: the new service had a model of its own, not loaded, and ask was 503
    model_loading until it loaded again; with preload off, at the first ask every time)."""
    from fastapi.testclient import TestClient

    from memsvc.api.app import create_app

    loads = []

    def model():
        loads.append(threading.current_thread().name)
        return talking_llama()

    app = create_app(Settings(data_dir=tmp_path / "api", preload_model=False), encoder=lambda: tiny_encoder,
                     language_model=model)
    with TestClient(app) as http:
        first = app.state.service
        http.post("/v1/collections", json={"name": "docs"})
        http.post("/v1/collections/docs/documents", json={"documents": [{"id": "a", "text": "Generators yield."}]})
        assert error(http.post("/v1/collections/docs/ask", json={"question": "What yields?"}), 503)["code"] \
            == "model_loading"  # preload off: the first ask starts the load
        first.collections.language_model()  # wait for it
    assert not hasattr(app.state, "service")  # a stopped app has no service to reach
    with TestClient(app) as http:
        assert app.state.service is not first  # a new one, the first is closed
        assert app.state.service.collections.language_model.ready()
        answer = http.post("/v1/collections/docs/ask", json={"question": "What yields?", "max_new_tokens": 4})
        assert answer.status_code == 200 and answer.json()["citations"][0]["document_id"] == "a"
    assert loads == ["memsvc-load-model"]  # made once, in the background, for both lifespans


def test_ask_stops_decoding_when_the_client_disconnects(tmp_path, tiny_encoder):
    """A client that gives up (its timeout) ends the server's decoding within a token or two, and the server
    then shuts down at once (before: it decoded all max_new_tokens for nobody)."""
    import uvicorn
    from conftest import free_port

    from lm.model import tiny_llama
    from memsvc.api.app import create_app

    model, tokenizer = tiny_llama()
    word, steps = tokenizer(" yes").input_ids[-1], []

    def slow_step(module, args, output):  # 20 ms a token, each one " yes" (a piece, never an end of sequence)
        steps.append(time.monotonic())
        output.logits.fill_(0.0)
        output.logits[..., word] = 1.0
        time.sleep(0.02)

    model.register_forward_hook(slow_step)
    app = create_app(Settings(data_dir=tmp_path / "api"), encoder=lambda: tiny_encoder,
                     language_model=lambda: (model, tokenizer))
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        with MemoryClient(url, long_timeout=1.0) as client:
            while not server.started:
                time.sleep(0.05)
            client.create_collection("docs").add_documents([Document("a", "Generators yield values.")])
            while not app.state.service.collections.language_model.ready():
                time.sleep(0.05)
            with pytest.raises(ServerUnavailable, match="did not answer within 1 s"):
                client.collection("docs").ask("What yields?", k=1, max_new_tokens=1024)
        gone = time.monotonic()
        assert len(steps) > 10 and steps[-1] > gone - 0.1  # it was decoding when the client left
        time.sleep(1.0)
        assert steps[-1] < gone + 0.5 and len(steps) < 200  # and stopped soon after (1024 tokens: >20 s)
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()


def test_async_client_collection_round_trip(tmp_path, tiny_encoder):
    """AsyncMemoryClient has the collection calls of MemoryClient (create, upsert, search, ask, stats, delete)."""
    import asyncio

    from lm.model import tiny_llama
    from memsvc.api.app import create_app
    from memsvc.client import AsyncMemoryClient

    app = create_app(Settings(data_dir=tmp_path / "api"), encoder=lambda: tiny_encoder, language_model=tiny_llama)

    async def main():
        async with app.router.lifespan_context(app), \
                AsyncMemoryClient("http://memsvc", transport=httpx.ASGITransport(app)) as client:
            col = await client.create_collection("docs")
            assert (await col.add_documents(docs())).added == list(DOCS)
            assert (await col.upsert(docs())).unchanged == list(DOCS)
            assert await client.list_collections() == ["docs"]
            assert await col.stats() == CollectionStats("docs", documents=3, chunks=3)
            hit = (await col.search("walrus operator", k=1, mode="bm25"))[0]
            assert (hit.document_id, hit.metadata) == ("c.txt", {"source": "c.txt"})
            while not app.state.service.collections.language_model.ready():
                await asyncio.sleep(0.05)
            answer = await (await client.collection("docs")).ask("What is a generator?", k=2, max_new_tokens=4)
            assert [c.n for c in answer.citations] == [1, 2]
            await col.delete("c.txt")
            assert (await col.stats()).documents == 2
            await client.delete_collection("docs")
            with pytest.raises(NotFound):
                await client.collection("docs")

    asyncio.run(main())


def test_rest_search_by_document_equals_the_embedded_one(api, open_service):
    """group_by/score travel through REST and RemoteCollection and answer as the embedded collection does."""
    http, client = api
    remote, local = client.create_collection("bydoc"), open_service().create_collection("bydoc")
    for col in (remote, local):
        col.upsert([Document("guide.md", GUIDE.replace("Call search.", "Call pip search.")), *docs()])
    for options in ({"group_by": "document"}, {"group_by": "document", "score": "sum"}, {}):
        assert remote.search("pip install", k=10, mode="bm25", **options) == \
            local.search("pip install", k=10, mode="bm25", **options)
    assert [h.document_id for h in remote.search("pip install", k=10, mode="bm25", group_by="document")] == \
        ["guide.md"]
    bad = http.post("/v1/collections/bydoc/search", json={"query": "pip", "group_by": "section"})
    assert error(bad, 422)["field"] == "group_by"


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


LONE = "abc \ud800 def"  # a lone UTF-16 surrogate (issue 12 #4): a JSON escape carries it, UTF-8 cannot


def test_lone_surrogates_are_422_in_every_collection_route(api):
    """Every string field of every collection route, and the same text in-process: 422 / InvalidInput
    naming the field (before: 500 for a document's text and a search's query); nothing is stored."""
    http, client = api
    client.create_collection("docs").add_documents(docs())
    requests = {  # path, body, field
        "create name": ("", {"name": LONE}, "name"),
        "document text": ("/docs/documents", {"documents": [{"id": "a.md", "text": "new"}, {"id": "x", "text": LONE}]},
                          "documents.1.text"),
        "document id": ("/docs/documents", {"documents": [{"id": LONE, "text": "fine"}]}, "documents.0.id"),
        "metadata value": ("/docs/documents", {"documents": [{"id": "x", "text": "t", "metadata": {"k": [LONE]}}]},
                           "documents.0.metadata"),
        "metadata key": ("/docs/documents", {"documents": [{"id": "x", "text": "t", "metadata": {LONE: 1}}]},
                         "documents.0.metadata"),
        "search query": ("/docs/search", {"query": "fruit \ud800"}, "query"),
        "search mode": ("/docs/search", {"query": "fruit", "mode": LONE}, "mode"),  # pydantic's Literal check
        "ask question": ("/docs/ask", {"question": LONE, "k": 1}, "question"),
    }
    for case, (path, body, field) in requests.items():
        response = http.post(f"/v1/collections{path}", content=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
        err = error(response, 422)
        assert (err["code"], err["field"]) == ("invalid_input", field), case
        why = "unable to parse raw data as a unicode string" if field == "mode" else "lone UTF-16 surrogate (U+D800"
        assert why in err["message"], case
    assert error(http.delete("/v1/collections/docs/documents/%ED%A0%80"), 404)["field"] == "document_id"
    assert http.get("/v1/collections").json() == {"collections": ["docs"]}
    assert http.get("/v1/collections/docs").json() == {"name": "docs", "documents": 3, "chunks": 3}

    local = client.http.app.state.service.collection("docs")
    calls = {"documents[0].text": lambda: local.upsert([Document("x", LONE)]),
             "query": lambda: local.search("fruit \ud800", k=3, mode="dense"),
             "question": lambda: local.ask(LONE, k=1, max_new_tokens=1)}
    for field, call in calls.items():
        with pytest.raises(InvalidInput, match="lone UTF-16 surrogate") as info:
            call()
        assert info.value.field == field
    assert local.stats() == CollectionStats("docs", documents=3, chunks=3)


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


def sse_events(response) -> list[tuple[str, dict]]:
    """(event, data) of a text/event-stream body, parsed by hand (the client reads with `wire.read_sse`)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    events = []
    for block in response.text.split("\n\n")[:-1]:
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


ASK = {"question": "What is a generator?", "k": 2, "max_new_tokens": 8}


def test_server_sent_events_read_as_the_whatwg_format_says():
    from memsvc.contract.wire import read_sse, sse_event

    body = sse_event("token", b'{"text": "a"}') + b": a comment\n\nevent: done\ndata: 1\ndata:2\n\ndata: x\n\nevent: cut"
    assert list(read_sse(body.decode().split("\n"))) == [("token", '{"text": "a"}'), ("done", "1\n2"),
                                                          ("message", "x")]  # an event never ended is dropped


def test_rest_ask_streams_server_sent_events(api):
    http, client = api
    col = client.create_collection("docs")
    col.add_documents(docs())
    whole = http.post("/v1/collections/docs/ask", json=ASK)
    assert whole.headers["content-type"] == "application/json"
    for streamed in (http.post("/v1/collections/docs/ask", json={**ASK, "stream": True}),
                     http.post("/v1/collections/docs/ask", json=ASK, headers={"Accept": "text/event-stream"})):
        events = sse_events(streamed)
        assert [name for name, _ in events] == ["token"] * (len(events) - 1) + ["done"]
        assert events[0][1] == {"text": "Rog"}  # the talking model's first word, its leading space dropped
        assert events[-1][1] == whole.json()  # done: the JSON answer
        assert "".join(data["text"] for _, data in events[:-1]) == whole.json()["answer"]

    with col.ask_stream("What is a generator?", k=2, max_new_tokens=8) as stream:  # the client
        pieces = list(stream)
    local = client.http.app.state.service.collection("docs").ask_stream("What is a generator?", 2, 8)
    assert pieces == list(local) and len(pieces) == 8
    assert stream.result() == local.result() == col.ask("What is a generator?", k=2, max_new_tokens=8)


@pytest.mark.parametrize("k, max_new_tokens, message, field", [
    (0, 256, "k: Input should be greater than 0", "k"),
    (21, 256, "k: Input should be less than or equal to 20", "k"),
    (4, 0, "max_new_tokens: Input should be greater than 0", "max_new_tokens"),
    (4, 1025, "max_new_tokens: Input should be less than or equal to 1024", "max_new_tokens"),
])
def test_ask_numbers_are_one_rule_on_every_face(api, open_service, monkeypatch, k, max_new_tokens, message, field):
    """An ask's k and max_new_tokens: the REST API refused k 21 with 422 while the embedded `Collection.ask` loaded
    the model first and then took it (k up to 2048, any max_new_tokens). Now one rule (`check_ask`), the same
    error on every face, before a model loads or a request goes."""
    http, client = api
    client.create_collection("docs").add_documents(docs())
    body = {"question": "what is a generator?", "k": k, "max_new_tokens": max_new_tokens}
    assert error(http.post("/v1/collections/docs/ask", json=body), 422) == {
        "code": "invalid_input", "message": message, "field": field}
    sent = []
    monkeypatch.setattr(client.http, "send", lambda *args, **kwargs: sent.append(args))
    embedded = open_service().create_collection("docs")
    monkeypatch.setattr(embedded, "_language_model", lambda: pytest.fail("the model loaded"))
    for face in (RemoteCollection(client, "docs"), embedded):
        for call in (face.ask, face.ask_stream):
            with pytest.raises(InvalidInput) as info:
                call("what is a generator?", k=k, max_new_tokens=max_new_tokens)
            assert (info.value.message, info.value.field) == (message, field), (face, call)
    assert sent == []


def test_rest_ask_stream_errors(api):
    """Bad input is a JSON error before any event; a failure while decoding is an `error` event, which the
    client raises as its memsvc error."""
    http, client = api
    col = client.create_collection("docs")
    col.add_documents(docs())
    assert error(http.post("/v1/collections/docs/ask", json={**ASK, "question": " ", "stream": True}), 422)["field"] \
        == "question"
    assert error(http.post("/v1/collections/nope/ask", json={**ASK, "stream": True}), 404)["field"] == "name"
    with pytest.raises(InvalidInput) as info:
        col.ask_stream("x", k=0)
    assert info.value.field == "k"
    with pytest.raises(NotFound):
        RemoteCollection(client, "nope").ask_stream("x")

    model, _ = client.http.app.state.service.collections._language_model()
    calls = []

    def fail_on_the_fourth(*_):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the model broke")

    hook = model.register_forward_hook(fail_on_the_fourth)
    try:
        events = sse_events(http.post("/v1/collections/docs/ask", json={**ASK, "stream": True}))
        assert [name for name, _ in events] == ["token", "token", "token", "error"]
        assert events[-1][1] == {"error": {"code": "internal_error", "message": "internal server error (RuntimeError)"}}
        calls.clear()
        stream = col.ask_stream("What is a generator?", k=2, max_new_tokens=8)
        with pytest.raises(MemsvcError, match="internal server error"):
            list(stream)
    finally:
        hook.remove()


@pytest.fixture
def live(tmp_path, tiny_encoder):
    """The app (tiny encoder, talking tiny LM) served by uvicorn in a thread of this process, so a test can
    hold the server's model while it reads the stream; (url, app)."""
    import uvicorn
    from conftest import free_port

    from memsvc.api.app import create_app

    app = create_app(Settings(data_dir=tmp_path / "live"), encoder=lambda: tiny_encoder, language_model=talking_llama)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    app.state.service.collections.language_model()  # preloaded at start: wait for it, ask is never 503
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(30)


def forward_calls(app, on_call=None) -> tuple[list[int], object]:
    """Count the server's LM forward passes (calling `on_call(n)` on each); (counts, hook handle)."""
    model, _ = app.state.service.collections._language_model()
    calls: list[int] = []

    def hook(*_):
        calls.append(1)
        if on_call is not None:
            on_call(len(calls))

    return calls, model.register_forward_hook(hook)


def test_ask_stream_pieces_arrive_as_they_decode_and_closing_stops_decoding(live):
    url, app = live
    question = "What is a generator?"
    with MemoryClient(url) as client:
        col = client.create_collection("docs")
        col.add_documents(docs())
        whole = col.ask(question, k=2, max_new_tokens=8)
        release, released = threading.Event(), []
        # the server holds after its 4th forward pass (the 4th token) until the client has read 3 pieces
        calls, hook = forward_calls(app, lambda n: n == 4 and released.append(release.wait(10)))
        try:
            with col.ask_stream(question, k=2, max_new_tokens=8) as stream:
                pieces = iter(stream)
                first = [next(pieces) for _ in range(3)]
                release.set()
                rest = list(pieces)
            assert released == [True]  # not a timeout: the 3 pieces came while the server was held
            assert "".join(first + rest) == whole.answer and stream.result() == whole

            calls.clear()
            with col.ask_stream(question, k=2, max_new_tokens=1000) as stream:
                next(iter(stream))
            counted, deadline = -1, time.monotonic() + 30
            while counted != len(calls) and time.monotonic() < deadline:  # until the server stops decoding
                counted = len(calls)
                time.sleep(0.5)
            assert counted < 200  # it stopped soon after the client went away, far before 1000 tokens
        finally:
            hook.remove()


def test_cli_ask_prints_the_answer_as_it_decodes(live, tmp_path, tiny_encoder, monkeypatch):
    """`memsvc ask` prints the pieces, then the passages; --json one object. Through a server (--url) and
    embedded (the service's embedder and model replaced by the tiny ones)."""
    url, app = live
    question = "What is a generator?"
    with MemoryClient(url) as client:
        client.create_collection("docs").add_documents(docs())
    data_dir = tmp_path / "embedded"
    with Service(Settings(data_dir=data_dir), encoder=lambda: tiny_encoder) as service:
        service.create_collection("docs").add_documents(docs())
    monkeypatch.setattr("retrievers.encoders.make_embedder", lambda name, cache_dir: tiny_encoder)
    monkeypatch.setattr("memsvc.service.load_language_model", lambda settings: talking_llama())
    expected = app.state.service.collection("docs").ask(question, 2, 8)
    for where in (("--url", url), ("--data-dir", str(data_dir))):
        args = ("ask", question, "--collection", "docs", "--k", "2", "--max-new-tokens", "8", *where)
        printed = run_cli(*args)
        assert printed.exit_code == 0, printed.output
        chunk_ids = [c.chunk_id for c in expected.citations]
        assert printed.stdout == f"{expected.answer}\n[1]  {chunk_ids[0]}\n[2]  {chunk_ids[1]}\n"
        as_json = run_cli(*args, "--json")
        assert json.loads(as_json.stdout)["answer"] == expected.answer and as_json.stdout.count("\n") == 1
        for run in (printed, as_json):  # the wait for the first token is shown on stderr, not stdout
            assert "ask: waiting for the first token (a first ask loads the model): 00:0" in run.stderr


# --- through a running server (the real embedder; ask loads SmolLM2 in the server) -----------------

LIBRARY = Path("/usr/share/doc/python3.11/html/_sources/library")
SMALL_DOCS = ("copy.rst.txt", "fnmatch.rst.txt", "atexit.rst.txt", "tomllib.rst.txt")


def run_cli(*args: str):
    from typer.testing import CliRunner

    from memsvc.cli.commands import app

    return CliRunner().invoke(app, list(args))


def test_cli_ask_rejects_an_unknown_device_before_opening_the_store(tmp_path):
    result = run_cli("ask", "a question", "-c", "docs", "--device", "tpu", "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.stderr
    assert not (tmp_path / "data").exists()


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

        # printed as it decodes, then the passages (that this equals --json's answer: the tiny-model CLI test)
        streamed = run_cli("ask", "Which function of the atexit module registers a function to be called at "
                           "interpreter exit?", "--k", "2", "--max-new-tokens", "48", *url)
        assert streamed.exit_code == 0, streamed.output
        *answer, first, second = streamed.stdout.splitlines()
        assert "register" in "\n".join(answer)
        assert first.startswith("[1]") and first[4:].startswith(" lib/atexit.rst.txt#") and second.startswith("[2]")

        server.kill()
        server.start()
        after = run_cli("search", "shallow and deep copy operations", "--mode", "hybrid", "--k", "3", "--json", *url)
        assert json.loads(after.stdout)["hits"] == hits


@pytest.mark.slow
def test_sigkill_during_ingestion_leaves_nothing_half_ingested(tmp_path):
    """Kill the server while batches of documents are being embedded and stored; after a restart every
    document is whole (its chunks in SQL, exactly its vectors in the memory) or absent."""
    # documents of 300 one-line sections (a chunk each): embedding them is quick, while publishing an upsert's
    # 1,200 chunk rows takes long enough that a poll sees its vectors stored and its rows not yet committed
    documents = [Document(f"doc-{i}.md", "\n\n".join(f"# Part {j}\n\nNote {j} of document {i}." for j in range(300)))
                 for i in range(22)]
    with ServerProcess(tmp_path / "data") as server, MemoryClient(server.url, timeout=600) as client:
        col = client.create_collection("py")
        col.upsert(documents[:2])
        failures: list[Exception] = []

        def ingest() -> None:
            try:
                for start in range(2, len(documents), 4):
                    col.upsert(documents[start:start + 4])
            except ServerUnavailable as exc:  # the server dies under it
                failures.append(exc)

        writer = threading.Thread(target=ingest)
        writer.start()
        vectors, chunks = 0, 0
        while writer.is_alive() and vectors <= chunks:  # until vectors exist that no committed document has
            time.sleep(0.01)
            chunks = col.stats().chunks  # committed rows first, then vectors: more vectors = an upsert in flight
            vectors = client.memory("col.py").stats().count
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


# --- `memsvc ingest`: one document id per file (issue 12 #2) ------------------------------------

def notes_dirs(root: Path) -> tuple[Path, Path]:
    """The issue's input: a/notes.txt and b/notes.txt, and a/docs/README.md, b/docs/README.md."""
    for name, fact in (("a", "Alpha: the deploy password rotates every Monday."), ("b", "Beta: lunch is at noon.")):
        (root / name / "docs").mkdir(parents=True)
        (root / name / "notes.txt").write_text(fact + "\n")
        (root / name / "docs" / "README.md").write_text(f"# {name}\n\n{fact}\n")
    return root / "a", root / "b"


@pytest.mark.parametrize("inputs, document_id", [(("a/notes.txt", "b/notes.txt"), "notes.txt"),
                                                 (("a", "b"), "docs/README.md")])
def test_cli_ingest_refuses_two_files_for_one_id_before_writing(tmp_path, inputs, document_id):
    """Two files that would be one document are an error naming both, exit 2, with --url and embedded;
    nothing is created (the embedded store's directory does not even appear, no server is reached)."""
    notes_dirs(tmp_path)
    paths = [str(tmp_path / p) for p in inputs]
    first, second = (tmp_path / p / "docs/README.md" if (tmp_path / p).is_dir() else tmp_path / p for p in inputs)
    for where in (("--url", "http://127.0.0.1:9"), ("--data-dir", str(tmp_path / "data"))):
        result = run_cli("ingest", *paths, "--collection", "c", *where)
        assert result.exit_code == 2, result.output
        assert result.stderr == (f"error: {first} and {second} would both be document {document_id!r}: ingest them "
                                 "in separate calls with different --prefix values (e.g. --prefix a/), or name "
                                 "documents by their paths (--id-from path)\n")
        assert result.stdout == ""
    assert not (tmp_path / "data").exists()


def test_ingest_ids_same_file_twice_prefix_and_paths(tmp_path, monkeypatch):
    from memsvc.cli.commands import ingest_files

    a, b = notes_dirs(tmp_path)
    monkeypatch.chdir(tmp_path)
    names = lambda found: [(i, p.relative_to(tmp_path).as_posix() if p.is_absolute() else p.as_posix())
                           for i, p in found]
    # one file given twice, or again inside its directory under the same id: one document
    assert names(ingest_files([a / "notes.txt", a / "notes.txt", a, Path("a/notes.txt")])) == [
        ("notes.txt", "a/notes.txt"), ("docs/README.md", "a/docs/README.md")]
    # the same file under two different ids is two documents (the caller asked for both)
    assert [i for i, _ in ingest_files([a, a / "docs/README.md"])] == ["docs/README.md", "notes.txt", "README.md"]
    assert names(ingest_files([Path("a/notes.txt"), Path("b/notes.txt")], id_from="path")) == [
        ("a/notes.txt", "a/notes.txt"), ("b/notes.txt", "b/notes.txt")]
    assert [i for i, _ in ingest_files([Path("a"), Path("./b")], id_from="path")] == [
        "a/docs/README.md", "a/notes.txt", "b/docs/README.md", "b/notes.txt"]
    assert [i for i, _ in ingest_files([a], prefix="team-a/")] == ["team-a/docs/README.md", "team-a/notes.txt"]
    with pytest.raises(InvalidInput, match="would both be document 'x/notes.txt'") as info:
        ingest_files([a / "notes.txt", b / "notes.txt"], prefix="x/")
    assert info.value.field == "paths"
    with pytest.raises(NotFound, match="no such file or directory"):
        ingest_files([a, tmp_path / "missing"])


def test_ingest_ids_follow_the_upsert_rule_before_anything_is_read(tmp_path):
    """`ingest --prefix` took ids with control characters and ids past the limit (each document then refused by
    the upsert, one by one, after the collection was made and the embedder loaded): every id ingest would build
    is checked with the rule every upsert applies (`check_document_id`), before anything is read."""
    from memsvc.cli.commands import ingest_files
    from memsvc.contract import MAX_DOCUMENT_ID, check_document_id

    assert MAX_DOCUMENT_ID == 1024
    for good in ("a b.txt", "x" * 1024, "docs/ü ñ.md", "#1"):
        assert check_document_id(good) == good
    for bad in ("", "a\tb", "a\nb", "a\x1bb", "x" * 1025, 7, None):
        with pytest.raises(InvalidInput) as info:
            check_document_id(bad, "documents[0].id")
        assert (info.value.message, info.value.field) == (
            "document_id must be a printable string of 1..1024 characters", "documents[0].id")
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    rule = "document ids are printable strings of 1..1024 characters"
    assert ingest_files([doc], prefix="my docs/") == [("my docs/doc.txt", doc)]  # spaces are printable
    assert ingest_files([doc], prefix="p" * 1017) == [("p" * 1017 + "doc.txt", doc)]  # exactly 1024
    for prefix, message, field in [
        ("a\tb/", f"--prefix 'a\\tb/' has the unprintable character '\\t'; {rule}", "prefix"),
        ("a\nb/", f"--prefix 'a\\nb/' has the unprintable character '\\n'; {rule}", "prefix"),
        ("\x1b[31m", f"--prefix '\\x1b[31m' has the unprintable character '\\x1b'; {rule}", "prefix"),
        ("p" * 1024, f"--prefix has 1024 characters, leaving no room for a file name; {rule}", "prefix"),
        ("p" * 1018, f"{doc} would be document {'p' * 60!r}..., which has 1025 characters; {rule}", "paths"),
    ]:
        with pytest.raises(InvalidInput) as info:
            ingest_files([doc], prefix=prefix)
        assert (info.value.message, info.value.field) == (message, field), prefix
    tabbed = tmp_path / "dir" / "sub" / "tab\tname.txt"
    tabbed.parent.mkdir(parents=True)
    tabbed.write_text("hello")
    (tmp_path / "dir" / "fine.txt").write_text("hello")
    with pytest.raises(InvalidInput) as info:  # a file's own name, not only the prefix
        ingest_files([tmp_path / "dir"])
    assert (info.value.message, info.value.field) == (
        (f"{str(tabbed)!r} would be document 'sub/tab\\tname.txt', which has the unprintable character '\\t'; "
         f"{rule}"), "paths")


def test_cli_ingest_by_path_keeps_both_notes(tmp_path, monkeypatch, tiny_encoder):
    """The issue's input ingested with --id-from path: two documents, each searchable with its own text
    (the embedded store, with the tiny encoder)."""
    notes_dirs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("memsvc.connect.connect", lambda url, data_dir, *args: Service(
        Settings(data_dir=data_dir), encoder=lambda: tiny_encoder))
    result = run_cli("ingest", "a/notes.txt", "b/notes.txt", "--collection", "c", "--id-from", "path",
                     "--data-dir", "data")
    assert result.exit_code == 0, result.output
    assert result.stdout == "2 added, 0 updated, 0 unchanged, 0 skipped, 2 chunks\n"
    with Service(Settings(data_dir=tmp_path / "data"), encoder=lambda: tiny_encoder) as service:
        col = service.collection("c")
        assert col.stats() == CollectionStats("c", documents=2, chunks=2)
        hit = col.search("deploy password Monday", k=1, mode="bm25")[0]
        assert (hit.document_id, hit.text) == ("a/notes.txt", "Alpha: the deploy password rotates every Monday.")
        assert col.search("lunch noon", k=1, mode="bm25")[0].document_id == "b/notes.txt"


# --- readers never see a mix of two versions of a document (issue 12 #3) -------------------------

SECTIONS = 60  # one chunk each
QUERIES = ("section 7 ferns", "section 30 zebra")
MODES = ("bm25", "dense", "hybrid")


def big_document(version: int) -> Document:
    """A long Markdown document (one chunk per section); version 2 rewrites section 30 only."""
    def body(i: int) -> str:
        if i == 30:
            return f"Section {i} zebra {'stripes rotate on Mondays' if version == 1 else 'deploy password notes'}."
        return f"Section {i} talks about ferns number {i} and item {i * 7 % 13} of the catalogue."
    text = "\n\n".join(f"## Part {i}\n\n{body(i)}" for i in range(SECTIONS))
    return Document("big.md", text, {"version": version})


def searches(col, ask: bool = False) -> dict[tuple[str, str], list]:
    """Every query's top 5 in every mode (and, with `ask`, the passages `ask` cites for the second)."""
    answers = {(query, mode): col.search(query, k=5, mode=mode) for query in QUERIES for mode in MODES}
    if ask:
        answers[(QUERIES[1], "ask")] = col.ask(QUERIES[1], k=5, max_new_tokens=1).citations
    return answers


class Reader(threading.Thread):
    """Searches the collection (every query and mode) in rounds, every 50 ms and whenever the writer asks
    (`pause`: the writer waits for it to finish a whole round), until `done`; keeps every answer."""

    def __init__(self, col, ask: bool = False, limit: int = 200):
        super().__init__()
        self.col, self.ask, self.limit, self.seen, self.started = col, ask, limit, [], 0
        self.state = threading.Condition()
        self.waiting, self.stop = 0, False

    def run(self) -> None:
        while True:
            with self.state:
                self.started += 1
            answer = searches(self.col, self.ask)
            with self.state:
                self.seen.append(answer)
                self.state.notify_all()
                self.state.wait_for(lambda: self.stop or self.waiting, 0.05)
                if self.stop or len(self.seen) >= self.limit:
                    return

    def pause(self, timeout: float) -> None:
        """Until a round that began after this call has ended, or `timeout` s."""
        with self.state:
            start, self.waiting = self.started, self.waiting + 1
            self.state.notify_all()
            self.state.wait_for(lambda: len(self.seen) > start, timeout)
            self.waiting -= 1

    def done(self) -> None:
        with self.state:
            self.stop = True
            self.state.notify_all()
        self.join()


def paused(reader: Reader, step, before: bool, after: bool, timeout: float):
    def wrapped(*args, **kwargs):
        if before:
            reader.pause(timeout)
        result = step(*args, **kwargs)
        if after:
            reader.pause(timeout)
        return result
    return wrapped


def changes_seen_by_a_reader(col, change, reader_col=None, ask: bool = False) -> tuple[dict, dict, list]:
    """The answers before `change()`, after it, and every answer of a concurrent reader (of `reader_col`,
    e.g. the collection over REST, by default `col`), whom the change lets search between each two of its
    steps: storing the new vectors, committing SQL, publishing the vector ids, changing BM25, deleting the
    replaced vectors."""
    reader_col = reader_col or col
    before, reader = searches(reader_col, ask), Reader(reader_col, ask)
    inside = 0.1  # a step under the collection's write lock: the reader waits for it, the writer briefly
    steps = {(col.dense, "store"): (False, True, 10), (col.dense, "publish"): (True, False, inside),
             (col.bm25, "add"): (True, False, inside), (col.bm25, "remove"): (True, False, inside),
             (col.memory, "delete"): (True, True, 10)}
    for (owner, name), sides in steps.items():
        setattr(owner, name, paused(reader, getattr(owner, name), *sides))
    reader.start()
    try:
        change()
    finally:
        reader.done()
        for owner, name in steps:
            delattr(owner, name)
    return before, searches(reader_col, ask), reader.seen


def test_readers_see_one_version_during_upsert_and_delete(open_service):
    """Replace a 60-chunk document whose new version changes one section, then delete it, while another
    thread searches in every mode: each answer is exactly the answer before or after the change (no chunk
    twice, no chunk of the other version, none missing)."""
    col = open_service().create_collection("docs")
    col.upsert([big_document(1), Document("other.md", "Deploy password notes live in the wiki.")])
    assert col.stats().chunks == SECTIONS + 1
    answers = []
    for change in (lambda: col.upsert([big_document(2)]), lambda: col.delete("big.md")):
        before, after, seen = changes_seen_by_a_reader(col, change)
        assert before != after and len(seen) >= 2
        for answer in seen:
            for key, hits in answer.items():
                assert hits in (before[key], after[key]), (key, [h.chunk_id for h in hits])
        answers.append((before, after, len(seen)))
    print("rounds read during the upsert and the delete:", [n for *_, n in answers])
    (v1, v2, _), (_, deleted, _) = answers
    assert [h.metadata for h in v1[("section 30 zebra", "bm25")]][:1] == [{"version": 1}]
    new = v2[("section 30 zebra", "bm25")][0]
    assert (new.chunk_id.split("-")[0], new.metadata, new.text) == (
        "big.md#30", {"version": 2}, "## Part 30\n\nSection 30 zebra deploy password notes.")
    assert all(len(hits) == 5 for key, hits in v2.items())
    assert [h.document_id for h in deleted[("section 30 zebra", "dense")]] == ["other.md"]
    assert deleted[("section 30 zebra", "bm25")] == []


def test_rest_readers_and_ask_see_one_version_during_upsert_and_delete(api):
    """The same over REST: searches in every mode and `ask`'s passages, while the document is replaced
    and then deleted through the API."""
    _, client = api
    col = client.create_collection("docs")
    col.upsert([big_document(1), Document("other.md", "Deploy password notes live in the wiki.")])
    local = client.http.app.state.service.collection("docs")
    searches(col, ask=True)  # loads the language model
    for change in (lambda: col.upsert([big_document(2)]), lambda: col.delete("big.md")):
        before, after, seen = changes_seen_by_a_reader(local, change, reader_col=col, ask=True)
        assert before != after and len(seen) >= 2
        for answer in seen:
            for key, hits in answer.items():
                assert hits in (before[key], after[key]), (key, [h.chunk_id for h in hits])
        for answers in (before, after):
            passages = [(c.chunk_id, c.score) for c in answers[(QUERIES[1], "ask")]]
            assert passages == [(h.chunk_id, h.score) for h in answers[(QUERIES[1], "hybrid")]]
