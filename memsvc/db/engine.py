"""Engines and migrations: one way to connect (SQLite or PostgreSQL) and to bring the schema to head."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url

MIGRATIONS = Path(__file__).parent / "migrations"
_ALEMBIC_LOCK = threading.Lock()  # alembic keeps its running context in module globals: one at a time


def make_engine(url: str) -> Engine:
    """An engine for a SQLAlchemy URL. SQLite files get their directory, WAL, foreign keys and real
    transactions (see `_sqlite_connect`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, pool_pre_ping=True)  # a server outlives database restarts
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # sqlite3 would begin transactions only before DML, leaving DDL (migrations) and reads outside them;
    # we switch that off and emit BEGIN ourselves in `_sqlite_begin`.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    _use_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _use_wal(cursor: Any, patience: float = 30.0) -> None:
    """Switch the file to WAL (it stays so). The switch needs the file to itself and SQLite may refuse it
    at once, without its busy timeout, while another process is migrating a fresh database: retry."""
    deadline = time.monotonic() + patience
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock up front: concurrent writers (and concurrent first-time migrations)
    # wait their turn under the busy timeout instead of failing halfway. Catalog transactions are short.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configured in code (no alembic.ini): our migrations, run on `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Migrate the schema to head in one transaction; a no-op when it is already there."""
    with _ALEMBIC_LOCK, engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
