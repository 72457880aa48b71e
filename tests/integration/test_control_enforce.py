"""The control plane's state and changes enforced by a real edge worker (control/README.md):
domain states (403, 404 and the deletion of a terminated domain's cached objects), URL blocks
(451), purges by url, prefix, domain and tag (memory and disk), bans across a restart, a purge
during a fill, and the supervised worker's control loop over a real socket pair."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.config import parse_config
from edge.disk import DiskStore
from edge.worker import EdgeWorker, listen_socket, run_worker_process
from tests.integration.conftest import HOST, Edge
from tests.integration.edgetest import cs_params, get
from tests.integration.test_control_follow import ControlledEdge, FakeControl
from tests.integration.test_supervisor import on_one_loop
from tests.rawhttp import RawResponse, read_response

OTHER = "other.example.test"
DISK = '[cache]\nmemory_max_object = "64KiB"\ndisk = "64MiB"\n'
CACHEABLE = {"Cache-Control": "max-age=600"}


def config_text(state_dir: Path, origin: str) -> str:
    """An edge config; its one [[domains]] entry is replaced by the control plane's."""
    return f"""
[edge]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "{state_dir}"
{DISK}
[[domains]]
name = "file-only.test"
origins = ["{origin}"]
"""


def domain(name: str, origin: str, state: str = "active", **config: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "reason": "", "config": {"origins": [origin], **config}}


def initial_state(origin: str) -> dict[str, Any]:
    return {"version": 1, "domains": [domain(HOST, origin), domain(OTHER, origin)], "blocks": []}


class ControlEdge(Edge):
    """An in-process worker in control mode; `change` applies the next version as the lead."""

    def change(self, kind: str, payload: dict[str, Any], *, lead: bool = True) -> None:
        self.worker.apply_change(self.worker.config_version + 1, kind, payload, lead)

    def purge(self, kind: str, *values: str, host: str = HOST) -> None:
        items = [{"domain": host, "value": v} for v in values]
        self.change("purge", {"task": 1, "type": kind, "items": items})

    def files(self) -> list[Path]:
        root = Path(self.worker.config.edge.state_dir) / "cache" / "objects"
        return [p for p in root.rglob("*") if p.is_file() and "." not in p.name]

    async def settled(self, count: int) -> None:
        """Wait for the disk to hold `count` objects (a commit follows the client's last
        byte, the lurker works in the background)."""
        for _ in range(300):
            if len(self.files()) == count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.files())} files on disk, expected {count}")


ControlEdgeFactory = Callable[..., Awaitable[ControlEdge]]


@pytest.fixture
async def make_control_edge(tmp_path: Path) -> AsyncIterator[ControlEdgeFactory]:
    """Start an edge whose domains come from a control-plane STATE (both domains in front of
    `origin` by default), with the disk tier on."""
    workers: list[EdgeWorker] = []

    async def start(
        origin: str,
        state: dict[str, Any] | None = None,
        state_dir: Path | None = None,
        *,
        flush: bool = False,
    ) -> ControlEdge:
        config = parse_config(config_text(state_dir or tmp_path / "edge", origin), "t.toml")
        worker = EdgeWorker(config, control_state=state or initial_state(origin), flush=flush)
        await worker.start()
        workers.append(worker)
        return ControlEdge(worker)

    yield start
    for worker in workers:
        await worker.stop(grace=1.0)


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fresh(headers: dict[str, str] | None = None, delay: float = 0.0) -> Route:
    """A cacheable route whose body changes on every origin fetch (so a purge shows)."""
    count = [0]

    async def handler(req: web.Request) -> web.StreamResponse:
        count[0] += 1
        if delay:
            await asyncio.sleep(delay)
        body = f"{req.path_qs} #{count[0]} {req.headers.get('Accept-Encoding', '')}\n"
        return web.Response(body=body.encode(), headers={**CACHEABLE, **(headers or {})})

    return handler


