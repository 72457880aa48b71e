"""An edge following a control plane (control/README.md, "The feed", "The edge's side").

`FakeControl` is the feed side of the control plane, small enough to read next to the README:
a change log with gap-free versions, snapshots for `since` 0 / pruned / from the future / with
another `at` (a control plane restored from a backup), heartbeats, and the ack and task-result
routes, recording what edges post. The follower is
tested in-process against it; the supervised edge as operators run it, `cdn edge`.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edge.config import ControlSettings, parse_config
from edge.follow import Change, ControlFollower, State, load_saved
from edge.supervisor import (
    PREFETCH_CONCURRENCY,
    PREFETCH_TASKS,
    Asked,
    Generation,
    Supervisor,
    WorkerProcess,
)
from edge.worker import EdgeWorker
from tests.integration.conftest import Origin
from tests.integration.test_supervisor import (
    BODY,
    EdgeProcess,
    cdn_command,
    config_text,
    free_port,
    on_one_loop,
    total,
)

TOKEN = "cdn_edge_test_token_0123"
HOST = "www.example.test"
OTHER = "other.example.test"

# The worker side (edge/worker.py answering "change" and "state") is written separately; what
# needs it to enforce the state is skipped until it is there.
WORKER_FOLLOWS = "control_state" in inspect.signature(EdgeWorker).parameters
needs_worker = pytest.mark.skipif(not WORKER_FOLLOWS, reason="workers do not follow changes yet")


def sse(event: str, version: int, data: object) -> bytes:
    return f"event: {event}\nid: {version}\ndata: {json.dumps(data)}\n\n".encode()


class FakeControl:
    """The control plane's edge routes, faithful to the README, with knobs to misbehave."""

    def __init__(self, heartbeat: float = 0.2) -> None:
        self.heartbeat = heartbeat
        self.version = 0
        self.log: list[Change] = []  # log[i] has version i + 1
        self.oldest = 1  # changes before this one are pruned: such a `since` gets a snapshot
        self.domains: dict[str, dict[str, Any]] = {}
        self.backups: list[dict[str, dict[str, Any]]] = []  # backups[i]: domains at version i + 1
        self.malformed: set[int] = set()  # versions whose change event is sent broken
        self.down = False  # answer 503 and drop open feeds
        self.silent = False  # no heartbeats
        self.gap_once = False  # skip one change on the next stream (a broken control plane)
        self.since: list[int] = []  # `since` of every feed request, in order
        self.at: list[str | None] = []  # and its `at`
        self.acks: list[int] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.refused = 0
        self._wake = asyncio.Event()
        self.server: TestServer | None = None
        self.url = ""

    # --- writes, as the API would publish them

    def publish(self, kind: str, payload: dict[str, Any]) -> int:
        self.version += 1
        at = datetime.now(UTC).isoformat()
        self.log.append({"version": self.version, "kind": kind, "payload": payload, "at": at})
        self.backups.append(copy.deepcopy(self.domains))
        self.wake()
        return self.version

    def restore(self, version: int) -> None:
        """Back to the state at `version`, as from a backup: later changes are forgotten, and
        new ones get those versions again."""
        self.version = version
        del self.log[version:], self.backups[version:]
        self.domains = copy.deepcopy(self.backups[-1]) if version else {}

    def upsert(self, name: str, origin: str) -> int:
        domain = {"name": name, "state": "active", "reason": "", "config": {"origins": [origin]}}
        self.domains[name] = domain
        return self.publish("domain.upsert", {"domain": domain})

    def set_state(self, name: str, state: str, reason: str) -> int:
        self.domains[name] |= {"state": state, "reason": reason}
        return self.publish("domain.state", {"name": name, "state": state, "reason": reason})

    def snapshot(self) -> State:
        return {
            "version": self.version,
            "at": self.log[-1]["at"] if self.log else None,
            "domains": list(self.domains.values()),
            "blocks": [],
        }

    def wake(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def go_down(self) -> None:
        self.down = True
        self.wake()

    # --- routes

    def _refuse(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.refused += 1
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        if self.down:
            return web.Response(status=503)
        return None

    async def events(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refuse(request)
        if refusal is not None:
            return refusal
        since, at = int(request.query.get("since", "0")), request.query.get("at")
        try:
            if at is not None:
                datetime.fromisoformat(at)
        except ValueError:
            return web.Response(status=400, text=f"at must be an ISO time, got {at!r}")
        self.since.append(since)
        self.at.append(at)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = since
        if (
            since == 0
            or since < self.oldest - 1
            or since > self.version
            or (at is not None and self.log[since - 1]["at"] != at)
        ):
            await resp.write(sse("snapshot", self.version, self.snapshot()))
            sent = self.version
        while not self.down:
            for change in self.log[sent:]:
                if self.gap_once:
                    self.gap_once = False
                    continue
                version = change["version"]
                bad = {"version": version, "kind": change["kind"]}  # no payload
                await resp.write(
                    sse("change", version, bad if version in self.malformed else change)
                )
            sent = self.version
            wake = self._wake
            try:
                await asyncio.wait_for(wake.wait(), self.heartbeat)
            except TimeoutError:
                if not self.silent:
                    await resp.write(b": heartbeat\n\n")
        return resp

    async def ack(self, request: web.Request) -> web.Response:
        refusal = self._refuse(request)
        if refusal is not None:
            return refusal
        self.acks.append((await request.json())["version"])
        return web.json_response({})

    async def result(self, request: web.Request) -> web.Response:
        refusal = self._refuse(request)
        if refusal is not None:
            return refusal
        self.results[request.match_info["task"]] = await request.json()
        return web.json_response({})

    async def snapshot_route(self, request: web.Request) -> web.Response:
        return self._refuse(request) or web.json_response(self.snapshot())

    async def start(self, port: int | None = None) -> None:
        app = web.Application()
        app.router.add_get("/v1/edge/events", self.events)
        app.router.add_get("/v1/edge/snapshot", self.snapshot_route)
        app.router.add_post("/v1/edge/ack", self.ack)
        app.router.add_post("/v1/edge/tasks/{task}/result", self.result)
        self.server = TestServer(app, host="127.0.0.1", port=port)
        await self.server.start_server()
        self.url = f"http://127.0.0.1:{self.server.port}"

    async def close(self) -> None:
        self.go_down()
        if self.server is not None:
            await self.server.close()


@pytest.fixture
async def control() -> AsyncIterator[Callable[..., Awaitable[FakeControl]]]:
    started: list[FakeControl] = []

    async def start(port: int | None = None, **kwargs: Any) -> FakeControl:
        fake = FakeControl(**kwargs)
        await fake.start(port)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.close()


def saved_state(path: Path) -> State | None:
    saved = load_saved(path)
    return saved.state if saved is not None else None


async def until(check: Callable[[], bool], failure: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        await asyncio.sleep(0.02)


# --- the follower in-process -----------------------------------------------------------------


# A read timeout for tests that count connections: no stall of the test's loop drops the feed.
STEADY = 5.0


class Followed:
    """A follower whose "workers" apply what `applied` says."""

    def __init__(
        self, url: str, state_dir: Path, *, token: str = TOKEN, read_timeout: float = 0.5
    ) -> None:
        self.states: list[State] = []
        self.changes: list[Change] = []
        self.applied = 0
        self.follower = ControlFollower(
            ControlSettings(url, token, read_timeout=read_timeout),
            state_dir,
            on_state=self.states.append,
            on_change=self.changes.append,
            applied=lambda: self.applied,
        )

    def saved(self) -> State | None:
        return saved_state(self.follower.path)


@pytest.fixture
async def followed(tmp_path: Path) -> AsyncIterator[Callable[..., Followed]]:
    made: list[Followed] = []

    def make(url: str, **kwargs: Any) -> Followed:
        f = Followed(url, tmp_path, **kwargs)
        f.follower.load()
        f.follower.start()
        made.append(f)
        return f

    yield make
    for f in made:
        await f.follower.stop()


async def test_snapshot_then_changes_saved_and_acked_once_applied(
    control: Callable[..., Awaitable[FakeControl]], followed: Callable[..., Followed]
) -> None:
    fake = await control()
    fake.upsert(HOST, "http://o.test")
    # One connection must carry it all (`since` below): with the usual 0.5 s read timeout, a
    # stall of this loop past 0.3 s (a busy CI machine) dropped the feed and failed the test.
    f = followed(fake.url, read_timeout=STEADY)
    assert await f.follower.wait_ready(5)
    assert f.states == [fake.snapshot()] and f.follower.version == 1
    await until(lambda: f.follower.persisted == 1, "the snapshot was never saved")
    assert f.saved() == fake.snapshot()
    await asyncio.sleep(0.1)
    assert fake.acks == []  # the "workers" have not applied it
    f.applied = 1
    f.follower.poke()
    await until(lambda: fake.acks == [1], "never acked")

    for n in range(20):  # a burst: every change in order, acks coalesced
        fake.upsert(f"d{n}.example.test", "http://o.test")
    await until(lambda: f.follower.version == 21, "changes not applied")
    assert [c["version"] for c in f.changes] == list(range(2, 22))
    f.applied = 21
    f.follower.poke()
    await until(lambda: fake.acks[-1:] == [21], "the newest version was never acked")
    assert fake.acks == sorted(fake.acks) and len(fake.acks) <= 3
    assert f.saved() == fake.snapshot()
    assert f.follower.connected and f.follower.contact_age() < 1
    assert fake.since == [0]


async def test_never_acks_what_is_not_saved(
    control: Callable[..., Awaitable[FakeControl]],
    followed: Callable[..., Followed],
    tmp_path: Path,
) -> None:
    fake = await control()
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "state.json").mkdir()  # a directory: every save fails
    f = followed(fake.url)
    f.applied = 10
    fake.upsert(HOST, "http://o.test")
    await until(lambda: f.follower.version == 1, "not followed")
    await asyncio.sleep(0.3)
    assert f.follower.persisted == -1
    assert fake.acks == []


async def test_reconnects_after_a_gap_silence_and_downtime_and_applies_in_order(
    control: Callable[..., Awaitable[FakeControl]],
    followed: Callable[..., Followed],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "edge.follow")
    fake = await control()
    fake.upsert(HOST, "http://o.test")
    f = followed(fake.url)
    await until(lambda: f.follower.version == 1, "no snapshot")

    fake.gap_once = True  # the next stream skips a change: the edge must not skip it
    fake.upsert("a.example.test", "http://o.test")  # 2: lost by the current stream
    fake.go_down()  # ...which ends; the next stream skips 2 and sends 3 first
    await until(lambda: not f.follower.connected, "still connected")
    fake.down = False
    fake.gap_once = True
    fake.upsert("b.example.test", "http://o.test")  # 3
    await until(lambda: f.follower.version == 3, "not caught up after the gap")
    assert "dropped the feed: change 3 follows version 1" in caplog.text
    assert [c["version"] for c in f.changes] == [2, 3]
    assert fake.since[-2:] == [1, 1]

    # Changes made while the edge is disconnected arrive in order once it is back.
    fake.go_down()
    await until(lambda: not f.follower.connected, "still connected")
    versions = [fake.upsert(f"late{n}.example.test", "http://o.test") for n in range(5)]
    await asyncio.sleep(0.3)
    assert f.follower.version == 3
    fake.down = False
    await until(lambda: f.follower.version == versions[-1], "not caught up after downtime")
    assert [c["version"] for c in f.changes] == [2, 3, *versions]
    assert f.follower.state == fake.snapshot()

    # Silence past read_timeout (0.5 s): dropped and reconnected.
    fake.silent = True
    before = len(fake.since)
    await until(lambda: len(fake.since) > before, "never reconnected after silence", 5)
    assert "nothing heard for 0.5s" in caplog.text


async def test_pruned_log_gets_a_snapshot(
    control: Callable[..., Awaitable[FakeControl]], followed: Callable[..., Followed]
) -> None:
    fake = await control()
    fake.upsert(HOST, "http://o.test")
    f = followed(fake.url)
    await until(lambda: f.follower.persisted == 1, "not saved")
    await f.follower.stop()
    fake.upsert(OTHER, "http://o.test")
    fake.oldest = 3  # change 2 pruned before the edge came back
    again = followed(fake.url)
    assert again.follower.version == 1  # from state.json
    await until(lambda: again.follower.version == 2, "no snapshot after the prune")
    assert fake.since[-1] == 1
    assert again.states == [fake.snapshot()] and again.changes == []


async def test_a_control_plane_with_another_history_sends_a_snapshot(
    control: Callable[..., Awaitable[FakeControl]], followed: Callable[..., Followed]
) -> None:
    """Restored from a backup at version 1, the control plane made another change 2: the edge,
    at its own change 2, must not take the new change 3 on top of it."""
    fake = await control()
    fake.upsert(HOST, "http://o.test")
    fake.upsert(OTHER, "http://o.test")
    f = followed(fake.url)
    await until(lambda: f.follower.persisted == 2, "not saved")
    assert f.saved() == fake.snapshot()
    at = fake.log[1]["at"]
    await f.follower.stop()
    fake.restore(1)
    fake.upsert("third.example.test", "http://o.test")
    fake.upsert("fourth.example.test", "http://o.test")
    again = followed(fake.url)
    await until(lambda: again.follower.state == fake.snapshot(), "kept the other history")
    assert (fake.since[-2:], fake.at[-2:]) == ([0, 2], [None, at])
    assert [state["version"] for state in again.states] == [3]
    await until(lambda: again.saved() == fake.snapshot(), "not saved")


async def test_a_refused_at_asks_for_a_snapshot(
    control: Callable[..., Awaitable[FakeControl]],
    followed: Callable[..., Followed],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An `at` the control plane cannot read (400) is not asked again and again."""
    fake = await control()
    fake.upsert(HOST, "http://o.test")
    state = {"version": 1, "at": "yesterday", "domains": [], "blocks": []}
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "state.json").write_text(json.dumps(state))
    f = followed(fake.url, read_timeout=STEADY)  # connections counted below
    await until(lambda: f.follower.state == fake.snapshot(), "never asked for a snapshot")
    assert fake.since == [0]
    assert "HTTP 400" in caplog.text


async def test_a_bad_event_asks_for_a_snapshot_once(
    control: Callable[..., Awaitable[FakeControl]],
    followed: Callable[..., Followed],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await control()
    fake.upsert(HOST, "http://o.test")
    f = followed(fake.url, read_timeout=STEADY)  # connections counted below
    await until(lambda: f.follower.version == 1, "no snapshot")
    fake.malformed = {2}
    fake.upsert(OTHER, "http://o.test")  # 2, sent without its payload
    await until(lambda: f.follower.state == fake.snapshot(), "never got past the bad event")
    assert fake.since == [0, 0] and f.follower.bad_events == 1
    assert caplog.text.count("sent an event this edge cannot use") == 1
    assert "malformed change event: KeyError('payload')" in caplog.text
    fake.upsert("third.example.test", "http://o.test")  # and on from there, as usual
    await until(lambda: f.follower.state == fake.snapshot(), "not following after it")
    assert fake.since == [0, 0]


async def test_refused_token_is_logged_without_the_token(
    control: Callable[..., Awaitable[FakeControl]],
    followed: Callable[..., Followed],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await control()
    f = followed(fake.url, token="cdn_edge_wrong_secret")
    await until(lambda: fake.refused >= 3, "did not retry")
    assert not await f.follower.wait_ready(0.1)
    assert "refused this edge's token (HTTP 401)" in caplog.text
    assert caplog.text.count("refused this edge's token") == 1  # once, not per retry
    assert "wrong_secret" not in caplog.text


# --- the supervised edge (`cdn edge`) ---------------------------------------------------------


class ControlledEdge(EdgeProcess):
    """`cdn edge` with a [control] table instead of [[domains]]."""

    def __init__(
        self, tmp: Path, origin: Origin, control_url: str, workers: int = 2, token: str = TOKEN
    ) -> None:
        self.control_url = control_url
        self.token = token
        self.read_timeout = 1
        super().__init__(tmp, origin, workers=workers, loop="uvloop")

    def write_config(self, extra: str = "", *, port: int | None = None) -> None:
        self.config.write_text(
            f"""
[edge]
listen = "127.0.0.1:{self.port if port is None else port}"
admin_listen = "127.0.0.1:{self.admin_port}"
workers = {self.workers}
state_dir = "{self.state}"

[origin]
deny = []  # the test's origin is on loopback

[control]
url = "{self.control_url}"
token = "{self.token}"
read_timeout = {self.read_timeout}
start_timeout = 1
{extra}
"""
        )

    def saved(self) -> State | None:
        return saved_state(self.state / "control" / "state.json")

    def stored(self) -> list[Path]:
        """The objects on the disk tier."""
        objects = self.state / "cache" / "objects"
        return [p for p in objects.rglob("*") if p.is_file() and "." not in p.name]

    def saved_raw(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / "control" / "state.json").read_bytes()))
        except (OSError, ValueError):
            return {}

    def saved_version(self) -> int | None:
        return self.saved_raw().get("version")

    def saved_flush(self) -> bool | None:
        return self.saved_raw().get("flush")


async def obj(req: web.Request) -> web.StreamResponse:
    return web.Response(body=BODY, headers={"Cache-Control": "max-age=60"})


def counted(delay: float = 0.0) -> tuple[Route, list[int]]:
    """A cacheable route whose body changes on every fetch, and [requests in flight, most]."""
    in_flight = [0, 0]
    count = itertools.count(1)

    async def handler(req: web.Request) -> web.StreamResponse:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            await asyncio.sleep(delay)
        finally:
            in_flight[0] -= 1
        body = f"{req.path} #{next(count)}\n".encode()
        return web.Response(body=body, headers={"Cache-Control": "max-age=600"})

    return handler, in_flight


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]
Routes = dict[str, Route]
ROUTES: Routes = {"/obj": obj}
URL_PURGE = {"task": 1, "type": "url", "items": [{"domain": HOST, "value": "/p"}]}
DISK = '[cache]\nmemory_max_object = "64KiB"\ndisk = "64MiB"\n'


@pytest.fixture
async def controlled(
    make_origin: Callable[..., Awaitable[Origin]], tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ControlledEdge]]]:
    started: list[ControlledEdge] = []

    async def make(
        control_url: str, *, workers: int = 2, token: str = TOKEN, routes: Routes = ROUTES
    ) -> ControlledEdge:
        origin = await make_origin(routes)
        process = ControlledEdge(tmp_path, origin, control_url, workers, token)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None and process.proc.returncode is None:
            await process.stop()


@on_one_loop
async def test_edge_starts_from_the_snapshot_and_follows(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    fake = await control()
    e = await controlled(fake.url)
    fake.upsert(HOST, e.origin)
    await e.start()
    assert "control plane state: version 1" in e.log_text()
    await e.until(lambda: _true(fake.acks == [1]), "the starting state was never acked")
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "state.json not written")
    await until_metric(e, "cdn_edge_config_version", 1)
    m = await e.metrics()
    assert m["cdn_edge_control_connected"] == 1
    assert m["cdn_edge_control_bad_events_total"] == 0
    assert 0 <= m["cdn_edge_control_contact_age_seconds"] < 1
    await asyncio.sleep(0.5)  # heartbeats keep the contact fresh
    assert (await e.metrics())["cdn_edge_control_contact_age_seconds"] < 0.5

    fake.upsert(OTHER, e.origin)
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "change 2 not saved")
    await until_metric(e, "cdn_edge_config_version", 2)
    if WORKER_FOLLOWS:
        assert (await e.get("/obj", HOST)).status == 200
        assert (await e.get("/obj", OTHER)).status == 200
        await e.until(lambda: _true(fake.acks[-1:] == [2]), "version 2 never acked")
        fake.set_state(OTHER, "suspended", "unpaid invoice")
        await e.until(lambda: _true(fake.acks[-1:] == [3]), "version 3 never acked")
        assert (await e.get("/obj", OTHER)).status == 403
    assert await e.stop() == 0
    assert TOKEN not in e.log_text()


@on_one_loop
async def test_fail_static_serves_the_saved_state_then_catches_up(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    fake = await control()
    e = await controlled(fake.url)
    fake.upsert(HOST, e.origin)
    await e.start()
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "state.json not written")
    assert await e.stop() == 0

    fake.go_down()
    fake.upsert(OTHER, e.origin)  # made while the edge is away
    await e.start()  # ready without the control plane
    log = e.log_text()
    assert "not reachable: serving the saved state version 1" in log
    assert "(fail-static)" in log
    m = await e.metrics()
    assert m["cdn_edge_config_version"] == 1 and m["cdn_edge_control_connected"] == 0
    if WORKER_FOLLOWS:
        assert (await e.get("/obj", HOST)).status == 200
    fake.down = False  # back: change 2 arrives
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "did not catch up", timeout=15)
    assert fake.since[-1] == 1
    await until_metric(e, "cdn_edge_config_version", 2)
    assert (await e.metrics())["cdn_edge_control_connected"] == 1


@on_one_loop
async def test_no_state_and_no_control_plane_is_not_ready_until_it_answers(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    port = free_port()
    e = await controlled(f"http://127.0.0.1:{port}", workers=1)
    starting = asyncio.create_task(e.start())
    await asyncio.sleep(0)  # it has opened its log
    await e.until_logged("not reachable and no saved state")
    await asyncio.sleep(0.5)
    assert (await e.admin("/readyz")).status == 503
    assert (await e.admin("/healthz")).status == 200
    fake = await control(port)  # the control plane comes up
    fake.upsert(HOST, e.origin)
    await starting  # ready
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "state not saved")
    await until_metric(e, "cdn_edge_config_version", 1)


async def cdn_edge_exit(config: Path) -> tuple[int | None, str]:
    """Run `cdn edge` on a config it must refuse: its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cdn_command(), "edge", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    return proc.returncode, err.decode()


@on_one_loop
async def test_bad_control_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[control]\nurl = "http://127.0.0.1:1"\ntoken = "{TOKEN}"\n'
        '[[domains]]\nname = "a.test"\norigins = ["http://o.test"]\n'
    )
    assert await cdn_edge_exit(config) == (
        2,
        f"cdn: {config}: domains: must be empty with [control]: "
        "the domains come from the control plane\n",
    )
    config.write_text('[control]\nurl = "http://127.0.0.1:1"\ntoken = 42\n')
    assert await cdn_edge_exit(config) == (
        2,
        f"cdn: {config}: control.token: expected a string\n",
    )


@on_one_loop
async def test_sighup_keeps_following(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    fake = await control()
    e = await controlled(fake.url)
    fake.upsert(HOST, e.origin)
    await e.start()
    e.write_config()
    e.signal(signal.SIGHUP)
    await e.until_logged("reloaded: generation 2")
    fake.upsert(OTHER, e.origin)
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "not following after reload")
    assert "reconnecting to" not in e.log_text()  # [control] unchanged: the same feed
    assert fake.since == [0]

    e.read_timeout = 2  # [control] changed: a new follower, from the saved state
    e.write_config()
    e.signal(signal.SIGHUP)
    await e.until_logged("reloaded: generation 3")
    await e.until_logged(f"reload: [control] changed, reconnecting to {fake.url}")
    await e.until(lambda: _true(fake.since == [0, 2]), "did not reconnect from version 2")
    fake.upsert("third.example.test", e.origin)
    await e.until(lambda: _true(e.saved() == fake.snapshot()), "not following after reload")

    e.config.write_text(
        config_text(e.origin, state=e.state, port=e.port, admin_port=e.admin_port, workers=2)
    )
    e.signal(signal.SIGHUP)
    await e.until_logged("reload refused: adding or removing [control] needs a restart")
    if WORKER_FOLLOWS:
        assert (await e.get("/obj", "third.example.test")).status == 200


def test_changes_go_to_every_live_worker_with_one_lead_and_acks_wait_for_all() -> None:
    text = f'[edge]\nworkers = 3\n[control]\nurl = "http://127.0.0.1:1"\ntoken = "{TOKEN}"\n'
    config = parse_config(text, "edge.toml")
    sup = Supervisor(config, text)
    follower = Followed("http://127.0.0.1:1", Path("unused"))
    sup.follower = follower.follower
    follower.follower.state["version"] = 6
    assert sup.applied_version() == 0  # nothing runs yet
    running, draining = Generation(2, config, text), Generation(1, config, text)
    draining.stopping = True
    sup._generations = [draining, running]
    sup.current = running
    workers = [StubWorker(sup, running, slot, applied=6) for slot in range(3)]
    running.workers = dict(enumerate(workers))
    old = StubWorker(sup, draining, 0, applied=0)
    draining.workers = {0: old}
    sup._lead = workers[0]
    workers[2].exited = True
    purge = {"version": 7, "kind": "purge", "payload": {}}
    sup._send_change(purge)
    assert [w.sent for w in workers] == [
        [{"op": "change", "version": 7, "kind": "purge", "payload": {}, "lead": True}],
        [{"op": "change", "version": 7, "kind": "purge", "payload": {}, "lead": False}],
        [],
    ]
    assert old.sent == []
    assert sup.applied_version() == 6
    workers[0].answer("applied")
    assert sup.applied_version() == 6
    workers[1].answer("applied")
    assert sup.applied_version() == 7  # the dead worker and the draining one do not count
    workers[0].exited = workers[1].exited = True
    sup._send_change({"version": 8, "kind": "block", "payload": {}})
    assert sup.applied_version() == 7  # none alive: nobody enforces 8 yet


def test_a_new_lead_gets_the_purges_the_old_one_had_not_stored() -> None:
    """The lead dies before it answered purge 7: the worker taking over replays it as the
    lead, and once it answered, 7 is no longer kept."""
    text = f'[edge]\nworkers = 2\n[control]\nurl = "http://127.0.0.1:1"\ntoken = "{TOKEN}"\n'
    config = parse_config(text, "edge.toml")
    sup = Supervisor(config, text)
    followed = Followed("http://127.0.0.1:1", Path("unused"))
    follower = sup.follower = followed.follower
    generation = sup.current = Generation(1, config, text)
    sup._generations = [generation]
    lead, other = (StubWorker(sup, generation, slot, applied=6) for slot in range(2))
    generation.workers = {0: lead, 1: other}
    sup._lead = lead
    follower.state["version"] = 7
    purge = {"version": 7, "kind": "purge", "payload": {"type": "url", "items": []}}
    follower.unled = [purge]
    sup._send_change(purge)
    other.answer("applied")  # enforced, but not by the lead: not durable yet
    assert follower.unled == [purge]
    lead.exited = True
    sup._elect()
    assert sup._lead is other
    assert other.sent[-1] == {"op": "replay", "changes": [purge], "lead": True}
    assert sup.applied_version() == 7 and follower.unled == [purge]
    other.answer("applied")
    assert follower.unled == []

    # A reload: the lead's generation drains, a worker of the new one takes over.
    new = Generation(2, config, text)
    successor = StubWorker(sup, new, 0, applied=7)
    new.workers = {0: successor}
    sup._generations.append(new)
    generation.stopping = True
    sup._elect()
    assert sup._lead is successor
    assert other.sent[-1] == {"op": "replay", "changes": [], "lead": False}
    assert successor.sent == [{"op": "replay", "changes": [], "lead": True}]


class StubWorker(WorkerProcess):
    """A worker without a process: what the supervisor sends it is recorded, and `answer`
    answers it as the worker would."""

    def __init__(self, sup: Supervisor, generation: Generation, slot: int, applied: int) -> None:
        self.sup, self.generation, self.slot, self.pid = sup, generation, slot, 1000 + slot
        self.applied, self.asked, self.lead_flushed = applied, deque[Asked](), False
        self.exited = False
        self.sent: list[dict[str, object]] = []

    def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)

    def answer(self, op: str) -> None:
        self.sup._from_worker(self, {"op": op})


@needs_worker
@on_one_loop
async def test_prefetch_goes_through_the_edge_and_reports(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    fake = await control()
    e = await controlled(fake.url)
    fake.upsert(HOST, e.origin)
    await e.start()
    items = [{"domain": HOST, "value": "/obj"}, {"domain": HOST, "value": "/missing"}]
    fake.publish("prefetch", {"task": "t1", "items": items})
    await e.until(lambda: _true("t1" in fake.results), "no prefetch result")
    assert fake.results["t1"] == {"fetched": 1, "failed": [f"http://{HOST}/missing"]}
    assert e.origin_server.hits["/obj"] == 1
    resp = await e.get("/obj", HOST)
    assert resp.status == 200 and "hit" in (resp.header("cache-status") or "")
    assert e.origin_server.hits["/obj"] == 1
    assert total(await e.metrics(), "cdn_edge_requests_total") >= 3


@needs_worker
@on_one_loop
async def test_prefetch_keeps_a_bound_for_the_whole_edge(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    """Two tasks of 20 URLs never have more than PREFETCH_CONCURRENCY requests in flight
    together; past PREFETCH_TASKS admitted tasks, a task fails at once (edge busy)."""
    handler, in_flight = counted(delay=0.2)
    fake = await control()
    e = await controlled(fake.url, routes={f"/s{n}": handler for n in range(60)})
    fake.upsert(HOST, e.origin)
    await e.start()
    for task in range(2):
        items = [{"domain": HOST, "value": f"/s{n}"} for n in range(20 * task, 20 * task + 20)]
        fake.publish("prefetch", {"task": f"t{task}", "items": items})
    await e.until(lambda: _true(len(fake.results) == 2), "no prefetch results")
    assert fake.results == {f"t{t}": {"fetched": 20, "failed": []} for t in range(2)}
    assert in_flight[1] == PREFETCH_CONCURRENCY

    fake.results.clear()
    for n in range(PREFETCH_TASKS + 1):
        fake.publish("prefetch", {"task": f"u{n}", "items": [{"domain": HOST, "value": "/s59"}]})
    await e.until(lambda: _true(len(fake.results) == PREFETCH_TASKS + 1), "no results")
    refused = {"fetched": 0, "failed": [f"http://{HOST}/s59"]}
    assert [t for t, result in fake.results.items() if result == refused] == [f"u{PREFETCH_TASKS}"]
    assert "edge busy" in e.log_text()


@on_one_loop
async def test_a_purge_while_no_worker_runs_is_acked_once_a_worker_enforces_it(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    """workers = 1, restarting with a backoff: a url purge made meanwhile is not acked before
    a worker enforces it, and the object it purged is not served from disk afterwards."""
    handler, _ = counted()
    fake = await control()
    e = await controlled(fake.url, workers=1, routes={"/p": handler})
    e.write_config(DISK)
    fake.upsert(HOST, e.origin)
    await e.start()
    first = (await e.get("/p", HOST)).body
    await e.until(lambda: _true(bool(e.stored())), "never stored on disk")
    pids: set[int] = set()
    for delay in ("", " in 0.5s", " in 1.0s", " in 2.0s"):  # quick deaths back off longer
        await e.until(lambda: _true(bool(e.worker_pids() - pids)), "no new worker")
        (pid,) = e.worker_pids() - pids
        pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        await e.until_logged(f"SIGKILL (exit code -9); restarting it{delay}\n")
    version = fake.publish("purge", URL_PURGE)
    await e.until(lambda: _true(e.saved_version() == version), "the purge was not followed")
    assert e.worker_pids() == set(), "the worker came back too soon for this test"
    await asyncio.sleep(0.2)
    assert version not in fake.acks  # nobody enforces it yet
    await e.until(lambda: _true(fake.acks[-1:] == [version]), "never acked", timeout=10)
    assert (await e.get("/p", HOST)).body not in (first, b"")


@needs_worker
@on_one_loop
async def test_a_snapshot_flushes_what_the_workers_stored(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    """A purge made while the edge was away and pruned from the log before it came back
    reaches it only as a snapshot: the workers flush, so that nothing stored before is
    served. The flush stays owed in state.json until every worker did it."""
    handler, _ = counted()
    fake = await control()
    e = await controlled(fake.url, routes={"/p": handler})
    fake.upsert(HOST, e.origin)
    await e.start()
    before = {(await e.get("/p", HOST)).body for _ in range(8)}  # both workers, likely
    await e.until(lambda: _true(e.saved_flush() is False), "the start's flush never done")
    fake.go_down()
    await until_metric(e, "cdn_edge_control_connected", 0)
    version = fake.publish("purge", URL_PURGE)
    fake.oldest = version + 1  # pruned
    fake.down = False
    await e.until(lambda: _true(fake.acks[-1:] == [version]), "the snapshot never acked")
    assert fake.since[-1] == version - 1 and fake.since.count(0) == 1
    assert "flush" in e.saved_raw() and e.saved_flush() is False
    after = {(await e.get("/p", HOST)).body for _ in range(8)}
    assert not after & before, (before, after)


@needs_worker
@on_one_loop
async def test_a_start_without_saved_state_flushes_the_disk_left_from_before(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    """state.json lost, the disk cache kept: the purges made meanwhile are unknown, so the
    workers start with a flush, which the lead makes durable: an object not requested since
    is not back after one more restart."""
    handler, _ = counted()
    fake = await control()
    e = await controlled(fake.url, routes={"/p": handler, "/q": handler})
    e.write_config(DISK)
    fake.upsert(HOST, e.origin)
    await e.start()
    old = {(await e.get(path, HOST)).body for path in ("/p", "/q")}
    await e.until(lambda: _true(len(e.stored()) == 2), "never stored on disk")
    assert await e.stop() == 0
    (e.state / "control" / "state.json").unlink()
    fake.publish("purge", URL_PURGE)
    await e.start()
    assert {(await e.get("/p", HOST)).body for _ in range(8)} == {b"/p #3\n"}, old
    await e.until(lambda: _true(e.saved_flush() is False), "the flush never done")
    assert await e.stop() == 0
    await e.start()
    assert (await e.get("/q", HOST)).body == b"/q #4\n", old


@needs_worker
@on_one_loop
async def test_a_flush_owed_at_a_crash_is_done_at_the_next_start(
    control: Callable[..., Awaitable[FakeControl]],
    controlled: Callable[..., Awaitable[ControlledEdge]],
) -> None:
    """The edge stopped after a snapshot and before its workers flushed: state.json says the
    flush is owed, and the next start does it, even without the control plane."""
    handler, _ = counted()
    fake = await control()
    e = await controlled(fake.url, routes={"/p": handler})
    e.write_config(DISK)
    fake.upsert(HOST, e.origin)
    await e.start()
    first = (await e.get("/p", HOST)).body
    await e.until(lambda: _true(bool(e.stored())), "never stored on disk")
    assert await e.stop() == 0
    saved = e.saved_raw()
    assert not saved.get("flush")
    (e.state / "control" / "state.json").write_text(json.dumps(saved | {"flush": True}))
    fake.go_down()
    await e.start()
    assert (await e.get("/p", HOST)).body == b"/p #2\n", first
    await e.until(lambda: _true(e.saved_flush() is False), "the flush never done")


async def _true(value: bool) -> bool:
    return value


async def until_metric(e: EdgeProcess, name: str, value: float) -> None:
    async def reached() -> bool:
        return (await e.metrics()).get(name) == value

    await e.until(reached, f"{name} never became {value}")


# --- against the real control plane -----------------------------------------------------------

ADMIN = "test-operator-token-e2e"


@needs_worker
@on_one_loop
async def test_end_to_end_with_the_control_plane(
    tmp_path: Path, controlled: Callable[..., Awaitable[ControlledEdge]]
) -> None:
    """control/app.py on SQLite: an edge made by the API follows domains made by the API."""
    from control.app import make_app
    from control.config import ControlConfig
    from control.db import engine_for, migrate

    engine = engine_for(f"sqlite:///{tmp_path}/control.db")
    await migrate(engine)
    config = ControlConfig(
        source="test", admin_token=ADMIN, cname_suffix="cdn.test", heartbeat=0.5,
        change_log_keep=3600.0, origin_deny=(),  # the test's origin is on loopback
        log_dir=str(tmp_path / "logs"),
    )  # fmt: skip
    server = TestServer(make_app(config, engine), host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as client:

            async def call(method: str, path: str, token: str, body: object = None) -> Any:
                headers = {"Authorization": f"Bearer {token}"}
                async with client.request(method, url + path, json=body, headers=headers) as r:
                    assert r.status < 300, (method, path, r.status, await r.text())
                    return await r.json() if r.status != 204 else None

            edge_token = (await call("POST", "/v1/edges", ADMIN, {"name": "edge-1"}))["token"]
            made = await call(
                "POST", "/v1/accounts", ADMIN, {"name": "acme", "billing": "postpaid"}
            )
            e = await controlled(url, token=edge_token)
            await call("POST", "/v1/domains", made["token"], {"name": HOST, "origins": [e.origin]})
            await e.start()
            assert "control plane state: version" in e.log_text()
            urls = [f"http://{HOST}/obj", f"http://{HOST}/missing"]
            task = await call("POST", "/v1/prefetch", made["token"], {"urls": urls})

            async def prefetched() -> bool:
                status = await call("GET", f"/v1/tasks/{task['id']}", made["token"])
                return bool(status["state"] == "done")

            await e.until(prefetched, "the prefetch task was never done")
            status = await call("GET", f"/v1/tasks/{task['id']}", made["token"])
            assert status["results"] == {"edge-1": {"fetched": 1, "failed": [urls[1]]}}
            assert e.origin_server.hits["/obj"] == 1
            assert (await e.get("/obj", HOST)).status == 200
            assert e.origin_server.hits["/obj"] == 1  # the prefetched copy

            await call("POST", f"/v1/domains/{HOST}/suspend", ADMIN, {"reason": "unpaid"})

            async def suspended() -> bool:
                return (await e.get("/obj", HOST)).status == 403

            await e.until(suspended, "the suspension never reached the edge")

            async def acked() -> bool:
                (listed,) = (await call("GET", "/v1/edges", ADMIN))["edges"]
                newest = int(listed["applied_version"])
                return newest == (await e.metrics())["cdn_edge_config_version"] > 0

            await e.until(acked, "the edge never acked what it applied")
            # Before the control plane stops: its shutdown waits for open feeds to end.
            assert await e.stop() == 0
            assert edge_token not in e.log_text()
    finally:
        await server.close()
        await engine.dispose()
