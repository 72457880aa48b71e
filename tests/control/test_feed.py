"""The edge feed over real sockets, on SQLite and PostgreSQL: snapshots, resumption, pruning,
heartbeats, acks, task results, snapshot consistency, latency, and cross-replica wake-ups."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

import control.feed
import control.schema
from control.app import ENGINE, OPERATOR_TOKEN, errors_and_auth
from control.auth import new_token
from control.db import engine_for
from control.feed import Feed, build_state, publish, read_snapshot
from control.schema import (
    accounts,
    api_tokens,
    changes,
    domains,
    edges,
    task_results,
    tasks,
    url_blocks,
)
from tests.control.conftest import SSE, on_one_backend

OP_TOKEN = "op-token"
NOW = datetime(2026, 11, 26, tzinfo=UTC)

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


# --- rows inserted directly ------------------------------------------------------------------


async def change_at(db: AsyncEngine, version: int) -> str:
    """The change's created_at as events carry it: ISO 8601, microseconds, offset."""
    async with db.connect() as conn:
        at = (
            await conn.execute(select(changes.c.created_at).where(changes.c.version == version))
        ).scalar_one()
    assert isinstance(at, datetime)
    return at.isoformat(timespec="microseconds")


async def add_account(db: AsyncEngine) -> int:
    async with db.begin() as conn:
        return int(
            (
                await conn.execute(
                    insert(accounts)
                    .values(
                        name="acme",
                        billing="prepaid",
                        timezone="Asia/Shanghai",
                        state="active",
                        created_at=NOW,
                    )
                    .returning(accounts.c.id)
                )
            ).scalar_one()
        )


async def add_edge(db: AsyncEngine, name: str = "edge-1") -> tuple[int, str]:
    token, token_hash = new_token("edge")
    async with db.begin() as conn:
        edge_id = (
            await conn.execute(
                insert(edges).values(name=name, created_at=NOW).returning(edges.c.id)
            )
        ).scalar_one()
        await conn.execute(
            insert(api_tokens).values(
                token_hash=token_hash, kind="edge", edge_id=edge_id, created_at=NOW
            )
        )
    return int(edge_id), token


async def add_account_token(db: AsyncEngine, account_id: int) -> str:
    token, token_hash = new_token("account")
    async with db.begin() as conn:
        await conn.execute(
            insert(api_tokens).values(
                token_hash=token_hash, kind="account", account_id=account_id, created_at=NOW
            )
        )
    return token


def domain_row(account_id: int, name: str, state: str = "active", reason: str = "") -> Any:
    return insert(domains).values(
        account_id=account_id,
        name=name,
        config={"origins": ["http://127.0.0.1:8081"]},
        state=state,
        state_reason=reason,
        created_at=NOW,
        updated_at=NOW,
    )


async def write(feed: Feed, n: int = 1) -> list[int]:
    """Publish `n` changes, each in its own committed transaction, waking the feed."""
    versions = []
    for _ in range(n):
        async with feed.engine.begin() as conn:
            versions.append(
                await publish(conn, "purge", {"task": 0, "type": "domain", "items": []})
            )
        feed.changed()
    return versions


# --- the server ------------------------------------------------------------------------------

Serve = Callable[..., Awaitable[tuple[TestClient[Any, Any], Feed]]]


@pytest.fixture
async def serve(db: AsyncEngine, aiohttp_client: AiohttpClient) -> Serve:
    async def start(
        heartbeat: float = 30.0, keep: float = 3600.0
    ) -> tuple[TestClient[Any, Any], Feed]:
        feed = Feed(db, heartbeat=heartbeat, keep=keep)
        app = web.Application(middlewares=[errors_and_auth])
        app[ENGINE] = db
        app[OPERATOR_TOKEN] = OP_TOKEN
        app.add_routes(feed.routes())

        async def on_startup(_app: web.Application) -> None:
            await feed.start()

        async def on_cleanup(_app: web.Application) -> None:
            await feed.stop()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return await aiohttp_client(app), feed

    return start


