"""Fixtures for the control-plane suite: every store and API test runs on SQLite and on PostgreSQL.

PostgreSQL: ``CONTROL_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``,
trust auth, as in CI). Each test gets a fresh schema, put first on the search path of every pooled
connection and dropped afterwards, so tests never see each other's tables. When PostgreSQL cannot be
reached the PostgreSQL half is skipped locally, and fails when ``CI=true``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient
from sqlalchemy import Table, event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from control.app import ROUTES, make_app
from control.config import ControlConfig
from control.db import engine_for, migrate
from control.openapi import EDGE_ROUTES
from control.schema import Change, change_counter, changes_since

PG_URL = os.environ.get("CONTROL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _unreachable(reason: str) -> None:
    message = (
        f"PostgreSQL at {PG_URL} unreachable ({reason}); start it or set CONTROL_TEST_POSTGRES_URL"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


async def admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        _unreachable(f"{type(exc).__name__}: {exc}")
        raise  # unreachable: skip/fail raise


# For a request the route refuses before its handler runs (a body or query its model rejects):
# no query depends on the backend, so the answer cannot, and one backend is enough.
on_one_backend = pytest.mark.parametrize("backend", ["sqlite"])


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database every control test runs on, once each."""
    return str(request.param)


@asynccontextmanager
async def _postgresql_schema() -> AsyncIterator[tuple[asyncpg.Connection, str, AsyncEngine]]:
    """A fresh schema, first on the search path of every pooled connection of the engine, and
    dropped afterwards; with the admin connection that made it."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = await admin_connection()
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        eng = engine_for(PG_URL, connect_args={"server_settings": {"search_path": schema}})
        try:
            yield admin, schema, eng
        finally:
            await eng.dispose()
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await admin.close()


@pytest.fixture
async def engine(backend: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An empty database (not migrated) on the parametrized backend."""
    if backend == "sqlite":
        eng = engine_for(f"sqlite:///{tmp_path}/db/control.db")
        try:
            yield eng
        finally:
            await eng.dispose()
        return
    async with _postgresql_schema() as (_, _, eng):
        yield eng


# Migrating costs about 0.15 s on SQLite and 0.2 s on PostgreSQL, most of it Alembic's own work
# (loading the revision scripts, building and compiling each DDL statement), paid again by every
# test. So the tests' databases are migrated once per session: SQLite's is a copy of a migrated
# file; PostgreSQL's schema gets the very statements migrating sent to PostgreSQL, recorded once
# and replayed in one transaction, as migrate() runs them. Migrating itself is still tested on
# both backends from the empty `engine` (tests/control/test_store.py).


def _run(coroutine: Any) -> Any:
    """Run setup work on a loop of its own, leaving the tests' event loops alone."""
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coroutine)


@pytest.fixture(scope="session")
def sqlite_migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file, complete on its own (no WAL left beside it)."""
    path = tmp_path_factory.mktemp("control-migrated") / "control.db"

    async def build() -> None:
        eng = engine_for(f"sqlite:///{path}")
        try:
            await migrate(eng)
        finally:
            await eng.dispose()  # the last connection's close checkpoints the WAL into the file

    _run(build())
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    return path


Statements = list[tuple[str, tuple[Any, ...]]]


@pytest.fixture(scope="session")
def postgresql_migrated() -> Statements:
    """What migrating an empty schema sends to PostgreSQL: each statement with its parameters."""
    sent: Statements = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        assert not many, statement
        sent.append((statement, tuple(parameters or ())))

    async def build() -> None:
        async with _postgresql_schema() as (_, _, eng):
            event.listen(eng.sync_engine, "before_cursor_execute", record)
            await migrate(eng)

    _run(build())
    return sent


@pytest.fixture
def migrated(backend: str, request: pytest.FixtureRequest) -> Any:
    """The backend's migrated database (made only for the backends that run)."""
    return request.getfixturevalue(f"{backend}_migrated")


@pytest.fixture
async def db(backend: str, migrated: Any, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated database on the parametrized backend, the test's own."""
    if backend == "sqlite":
        path = tmp_path / "db" / "control.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated, path)
        eng = engine_for(f"sqlite:///{path}")
        try:
            yield eng
        finally:
            await eng.dispose()
        return
    async with _postgresql_schema() as (admin, schema, eng):
        async with admin.transaction():
            await admin.execute(f'SET LOCAL search_path TO "{schema}"')
            for statement, parameters in migrated:
                await admin.execute(statement, *parameters)
        yield eng


# --- the running API ----------------------------------------------------------------------------

ADMIN_TOKEN = "test-operator-token-f3b9c1d2"
CNAME_SUFFIX = "cdn.test"


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON, or None for an empty body
    headers: CIMultiDictProxy[str]

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0]


