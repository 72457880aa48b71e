"""The change feed edges follow: publishing changes, and serving them as SSE.

`publish` appends a change in the writer's transaction; with PostgreSQL it also queues a
`NOTIFY cdn_changes`, which PostgreSQL delivers at commit to every replica listening (a rolled
back writer notifies no one).

`Feed` serves `/v1/edge/*` (control/README.md, "The feed"); the domains it sends carry their
signing keys decrypted (`_domain_state`, `_for_edges`): the only place they leave in plaintext
besides the answers of the domain API to those who may change them.

Each open stream sleeps on an event that `Feed.changed()` (a writer in this process) and the
LISTEN connection (a writer on another replica) wake; it then reads the log after the last
version it sent. The log is gap-free and in commit order, so "everything after my last version"
never skips or reorders a change; a periodic re-read at each heartbeat covers a lost
notification.

A stream lives only as long as its token: removing an edge ends its streams in this process at
once (`end_streams_of`), and every stream checks its token at each heartbeat, which ends the
streams other replicas hold within one heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web
from cryptography.fernet import Fernet
from sqlalchemy import Row, case, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.auth import PRINCIPAL, Principal
from control.background import sleep_unless_stopping, stop_at_safe_point
from control.db import write_transaction
from control.digits import parse_digits
from control.problems import Problem
from control.schema import (
    Change,
    api_tokens,
    append_change,
    change_counter,
    changes,
    changes_since,
    domains,
    edges,
    iso,
    task_results,
    tasks,
    url_blocks,
)
from control.signing_keys import opened

NOTIFY_CHANNEL = "cdn_changes"

log = logging.getLogger("control.feed")

# Changes read per query; a lagging edge gets them in batches of this size, back to back.
BATCH = 500
# The LISTEN connection's liveness probe interval and its reconnect backoff bounds (seconds).
LISTEN_PROBE = 10.0
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
# How often the pruning task runs at most (seconds); more often when `keep` is short.
# How long a stopping feed lets a prune in progress finish (cancelling it mid-statement on
# SQLite invalidates the connection: control.background).
PRUNE_STOP_GRACE = 10.0
PRUNE_EVERY = 3600.0
MAX_ID = 2**31 - 1  # the largest Integer primary key
MAX_ID_DIGITS = 10
MAX_VERSION_DIGITS = 19  # a BigInteger


async def publish(conn: AsyncConnection, kind: str, payload: dict[str, Any]) -> int:
    """Append a change (see control/README.md for kinds and payloads); returns its version.

    After the transaction commits, the caller wakes this process's feed with `Feed.changed()`.
    """
    version = await append_change(conn, kind, payload)
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_notify(:channel, :version)"),
            {"channel": NOTIFY_CHANNEL, "version": str(version)},
        )
    return version


async def newest_version(conn: AsyncConnection) -> int:
    return int(
        (
            await conn.execute(select(change_counter.c.version).where(change_counter.c.id == 1))
        ).scalar_one()
    )


async def build_state(conn: AsyncConnection, cipher: Fernet | None = None) -> dict[str, Any]:
    """The whole truth edges enforce (STATE), at the version read with it; signing keys opened
    with `cipher` (edges get them in plaintext).

    Consistent only inside one snapshot: use `read_snapshot`.
    """
    version = await newest_version(conn)
    at = await conn.execute(select(changes.c.created_at).where(changes.c.version == version))
    domain_rows = await conn.execute(select(domains).order_by(domains.c.name))
    block_rows = await conn.execute(
        select(url_blocks.c.domain, url_blocks.c.pattern, url_blocks.c.reason).order_by(
            url_blocks.c.domain, url_blocks.c.pattern
        )
    )
    return {
        "version": version,
        "at": iso(at.scalar_one_or_none()),
        "domains": [_domain_state(r, cipher) for r in domain_rows],
        "blocks": [
            {"domain": r.domain, "pattern": r.pattern, "reason": r.reason} for r in block_rows
        ],
    }


def _domain_state(row: Row[Any], cipher: Fernet | None) -> dict[str, Any]:
    """DOMAIN; a terminated domain without its config: edges only answer 404 for it."""
    state = {"name": row.name, "state": row.state, "reason": row.state_reason}
    if row.state != "terminated":
        state["config"] = opened(row.name, row.config, cipher)
    return state


def _for_edges(change: Change, cipher: Fernet | None) -> Change:
    """`change` as edges get it: a `domain.upsert` with its signing keys opened."""
    domain = change.payload.get("domain")
    if change.kind != "domain.upsert" or not isinstance(domain, dict) or "config" not in domain:
        return change
    config = opened(domain["name"], domain["config"], cipher)
    if config is domain["config"]:
        return change
    payload = {**change.payload, "domain": {**domain, "config": config}}
    return dataclasses.replace(change, payload=payload)


@contextlib.asynccontextmanager
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection whose reads all see one committed state.

    PostgreSQL: a REPEATABLE READ transaction. SQLite: the driver only issues BEGIN before a
    write, so each SELECT would be its own transaction; the connection is switched to autocommit
    and an explicit BEGIN holds one WAL read snapshot across the reads.
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                await conn.exec_driver_sql("ROLLBACK")
            return
        conn = await conn.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        async with conn.begin():
            yield conn


def _event(name: str, version: int, data: dict[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return f"event: {name}\nid: {version}\ndata: {body}\n\n".encode()


def _edge(request: web.Request) -> Principal:
    principal: Principal = request[PRINCIPAL]
    if principal.kind != "edge" or principal.edge_id is None or principal.token_id is None:
        raise Problem(403, "only an edge token may call /v1/edge/*")
    return principal


def _at(raw: str | None) -> datetime | None:
    """The `at` query parameter: when the edge's last change was made, as the feed sent it."""
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        value = None
    if value is None or value.utcoffset() is None:
        raise Problem(
            400, f"at must be the ISO 8601 time with offset of the change `since`, got {raw!r}"
        )
    return value