@pytest.fixture
async def edge(db: AsyncEngine) -> tuple[int, str]:
    return await add_edge(db)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def open_stream(
    client: TestClient[Any, Any], token: str, since: int | None = None, at: str | None = None
) -> SSE:
    query = {k: v for k, v in (("since", since), ("at", at)) if v is not None}
    response = await client.get("/v1/edge/events", params=query, headers=auth(token))
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    return SSE(response)


# --- the stream ------------------------------------------------------------------------------


async def test_since_zero_starts_with_a_snapshot(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str]
) -> None:
    edge_id, token = edge
    client, feed = await serve()
    account = await add_account(db)
    async with db.begin() as conn:
        await conn.execute(domain_row(account, "a.example"))
        await conn.execute(domain_row(account, "b.example", "terminated", "agreement 6.3"))
        await conn.execute(
            insert(url_blocks).values(
                domain="a.example", pattern="/x*", reason="court order", created_at=NOW
            )
        )
        await publish(conn, "domain.upsert", {"domain": {"name": "a.example"}})
        await publish(conn, "domain.upsert", {"domain": {"name": "b.example"}})
    feed.changed()

    stream = await open_stream(client, token)  # since defaults to 0
    snapshot = await stream.next()
    assert snapshot.kind == "snapshot" and snapshot.id == 2
    assert snapshot.data == {
        "version": 2,
        "at": await change_at(db, 2),
        "domains": [
            {
                "name": "a.example",
                "state": "active",
                "reason": "",
                "config": {"origins": ["http://127.0.0.1:8081"]},
            },
            # an edge only answers 404 for a terminated domain: it gets no config
            {"name": "b.example", "state": "terminated", "reason": "agreement 6.3"},
        ],
        "blocks": [{"domain": "a.example", "pattern": "/x*", "reason": "court order"}],
    }
    [v3] = await write(feed)
    change = await stream.next()
    assert (change.kind, change.id) == ("change", v3)
    assert change.data == {
        "version": v3,
        "kind": "purge",
        "payload": {"task": 0, "type": "domain", "items": []},
        "at": await change_at(db, v3),
    }
    await stream.close()
    async with db.connect() as conn:
        last_seen = (
            await conn.execute(select(edges.c.last_seen).where(edges.c.id == edge_id))
        ).scalar_one()
    assert last_seen is not None and datetime.now(UTC) - last_seen < timedelta(minutes=1)

    response = await client.get("/v1/edge/snapshot", headers=auth(token))
    assert response.status == 200
    assert await response.json() == {**snapshot.data, "version": v3, "at": change.data["at"]}


async def test_resume_delivers_exactly_the_later_changes_in_order(
    serve: Serve, edge: tuple[int, str]
) -> None:
    _, token = edge
    client, feed = await serve()
    await write(feed, 5)
    stream = await open_stream(client, token, since=2)
    assert [(e.kind, e.id) for e in [await stream.next() for _ in range(3)]] == [
        ("change", 3),
        ("change", 4),
        ("change", 5),
    ]
    await write(feed, 2)
    assert [(await stream.next()).id for _ in range(2)] == [6, 7]
    with pytest.raises(TimeoutError):
        await stream.next(timeout=0.3)
    await stream.close()


async def test_more_than_a_batch_arrives_in_order(serve: Serve, edge: tuple[int, str]) -> None:
    _, token = edge
    client, feed = await serve()
    count = control.feed.BATCH + 7
    async with feed.engine.begin() as conn:
        for i in range(count):
            await publish(conn, "purge", {"task": i, "type": "domain", "items": []})
    stream = await open_stream(client, token, since=1)
    assert [(await stream.next()).id for _ in range(count - 1)] == list(range(2, count + 1))
    await stream.close()


