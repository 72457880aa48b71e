"""Engine construction and schema migration for the control-plane store.

One code path for both backends (LIBRARIES.md): SQLAlchemy 2 Core on an async engine, SQLite through
aiosqlite (the default, single control process) and PostgreSQL through asyncpg (several replicas).
Configuration names plain URLs (``sqlite:///var/control.db``, ``postgresql://user@host/db``);
the async driver is chosen here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# How long an SQLite writer waits for another writer's lock before giving up (milliseconds).
# Writers are serialised by the database lock; the wait happens in aiosqlite's thread, not on
# the event loop.
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Arbitrary constant key: serialises `migrate` across control replicas sharing one PostgreSQL.
_PG_MIGRATION_LOCK_KEY = 0x43444E4D  # "CDNM"

_SQLITE_DRIVERS = {"sqlite", "sqlite+aiosqlite"}
_PG_DRIVERS = {"postgresql", "postgres", "postgresql+asyncpg"}


def async_url(url: str) -> URL:
    """Map a configured database URL to its async-driver URL; ValueError if unsupported."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        scheme = url.split(":", 1)[0] if ":" in url else "(none)"
        raise ValueError(
            f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH or postgresql://..."
        ) from None
    if parsed.drivername in _SQLITE_DRIVERS:
        return parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername in _PG_DRIVERS:
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: "
        "use sqlite:///PATH or postgresql://..."
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def engine_for(url: str, *, connect_args: dict[str, Any] | None = None) -> AsyncEngine:
    """An async engine for ``sqlite:///path`` or ``postgresql://...``.

    SQLite: the parent directory of the file is created; every connection runs in WAL mode with
    foreign keys enforced. ``connect_args`` go to the DBAPI driver (e.g. asyncpg
    ``server_settings``).
    """
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        database = target.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(target, connect_args=connect_args or {})
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    return create_async_engine(target, connect_args=connect_args or {}, pool_pre_ping=True)


def alembic_config() -> Config:
    """Alembic configuration built in code (no alembic.ini): just the script location."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


def _upgrade_head(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Two replicas starting together must not both create the tables.
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY}
        )
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (Alembic ``upgrade head``), in one transaction."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_head)


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction for a write: committed when the block ends, rolled back
    when it raises.

    SQLite: the transaction takes the write lock up front (BEGIN IMMEDIATE). The driver's deferred
    BEGIN would read first and then fail, not wait, to upgrade to a write lock once another writer
    had committed in between (SQLITE_BUSY_SNAPSHOT); this way concurrent writers queue on the
    busy timeout instead.
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.exec_driver_sql("ROLLBACK")
                raise
            await conn.exec_driver_sql("COMMIT")
        else:
            async with conn.begin():
                yield conn
