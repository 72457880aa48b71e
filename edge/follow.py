"""The edge's side of the control plane's change feed (control/README.md, "The edge's side").

The supervisor owns one `ControlFollower`. It holds `GET /v1/edge/events?since=V&at=AT`, applies
each snapshot and change to its STATE strictly in version order, keeps STATE on disk
(state_dir/control/state.json, replaced atomically, so that an edge restarted while the control
plane is down serves what it had: fail-static), hands every event to the supervisor (which
sends it to the workers), and acks the newest version that is both on disk and applied by every
worker (the supervisor's `applied`, which does not move while no worker is live, so with
`workers = 1` nothing is acked while that worker restarts).

`at`, the creation time of the change at version V, lets the control plane see that this edge's
version V is not its own (it was restored from an older backup and wrote other changes since):
it then answers with a snapshot. Every snapshot may hide purges this edge never heard of, so it
makes a flush owed (the workers ban everything stored before it) until the supervisor says the
workers did it. The purges the lead worker has not yet stored durably (`unled`) are kept too:
both live in state.json next to STATE, so that a crash loses neither.

Any trouble (refused token, a gap in the versions, silence past `read_timeout`) drops the
connection, and the follower reconnects with `since` = its version after a jittered, capped
backoff; an event it cannot parse or apply makes it ask for a snapshot instead (`since=0`), as
asking from the same version would bring the same event back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edge.config import ControlSettings
from edge.files import write_atomically

log = logging.getLogger("edge.follow")

State = dict[str, Any]  # {"version": V, "at": AT | None, "domains": [...], "blocks": [...]}
Change = dict[str, Any]  # {"version": V, "kind": K, "payload": P}, and "at" on the feed

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
CONNECT_TIMEOUT = 5.0
POST_TIMEOUT = 10.0
ACK_GATHER = 0.05  # seconds an ack waits for more applied changes to cover
WRITE_GATHER = 0.02  # seconds a save of STATE waits for more edits to cover
# A STATE travels to each worker as one control-socket line (edge.worker.CONTROL_LINE_LIMIT).
MAX_EVENT_BYTES = 2**26


def empty_state() -> State:
    return {"version": 0, "at": None, "domains": [], "blocks": []}


def purges(change: Change) -> bool:
    """Whether the change removes cached objects (control/README.md, "Changes")."""
    kind, payload = change["kind"], change["payload"]
    return (
        kind in ("purge", "domain.delete")
        or (kind == "domain.state" and payload.get("state") == "terminated")
        or (kind == "domain.upsert" and payload.get("domain", {}).get("state") == "terminated")
    )


class ProtocolError(Exception):
    """The control plane said something the edge cannot follow; the feed is reconnected."""


class BadEvent(ProtocolError):
    """An event the edge cannot parse or apply: asking from the same version would bring it
    back, so the follower asks for a snapshot."""


class Refused(ProtocolError):
    """401/403 on the feed: the token is wrong or revoked (the message never contains it)."""


class HttpStatusError(ProtocolError):
    """A POST the control plane answered with other than 2xx."""

    def __init__(self, status: int, path: str) -> None:
        super().__init__(f"HTTP {status} from POST {path}")
        self.status = status

    @property
    def final(self) -> bool:
        """A 4xx other than 408 and 429: sending the same request again would not help."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


# --- server-sent events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    id: str
    data: str