async def test_a_change_made_while_disconnected_arrives_on_reconnect(
    serve: Serve, edge: tuple[int, str]
) -> None:
    _, token = edge
    client, feed = await serve()
    await write(feed)
    stream = await open_stream(client, token)
    assert (await stream.next()).id == 1  # the snapshot
    await stream.close()
    [missed] = await write(feed)
    stream = await open_stream(client, token, since=1)
    event = await stream.next()
    assert (event.kind, event.id) == ("change", missed)
    await stream.close()


async def test_an_edge_behind_the_pruned_log_gets_a_snapshot_then_changes(
    serve: Serve, edge: tuple[int, str]
) -> None:
    _, token = edge
    client, feed = await serve(keep=60)
    await write(feed, 5)
    assert await feed.prune(datetime.now(UTC)) == 0  # nothing is old yet
    # Everything is old now, but the newest change stays.
    assert await feed.prune(datetime.now(UTC) + timedelta(seconds=61)) == 4
    assert await feed.prune(datetime.now(UTC) + timedelta(days=365)) == 0
    async with feed.engine.connect() as conn:
        assert (await conn.execute(select(changes.c.version))).scalars().all() == [5]

    stream = await open_stream(client, token, since=3)  # 4 is gone
    snapshot = await stream.next()
    assert (snapshot.kind, snapshot.id) == ("snapshot", 5)
    [v6] = await write(feed)
    change = await stream.next()
    assert (change.kind, change.id) == ("change", v6)
    await stream.close()

    stream = await open_stream(client, token, since=4)  # 5 is still there: no snapshot
    assert [((e := await stream.next()).kind, e.id) for _ in range(2)] == [
        ("change", 5),
        ("change", 6),
    ]
    await stream.close()


async def test_since_newer_than_the_newest_version_gets_a_snapshot(
    serve: Serve, edge: tuple[int, str]
) -> None:
    _, token = edge
    client, feed = await serve()
    await write(feed, 2)
    stream = await open_stream(client, token, since=99)
    snapshot = await stream.next()
    assert (snapshot.kind, snapshot.id, snapshot.data["version"]) == ("snapshot", 2, 2)
    [v3] = await write(feed)
    assert (await stream.next()).id == v3
    await stream.close()


async def test_an_edge_on_a_divergent_history_gets_a_snapshot(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str]
) -> None:
    """A control plane restored from a backup reuses versions: the edge's (version, at) tells
    whether its change V is the one in this log."""
    _, token = edge
    client, feed = await serve()
    await write(feed, 3)
    at = await change_at(db, 2)
    # the same history, whichever way the instant is written: resume after 2
    same = datetime.fromisoformat(at).astimezone(timezone(timedelta(hours=8))).isoformat()
    for when in (at, same):
        stream = await open_stream(client, token, since=2, at=when)
        event = await stream.next()
        assert (event.kind, event.id, event.data["at"]) == ("change", 3, await change_at(db, 3))
        await stream.close()
    # the edge applied another change 2 (a history the restore threw away)
    other = (datetime.fromisoformat(at) - timedelta(microseconds=1)).isoformat()
    stream = await open_stream(client, token, since=2, at=other)
    snapshot = await stream.next()
    assert (snapshot.kind, snapshot.id) == ("snapshot", 3)
    assert snapshot.data["at"] == await change_at(db, 3)
    [v4] = await write(feed)
    assert (await stream.next()).id == v4
    await stream.close()


