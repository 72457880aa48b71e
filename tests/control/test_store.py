"""The control-plane store foundation: engines, migrations and the change log (both backends)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from control.db import alembic_config, async_url, engine_for, migrate
from control.schema import append_change, change_counter, changes_since, metadata


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _append_committed(engine: AsyncEngine, kind: str, payload: dict[str, object]) -> int:
    async with engine.begin() as conn:
        return await append_change(conn, kind, payload)


# --- engines ------------------------------------------------------------------------------------


def test_engine_for_maps_sqlite_and_postgresql_to_async_drivers() -> None:
    assert async_url("sqlite:///var/control.db").drivername == "sqlite+aiosqlite"
    assert async_url("sqlite:///var/control.db").database == "var/control.db"
    pg = async_url("postgresql://cdn:pw@db.example:5433/control")
    assert pg.drivername == "postgresql+asyncpg"
    assert (pg.host, pg.port, pg.database, pg.username) == ("db.example", 5433, "control", "cdn")


@pytest.mark.parametrize(
    "url", ["mysql://x", "mssql+pyodbc://h/db", "redis://localhost", "nonsense"]
)
def test_engine_for_rejects_other_schemes_with_one_line(url: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        engine_for(url)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "scheme" in message
    assert url.split(":")[0].split("+")[0] in message or "(none)" in message


async def test_sqlite_engine_creates_parent_dir_and_uses_wal_and_foreign_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nested" / "deeper" / "control.db"
    engine = engine_for(f"sqlite:///{path}")
    try:
        assert path.parent.is_dir()
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        await engine.dispose()


# --- migrations ---------------------------------------------------------------------------------


async def test_migrate_from_empty_creates_every_table_and_is_idempotent(
    engine: AsyncEngine,
) -> None:
    assert await _tables(engine) == set()
    await migrate(engine)
    assert await _tables(engine) == {"alembic_version", *metadata.tables}
    async with engine.connect() as conn:
        assert (
            await conn.execute(text("SELECT version_num FROM alembic_version"))
        ).scalar_one() == ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert (await conn.execute(select(change_counter.c.version))).scalars().all() == [0]

    await _append_committed(engine, "purge", {"n": 1})
    await migrate(engine)  # again: no-op, data kept, counter not re-seeded
    assert await _tables(engine) == {"alembic_version", *metadata.tables}
    async with engine.connect() as conn:
        assert (await conn.execute(select(change_counter.c.version))).scalars().all() == [1]
        assert [c.version for c in await changes_since(conn, 0, 10)] == [1]


# --- change log ---------------------------------------------------------------------------------


async def test_append_change_returns_consecutive_versions(db: AsyncEngine) -> None:
    versions = [await _append_committed(db, "domain.upsert", {"i": i}) for i in range(5)]
    assert versions == [1, 2, 3, 4, 5]
    async with db.begin() as conn:  # several appends in one transaction
        assert [await append_change(conn, "purge", {"i": i}) for i in range(3)] == [6, 7, 8]


async def test_concurrent_appenders_get_every_version_once_in_order(db: AsyncEngine) -> None:
    n = 50

    async def writer(i: int) -> int:
        async with db.begin() as conn:
            version = await append_change(conn, "purge", {"writer": i})
            await asyncio.sleep(0)  # let other writers queue up behind the row/database lock
            return version

    versions = await asyncio.gather(*(writer(i) for i in range(n)))
    assert sorted(versions) == list(range(1, n + 1))

    async with db.connect() as conn:
        log = await changes_since(conn, 0, 1000)
        assert [c.version for c in log] == list(range(1, n + 1))
        # each writer's payload is stored under the version that writer was given
        assert {c.payload["writer"]: c.version for c in log} == dict(enumerate(versions))
        assert [c.version for c in await changes_since(conn, 20, 1000)] == list(range(21, n + 1))
        assert [c.version for c in await changes_since(conn, 20, 5)] == [21, 22, 23, 24, 25]
        assert await changes_since(conn, n, 10) == []


async def test_rollback_leaves_no_gap(db: AsyncEngine) -> None:
    """Observed on both backends: the counter increment rolls back with the change, so no gap."""
    assert await _append_committed(db, "purge", {"n": 1}) == 1
    async with db.connect() as conn, conn.begin() as tx:
        assert await append_change(conn, "purge", {"n": "lost"}) == 2
        await tx.rollback()
    assert await _append_committed(db, "purge", {"n": 2}) == 2
    async with db.connect() as conn:
        log = await changes_since(conn, 0, 10)
    assert [(c.version, c.payload) for c in log] == [(1, {"n": 1}), (2, {"n": 2})]


async def test_concurrent_rollbacks_leave_no_gap(db: AsyncEngine) -> None:
    class Abort(Exception):
        pass

    async def writer(i: int) -> int | None:
        try:
            async with db.begin() as conn:
                version = await append_change(conn, "purge", {"writer": i})
                await asyncio.sleep(0)
                if i % 5 == 0:
                    raise Abort
                return version
        except Abort:
            return None

    results = await asyncio.gather(*(writer(i) for i in range(50)))
    committed = sorted(v for v in results if v is not None)
    assert committed == list(range(1, 41))
    async with db.connect() as conn:
        log = await changes_since(conn, 0, 1000)
    assert [c.version for c in log] == committed
    assert all(c.payload["writer"] % 5 != 0 for c in log)


async def test_versions_become_visible_in_commit_order(db: AsyncEngine) -> None:
    """A second writer waits for the first to commit, so a reader never sees v+1 before v."""
    async with db.connect() as first:
        await first.begin()
        assert await append_change(first, "suspend", {"who": "first"}) == 1

        second = asyncio.create_task(_append_committed(db, "resume", {"who": "second"}))
        await asyncio.sleep(0.3)
        assert not second.done()  # blocked on the counter row (PostgreSQL) / write lock (SQLite)
        async with db.connect() as reader:
            assert await changes_since(reader, 0, 10) == []

        await first.commit()
    assert await asyncio.wait_for(second, 10) == 2
    async with db.connect() as reader:
        assert [c.payload["who"] for c in await changes_since(reader, 0, 10)] == ["first", "second"]


async def test_payload_round_trips_as_json(db: AsyncEngine) -> None:
    payload: dict[str, object] = {
        "domain": "cdn.example.com",
        "origins": ["https://a.example", "https://b.example:8443"],
        "rules": {"ttl": 3600, "query": {"keep": ["v", "lang"]}, "ignore": None},
        "ratio": 0.25,
        "enabled": True,
        "text": 'ünïcødé \u2603 "quoted" \\ back',
        "empty": {},
        "big": 2**53,
    }
    version = await _append_committed(db, "domain.upsert", payload)
    async with db.connect() as conn:
        (change,) = await changes_since(conn, version - 1, 10)
    assert change.kind == "domain.upsert"
    assert change.payload == payload


async def test_created_at_is_aware_utc(db: AsyncEngine) -> None:
    before = datetime.now(UTC)
    await _append_committed(db, "purge", {})
    after = datetime.now(UTC)
    async with db.connect() as conn:
        (change,) = await changes_since(conn, 0, 10)
    assert change.created_at.tzinfo is not None
    assert change.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= change.created_at <= after + timedelta(seconds=1)


async def test_changes_since_rejects_a_non_positive_limit(db: AsyncEngine) -> None:
    async with db.connect() as conn:
        with pytest.raises(ValueError, match="limit"):
            await changes_since(conn, 0, 0)


async def test_migrations_build_exactly_the_schema_the_code_declares(db: AsyncEngine) -> None:
    """A table or column added to control/schema.py without a migration fails here."""
    async with db.connect() as conn:
        diff = await conn.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c), metadata)
        )
    assert diff == []