_TABLE = [
    (
        route,
        re.compile(re.sub(r"{(\w+)}", lambda m: "[0-9]+" if m[1] == "id" else "[^/]+", route.path)),
    )
    for route in (*ROUTES, *EDGE_ROUTES)
]


def _check_response(method: str, path: str, reply: Reply) -> None:
    """Every successful answer has the status and the body its route-table entry documents."""
    bare = path.partition("?")[0]
    [route] = [r for r, pattern in _TABLE if r.method == method and pattern.fullmatch(bare)]
    assert reply.status == route.status, (method, path, reply.status)
    if route.status == 204:
        assert reply.body is None
    elif route.response is not None:
        route.response.model_validate(reply.body)


class Api:
    """A control app served on a real socket, with helpers that make accounts, sub-accounts,
    edges and domains through the API itself."""

    def __init__(self, client: TestClient[Any, Any], engine: AsyncEngine) -> None:
        self.client = client
        self.engine = engine
        self.app = client.app

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = ADMIN_TOKEN,
        body: Any = None,
        *,
        raw: bytes | None = None,
    ) -> Reply:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.client.request(method, path, headers=headers, data=data) as resp:
            text = await resp.read()
            parsed = json.loads(text) if text else None
            reply = Reply(resp.status, parsed, resp.headers)
        if 200 <= reply.status < 300:
            _check_response(method, path, reply)
        return reply

    async def ok(
        self,
        method: str,
        path: str,
        token: str | None = ADMIN_TOKEN,
        body: Any = None,
        status: int | None = None,
    ) -> Any:
        """The parsed body of a call that must succeed (with `status`, if given)."""
        reply = await self.call(method, path, token, body)
        expected = status if status is not None else reply.status
        assert reply.status < 300 and reply.status == expected, (method, path, reply)
        return reply.body

    async def account(self, name: str = "acme", billing: str = "postpaid") -> tuple[int, str]:
        """Postpaid by default: its domains serve at once (a prepaid one's wait for money, 4.1)."""
        made = await self.ok("POST", "/v1/accounts", body={"name": name, "billing": billing})
        return made["account"]["id"], made["token"]

    async def subaccount(
        self,
        account_token: str,
        scopes: list[str],
        domains: list[str] | None = None,
        name: str = "helper",
    ) -> tuple[int, str]:
        body: dict[str, Any] = {"name": name, "scopes": scopes}
        if domains is not None:
            body["domains"] = domains
        made = await self.ok("POST", "/v1/subaccounts", account_token, body, status=201)
        return made["subaccount"]["id"], made["token"]

    async def edge(self, name: str = "edge-1") -> tuple[int, str]:
        made = await self.ok("POST", "/v1/edges", body={"name": name}, status=201)
        return made["edge"]["id"], made["token"]

    async def domain(self, token: str, name: str, **settings: Any) -> Any:
        body = {"name": name, "origins": ["http://origin.example:8080"], **settings}
        return await self.ok("POST", "/v1/domains", token, body, status=201)

    async def changes(self, after: int = 0) -> list[Change]:
        async with self.engine.connect() as conn:
            return await changes_since(conn, after, 10_000)

    async def version(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(change_counter.c.version))).scalar_one())

    async def rows(self, table: Table) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(select(table)))


@pytest.fixture
def api_settings() -> dict[str, Any]:
    """ControlConfig fields a test changes: `@pytest.mark.parametrize("api_settings", [{...}])`."""
    return {}


@pytest.fixture
async def api(
    db: AsyncEngine, aiohttp_client: AiohttpClient, api_settings: dict[str, Any], tmp_path: Path
) -> Api:
    """The control plane on the parametrized database, listening on a real socket; its log
    store in the test's own directory."""
    settings: dict[str, Any] = {
        "heartbeat": 1.0,
        "change_log_keep": 3600.0,
        "log_dir": str(tmp_path / "logs"),
        **api_settings,
    }
    config = ControlConfig(
        source="test", admin_token=ADMIN_TOKEN, cname_suffix=CNAME_SUFFIX, **settings
    )
    client = await aiohttp_client(make_app(config, db))
    return Api(client, db)


# --- the edge feed ---------------------------------------------------------------------------


@dataclass
class Event:
    kind: str  # "snapshot" | "change" | "comment"
    id: int | None = None
    data: Any = None


class SSE:
    """A minimal text/event-stream reader over a response body."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response

    async def next(self, *, timeout: float = 5.0, heartbeats: bool = False) -> Event:
        fields: dict[str, str] = {}
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                if heartbeats:
                    return Event("comment", data=line[1:].strip())
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:
                return Event(fields["event"], int(fields["id"]), json.loads(fields["data"]))

    async def close(self) -> None:
        self.response.close()