async def _diverged(conn: AsyncConnection, since: int, at: datetime) -> bool:
    """Whether this log's change `since` was made at another time than the edge's: a restored
    control plane has made other changes under the same versions."""
    made = (
        await conn.execute(select(changes.c.created_at).where(changes.c.version == since))
    ).scalar_one_or_none()
    return made is not None and made != at


@dataclasses.dataclass(eq=False, slots=True)
class _Stream:
    """One open feed stream: whose token it serves, and whether it must end."""

    edge_id: int
    token_id: int
    ended: bool = False


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:  # bad JSON, bad UTF-8, or an integer too long to convert
        raise Problem(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem(
            422,
            "the body must be a JSON object",
            errors=[{"field": "", "problem": "not an object"}],
        )
    return body


def _check_fields(body: dict[str, Any], rules: dict[str, str]) -> None:
    """422 naming every unknown, missing or mistyped field. Rules: "int" (>= 0), "strings"."""
    errors = [{"field": k, "problem": "unknown field"} for k in body if k not in rules]
    for field, rule in rules.items():
        if field not in body:
            errors.append({"field": field, "problem": "required"})
            continue
        value = body[field]
        if rule == "int":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                errors.append({"field": field, "problem": "must be an integer >= 0"})
        elif not isinstance(value, list):
            errors.append({"field": field, "problem": "must be a list of strings"})
        else:
            errors.extend(
                {"field": f"{field}[{i}]", "problem": "must be a string"}
                for i, item in enumerate(value)
                if not isinstance(item, str)
            )
    if errors:
        names = ", ".join(e["field"] for e in errors)
        raise Problem(422, f"invalid fields: {names}", errors=errors)


class Feed:
    """Serves the change feed and the other edge endpoints; owns the LISTEN and pruning tasks."""

    def __init__(
        self, engine: AsyncEngine, *, heartbeat: float, keep: float, cipher: Fernet | None = None
    ) -> None:
        self.engine = engine
        self.cipher = cipher  # opens the signing keys of the domains sent (control.signing_keys)
        self.heartbeat = heartbeat
        self.keep = keep
        # Streams wait on the current event; `changed` sets it and installs a fresh one, so a
        # stream that took the event before reading the log cannot miss a later wake.
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pruner: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()  # the first LISTEN attempt finished (either way)
        # One in-flight log read per (last version, wake generation), shared by the streams
        # that need exactly it: a wake costs one query per distinct position, not per stream.
        self._generation = 0
        self._reads: dict[tuple[int, int], asyncio.Task[list[Change]]] = {}
        self._streams: set[_Stream] = set()
        # Acks waiting for the next group commit, and what the last one wrote (see _record_ack).
        self._pending_acks: dict[int, int] = {}
        self._applied: dict[int, int] = {}
        self._newest_acked = 0  # the newest version an ack named that exists
        self._ack_lock = asyncio.Lock()

    async def start(self) -> None:
        """Start pruning and, with PostgreSQL, listening; returns once LISTEN was tried."""
        self._stopping.clear()
        self._pruner = asyncio.create_task(self._prune_loop(), name="feed-prune")
        if self.engine.dialect.name == "postgresql":
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="feed-listen"))
            await self._listening.wait()

    async def stop(self) -> None:
        """End open streams and the background tasks. Idempotent; call it at app shutdown
        (aiohttp's on_shutdown) so open streams do not hold the server's graceful stop."""
        self._stopping.set()
        self.changed()
        tasks, self._tasks = self._tasks, []
        pruner, self._pruner = self._pruner, None
        if pruner is not None:  # never cancelled inside its database write
            await stop_at_safe_point(pruner, self._stopping, PRUNE_STOP_GRACE)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Shared log reads are short: let them finish (their streams then see the stop) rather
        # than cancel them under the streams awaiting them.
        await asyncio.gather(*self._reads.values(), return_exceptions=True)

    def changed(self) -> None:
        """Wake this process's streams (a writer calls it after its commit)."""
        self._generation += 1
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def end_streams_of(self, edge_id: int) -> None:
        """End this process's open streams of a removed edge now (its token no longer works;
        the other streams only wake, see nothing new and sleep again)."""
        for stream in self._streams:
            if stream.edge_id == edge_id:
                stream.ended = True
        self.changed()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/edge/events", self._events),
            web.get("/v1/edge/snapshot", self._snapshot),
            web.post("/v1/edge/ack", self._ack),
            web.post("/v1/edge/tasks/{id}/result", self._task_result),
        ]

    # --- the stream ---------------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        principal = _edge(request)
        raw = request.query.get("since", "0")
        since = parse_digits(raw, MAX_VERSION_DIGITS)
        if since is None:
            raise Problem(400, f"since must be a non-negative integer version, got {raw!r}")
        at = _at(request.query.get("at"))
        async with self.engine.begin() as conn:
            await conn.execute(
                update(edges)
                .where(edges.c.id == principal.edge_id)
                .values(last_seen=datetime.now(UTC))
            )
            snapshot_first = (
                since == 0
                or since > await newest_version(conn)
                or (at is not None and await _diverged(conn, since, at))
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        assert principal.edge_id is not None and principal.token_id is not None  # _edge
        stream = _Stream(principal.edge_id, principal.token_id)
        self._streams.add(stream)
        try:
            await response.prepare(request)
            await self._stream(response, stream, since, snapshot_first)
        except ConnectionResetError:
            log.debug("edge %s went away", principal.edge_id)
        except (SQLAlchemyError, OSError) as exc:
            # The answer has begun: no problem document now. Ending it makes the edge reconnect.
            log.warning("feed stream to edge %s ended: %s", principal.edge_id, exc)
        finally:
            self._streams.discard(stream)
        return response

    async def _stream(
        self, response: web.StreamResponse, stream: _Stream, last: int, snapshot_first: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        beat_at = check_at = loop.time() + self.heartbeat
        wake = self._wake
        if snapshot_first:
            last = await self._send_snapshot(response)
        while not self._stopping.is_set() and not stream.ended:
            if loop.time() >= check_at:  # on its own clock: a busy stream never heartbeats
                if not await self._token_live(stream):
                    return
                check_at = loop.time() + self.heartbeat
            batch = await self._read_after(last)
            if batch and batch[0].version != last + 1:
                # The changes right after `last` were pruned: the edge needs the whole state.
                last = await self._send_snapshot(response)
                continue
            for change in batch:
                await response.write(
                    _event(
                        "change",
                        change.version,
                        {
                            "version": change.version,
                            "kind": change.kind,
                            "payload": change.payload,
                            "at": iso(change.created_at),
                        },
                    )
                )
                last = change.version
            if batch:
                beat_at = loop.time() + self.heartbeat
            if len(batch) == BATCH:
                continue
            if not wake.is_set():
                timeout = min(beat_at, check_at) - loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
            wake = self._wake
            if loop.time() >= beat_at and not self._stopping.is_set() and not stream.ended:
                await response.write(b": heartbeat\n\n")
                beat_at = loop.time() + self.heartbeat

    async def _token_live(self, stream: _Stream) -> bool:
        """Whether the stream's token still opens the feed: not revoked, its edge not removed
        (here, or by another replica, which cannot reach this stream)."""
        async with self.engine.connect() as conn:
            row = await conn.execute(
                select(api_tokens.c.id)
                .join(edges, edges.c.id == api_tokens.c.edge_id)
                .where(
                    api_tokens.c.id == stream.token_id,
                    api_tokens.c.revoked_at.is_(None),
                    edges.c.deleted_at.is_(None),
                )
            )
            return row.first() is not None

    async def _send_snapshot(self, response: web.StreamResponse) -> int:
        async with read_snapshot(self.engine) as conn:
            state = await build_state(conn, self.cipher)
        await response.write(_event("snapshot", state["version"], state))
        return int(state["version"])

    async def _read_after(self, last: int) -> list[Change]:
        key = (last, self._generation)
        read = self._reads.get(key)
        if read is None:
            read = asyncio.create_task(self._read(last))
            self._reads[key] = read
            read.add_done_callback(lambda done: self._forget(key, done))
        # shield: one stream going away must not cancel the read its peers share
        return await asyncio.shield(read)

    def _forget(self, key: tuple[int, int], read: asyncio.Task[list[Change]]) -> None:
        self._reads.pop(key, None)
        if not read.cancelled():
            read.exception()  # retrieved here too: every reader may have gone away

    async def _read(self, last: int) -> list[Change]:
        async with self.engine.connect() as conn:
            batch = await changes_since(conn, last, BATCH)
        return [_for_edges(change, self.cipher) for change in batch]

    # --- the other edge endpoints ---------------------------------------------------------------

    async def _snapshot(self, request: web.Request) -> web.Response:
        _edge(request)
        async with read_snapshot(self.engine) as conn:
            state = await build_state(conn, self.cipher)
        return web.json_response(state)

    async def _ack(self, request: web.Request) -> web.Response:
        principal = _edge(request)
        body = await _json_object(request)
        _check_fields(body, {"version": "int"})
        version: int = body["version"]
        # Versions only grow: checking before the write is enough, and a version already seen
        # needs no read (every edge acks every change).
        if version > self._newest_acked:
            async with self.engine.connect() as conn:
                newest = await newest_version(conn)
            if version > newest:
                raise Problem(
                    422,
                    f"version {version} is newer than the newest change ({newest})",
                    errors=[{"field": "version", "problem": f"greater than {newest}"}],
                )
            self._newest_acked = max(self._newest_acked, version)
        assert principal.edge_id is not None
        applied = await self._record_ack(principal.edge_id, version)
        return web.json_response({"applied_version": applied})

    async def _record_ack(self, edge_id: int, version: int) -> int:
        """Store an edge's ack; answer once it is committed. Group commit: every edge acks
        each change at about the same time, and acks waiting while one transaction runs are
        all written by the next, so a fleet's acks cost a couple of commits, not one each."""
        pending = self._pending_acks
        pending[edge_id] = max(pending.get(edge_id, 0), version)
        async with self._ack_lock:
            batch, self._pending_acks = self._pending_acks, {}
            if batch:  # else an earlier holder wrote this edge's ack with its own batch
                try:
                    self._applied.update(await self._write_acks(batch))
                except BaseException:
                    # Not written: back in the queue, for the next holder (or this edge's retry).
                    for edge, acked in batch.items():
                        self._pending_acks[edge] = max(self._pending_acks.get(edge, 0), acked)
                    raise
        return int(self._applied.get(edge_id, version))

    async def _write_acks(self, batch: dict[int, int]) -> dict[int, int]:
        """One transaction: raise each edge's applied_version (never lower it); the results."""
        now = datetime.now(UTC)
        written: dict[int, int] = {}
        async with write_transaction(self.engine) as conn:
            for edge, acked in sorted(batch.items()):
                written[edge] = (
                    await conn.execute(
                        update(edges)
                        .where(edges.c.id == edge)
                        .values(
                            applied_version=case(
                                (edges.c.applied_version < acked, acked),
                                else_=edges.c.applied_version,
                            ),
                            last_seen=now,
                        )
                        .returning(edges.c.applied_version)
                    )
                ).scalar_one()
        return written

    async def _task_result(self, request: web.Request) -> web.Response:
        principal = _edge(request)
        raw_id = request.match_info["id"]
        task_id = parse_digits(raw_id, MAX_ID_DIGITS)
        if task_id is not None and task_id > MAX_ID:
            task_id = None
        body = await _json_object(request)
        _check_fields(body, {"fetched": "int", "failed": "strings"})
        result = {"fetched": body["fetched"], "failed": body["failed"]}
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            known = (
                task_id is not None
                and (await conn.execute(select(tasks.c.id).where(tasks.c.id == task_id))).first()
            )
            if not known:
                raise Problem(404, f"no task {raw_id}")
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            stmt = dialect.insert(task_results).values(
                task_id=task_id, edge_id=principal.edge_id, result=result, at=now
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[task_results.c.task_id, task_results.c.edge_id],
                    set_={"result": stmt.excluded.result, "at": stmt.excluded.at},
                )
            )
        return web.json_response({"task": task_id, "edge": principal.edge_id, **result})

    # --- background tasks -----------------------------------------------------------------------

    async def prune(self, now: datetime) -> int:
        """Delete changes older than `keep` seconds before `now`, never the newest one (the log
        then still says how far it goes: an edge behind it gets a snapshot). Returns the count."""
        cutoff = now - timedelta(seconds=self.keep)
        newest = select(change_counter.c.version).where(change_counter.c.id == 1)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                changes.delete().where(
                    changes.c.created_at < cutoff,
                    changes.c.version < newest.scalar_subquery(),
                )
            )
        return int(result.rowcount)

    async def _prune_loop(self) -> None:
        every = max(1.0, min(PRUNE_EVERY, self.keep / 10))
        while not self._stopping.is_set():
            try:
                pruned = await self.prune(datetime.now(UTC))
            except Exception:
                log.exception("pruning the change log failed; retrying in %.0f s", every)
            else:
                if pruned:
                    log.info("pruned %d changes older than %.0f s", pruned, self.keep)
            await sleep_unless_stopping(self._stopping, every)

    def _notified(self, *_args: object) -> None:
        self.changed()

    async def _listen_loop(self) -> None:
        """Hold a LISTEN connection, reconnecting with backoff when it drops."""
        dsn = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = RECONNECT_MIN
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=10)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                log.warning(
                    "LISTEN %s: cannot connect (%s); retry in %.1f s", NOTIFY_CHANNEL, exc, delay
                )
                self._listening.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            try:
                await self._hold(conn)
            except Exception as exc:  # whatever broke it: reconnect, never stop listening
                log.warning("LISTEN %s: connection lost (%s); reconnecting", NOTIFY_CHANNEL, exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
            delay = RECONNECT_MIN

    async def _hold(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        self._listening.set()
        # Writes committed while no connection listened notified no one here.
        self.changed()
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTEN_PROBE)
            if not lost.is_set():
                # A half-open TCP connection would otherwise sit silent for hours.
                await conn.fetchval("SELECT 1", timeout=LISTEN_PROBE)