@pytest.mark.parametrize("at", ["yesterday", "", "2026-11-26T10:00:00", "2026-13-01T00:00:00Z"])
async def test_a_bad_at_is_400(serve: Serve, edge: tuple[int, str], at: str) -> None:
    client, feed = await serve()
    await write(feed)
    response = await client.get(
        "/v1/edge/events", params={"since": 1, "at": at}, headers=auth(edge[1])
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert "at" in (await response.json())["detail"]


@on_one_backend
@pytest.mark.parametrize("since", ["abc", "-1", "1.5", "", "%2B1", "1" + "0" * 30, "²"])
async def test_a_bad_since_is_400(serve: Serve, edge: tuple[int, str], since: str) -> None:
    client, _ = await serve()
    response = await client.get(f"/v1/edge/events?since={since}", headers=auth(edge[1]))
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert "since" in (await response.json())["detail"]


async def test_heartbeats_arrive_on_an_idle_stream(serve: Serve, edge: tuple[int, str]) -> None:
    client, feed = await serve(heartbeat=0.1)
    await write(feed)
    stream = await open_stream(client, token=edge[1], since=1)
    started = time.monotonic()
    for _ in range(3):
        event = await stream.next(timeout=1, heartbeats=True)
        assert (event.kind, event.data) == ("comment", "heartbeat")
    assert time.monotonic() - started >= 0.25
    await stream.close()


async def test_idle_streams_do_not_poll_and_share_their_reads(
    serve: Serve, edge: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    real_changes_since = control.schema.changes_since

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_changes_since(*args, **kwargs)

    monkeypatch.setattr(control.feed, "changes_since", counting)
    client, feed = await serve()
    await write(feed)
    streams = [await open_stream(client, edge[1], since=1) for _ in range(5)]
    await asyncio.sleep(0.1)
    reads = 0
    feed.changed()  # a spurious wake (another schema's NOTIFY, a rolled-back writer): harmless
    await asyncio.sleep(0.5)
    # Shared: one read per wake for all five streams, not one each. (On PostgreSQL the NOTIFY
    # of the write above may add a wake of its own, so not "exactly one".)
    assert reads < len(streams)
    reads = 0
    await asyncio.sleep(0.5)
    assert reads == 0  # idle: nothing read at all
    reads = 0
    [v2] = await write(feed)
    for stream in streams:
        assert (await stream.next()).id == v2
    assert reads <= 2  # five streams at the same version: one query, not five
    for stream in streams:
        await stream.close()


async def test_stop_ends_open_streams_promptly(serve: Serve, edge: tuple[int, str]) -> None:
    client, feed = await serve()
    stream = await open_stream(client, edge[1])
    assert (await stream.next()).kind == "snapshot"
    started = time.monotonic()
    await feed.stop()
    with pytest.raises(EOFError):
        await stream.next(timeout=2)
    assert time.monotonic() - started < 1
    await stream.close()


async def test_a_client_going_away_ends_its_stream_quietly(
    serve: Serve, edge: tuple[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    client, feed = await serve(heartbeat=0.05)
    streams = [await open_stream(client, edge[1]) for _ in range(3)]
    for stream in streams:
        await stream.next()
        await stream.close()
    await write(feed, 3)
    await asyncio.sleep(0.3)  # heartbeats and changes hit the closed sockets
    live = await open_stream(client, edge[1], since=3)
    assert (await live.next(heartbeats=True)).kind == "comment"
    await live.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_end_streams_of_ends_only_that_edges_streams(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str]
) -> None:
    client, feed = await serve()  # heartbeat 30 s: only end_streams_of can end it in time
    _, other = await add_edge(db, "edge-2")
    gone = [await open_stream(client, edge[1]) for _ in range(2)]
    kept = await open_stream(client, other)
    for stream in (*gone, kept):
        assert (await stream.next()).kind == "snapshot"
    feed.end_streams_of(edge[0])
    for stream in gone:
        with pytest.raises(EOFError):
            await stream.next(timeout=2)
        await stream.close()
    [v1] = await write(feed)
    assert (await kept.next()).id == v1
    await kept.close()


@pytest.mark.parametrize("death", ["edge deleted", "token revoked", "edge deleted, busy feed"])
async def test_a_stream_whose_token_died_elsewhere_ends_at_the_next_heartbeat(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str], death: str
) -> None:
    edge_id, token = edge
    client, feed = await serve(heartbeat=0.2)
    stream = await open_stream(client, token)
    assert (await stream.next()).kind == "snapshot"

    async def busy() -> None:  # a change more often than the heartbeat: the stream never idles
        while True:
            await write(feed)
            await asyncio.sleep(0.05)

    writer = asyncio.create_task(busy()) if "busy" in death else None
    # as another replica would: nothing tells this process's feed
    async with db.begin() as conn:
        if death.startswith("edge deleted"):
            await conn.execute(update(edges).where(edges.c.id == edge_id).values(deleted_at=NOW))
        else:
            await conn.execute(
                update(api_tokens).where(api_tokens.c.edge_id == edge_id).values(revoked_at=NOW)
            )
    started = time.monotonic()
    try:
        with pytest.raises(EOFError):
            while time.monotonic() - started < 5:
                await stream.next(timeout=2, heartbeats=True)
        assert time.monotonic() - started < 1.5
    finally:
        if writer is not None:
            writer.cancel()
    await stream.close()


# --- who may ---------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/edge/events"),
    ("GET", "/v1/edge/snapshot"),
    ("POST", "/v1/edge/ack"),
    ("POST", "/v1/edge/tasks/1/result"),
]


async def test_only_edges_may_call_the_edge_routes(db: AsyncEngine, serve: Serve) -> None:
    client, _ = await serve()
    account_token = await add_account_token(db, await add_account(db))
    for method, path in ROUTES:
        response = await client.request(method, path, json={"version": 0})
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"] == "Bearer"
        response = await client.request(method, path, headers=auth("cdn_edge_nope"))
        assert response.status == 401, path
        for token in (OP_TOKEN, account_token):
            response = await client.request(method, path, headers=auth(token), json={"version": 0})
            assert response.status == 403, (path, token)
            assert response.content_type == "application/problem+json"


# --- acks and task results -------------------------------------------------------------------


async def applied_version(db: AsyncEngine, edge_id: int) -> int:
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(select(edges.c.applied_version).where(edges.c.id == edge_id))
            ).scalar_one()
        )


