"""The SQL catalog on SQLite and PostgreSQL: round trips, typed errors, migrations, races."""
from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import event, inspect, make_url, select, text
from sqlalchemy.exc import OperationalError

from memsvc.api.errors import http_status
from memsvc.contract import AlreadyExists, InvalidInput, MemorySpec, NotFound
from memsvc.db import Catalog
from memsvc.db.engine import alembic_config, make_engine, upgrade
from memsvc.db.models import Base, MemoryRow

POSTGRES_URL = os.environ.get("MEMSVC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    schema = f"test_catalog_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as e:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}: {e.orig}")
    try:
        yield make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"}) \
            .render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def catalog(url):
    cat = Catalog(url)
    yield cat
    cat.close()


def spec(name: str, dim: int = 16, **kw) -> MemorySpec:
    return MemorySpec(name=name, dim=dim, **kw)


def test_round_trip(catalog):
    specs = [
        spec("ds", dim=576, value_kind="token", index="ivfpq", nlist=256, pq_m=48, train_size=4096,
             nprobe=8, metadata={"knnlm": {"lam": 0.25, "temp": 1.0, "k": 32}, "note": "ünïcode"}),
        spec("B-attn", metric="ip", value_kind="vector", value_dim=64, index="hnsw", hnsw_m=16, ef_search=64),
        spec("a.rag", metric="cosine"),
    ]
    for s in specs:
        catalog.create_memory(s)
    for s in specs:
        assert catalog.get_memory(s.name) == s
    assert catalog.list_memories() == sorted(specs, key=lambda s: s.name)
    assert [s.name for s in catalog.list_memories()] == ["B-attn", "a.rag", "ds"]

    updated = catalog.update_metadata("a.rag", {"owner": "lm", "tags": ["x", "y"]})
    assert updated == specs[2].model_copy(update={"metadata": {"owner": "lm", "tags": ["x", "y"]}})
    assert catalog.get_memory("a.rag") == updated
    assert catalog.update_metadata("a.rag", {}).metadata == {}

    catalog.delete_memory("ds")
    assert [s.name for s in catalog.list_memories()] == ["B-attn", "a.rag"]
    with pytest.raises(NotFound):
        catalog.get_memory("ds")


def test_rows_hold_real_columns_and_timestamps(catalog):
    catalog.create_memory(spec("m", dim=32, metric="ip", index="hnsw", metadata={"a": 1}))
    with catalog.engine.connect() as conn:
        row = conn.execute(select(MemoryRow.__table__)).one()._asdict()
    assert (row["name"], row["dim"], row["metric"], row["value_kind"], row["value_dim"], row["index_kind"]) \
        == ("m", 32, "ip", "none", None, "hnsw")
    assert row["index_params"]["hnsw_m"] == 32 and row["metadata"] == {"a": 1}
    assert row["created_at"] is not None and row["updated_at"] >= row["created_at"]


def test_duplicate_name_is_already_exists(catalog):
    catalog.create_memory(spec("dup", metadata={"first": True}))
    with pytest.raises(AlreadyExists) as e:
        catalog.create_memory(spec("dup", dim=8))
    assert e.value.field == "name" and http_status(e.value) == 409
    assert catalog.get_memory("dup") == spec("dup", metadata={"first": True})


def test_missing_name_is_not_found(catalog):
    catalog.create_memory(spec("here"))
    for call in (lambda: catalog.get_memory("gone"), lambda: catalog.delete_memory("gone"),
                 lambda: catalog.update_metadata("gone", {"a": 1})):
        with pytest.raises(NotFound) as e:
            call()
        assert e.value.field == "name" and http_status(e.value) == 404 and "gone" in e.value.message
    assert [s.name for s in catalog.list_memories()] == ["here"]


@pytest.mark.parametrize("metadata", [{"x": float("nan")}, {"x": {1, 2}}, {"x": object()}, ["not", "a", "dict"]])
def test_metadata_that_is_not_json_is_refused_and_nothing_changes(catalog, metadata):
    catalog.create_memory(spec("m", metadata={"keep": 1}))
    with pytest.raises(InvalidInput) as e:
        catalog.update_metadata("m", metadata)
    assert e.value.field == "metadata"
    if isinstance(metadata, dict):
        with pytest.raises(ValidationError):  # the spec itself refuses it: no catalog ever sees it
            spec("other", metadata=metadata)
    assert catalog.list_memories() == [spec("m", metadata={"keep": 1})]


def test_reopening_keeps_data_and_upgrade_is_a_no_op(url):
    first = Catalog(url)
    first.create_memory(spec("kept", metadata={"v": 1}))
    first.close()

    engine = make_engine(url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    upgrade(engine)
    changes = [s for s in statements if s.lstrip().split()[0].upper() in {"CREATE", "ALTER", "DROP", "INSERT",
                                                                        "UPDATE", "DELETE"}]
    assert changes == []
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == HEAD
    engine.dispose()

    second = Catalog(url)
    assert second.list_memories() == [spec("kept", metadata={"v": 1})]
    second.close()


def test_downgrade_to_base_then_upgrade_to_head(catalog):
    catalog.create_memory(spec("m"))
    with catalog.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    with catalog.engine.connect() as conn:
        assert not inspect(conn).has_table("memories")
        assert MigrationContext.configure(conn).get_current_revision() is None
    upgrade(catalog.engine)
    assert catalog.list_memories() == []
    catalog.create_memory(spec("m"))
    assert catalog.get_memory("m") == spec("m")


def test_models_and_migrations_agree(catalog):
    with catalog.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_sqlite_uses_wal_and_foreign_keys(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'deeper' / 'catalog.db'}")
    with cat.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    cat.close()


def test_racing_creates_of_one_name_let_exactly_one_succeed(catalog):
    threads = 4
    barrier = threading.Barrier(threads)

    def create(i: int) -> str:
        barrier.wait()
        try:
            catalog.create_memory(spec("race", metadata={"winner": i}))
            return "created"
        except AlreadyExists:
            return "exists"

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(create, range(threads)))
    assert sorted(outcomes) == ["created"] + ["exists"] * (threads - 1)
    assert [s.name for s in catalog.list_memories()] == ["race"]
    assert catalog.get_memory("race").metadata["winner"] in range(threads)


def _open_catalog(url: str, barrier) -> None:
    barrier.wait()
    Catalog(url).close()


def test_racing_first_opens_migrate_once(url):
    """Server processes starting together on a fresh database all come up (the migration runs once)."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_open_catalog, args=(url, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cat = Catalog(url)
    cat.create_memory(spec("m"))
    assert cat.get_memory("m") == spec("m")
    cat.close()


def test_catalogs_opened_at_once_in_one_process(url):
    barrier = threading.Barrier(3)

    def open_catalog(_: int) -> Catalog:
        barrier.wait()
        return Catalog(url)

    with ThreadPoolExecutor(3) as pool:
        catalogs = list(pool.map(open_catalog, range(3)))
    catalogs[0].create_memory(spec("m"))
    assert [cat.get_memory("m") for cat in catalogs] == [spec("m")] * 3
    for cat in catalogs:
        cat.close()