async def cached(edge: Edge, target: str, host: str = HOST, **kw: Any) -> RawResponse:
    """GET `target` twice: the second answer must be a hit with the same body. Neither shows
    the origin's purge tags (Surrogate-Key, Cache-Tag are for this cache only)."""
    first = await get(edge, target, host=host, **kw)
    again = await get(edge, target, host=host, **kw)
    assert first.status == 200 and cs_params(again).get("hit") is True, again.raw_head
    assert again.body == first.body
    for resp in (first, again):
        assert resp.header("surrogate-key") is None and resp.header("cache-tag") is None
    return again


# ------------------------------------------------------------------------------ states


async def test_domain_states(make_origin: Any, make_control_edge: ControlEdgeFactory) -> None:
    origin = await make_origin({"/a": fresh(), "/b": fresh()})
    edge = await make_control_edge(origin.url)
    assert edge.worker.snapshot()["gauges"]["config_version"] == 1
    active = await cached(edge, "/a")
    await cached(edge, "/b", host=OTHER)
    await edge.settled(2)

    edge.change("domain.state", {"name": HOST, "state": "suspended", "reason": "unpaid invoice"})
    for method in ("GET", "HEAD", "POST"):
        resp = await get(edge, "/a", method=method)
        assert resp.status == 403, method
    resp = await get(edge, "/a")
    assert resp.body == b"domain suspended: unpaid invoice\n"
    assert resp.header("cache-status") is not None and resp.header("age") is None
    assert edge.stats.requests["refused"] == 4
    assert (await get(edge, "/b", host=OTHER)).status == 200  # the other domain serves on

    edge.change("domain.state", {"name": HOST, "state": "active", "reason": ""})
    resumed = await get(edge, "/a")
    assert resumed.status == 200 and resumed.body == active.body  # the cache was kept
    assert origin.hits == {"/a": 1, "/b": 1}

    edge.change("domain.state", {"name": HOST, "state": "terminated", "reason": "6.3"})
    assert (await get(edge, "/a")).status == 404
    await edge.settled(1)  # agreement 6.3: its cached objects are deleted, on disk too
    assert len(edge.worker.proxy.tiers.memory) == 1

    edge.change("domain.delete", {"name": OTHER})
    assert (await get(edge, "/b", host=OTHER)).status == 404
    await edge.settled(0)
    assert len(edge.worker.proxy.tiers.memory) == 0
    assert origin.hits == {"/a": 1, "/b": 1}  # refusals never reach the origin
    assert edge.worker.snapshot()["gauges"]["config_version"] == 5


