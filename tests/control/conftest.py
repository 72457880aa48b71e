"""Fixtures for the control-plane suite: every store test runs on SQLite and on PostgreSQL.

PostgreSQL: ``CONTROL_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``,
trust auth, as in CI). Each test gets a fresh schema, put first on the search path of every pooled
connection and dropped afterwards, so tests never see each other's tables. When PostgreSQL cannot be
reached the PostgreSQL half is skipped locally, and fails when ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from control.db import engine_for, migrate

PG_URL = os.environ.get("CONTROL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _unreachable(reason: str) -> None:
    message = (
        f"PostgreSQL at {PG_URL} unreachable ({reason}); start it or set CONTROL_TEST_POSTGRES_URL"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        _unreachable(f"{type(exc).__name__}: {exc}")
        raise  # unreachable: skip/fail raise


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An empty database (not migrated) on the parametrized backend."""
    if request.param == "sqlite":
        eng = engine_for(f"sqlite:///{tmp_path}/db/control.db")
        try:
            yield eng
        finally:
            await eng.dispose()
        return

    schema = f"t_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        eng = engine_for(PG_URL, connect_args={"server_settings": {"search_path": schema}})
        try:
            yield eng
        finally:
            await eng.dispose()
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await admin.close()


@pytest.fixture
async def db(engine: AsyncEngine) -> AsyncEngine:
    """A migrated database on the parametrized backend."""
    await migrate(engine)
    return engine