class SseParser:
    """Server-sent events (HTML Living Standard 9.2) from bytes as they arrive.

    Lines end in LF or CRLF; comment lines (":" first, the heartbeats) and unknown fields are
    skipped; an event without data is not dispatched. An event larger than `limit` bytes is a
    BadEvent, so a broken control plane cannot make the edge buffer without bound.
    """

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0  # the buffer holds no LF before this offset
        self._event = ""
        self._id = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        start = 0
        while (end := self._buffer.find(b"\n", max(start, self._scanned))) >= 0:
            line = bytes(self._buffer[start:end]).removesuffix(b"\r")
            start = end + 1
            try:
                event = self._line(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise BadEvent(f"the feed is not UTF-8: {exc}") from None
            if event is not None:
                events.append(event)
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._size + len(self._buffer) > self._limit:
            raise BadEvent(f"an event larger than {self._limit} bytes")
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            event = None
            if self._data:
                event = SseEvent(self._event or "message", self._id, "\n".join(self._data))
            self._event, self._data, self._size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._size += len(value) + 1
        elif name == "id":
            self._id = value
        return None


# --- STATE ------------------------------------------------------------------------------------


def apply_change(state: State, kind: str, payload: dict[str, Any]) -> None:
    """Bring STATE forward by one change (README, "Changes"); purge and prefetch change nothing
    in it. KeyError or TypeError on a malformed payload."""
    domains: list[dict[str, Any]] = state["domains"]
    blocks: list[dict[str, Any]] = state["blocks"]
    if kind == "domain.upsert":
        domain = payload["domain"]
        _put(domains, domain, lambda d: d["name"] == domain["name"])
    elif kind == "domain.delete":
        name = payload["name"]
        domains[:] = [d for d in domains if d["name"] != name]
    elif kind == "domain.state":
        name, new_state, reason = payload["name"], payload["state"], payload.get("reason", "")
        for domain in domains:
            if domain["name"] == name:
                domain["state"], domain["reason"] = new_state, reason
    elif kind in ("block", "unblock"):
        key = (payload["domain"], payload["pattern"])
        blocks[:] = [b for b in blocks if (b["domain"], b["pattern"]) != key]
        if kind == "block":
            blocks.append({"domain": key[0], "pattern": key[1], "reason": payload["reason"]})


def _put(items: list[dict[str, Any]], item: dict[str, Any], same: Callable[[Any], bool]) -> None:
    """Replace the entry `same` matches in place, or append."""
    for index, existing in enumerate(items):
        if same(existing):
            items[index] = item
            return
    items.append(item)


def check_state(state: object) -> State:
    """`state` if it has STATE's shape (a missing "at" becomes None), else ValueError."""
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("version"), int)
        or state["version"] < 0
        or not isinstance(state.get("at"), str | None)
        or not isinstance(state.get("domains"), list)
        or not isinstance(state.get("blocks"), list)
    ):
        raise ValueError("not a STATE object (version, at, domains, blocks)")
    state.setdefault("at", None)
    return state


@dataclass(slots=True)
class Saved:
    """state.json: STATE, whether a flush is owed, the purges no lead stored yet."""

    state: State
    flush: bool = False
    unled: list[Change] = field(default_factory=list)

    def encode(self) -> bytes:
        """STATE's fields with "flush" and "unled" beside them (a file without them, from an
        older edge, loads as owing nothing)."""
        body = {**self.state, "flush": self.flush, "unled": self.unled}
        return json.dumps(body, separators=(",", ":")).encode()


def load_saved(path: Path) -> Saved | None:
    """What was saved at `path`; None when there is none or it is unusable (logged)."""
    try:
        raw = json.loads(path.read_bytes())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        flush, unled = raw.pop("flush", False), raw.pop("unled", [])
        if not isinstance(flush, bool) or not isinstance(unled, list):
            raise ValueError("flush or unled malformed")
        for change in unled:
            if not (
                isinstance(change, dict)
                and isinstance(change.get("version"), int)
                and isinstance(change.get("kind"), str)
                and isinstance(change.get("payload"), dict)
            ):
                raise ValueError(f"unled change {change!r:.100}")
        return Saved(check_state(raw), flush, unled)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the saved control state %s: %s", path, exc)
        return None


# --- the follower -----------------------------------------------------------------------------


def jittered(delay: float) -> float:
    """A backoff delay spread over [delay/2, delay], so edges do not reconnect in lockstep."""
    return random.uniform(delay / 2, delay)