async def test_a_domain_the_edge_refuses_is_unknown(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    origin = await make_origin({"/a": fresh()})
    state = initial_state(origin.url)
    state["domains"][1]["config"]["origins"] = ["gopher://nope"]
    edge = await make_control_edge(origin.url, state)
    assert (await get(edge, "/a", host=OTHER)).status == 404
    edge.change("domain.upsert", {"domain": {"name": HOST, "state": "active", "config": {}}})
    assert (await get(edge, "/a")).status == 404
    edge.change("domain.upsert", {"domain": domain(HOST, origin.url)})
    assert (await get(edge, "/a")).status == 200


async def test_a_terminated_domain_comes_without_config(
    make_origin: Any, make_control_edge: ControlEdgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    origin = await make_origin({"/a": fresh()})
    state = initial_state(origin.url)
    state["domains"].append({"name": "gone.test", "state": "terminated", "reason": "6.3"})
    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        edge = await make_control_edge(origin.url, state)
        assert (await get(edge, "/a", host="gone.test")).status == 404
        edge.change("domain.state", {"name": HOST, "state": "terminated", "reason": "6.3"})
        assert (await get(edge, "/a")).status == 404
    assert not caplog.records
    assert origin.hits == {}


# ------------------------------------------------------------------------------ blocks


async def test_blocked_urls_answer_451(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    origin = await make_origin({"/court.html": fresh(), "/leaks/a": fresh(), "/ok": fresh()})
    edge = await make_control_edge(origin.url)
    edge.change("block", {"domain": HOST, "pattern": "/court.html", "reason": "order 12"})
    edge.change("block", {"domain": HOST, "pattern": "/leaks/*", "reason": ""})
    for target in ("/court.html", "/court.html?x=1", "/%63ourt.html", "/leaks/a", "/le%61ks/a?b"):
        resp = await get(edge, target)
        assert resp.status == 451, target
    assert (await get(edge, "/court.html")).body == b"unavailable for legal reasons: order 12\n"
    assert (await get(edge, "/ok")).status == 200
    assert (await get(edge, "/leaks/a", host=OTHER)).status == 200  # per domain
    assert origin.hits == {"/ok": 1, "/leaks/a": 1}

    edge.change("unblock", {"domain": HOST, "pattern": "/court.html"})
    assert (await get(edge, "/court.html?x=1")).status == 200  # and nothing 451 was cached
    assert (await get(edge, "/leaks/b")).status == 451
    assert origin.hits["/court.html"] == 1


async def test_blocks_cannot_be_stepped_around(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    """Dot segments, doubled slashes and an escaped slash reach the same file at an origin
    that resolves them: each is refused before the origin is asked."""
    origin = await make_origin({"/blocked/file.txt": fresh(), "/public/ok": fresh()})
    edge = await make_control_edge(origin.url)
    edge.change("block", {"domain": HOST, "pattern": "/blocked/file.txt", "reason": "order"})
    edge.change("block", {"domain": HOST, "pattern": "/blocked/*", "reason": "order"})
    for target in (
        "/public/../blocked/file.txt",
        "/./blocked/file.txt",
        "//blocked/file.txt",
        "/blocked%2Ffile.txt",
        "/public/%2E%2E/blocked/file.txt?x",
    ):
        resp = await get(edge, target)
        assert resp.status == 451, target
    assert origin.hits == {}
    assert (await get(edge, "/public/ok")).status == 200


# ------------------------------------------------------------------------------ purges


async def test_url_purge_removes_every_variant(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    origin = await make_origin({"/v": fresh({"Vary": "Accept-Encoding"}), "/q": fresh()})
    edge = await make_control_edge(origin.url)
    gzip = await cached(edge, "/v", headers={"Accept-Encoding": "gzip"})
    br = await cached(edge, "/v", headers={"Accept-Encoding": "br"})
    q1 = await cached(edge, "/q?a=1")
    await cached(edge, "/q?a=2")
    await edge.settled(5)  # two variants and their stub, two queries
    edge.purge("url", "/v", "/q?a=1")
    assert len(edge.files()) == 1  # at once, no walk needed: /q?a=2 is left
    for enc, before in (("gzip", gzip), ("br", br)):
        resp = await get(edge, "/v", headers={"Accept-Encoding": enc})
        assert resp.body != before.body and "hit" not in cs_params(resp)
    assert (await get(edge, "/q?a=1")).body != q1.body
    assert cs_params(await get(edge, "/q?a=2")).get("hit") is True
    assert origin.hits == {"/v": 4, "/q": 3}


async def test_prefix_and_domain_purges(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    origin = await make_origin({"/img/1": fresh(), "/img/2": fresh(), "/css/1": fresh()})
    edge = await make_control_edge(origin.url)
    for target in ("/img/1", "/img/2", "/css/1"):
        await cached(edge, target)
    await cached(edge, "/img/1", host=OTHER)
    await edge.settled(4)
    edge.purge("prefix", "/img/")
    await edge.settled(2)  # the lurker's walk of the disk
    for target in ("/img/1", "/img/2"):
        assert "hit" not in cs_params(await get(edge, target))
    assert cs_params(await get(edge, "/css/1")).get("hit") is True
    assert cs_params(await get(edge, "/img/1", host=OTHER)).get("hit") is True
    assert origin.hits == {"/img/1": 3, "/img/2": 2, "/css/1": 1}
    await edge.settled(4)  # the lurker removed the two, the refetches stored two

    edge.purge("domain", "")
    for target in ("/img/1", "/img/2", "/css/1"):
        assert "hit" not in cs_params(await get(edge, target))
    assert cs_params(await get(edge, "/img/1", host=OTHER)).get("hit") is True
    assert origin.hits == {"/img/1": 4, "/img/2": 3, "/css/1": 2}


async def test_tag_purges_by_surrogate_key_and_cache_tag(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    origin = await make_origin(
        {
            "/s": fresh({"Surrogate-Key": "shelf product-7"}),
            "/c": fresh({"Cache-Tag": "promo,product-7"}),
            "/n": fresh({"Surrogate-Key": "product-8"}),
            "/p": fresh({"Cache-Tag": "product-7", "Cache-Control": "no-store"}),
        }
    )
    edge = await make_control_edge(origin.url)
    for target in ("/s", "/c", "/n"):
        await cached(edge, target)
    passed = await get(edge, "/p")
    assert passed.status == 200 and passed.header("cache-tag") is None
    await edge.settled(3)

    edge.purge("tag", "product-7")
    assert "hit" not in cs_params(await get(edge, "/s"))
    assert "hit" not in cs_params(await get(edge, "/c"))
    assert cs_params(await get(edge, "/n")).get("hit") is True
    await edge.settled(3)
    edge.purge("tag", "promo")
    miss = await get(edge, "/c")
    assert "hit" not in cs_params(miss) and miss.header("cache-tag") is None
    assert origin.hits == {"/s": 2, "/c": 3, "/n": 1, "/p": 1}


async def test_a_tag_purge_reaches_disk_objects_and_survives_a_restart(
    make_origin: Any, make_control_edge: ControlEdgeFactory, monkeypatch: Any, tmp_path: Path
) -> None:
    origin = await make_origin({"/t": fresh({"Surrogate-Key": "t"}), "/u": fresh()})
    first = await make_control_edge(origin.url)
    before = await cached(first, "/t")
    await cached(first, "/u")
    await first.settled(2)

    async def stalled(self: DiskStore, doomed: Any) -> int:
        await asyncio.Event().wait()  # the walk never ends: the edge stops first
        return 0

    with monkeypatch.context() as m:
        m.setattr(DiskStore, "sweep", stalled)
        first.purge("tag", "t")
        await first.worker.stop(grace=1.0)
    assert len(first.files()) == 2  # the purged object is still on disk, its ban in the file
    state = initial_state(origin.url) | {"version": first.worker.config_version}
    again = await make_control_edge(origin.url, state, tmp_path / "edge")
    assert len(again.files()) == 2
    resp = await get(again, "/t")
    assert resp.body != before.body and "hit" not in cs_params(resp)  # not resurrected
    assert cs_params(await get(again, "/u")).get("hit") is True
    assert origin.hits == {"/t": 2, "/u": 1}
    again.change("block", {"domain": OTHER, "pattern": "/x", "reason": ""})  # lead again
    for _ in range(300):
        if not len(again.worker.proxy.tiers.bans):
            break
        await asyncio.sleep(0.01)
    assert not len(again.worker.proxy.tiers.bans)  # the walk ran, the ban is done


async def test_a_purge_during_a_fill_stores_nothing(
    make_origin: Any, make_control_edge: ControlEdgeFactory
) -> None:
    origin = await make_origin(
        {
            "/slow": fresh(delay=0.3),
            "/tagged": fresh({"Surrogate-Key": "k"}, delay=0.3),
        }
    )
    edge = await make_control_edge(origin.url)
    for target, kind, value in (("/slow", "url", "/slow"), ("/tagged", "tag", "k")):
        pending = asyncio.ensure_future(get(edge, target))
        while not origin.hits.get(target):
            await asyncio.sleep(0.01)
        edge.purge(kind, value)
        first = await pending
        assert first.status == 200  # its client still gets it
        again = await get(edge, target)
        assert again.body != first.body and "hit" not in cs_params(again), target
    assert origin.hits == {"/slow": 2, "/tagged": 2}


@pytest.mark.parametrize(("kind", "value"), [("url", "/big"), ("prefix", "/b")])
async def test_a_purge_during_a_slice_fetch_stores_nothing(
    make_origin: Any, make_control_edge: ControlEdgeFactory, tmp_path: Path, kind: str, value: str
) -> None:
    """A slice takes 2 s to arrive; at 0.5 s the origin has new bytes and the URL is purged:
    the old slice reaches its client but is never served again, not even after a restart."""
    version = [1]
    size = (1 << 20) + 4096  # two slices of the default 1 MiB; a seek reads the first

    async def big(req: web.Request) -> web.StreamResponse:
        body = bytes([version[0]]) * size
        first, _, last = req.headers["Range"].partition("=")[2].partition("-")
        start, end = int(first), min(int(last) + 1, size)
        resp = web.StreamResponse(
            status=206,
            headers={
                **CACHEABLE,
                "ETag": f'"v{version[0]}"',
                "Content-Range": f"bytes {start}-{end - 1}/{size}",
                "Content-Length": str(end - start),
            },
        )
        await resp.prepare(req)
        old = version[0] == 1
        step = -(-(end - start) // 8)
        for offset in range(start, end, step):  # the old body trickles in over 2 s
            await asyncio.sleep(0.25 if old else 0)
            await resp.write(body[offset : min(offset + step, end)])
        await resp.write_eof()
        return resp

    origin = await make_origin({"/big": big})
    edge = await make_control_edge(origin.url)
    seek = {"Range": "bytes=0-99"}
    pending = asyncio.ensure_future(get(edge, "/big", seek))
    while not origin.hits.get("/big"):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    version[0] = 2
    edge.purge(kind, value)
    old = await pending
    assert old.status == 206 and old.body == b"\x01" * 100  # its client still gets it
    again = await get(edge, "/big", seek)
    assert again.body == b"\x02" * 100 and "hit" not in cs_params(again)
    assert cs_params(await get(edge, "/big", seek)).get("hit") is True
    await edge.worker.stop(grace=1.0)

    state = initial_state(origin.url) | {"version": edge.worker.config_version}
    restarted = await make_control_edge(origin.url, state, tmp_path / "edge")
    resp = await get(restarted, "/big", seek)
    assert resp.body == b"\x02" * 100 and cs_params(resp).get("hit") is True
    assert origin.hits == {"/big": 2}


async def test_a_flushed_snapshot_bans_everything_stored_before_it(
    make_origin: Any, make_control_edge: ControlEdgeFactory, tmp_path: Path
) -> None:
    """A STATE with "flush" (purges may have been missed): nothing stored before it is served
    again, on disk either, for its domains and the old state's; without it the cache stays."""
    origin = await make_origin({"/a": fresh(), "/b": fresh()})
    edge = await make_control_edge(origin.url)
    edge.change("block", {"domain": HOST, "pattern": "/x", "reason": ""})  # the lead
    kept = await cached(edge, "/a")
    await cached(edge, "/b", host=OTHER)
    await edge.settled(2)
    state = initial_state(origin.url)
    edge.worker.replace_state(state | {"version": 7, "domains": state["domains"][:1]})
    assert (await get(edge, "/a")).body == kept.body
    edge.worker.replace_state(state | {"version": 8}, flush=True)
    resp = await get(edge, "/a")
    assert resp.body != kept.body and "hit" not in cs_params(resp)
    assert "hit" not in cs_params(await get(edge, "/b", host=OTHER))
    await cached(edge, "/a")
    for _ in range(300):  # the lead's walk removed the old files, the bans are done
        if not len(edge.worker.proxy.tiers.bans):
            break
        await asyncio.sleep(0.01)
    assert not len(edge.worker.proxy.tiers.bans)
    await edge.settled(2)
    assert origin.hits == {"/a": 2, "/b": 2}

    await edge.worker.stop(grace=1.0)  # a restart: the first STATE, without and with flush
    state_dir = tmp_path / "edge"
    again = await make_control_edge(origin.url, state | {"version": 8}, state_dir)
    after = await cached(again, "/a")
    await again.worker.stop(grace=1.0)
    flushed = await make_control_edge(origin.url, state | {"version": 9}, state_dir, flush=True)
    resp = await get(flushed, "/a")
    assert resp.body != after.body and "hit" not in cs_params(resp)
    assert origin.hits == {"/a": 3, "/b": 2}


# ------------------------------------------------------------------------------ supervised


class ControlSocket:
    """The supervisor's side of a worker process's control socket, played by the test."""

    def __init__(self, tmp_path: Path, origin: str) -> None:
        self.state_dir = tmp_path / "edge"
        self.origin = origin
        ours, theirs = socket.socketpair()
        listener = listen_socket("127.0.0.1", 0)
        self.port = listener.getsockname()[1]
        self.ours = ours
        self.process = asyncio.ensure_future(run_worker_process(theirs.detach(), listener.detach()))

    async def start(self, state: dict[str, Any], **hello: Any) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.ours)
        text = config_text(self.state_dir, self.origin)
        self.send({"op": "config", "source": "t.toml", "text": text, "grace": 1.0,
                   "control": state, **hello})  # fmt: skip
        assert (await self.receive("ready"))["pid"] == os.getpid()

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")

    async def receive(self, op: str) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            message: dict[str, Any] = json.loads(line)
            if message["op"] == op:
                return message

    async def fetch(self, target: str, host: str = HOST) -> RawResponse:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        w.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        try:
            return await read_response(r)
        finally:
            w.close()

    def bans(self) -> dict[str, Any]:
        saved: dict[str, Any] = json.loads((self.state_dir / "control" / "bans.json").read_bytes())
        return saved

    async def stop(self) -> None:
        self.writer.close()  # end of file: the worker drains and stops
        await asyncio.wait_for(self.process, 10)


def purge_change(version: int, kind: str, value: str, host: str = HOST) -> dict[str, Any]:
    items = [{"domain": host, "value": value}]
    return {
        "version": version,
        "kind": "purge",
        "payload": {"task": 1, "type": kind, "items": items},
    }


async def test_worker_process_control_loop(make_origin: Any, tmp_path: Path) -> None:
    """The first config line carries the STATE; changes and states are answered with
    applied."""
    origin = await make_origin({"/a": fresh()})
    sup = ControlSocket(tmp_path, origin.url)
    try:
        await sup.start(initial_state(origin.url))
        assert (await sup.fetch("/a")).status == 200
        sup.send(
            {
                "op": "change",
                "version": 2,
                "kind": "domain.state",
                "lead": True,
                "payload": {"name": HOST, "state": "suspended", "reason": "r"},
            }
        )
        assert await sup.receive("applied") == {"op": "applied", "version": 2}
        assert (await sup.fetch("/a")).status == 403
        sup.send(
            {
                "op": "change",
                "version": 2,
                "kind": "domain.delete",
                "lead": True,
                "payload": {"name": HOST},
            }
        )  # a redelivered version: ignored, still answered
        assert await sup.receive("applied") == {"op": "applied", "version": 2}
        assert (await sup.fetch("/a")).status == 403
        sup.send({"op": "state", "state": initial_state(origin.url) | {"version": 9}})
        assert await sup.receive("applied") == {"op": "applied", "version": 9}
        assert (await sup.fetch("/a")).status == 200
        sup.send({"op": "stats", "id": 1})
        assert (await sup.receive("stats"))["snapshot"]["gauges"]["config_version"] == 9
    finally:
        await sup.stop()


async def test_a_restarted_worker_flushes_and_replays(make_origin: Any, tmp_path: Path) -> None:
    """A worker started with "flush" bans what was stored before it; a "replay" applies the
    purges of changes older than its state, the lead answering once its bans are on disk."""
    origin = await make_origin({"/a": fresh(), "/b": fresh(), "/c": fresh()})
    state = initial_state(origin.url) | {"version": 20}
    first = ControlSocket(tmp_path, origin.url)
    await first.start(state)
    bodies = {t: (await first.fetch(t)).body for t in ("/a", "/b")}
    other = (await first.fetch("/c", OTHER)).body
    await first.stop()

    kept = ControlSocket(tmp_path, origin.url)
    await kept.start(state)
    assert (await kept.fetch("/a")).body == bodies["/a"]  # the disk tier survives a restart
    kept.send({"op": "replay", "changes": [], "lead": True})
    assert await kept.receive("applied") == {"op": "applied", "version": 20}
    kept.send(
        {
            "op": "replay",
            "lead": True,
            "changes": [
                purge_change(11, "url", "/a"),
                {"version": 12, "kind": "domain.delete", "payload": {"name": OTHER}},
                {"version": 13, "kind": "block", "payload": {"domain": HOST, "pattern": "/b"}},
            ],
        }
    )
    assert await kept.receive("applied") == {"op": "applied", "version": 13}
    saved = kept.bans()  # durable before the answer
    assert {(b["version"], b["kind"], b["key"]) for b in saved["bans"]} >= {
        (11, "url", f"{HOST}/a")
    }
    assert (await kept.fetch("/a")).body != bodies["/a"]
    assert (await kept.fetch("/b")).body == bodies["/b"]  # the block was not replayed
    assert (await kept.fetch("/c", OTHER)).body != other  # nor the state: still served
    await kept.stop()

    flushed = ControlSocket(tmp_path, origin.url)
    await flushed.start(state, flush=True)
    assert (await flushed.fetch("/b")).body != bodies["/b"]
    await flushed.stop()
    assert origin.hits == {"/a": 2, "/b": 2, "/c": 2}


async def test_a_burst_of_purges_refetches_every_url(make_origin: Any, tmp_path: Path) -> None:
    """200 URL purges back to back: every purged URL is fetched anew, the lead answers each
    once it is on disk, and the ban file ends up with all of them."""
    count = 200
    origin = await make_origin({f"/p{i}": fresh() for i in range(count)})
    sup = ControlSocket(tmp_path, origin.url)
    try:
        await sup.start(initial_state(origin.url))
        before = [(await sup.fetch(f"/p{i}")).body for i in range(count)]
        for i in range(count):
            sup.send({"op": "change", **purge_change(2 + i, "url", f"/p{i}"), "lead": True})
        for i in range(count):
            assert await sup.receive("applied") == {"op": "applied", "version": 2 + i}
        saved = sup.bans()
        assert saved["version"] == count + 1
        assert {b["key"] for b in saved["bans"]} == {f"{HOST}/p{i}" for i in range(count)}
        for i in range(count):
            assert (await sup.fetch(f"/p{i}")).body != before[i], i
        assert set(origin.hits.values()) == {2}
    finally:
        await sup.stop()


@on_one_loop
async def test_supervised_workers_purge_together(make_origin: Any, tmp_path: Path) -> None:
    """`cdn edge` with two workers sharing the disk tier: once the edge acked a purge, no
    worker answers from what it purged, in memory or on disk."""
    origin = await make_origin({"/p": fresh({"Surrogate-Key": "k"})})
    fake = FakeControl()
    await fake.start()
    edge = ControlledEdge(tmp_path, origin, fake.url, workers=2)
    fake.upsert(HOST, origin.url)
    try:
        await edge.start()
        seen: list[bytes] = []
        for purge in (None, ("url", "/p"), ("tag", "k")):
            if purge is not None:
                version = fake.publish(
                    "purge",
                    {"task": 1, "type": purge[0], "items": [{"domain": HOST, "value": purge[1]}]},
                )

                async def acked(version: int = version) -> bool:
                    return fake.acks[-1:] == [version]

                await edge.until(acked, f"purge {version} never acked")
            # New connections, spread over both workers by the kernel.
            bodies = {(await edge.get("/p", HOST)).body for _ in range(16)}
            assert len(bodies) == 1 and not bodies & set(seen), (purge, bodies, seen)
            seen.extend(bodies)
        assert origin.hits == {"/p": 3}
    finally:
        assert await edge.stop() == 0
        await fake.close()