async def test_ack_raises_applied_version_and_never_lowers_it(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str]
) -> None:
    edge_id, token = edge
    client, feed = await serve()
    await write(feed, 3)
    response = await client.post("/v1/edge/ack", headers=auth(token), json={"version": 2})
    assert response.status == 200 and await response.json() == {"applied_version": 2}
    assert await applied_version(db, edge_id) == 2
    response = await client.post("/v1/edge/ack", headers=auth(token), json={"version": 1})
    assert await response.json() == {"applied_version": 2}
    assert await applied_version(db, edge_id) == 2
    response = await client.post("/v1/edge/ack", headers=auth(token), json={"version": 3})
    assert await applied_version(db, edge_id) == 3

    response = await client.post("/v1/edge/ack", headers=auth(token), json={"version": 4})
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "version"
    assert await applied_version(db, edge_id) == 3


async def test_a_fleet_acking_at_once_is_answered_and_stored_exactly(
    db: AsyncEngine, serve: Serve
) -> None:
    """Every edge acks a change at about the same time: acks are group-committed, and each
    answer still comes after its own ack is stored."""
    fleet = [await add_edge(db, f"edge-{n}") for n in range(20)]
    client, feed = await serve()
    [version] = await write(feed, 1)
    answers = await asyncio.gather(
        *(
            client.post("/v1/edge/ack", headers=auth(token), json={"version": version})
            for _, token in fleet
        )
    )
    assert [a.status for a in answers] == [200] * len(fleet)
    assert [await a.json() for a in answers] == [{"applied_version": version}] * len(fleet)
    assert [await applied_version(db, edge_id) for edge_id, _ in fleet] == [version] * len(fleet)


@on_one_backend
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": "2"}, "version"),
        ({"version": True}, "version"),
        ({"version": -1}, "version"),
        ({"version": 1.0}, "version"),
        ({"version": 10**30}, "version"),
        ({}, "version"),
        ({"version": 1, "extra": 1}, "extra"),
        ([1], ""),
    ],
)
async def test_ack_validates_its_body(
    serve: Serve, edge: tuple[int, str], body: Any, field: str
) -> None:
    client, feed = await serve()
    await write(feed)
    response = await client.post("/v1/edge/ack", headers=auth(edge[1]), json=body)
    assert response.status == 422
    problem = await response.json()
    assert problem["status"] == 422
    assert field in [e["field"] for e in problem["errors"]]