class ControlFollower:
    """Follows the feed into STATE, saves it, and acks what every worker applied.

    `on_state(STATE)` is called after a snapshot replaced the whole state (a flush is then
    owed), `on_change(CHANGE)` after each change was applied to it (a purging one is then in
    `unled`), both before the version is saved (the supervisor sends them on; the ack waits for
    the file). `applied()` is the newest version every worker enforces; call `poke()` whenever
    it may have grown, `led(V)` when the lead worker stored the purges up to V durably,
    `flushed()` when every worker did the flush.
    """

    def __init__(
        self,
        settings: ControlSettings,
        state_dir: str | os.PathLike[str],
        *,
        on_state: Callable[[State], None],
        on_change: Callable[[Change], None],
        applied: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.path = Path(state_dir) / "control" / "state.json"
        self.state: State = empty_state()
        self.has_state = False  # from the file or a snapshot; empty_state() is not one
        self.flush_owed = False  # a snapshot came that the workers have not all flushed for
        self.unled: list[Change] = []  # purging changes the lead has not stored durably
        self.bad_events = 0  # events that could not be parsed or applied
        self.connected = False
        self.persisted = -1  # the version on disk
        self.acked = 0
        self._on_state = on_state
        self._on_change = on_change
        self._applied = applied
        self._last_contact = time.monotonic()
        self._edits = 0  # events applied to STATE; the writer saves when it is ahead of _saved
        self._saved = 0
        self._has_state = asyncio.Event()
        self._connected_once = asyncio.Event()
        self._dirty = asyncio.Event()
        self._ack_wanted = asyncio.Event()
        self._closing = False
        self._problem = ""  # the last connection problem logged (each is logged once)
        self._heard = False
        self._resync = False  # ask for a snapshot next: a bad event came, or a 400
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def version(self) -> int:
        return int(self.state["version"])

    def contact_age(self) -> float:
        """Seconds since the control plane last sent anything (a heartbeat counts), or since
        the follower was made if it never did."""
        return time.monotonic() - self._last_contact

    def load(self) -> bool:
        """Take the saved STATE, if there is one (before `start`)."""
        saved = load_saved(self.path)
        if saved is None:
            return False
        self.state, self.has_state, self.persisted = saved.state, True, saved.state["version"]
        self.flush_owed, self.unled = saved.flush, saved.unled
        self._has_state.set()
        return True

    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"Authorization": f"Bearer {self.settings.token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        )
        self._tasks = [
            asyncio.create_task(self._follow(), name="control-feed"),
            asyncio.create_task(self._ack(), name="control-ack"),
        ]
        self._writer = asyncio.create_task(self._write(), name="control-state-writer")

    async def stop(self) -> None:
        """Stop following; STATE as last applied is on disk when this returns."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            self._closing = True
            self._dirty.set()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.connected = False

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the control plane; whether the feed answered."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected_once.wait()
                await self._has_state.wait()
        return self._connected_once.is_set() and self.has_state

    def poke(self) -> None:
        """What every worker applied may have grown: ack if there is something new."""
        self._ack_wanted.set()

    def led(self, version: int) -> None:
        """The lead worker stored the purges of every version up to `version` durably."""
        kept = [change for change in self.unled if change["version"] > version]
        if len(kept) < len(self.unled):
            self.unled = kept
            self._edited()

    def flushed(self) -> None:
        """Every worker did the flush the last snapshot asked for."""
        if self.flush_owed:
            self.flush_owed = False
            self._edited()

    # --- feed ---------------------------------------------------------------------------------

    async def _follow(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            self._heard = False
            try:
                await self._follow_once()
            except BadEvent as exc:
                self.bad_events += 1
                self._resync, self._heard = True, False  # the backoff grows: it may come again
                log.error(
                    "control plane %s sent an event this edge cannot use (%s): asking for a "
                    "snapshot",
                    self.settings.url, exc,
                )  # fmt: skip
            except Refused as exc:
                self._report(str(exc), logging.ERROR)
            except ProtocolError as exc:
                self._report(f"dropped the feed: {exc}", logging.WARNING)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._report(f"unreachable ({_describe(exc)})", logging.WARNING)
            except Exception:  # a bug must not end following: fail-static, and keep trying
                log.exception("following the control plane failed")
                self._problem = ""
            finally:
                self.connected = False
            if self._heard:
                delay = BACKOFF_FIRST
            await asyncio.sleep(jittered(delay))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow_once(self) -> None:
        """One connection, until it fails (it always ends by raising). Sets `_heard` once the
        control plane sent something on it, which starts the backoff over."""
        url = f"{self.settings.url}/v1/edge/events"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=self.settings.read_timeout
        )
        since, at = (0, None) if self._resync else (self.version, self.state["at"])
        params = {"since": str(since)} | ({"at": at} if at is not None else {})
        try:
            async with self.session().get(
                url, params=params, timeout=timeout, allow_redirects=False
            ) as resp:
                if resp.status in (401, 403):
                    raise Refused(
                        f"the control plane refused this edge's token (HTTP {resp.status}); "
                        "check [control] token or CDN_EDGE_TOKEN"
                    )
                if resp.status == 400:  # an unusable `at`, maybe: ask for a snapshot instead
                    self._resync = True
                if resp.status != 200:
                    raise ProtocolError(f"HTTP {resp.status} from {url}")
                self._contact()
                self.connected = True
                self._connected_once.set()
                log.info("following the control plane at %s from version %d", url, since)
                self._problem = ""
                parser = SseParser()
                async for chunk in resp.content.iter_any():
                    self._contact()
                    self._heard = True
                    for event in parser.feed(chunk):
                        self._handle(event)
                raise ProtocolError("the control plane closed the feed")
        except aiohttp.ServerTimeoutError:
            raise ProtocolError(
                f"nothing heard for {self.settings.read_timeout:g}s, not even a heartbeat"
            ) from None

    def _contact(self) -> None:
        self._last_contact = time.monotonic()

    def _report(self, problem: str, level: int) -> None:
        if problem != self._problem:
            log.log(level, "control plane %s: %s", self.settings.url, problem)
            self._problem = problem

    def _handle(self, event: SseEvent) -> None:
        """Apply one event to STATE, in order, and pass it on."""
        try:
            if event.event == "snapshot":
                state = check_state(json.loads(event.data))
                self.state, self.has_state, self._resync = state, True, False
                # Purges may have been missed, whether a state was replaced or none was kept
                # (a disk cache may remain): the flush covers them and the unled ones.
                self.flush_owed, self.unled = True, []
                # A restored control plane may go back: its version is then acked anew.
                self.acked = min(self.acked, state["version"] - 1)
                self._edited()
                self._has_state.set()
                self._on_state(state)
            elif event.event == "change":
                data = json.loads(event.data)
                version, at = data["version"], data.get("at")
                current = self.version
                if not isinstance(version, int) or not isinstance(at, str | None):
                    raise ValueError(f"version {version!r}, at {at!r}")
                if version <= current:
                    return  # already applied (a replay after a reconnect)
                if version != current + 1:
                    raise ProtocolError(f"change {version} follows version {current}")
                change = {"version": version, "kind": data["kind"], "payload": data["payload"]}
                if not isinstance(change["kind"], str) or not isinstance(change["payload"], dict):
                    raise ValueError("kind or payload malformed")
                apply_change(self.state, change["kind"], change["payload"])
                self.state["version"], self.state["at"] = version, at
                if purges(change):
                    self.unled.append(change)
                self._edited()
                self._on_change(change)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadEvent(f"malformed {event.event} event: {exc!r}") from None

    # --- saving and acking --------------------------------------------------------------------

    def _edited(self) -> None:
        self._edits += 1
        self._dirty.set()

    async def _write(self) -> None:
        """Save STATE whenever it changed; a burst of changes during one write costs one more
        write, not one each. Never cancelled: `stop` lets it save the last version and end."""
        while True:
            await self._dirty.wait()
            if not self._closing:
                # One write for what a change brings at once: a purge is added to `unled`,
                # and leaves it when the lead stored it, a few milliseconds later.
                await asyncio.sleep(WRITE_GATHER)
            self._dirty.clear()
            if self._edits != self._saved:
                edits, version = self._edits, self.version
                data = Saved(self.state, self.flush_owed, self.unled).encode()
                try:
                    await asyncio.to_thread(write_atomically, self.path, data)
                except OSError as exc:
                    log.error("cannot save the control state to %s: %s", self.path, exc)
                    if not self._closing:
                        await asyncio.sleep(1.0)
                        self._dirty.set()
                else:
                    self._saved, self.persisted = edits, version
                    self.poke()
            if self._closing:
                return

    async def _ack(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            await self._ack_wanted.wait()
            # Acks only tell tasks' status: one a moment later covers every change applied
            # meanwhile, and keeps the ack's work off the moment edges are enforcing a change.
            await asyncio.sleep(ACK_GATHER)
            self._ack_wanted.clear()
            version = min(self.persisted, self._applied())
            if version <= self.acked:
                continue
            try:
                await self.post("/v1/edge/ack", {"version": version})
            except (aiohttp.ClientError, OSError, TimeoutError, ProtocolError) as exc:
                if isinstance(exc, HttpStatusError) and exc.final:
                    # Repeating it would change nothing; the next version's ack may fare better.
                    log.error("the control plane refused ack %d: %s", version, exc)
                    continue
                log.debug("ack %d failed (%s); retrying", version, _describe(exc))
                await asyncio.sleep(jittered(delay))
                delay = min(delay * 2, BACKOFF_MAX)
                self._ack_wanted.set()
            else:
                self.acked, delay = version, BACKOFF_FIRST

    async def post(self, path: str, body: dict[str, Any]) -> None:
        """POST JSON to the control plane; ProtocolError unless it answers 2xx."""
        async with self.session().post(
            f"{self.settings.url}{path}",
            json=body,
            timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT),
            allow_redirects=False,
        ) as resp:
            await resp.read()
            if resp.status >= 300:
                raise HttpStatusError(resp.status, path)

    async def report(self, path: str, body: dict[str, Any]) -> None:
        """POST until the control plane takes it (it may be down for a while); a refusal
        (4xx) is logged and dropped, as repeating it would change nothing."""
        delay = BACKOFF_FIRST
        while True:
            try:
                await self.post(path, body)
                return
            except HttpStatusError as exc:
                if exc.final:
                    log.error("the control plane refused POST %s: %s", path, exc)
                    return
                problem = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = _describe(exc)
            log.debug("POST %s failed (%s); retrying", path, problem)
            await asyncio.sleep(jittered(delay))
            delay = min(delay * 2, BACKOFF_MAX)


def _describe(exc: BaseException) -> str:
    """A short reason for a client error; aiohttp's own texts carry no headers (no token)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