async def test_malformed_json_is_400(serve: Serve, edge: tuple[int, str]) -> None:
    client, _ = await serve()
    for path in ("/v1/edge/ack", "/v1/edge/tasks/1/result"):
        response = await client.post(path, headers=auth(edge[1]), data=b"{nope")
        assert response.status == 400, path
        assert response.content_type == "application/problem+json"


async def test_task_results_are_upserted(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str]
) -> None:
    edge_id, token = edge
    client, _ = await serve()
    async with db.begin() as conn:
        task_id = (
            await conn.execute(
                insert(tasks)
                .values(kind="prefetch", payload={}, version=1, created_at=NOW)
                .returning(tasks.c.id)
            )
        ).scalar_one()
    url = f"/v1/edge/tasks/{task_id}/result"
    response = await client.post(url, headers=auth(token), json={"fetched": 2, "failed": ["/a"]})
    assert response.status == 200, await response.text()
    response = await client.post(url, headers=auth(token), json={"fetched": 3, "failed": []})
    assert response.status == 200
    async with db.connect() as conn:
        rows = (await conn.execute(select(task_results))).all()
    assert [(r.task_id, r.edge_id, r.result) for r in rows] == [
        (task_id, edge_id, {"fetched": 3, "failed": []})
    ]

    for missing in (task_id + 1, "x", 2**40):
        response = await client.post(
            f"/v1/edge/tasks/{missing}/result",
            headers=auth(token),
            json={"fetched": 0, "failed": []},
        )
        assert response.status == 404, missing
    for body, field in [
        ({"fetched": 1}, "failed"),
        ({"fetched": "1", "failed": []}, "fetched"),
        ({"fetched": 1, "failed": [1]}, "failed[0]"),
        ({"fetched": 1, "failed": "/a"}, "failed"),
        ({"fetched": 1, "failed": [], "ok": True}, "ok"),
    ]:
        response = await client.post(url, headers=auth(token), json=body)
        assert response.status == 422, body
        assert field in [e["field"] for e in (await response.json())["errors"]], body


# --- snapshot consistency --------------------------------------------------------------------


async def test_read_snapshot_does_not_see_a_later_commit(db: AsyncEngine) -> None:
    account = await add_account(db)
    async with read_snapshot(db) as snap:
        before = await build_state(snap)
        async with db.begin() as conn:
            await conn.execute(domain_row(account, "late.example"))
            await publish(conn, "domain.upsert", {"domain": {"name": "late.example"}})
        empty: dict[str, Any] = {"version": 0, "at": None, "domains": [], "blocks": []}
        assert await build_state(snap) == before == empty
    async with read_snapshot(db) as snap:
        after = await build_state(snap)
    assert after["version"] == 1 and [d["name"] for d in after["domains"]] == ["late.example"]


async def test_snapshots_are_consistent_under_a_concurrent_writer(
    db: AsyncEngine, serve: Serve, edge: tuple[int, str]
) -> None:
    """Each commit adds one domain and one change, so a consistent snapshot has exactly
    `version` domains."""
    client, feed = await serve()
    account = await add_account(db)
    done = asyncio.Event()
    seen: set[int] = set()

    async def writer() -> None:
        for i in range(40):
            async with db.begin() as conn:
                await publish(conn, "domain.upsert", {"domain": {"name": f"d{i}.example"}})
                await asyncio.sleep(0.002)  # widen the window between the two writes
                await conn.execute(domain_row(account, f"d{i}.example"))
            feed.changed()
            await asyncio.sleep(0.002)
        done.set()

    async def snapshots() -> None:
        while not done.is_set():
            response = await client.get("/v1/edge/snapshot", headers=auth(edge[1]))
            state = await response.json()
            assert len(state["domains"]) == state["version"]
            seen.add(state["version"])

    async def streams() -> None:
        while not done.is_set():
            stream = await open_stream(client, edge[1])
            snapshot = await stream.next()
            assert len(snapshot.data["domains"]) == snapshot.id
            await stream.close()

    await asyncio.gather(writer(), snapshots(), snapshots(), streams())
    assert len(seen) > 3  # the reads really overlapped the writes


# --- latency and replicas --------------------------------------------------------------------


async def test_latency_to_five_streams(
    serve: Serve, edge: tuple[int, str], request: pytest.FixtureRequest
) -> None:
    client, feed = await serve()
    streams = [await open_stream(client, edge[1]) for _ in range(5)]
    for stream in streams:
        assert (await stream.next()).kind == "snapshot"
    latencies: list[float] = []
    for _ in range(50):
        async with feed.engine.begin() as conn:
            version = await publish(conn, "purge", {"task": 0, "type": "domain", "items": []})
        committed = time.perf_counter()
        feed.changed()
        for event in await asyncio.gather(*(s.next() for s in streams)):
            assert event.id == version
        # gather returns when the last stream has it: the slowest delivery of the five
        latencies.append(time.perf_counter() - committed)
    for stream in streams:
        await stream.close()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"\nfeed latency [{request.node.callspec.id}]: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert latencies[-1] < 1.0


@pytest.fixture
async def replica_engine(db: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """A second engine on the same PostgreSQL schema: another control replica's."""
    if db.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    async with db.connect() as conn:
        schema = (await conn.execute(text("SHOW search_path"))).scalar_one()
    other = engine_for(
        db.url.render_as_string(hide_password=False),
        connect_args={"server_settings": {"search_path": schema}},
    )
    try:
        yield other
    finally:
        await other.dispose()


async def test_a_change_on_another_replica_wakes_the_stream_through_notify(
    serve: Serve,
    edge: tuple[int, str],
    replica_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listeners: list[Any] = []
    real_connect = asyncpg.connect

    async def recording_connect(*args: Any, **kwargs: Any) -> Any:
        conn = await real_connect(*args, **kwargs)
        listeners.append(conn)
        return conn

    # Only the feed's own connections (the engines' go through the real module).
    monkeypatch.setattr(
        control.feed,
        "asyncpg",
        SimpleNamespace(connect=recording_connect, PostgresError=asyncpg.PostgresError),
    )
    client, _ = await serve(heartbeat=60)  # no safety-net read within the test
    replica_a = Feed(replica_engine, heartbeat=60, keep=3600)
    await replica_a.start()
    try:
        stream = await open_stream(client, edge[1])
        assert (await stream.next()).id == 0

        async def publish_on_a() -> float:
            async with replica_engine.begin() as conn:
                version = await publish(conn, "purge", {"task": 0, "type": "domain", "items": []})
            committed = time.perf_counter()
            event = await stream.next(timeout=2)
            assert (event.kind, event.id) == ("change", version)
            return time.perf_counter() - committed

        latency = await publish_on_a()
        print(f"\ncross-replica NOTIFY latency: {latency * 1000:.2f} ms")
        assert latency < 0.5
        # The LISTEN connection drops (a PostgreSQL restart, a failover): B listens again.
        assert len(listeners) == 2  # one per replica
        replica_b_listener = listeners[0]  # B started first, with the app
        async with replica_engine.connect() as conn:
            await conn.execute(
                text("SELECT pg_terminate_backend(:pid)"),
                {"pid": replica_b_listener.get_server_pid()},
            )
        for _ in range(100):
            if len(listeners) == 3:
                break
            await asyncio.sleep(0.05)
        assert len(listeners) == 3
        assert await publish_on_a() < 1
        await stream.close()
    finally:
        await replica_a.stop()
