"""The edge supervisor: `cdn edge` runs it, and it runs `workers` worker processes.

Process model. A worker is a fresh interpreter, `python -m edge.worker`, started with fork+exec
through asyncio's subprocess API, not with multiprocessing. The event loop then reports a
worker's exit like any child's (`Process.wait()`, no sentinel polling), nothing is pickled (a
worker gets the config file's text and parses it itself, so a generation's workers, restarts
included, run exactly the text that was validated, whatever the file says by then), the
supervisor's loop, threads and sockets never leak into a worker, and `ps` shows what runs.

Listening sockets. The supervisor binds one listening socket per worker slot on `listen`, all
with SO_REUSEPORT so that the kernel spreads connections over them, hands slot i's socket to
the worker in slot i, and keeps its own copy. That copy is what lets reloads and restarts lose
nothing: closing a SO_REUSEPORT listener resets the connections still queued on it (unless
net.ipv4.tcp_migrate_req = 1), but here a stopping worker closes only its copy, and the next
worker of the slot accepts what was queued. Only while a slot's worker keeps crashing is the
slot's socket closed, so that new connections go to the workers that are up.

Control sockets. Each worker has a socketpair to the supervisor carrying JSON lines (protocol
in edge/worker.py): its config, "ready", stats snapshots on request, a final snapshot after
draining. `/metrics` asks every live worker (all generations) and adds up the answers, plus the
counts of workers that have exited, so counters never go back across restarts and reloads.

Signals. SIGTERM/SIGINT: SIGTERM to every worker, which stop accepting and drain (bounded by
`drain_timeout`, then SIGKILL), exit 0. SIGHUP: re-read the config; refused with one log line
when invalid; otherwise a new generation of workers starts on the same sockets, and once every
one of them is ready the old generation drains. `listen` and `admin_listen` stay as they were
(changing them needs a restart, and the log says so).

A worker that dies is restarted at once; one that keeps dying young waits longer each time (up
to BACKOFF_MAX).

Control plane. With `[control]` the domains come from the control plane's feed, which a
`ControlFollower` (edge/follow.py) holds. At start the supervisor waits up to
`control.start_timeout` for it; when it does not answer, the edge serves the state saved in
state_dir/control/state.json (fail-static) and keeps retrying. An edge with no saved state yet
starts all the same, but has nothing to serve: /readyz answers 503 until the control plane first
answers (so a load balancer sends it nothing), and then it serves without a restart. Workers get
the current STATE in their first message, and every change after it, in order; the follower acks
a version once every worker of the running generations answered that it applied it, and never
while none is live: with `workers = 1`, nothing is acked while that worker restarts.

One worker is the lead, doing the host-wide part of purges (deleting and sweeping disk objects,
keeping its bans in bans.json). A purge is durable once the lead answered it; until then it is
`unled` (in state.json too) and is replayed to every worker started meanwhile and, when the lead
dies, to the worker that takes over as lead. A snapshot owes a flush (every worker bans what it
stored before, the lead sweeps): sent with the new STATE to the running workers and in the first
message of any worker started until every worker and the lead did it.

Usage (issue 5). Workers send their metered buckets every 0.25 s ("usage", edge/worker.py);
the supervisor adds them to the durable open batch in state_dir/usage every 0.25 s, seals it as
each 5-minute window closes, and, with [control], ships pending batches to the control plane
until it acknowledges them (`edge.spool.UsageSink`). A graceful stop adds the workers' final
usage, seals and ships for up to USAGE_FLUSH_TIMEOUT s; a SIGKILL loses at most the last second
(the open batch on disk is sealed and shipped by the next start).

Access logs (issue 6). Each worker writes its own hourly files (edge.logwriter, named by its
slot); the supervisor's `edge.logship.LogShipper` ships the closed ones to the control plane (or,
without one, deletes them after retention_days), and /readyz reports the workers' log state
(`edge.logwriter.readiness`, from their stats). A reload that changes [logs] or [control]
restarts the shipper with the new settings (its counters go on).

Prefetch tasks are fetched here, through the edge's own listener, so that every worker's cache
rules and the disk tier apply as for any client; all tasks together keep at most
PREFETCH_CONCURRENCY requests in flight, and a task arriving while PREFETCH_TASKS are admitted
is reported at once with every URL failed (the edge is busy), so that prefetch requests cannot
make the supervisor download without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from yarl import URL

from edge.access import PREFETCH_HEADER
from edge.admin import make_admin_app
from edge.config import ConfigError, ControlSettings, EdgeConfig, parse_config
from edge.follow import Change, ControlFollower, State
from edge.logship import LogShipper, log_families
from edge.logwriter import readiness
from edge.meter import Bucket
from edge.metrics import (
    Snapshot,
    empty_snapshot,
    families,
    merge_snapshots,
    request_count,
)
from edge.spool import Shipper, Spool, UsageSink
from edge.worker import CONTROL_LINE_LIMIT, listen_socket, send_message

log = logging.getLogger("edge.supervisor")

DRAIN_TIMEOUT = 10.0  # a stopping worker's in-flight responses get this long
KILL_AFTER = 5.0  # past the drain timeout, a worker still running is killed
READY_TIMEOUT = 30.0  # a new worker must be serving within this
STATS_TIMEOUT = 1.0  # a worker slower than this to answer is counted from its last answer
HEALTHY_UPTIME = 10.0  # a worker that served this long restarts at once when it dies
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
PREFETCH_CONCURRENCY = 8  # requests all prefetch tasks together have in flight
PREFETCH_TASKS = 16  # prefetch tasks admitted (running or waiting); more are refused
PREFETCH_APPLIED_WAIT = 10.0  # a prefetch waits this long for the workers to apply what precedes
PREFETCH_READ_TIMEOUT = 60.0
USAGE_FLUSH_TIMEOUT = 5.0  # a stopping edge tries this long to ship its last usage


def read_config(path: str) -> tuple[EdgeConfig, str]:
    """The config at `path` and the exact text it came from, which is what workers are given.

    Problems are ConfigErrors worded as `load_config` words them.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, "(file)", exc.strerror or str(exc)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "(file)", f"not UTF-8 text: {exc}") from exc
    return parse_config(text, path), text


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


def backoff(quick_deaths: int) -> float:
    """Seconds before restarting a slot whose workers died young `quick_deaths` times in a row.

    The first death restarts at once; a slot that keeps dying waits longer each time.
    """
    if quick_deaths < 2:
        return 0.0
    return float(min(BACKOFF_FIRST * 2 ** (quick_deaths - 2), BACKOFF_MAX))


class ListenSockets:
    """The data listening sockets, one per worker slot, all on one address (SO_REUSEPORT)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._by_slot: dict[int, socket.socket] = {}

    def probe(self) -> None:
        """Fail if something else listens on the address, and resolve port 0.

        SO_REUSEPORT would otherwise let a second edge started with the same config quietly
        share the port with the first; a bind without it fails on any listener.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((self.host, self.port))
            self.port = probe.getsockname()[1]
        self.get(0)

    def get(self, slot: int) -> socket.socket:
        sock = self._by_slot.get(slot)
        if sock is None:
            sock = self._by_slot[slot] = listen_socket(self.host, self.port)
        return sock

    def release(self, slot: int) -> None:
        sock = self._by_slot.pop(slot, None)
        if sock is not None:
            sock.close()

    def slots(self) -> list[int]:
        return sorted(self._by_slot)

    def close(self) -> None:
        for slot in self.slots():
            self.release(slot)


@dataclass(frozen=True, slots=True)
class Asked:
    """A control message a worker answers, in order: the config with "ready", the others
    with "applied" (the version it carries is not needed). `version`: what the worker enforces
    once it answered (None: the replay that always follows the config sets it); `lead`: it was
    sent to the lead; `flush`: the answer also says the worker did a flush."""

    version: int | None
    lead: bool
    flush: bool = False


class WorkerProcess:
    """One worker process and the supervisor's end of its control socket."""

    def __init__(
        self,
        slot: int,
        generation: Generation,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[WorkerProcess, dict[str, object]], None],
    ) -> None:
        self.slot = slot
        self._on_message = on_message
        self.generation = generation
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.ready = False
        self.exited = False
        self.retired = False  # its counters have gone into the supervisor's retired totals
        self.last: Snapshot | None = None  # its latest stats answer (or final snapshot)
        self.applied: int | None = None  # the control version it enforces (None: not yet)
        self.asked: deque[Asked] = deque()  # sent, not yet answered
        self.lead_flushed = False  # it answered a flush while it was the lead
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Snapshot]] = {}
        self._control = asyncio.create_task(self._read(), name=f"worker-{slot}-{self.pid}")

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                op = message.get("op")
                if op == "ready":
                    self.ready = True
                    self.generation.changed.set()
                    self._on_message(self, message)
                elif op == "stats":
                    future = self._pending.get(message.get("id"))
                    if future is not None and not future.done():
                        future.set_result(cast(Snapshot, message["snapshot"]))
                elif op == "final":
                    self.last = cast(Snapshot, message["snapshot"])
                elif op in ("applied", "invalidate", "usage"):
                    self._on_message(self, message)
        except (ConnectionError, ValueError, KeyError, TypeError) as exc:
            log.warning("worker %d (pid %d): control socket: %r", self.slot, self.pid, exc)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("worker gone"))

    async def wait(self) -> int:
        """Wait for the process to exit and its control socket to be read to the end."""
        code = await self.proc.wait()
        await self._control
        self.exited = True
        self._writer.close()
        return code

    def send(self, message: dict[str, object]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            send_message(self._writer, message)

    def ask(self, message: dict[str, object], asked: Asked) -> None:
        """Send a message the worker answers."""
        self.asked.append(asked)
        self.send(message)

    def answered(self) -> Asked | None:
        """The message an answer ("ready" or "applied") is for; None without control."""
        if not self.asked:
            return None
        asked = self.asked.popleft()
        if asked.version is not None:
            self.applied = asked.version
        return asked

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def uptime(self) -> float:
        return time.monotonic() - self.started

    async def stats(self, timeout: float) -> bool | None:
        """Ask for a fresh snapshot into `last`; False when none came in time, None: not asked."""
        if self.exited or not self.ready:
            return None
        request_id = next(self._ids)
        future: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with asyncio.timeout(timeout):
                send_message(self._writer, {"op": "stats", "id": request_id})
                await self._writer.drain()
                self.last = await future
            return True
        except (TimeoutError, ConnectionError):
            return False
        finally:
            del self._pending[request_id]


class Generation:
    """Workers started from one config; a reload starts the next generation."""

    def __init__(self, number: int, config: EdgeConfig, text: str) -> None:
        self.number = number
        self.config = config
        self.text = text
        self.workers: dict[int, WorkerProcess] = {}  # the current process of each slot
        self.runners: list[asyncio.Task[None]] = []
        self.started = False  # every worker was ready once; from then on deaths are restarts
        self.stopping = False
        self.failure = ""  # why it could not start
        self.changed = asyncio.Event()  # a worker became ready, failed, or stopping began
        self.wake = asyncio.Event()  # stopping began: cut restart backoffs short

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if not w.exited]

    def all_ready(self) -> bool:
        return len(self.workers) == self.config.edge.workers and all(
            w.ready and not w.exited for w in self.workers.values()
        )

    def fail(self, reason: str) -> None:
        if not self.failure:
            self.failure = reason
        self.changed.set()


PeriodicJob = Callable[["Supervisor"], Awaitable[None]]


class Supervisor:
    def __init__(
        self,
        config: EdgeConfig,
        text: str,
        *,
        loop_name: str = "uvloop",
        log_level: str = "INFO",
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.path = config.source
        self.config = config  # the config the current generation runs
        self._text = text
        self.loop_name = loop_name
        self.log_level = log_level
        self.drain_timeout = drain_timeout
        # Proves to the workers that a request is this supervisor's prefetch, which the
        # domains' access rules (signed URLs, referer, IP lists, rate limits) must not refuse.
        self.prefetch_secret = secrets.token_urlsafe(24)
        self.current: Generation | None = None
        self._generations: list[Generation] = []  # the current one and any still draining
        self._numbers = itertools.count(1)
        self.sockets = ListenSockets(*config.edge.listen)
        self._admin: web.AppRunner | None = None
        self.admin_port = 0
        # Metrics of the supervisor itself, and the counters of workers that have exited.
        self.restarts = 0
        self.reloads: Counter[str] = Counter()
        self.stats_timeouts = 0
        self._retired = empty_snapshot()
        self._periodic: list[tuple[str, float, PeriodicJob]] = []
        # Owned tasks, awaited before run() returns: the reload loop and periodic jobs are
        # cancelled at shutdown, old generations draining are not.
        self._tasks: set[asyncio.Task[None]] = set()
        self._drains: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.follower: ControlFollower | None = None  # with [control]
        self._applied_grew = asyncio.Event()  # a worker answered "applied", or one died
        self._applied = 0  # what every worker enforced when last some worker was live
        self._lead: WorkerProcess | None = None  # the worker doing purges' host-wide part
        self._prefetch_slots = asyncio.Semaphore(PREFETCH_CONCURRENCY)
        self._prefetch_tasks = 0  # admitted, running or waiting for a slot
        self.usage: UsageSink | None = None  # between the start of `_serve` and `_shutdown`
        self.logs: LogShipper | None = None  # likewise, with [logs] enabled

    def add_periodic(self, name: str, interval: float, job: PeriodicJob) -> None:
        """Run `job(supervisor)` every `interval` s while serving (call before `run`).

        The place for host-wide housekeeping that must run once per host rather than once per
        worker, such as a disk tier's eviction; a failing job is logged and tried again.
        """
        self._periodic.append((name, interval, job))

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a clean stop, 1 when the edge cannot start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            return await self._serve()
        finally:
            # Signals stay handled while workers drain: a second SIGTERM changes nothing.
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.info("already stopping")
            return
        self._stop.set()
        for generation in self._generations:
            generation.changed.set()

    async def _serve(self) -> int:
        edge = self.config.edge
        try:
            self.sockets.probe()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", *edge.listen, exc.strerror or exc)
            return 1
        try:
            await self._start_admin()
        except OSError as exc:
            log.error("cannot listen on %s:%d (admin): %s", *edge.admin_listen, exc.strerror or exc)
            return 1
        self._start_usage()
        self._start_logs()
        if self.config.control is not None:
            await self._start_follower(self.config.control, wait=True)
        generation = await self._start_generation(self.config, self._text)
        if generation is None:
            return 0 if self._stop.is_set() else 1
        self.current = generation
        self._applied_changed()  # the workers enforce the STATE they started with: ack it
        log.info(
            "edge serving on %s:%d with %d workers, admin on %s:%d",
            self.sockets.host,
            self.sockets.port,
            edge.workers,
            edge.admin_listen[0],
            self.admin_port,
        )
        self._own(self._tasks, self._reload_loop(), "reload")
        for name, interval, job in self._periodic:
            self._own(self._tasks, self._run_periodic(name, interval, job), f"periodic-{name}")
        await self._stop.wait()
        log.info("stopping: workers drain in-flight responses (up to %.1fs)", self.drain_timeout)
        return 0

    async def _shutdown(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.follower is not None:
            await self.follower.stop()
        await asyncio.gather(
            *(self._stop_generation(g) for g in list(self._generations)),
            *self._drains,
            return_exceptions=True,
        )
        if self.usage is not None:  # after the workers' final usage
            await self.usage.stop(USAGE_FLUSH_TIMEOUT)
        if self.logs is not None:
            await self.logs.stop()
        if self._admin is not None:
            await self._admin.cleanup()
        self.sockets.close()
        log.info("stopped")

    def _own(
        self, tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None], name: str
    ) -> None:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("task %s failed", task.get_name(), exc_info=task.exception())

        task.add_done_callback(done)

    async def _start_admin(self) -> None:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(SupervisorCollector(self))
        self._admin = web.AppRunner(
            make_admin_app(registry, self.ready, self.refresh_metrics, self.readiness_notes),
            access_log=None,
            keepalive_timeout=15,
        )
        await self._admin.setup()
        host, port = self.config.edge.admin_listen
        await web.TCPSite(self._admin, host, port, reuse_address=True).start()
        self.admin_port = self._admin.addresses[0][1]

    def ready(self) -> bool:
        """Every worker of the current generation is serving (the admin /readyz)."""
        current = self.current
        has_state = self.follower is None or self.follower.has_state
        return current is not None and not self._stop.is_set() and current.all_ready() and has_state

    async def readiness_notes(self) -> list[tuple[bool, str]]:
        """What /readyz adds: the workers' access-log state (asked of them first)."""
        if not self.config.logs.enabled:
            return []
        await self.refresh_metrics()
        refuse = self.config.logs.on_log_failure == "refuse"
        return [readiness(self.snapshot(), refuse=refuse)]

    def _start_logs(self, before: LogShipper | None = None) -> None:
        """The log shipper for the current config; it counts on from `before`'s counters."""
        if self.config.logs.enabled:
            root = Path(self.config.edge.state_dir) / "logs"
            self.logs = LogShipper(root, self.config.logs, self.config.control)
            if before is not None:
                self.logs.shipped, self.logs.failures = before.shipped, before.failures
                self.logs.deleted = before.deleted
            self.logs.start()

    def _start_usage(self) -> None:
        edge, control = self.config.edge, self.config.control
        spool = Spool(Path(edge.state_dir) / "usage", edge.edge_id)
        shipper = Shipper(spool, control.url, control.token) if control is not None else None
        self.usage = UsageSink(spool, shipper, keep=edge.usage_keep_batches)
        self.usage.start()

    def _from_worker(self, sender: WorkerProcess, message: dict[str, object]) -> None:
        """A worker's usage goes to the spool, its invalidation to every other live worker (all
        generations); its "ready" and "applied" may let the follower ack, trim `unled` and end
        the flush."""
        if message["op"] == "usage":
            if self.usage is not None:
                try:
                    buckets = cast(list[object], message["buckets"])
                    self.usage.receive([Bucket.from_json(b) for b in buckets])
                except (ValueError, TypeError) as exc:  # a bug, never a reason to stop reading
                    log.error("worker %d (pid %d): bad usage: %s", sender.slot, sender.pid, exc)
            return
        if message["op"] in ("ready", "applied"):
            asked = sender.answered()
            if asked is not None and self.follower is not None:
                if asked.lead and sender is self._lead:
                    if asked.version is not None:
                        self.follower.led(asked.version)
                    sender.lead_flushed |= asked.flush
                self._applied_changed()
            return
        for generation in self._generations:
            for worker in generation.live():
                if worker is not sender and worker.ready:
                    worker.send(message)

    # --- the control plane --------------------------------------------------------------------

    async def _start_follower(self, control: ControlSettings, *, wait: bool) -> None:
        """Follow the control plane; `wait`: at start, up to start_timeout for its state."""
        follower = ControlFollower(
            control,
            self.config.edge.state_dir,
            on_state=self._send_state,
            on_change=self._send_change,
            applied=self.applied_version,
        )
        saved = follower.load()
        follower.start()
        self.follower = follower
        if not wait:
            return
        if await follower.wait_ready(control.start_timeout):
            log.info("control plane state: version %d", follower.version)
        elif saved:
            log.warning(
                "control plane %s not reachable: serving the saved state version %d from %s "
                "(fail-static) and retrying",
                control.url, follower.version, follower.path,
            )  # fmt: skip
        else:
            log.error(
                "control plane %s not reachable and no saved state in %s: nothing to serve "
                "(/readyz 503) until it answers; retrying",
                control.url, follower.path,
            )  # fmt: skip

    def _targets(self) -> list[WorkerProcess]:
        """The workers that must enforce the control state: every live worker of the running
        (and starting) generations, not those draining."""
        return [w for g in self._generations if not g.stopping for w in g.live()]

    def _send_state(self, state: State) -> None:
        """A snapshot replaced the state: every worker flushes (purges may have been missed)."""
        for worker in self._targets():
            worker.lead_flushed = False
            lead = worker is self._lead
            message = {"op": "state", "state": state, "flush": True, "lead": lead}
            worker.ask(message, Asked(state["version"], lead, flush=True))

    def _send_change(self, change: Change) -> None:
        """To every worker, in order; exactly one of them is told to do the host-wide part."""
        for worker in self._targets():
            lead = worker is self._lead
            worker.ask({"op": "change", **change, "lead": lead}, Asked(change["version"], lead))
        if change["kind"] == "prefetch":
            self._own(self._tasks, self._prefetch(change), f"prefetch-{change['version']}")

    def _replay(self, worker: WorkerProcess, follower: ControlFollower, *, start: bool) -> None:
        """The purges no lead stored durably yet, for a worker that was not sent them (just
        `start`ed) or must now store them (the new lead). A started worker's answer, coming
        once its bans are durable, also says it did the flush it may have started with."""
        lead = worker is self._lead
        message = {"op": "replay", "changes": follower.unled, "lead": lead}
        worker.ask(message, Asked(follower.version, lead, flush=start and follower.flush_owed))

    def _elect(self) -> None:
        """The lead left (died, or its generation drains): another live worker takes over,
        with the flush if one is owed and the purges the old lead may not have stored."""
        old, self._lead = self._lead, None
        if old is not None and not old.exited:  # draining: its host-wide work ends
            old.ask({"op": "replay", "changes": [], "lead": False}, Asked(None, False))
        targets = self._targets()
        if self.follower is None or not targets or self._stop.is_set():
            return
        self._lead = lead = targets[0]
        log.info("worker %d (pid %d) is the lead now", lead.slot, lead.pid)
        self._replay(lead, self.follower, start=False)
        if self.follower.flush_owed:  # the flush again, now with the lead's host-wide part
            state = self.follower.state
            message = {"op": "state", "state": state, "flush": True, "lead": True}
            lead.ask(message, Asked(state["version"], True, flush=True))

    def applied_version(self) -> int:
        """The newest control version every worker enforces (0 before any worker started). It
        stays as it was while no worker is live or a new one has not answered yet: a purge
        made meanwhile is not enforced by anyone yet."""
        if self.follower is None or self.current is None:
            return 0
        versions = [w.applied for w in self._targets()]
        if versions and None not in versions:
            self._applied = min(v for v in versions if v is not None)
        return self._applied

    def _applied_changed(self) -> None:
        self._applied_grew.set()
        follower = self.follower
        if follower is None:
            return
        lead, targets = self._lead, self._targets()
        if (
            follower.flush_owed
            and lead is not None
            and lead in targets
            and lead.lead_flushed
            and not any(asked.flush for w in targets for asked in w.asked)
        ):
            follower.flushed()
        follower.poke()

    async def _until_applied(self, version: int) -> None:
        while self.applied_version() < version:
            self._applied_grew.clear()
            await self._applied_grew.wait()

    async def _prefetch(self, change: Change) -> None:
        """GET each URL of a prefetch task through this edge's own listener (the domain's Host,
        the body read to the end), then report the task's result to the control plane. Past
        PREFETCH_TASKS admitted tasks, every URL of a new one fails at once: the edge is busy."""
        payload = change["payload"]
        items = payload["items"]
        if self._prefetch_tasks >= PREFETCH_TASKS:
            log.warning(
                "prefetch task %s refused: edge busy (%d tasks admitted), %d URLs failed",
                payload["task"], self._prefetch_tasks, len(items),
            )  # fmt: skip
            failed = [f"http://{i['domain']}{i['value']}" for i in items]
        else:
            self._prefetch_tasks += 1
            try:
                failed = await self._prefetch_items(change["version"], items)
            finally:
                self._prefetch_tasks -= 1
        result = {"fetched": len(items) - len(failed), "failed": failed}
        log.info("prefetch task %s: %d fetched, %d failed", payload["task"], *result.values())
        if self.follower is not None:
            await self.follower.report(f"/v1/edge/tasks/{payload['task']}/result", result)

    async def _prefetch_items(self, version: int, items: list[dict[str, Any]]) -> list[str]:
        """Fetch the items (after the workers applied what precedes `version`, so that the
        domains exist); the URLs that failed."""
        try:
            async with asyncio.timeout(PREFETCH_APPLIED_WAIT):
                await self._until_applied(version - 1)
        except TimeoutError:
            log.warning("prefetch %d: workers slow to apply earlier changes", version)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.sockets.host, self.sockets.host)
        base = f"http://{f'[{host}]' if ':' in host else host}:{self.sockets.port}"
        failed: list[str] = []

        async def fetch(session: aiohttp.ClientSession, domain: str, target: str) -> None:
            async with self._prefetch_slots:
                try:
                    async with session.get(
                        URL(base + target, encoded=True),
                        headers={"Host": domain, PREFETCH_HEADER: self.prefetch_secret},
                        allow_redirects=False,
                    ) as resp:
                        async for _ in resp.content.iter_chunked(2**16):
                            pass
                        if resp.status < 400:
                            return
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    pass
            failed.append(f"http://{domain}{target}")

        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding",),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=5.0, sock_read=PREFETCH_READ_TIMEOUT
            ),
        ) as session:
            await asyncio.gather(
                *(fetch(session, str(i["domain"]), str(i["value"])) for i in items)
            )
        return failed

    # --- generations and workers --------------------------------------------------------------

    async def _start_generation(self, config: EdgeConfig, text: str) -> Generation | None:
        """Start a generation and wait until every worker serves; None (stopped) if one fails."""
        generation = Generation(next(self._numbers), config, text)
        self._generations.append(generation)
        generation.runners = [
            asyncio.create_task(self._run_slot(generation, slot), name=f"slot-{slot}")
            for slot in range(config.edge.workers)
        ]
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while not generation.all_ready():
                    if generation.failure or self._stop.is_set():
                        break
                    generation.changed.clear()
                    await generation.changed.wait()
        except TimeoutError:
            generation.fail(f"workers not ready within {READY_TIMEOUT:.0f}s")
        if generation.failure or self._stop.is_set():
            if generation.failure:
                log.error("generation %d did not start: %s", generation.number, generation.failure)
            await self._stop_generation(generation)
            return None
        generation.started = True
        return generation

    async def _run_slot(self, generation: Generation, slot: int) -> None:
        """Keep one worker running in `slot` until the generation stops."""
        quick_deaths = 0  # consecutive deaths of workers that had not served HEALTHY_UPTIME
        while not generation.stopping:
            try:
                worker = await self._spawn(generation, slot)
            except OSError as exc:
                if not generation.started:
                    generation.fail(f"worker {slot} could not be started: {exc}")
                    return
                quick_deaths += 1
                what = f"worker {slot} could not be started ({exc})"
            else:
                if generation.stopping:  # began while the process was being started
                    worker.signal(signal.SIGTERM)
                code = await worker.wait()
                self._retire(worker)
                if worker is self._lead:
                    self._elect()
                self._applied_changed()
                if generation.stopping:
                    log.info(
                        "worker %d (pid %d) of generation %d %s",
                        slot,
                        worker.pid,
                        generation.number,
                        describe_exit(code),
                    )
                    return
                if not generation.started:
                    generation.fail(f"worker {slot} (pid {worker.pid}) {describe_exit(code)}")
                    return
                self.restarts += 1
                healthy = worker.ready and worker.uptime() >= HEALTHY_UPTIME
                quick_deaths = 0 if healthy else quick_deaths + 1
                what = f"worker {slot} (pid {worker.pid}) {describe_exit(code)}"
            delay = backoff(quick_deaths)
            log.error("%s; restarting it%s", what, f" in {delay:.1f}s" if delay else "")
            if delay:
                # Nobody accepts on the slot's socket meanwhile: close it so that the kernel
                # sends new connections to the workers that are up.
                if self.current is generation:
                    self.sockets.release(slot)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await generation.wake.wait()

    async def _spawn(self, generation: Generation, slot: int) -> WorkerProcess:
        listener = self.sockets.get(slot)
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge.worker",
                "--control-fd", str(theirs.fileno()),
                "--listen-fd", str(listener.fileno()),
                "--slot", str(slot),
                "--loop", self.loop_name,
                "--log-level", self.log_level,
                pass_fds=(theirs.fileno(), listener.fileno()),
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=CONTROL_LINE_LIMIT)
        worker = WorkerProcess(slot, generation, proc, reader, writer, self._from_worker)
        hello: dict[str, object] = {
            "op": "config",
            "source": generation.config.source,
            "text": generation.text,
            "grace": self.drain_timeout,
            "prefetch_secret": self.prefetch_secret,
        }
        follower = self.follower
        if follower is None:
            send_message(writer, hello)
        else:
            if self._lead not in self._targets():
                self._lead = worker
            lead = worker is self._lead
            hello |= {"control": follower.state, "lead": lead}
            if follower.flush_owed:
                hello["flush"] = True
            worker.ask(hello, Asked(None, lead))  # answered by "ready", when it serves
            self._replay(worker, follower, start=True)
        # Registered in the same step as its STATE is sent: every later change reaches it.
        generation.workers[slot] = worker
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return worker

    async def _stop_generation(self, generation: Generation) -> None:
        """SIGTERM its workers, which drain; SIGKILL what still runs after the drain timeout."""
        generation.stopping = True
        generation.changed.set()
        generation.wake.set()
        if self._lead is not None and self._lead.generation is generation:
            self._elect()
        for worker in generation.live():
            worker.signal(signal.SIGTERM)
        _, running = await asyncio.wait(generation.runners, timeout=self.drain_timeout + KILL_AFTER)
        if running:
            for worker in generation.live():
                log.warning(
                    "worker %d (pid %d) still running %.0fs after SIGTERM: killing it",
                    worker.slot,
                    worker.pid,
                    self.drain_timeout + KILL_AFTER,
                )
                worker.signal(signal.SIGKILL)
        for runner in generation.runners:
            try:
                await runner
            except Exception:
                log.exception("worker slot runner failed")
        if generation in self._generations:
            self._generations.remove(generation)
        # Sockets of slots that no generation runs (a reload to more workers that failed).
        in_use = {slot for g in self._generations for slot in range(g.config.edge.workers)}
        for slot in self.sockets.slots():
            if slot not in in_use and not self._stop.is_set():
                self.sockets.release(slot)

    def _retire(self, worker: WorkerProcess) -> None:
        """Keep what an exited worker counted (as of its last answer) in the totals."""
        if worker.last is not None:
            self._retired = merge_snapshots([self._retired, worker.last], counters_only=True)
        worker.retired = True

    # --- reload -------------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()  # SIGHUPs during a reload make one more reload after it
            await self._reload_once()

    async def _reload_once(self) -> None:
        log.info("SIGHUP: reloading %s", self.path)
        try:
            config, text = read_config(self.path)
        except ConfigError as exc:
            self.reloads["refused"] += 1
            log.error("reload refused, keeping the running config: %s", exc)
            return
        if (config.control is None) != (self.config.control is None):
            self.reloads["refused"] += 1
            log.error("reload refused: adding or removing [control] needs a restart")
            return
        old_edge = self.config.edge
        for key in ("listen", "admin_listen"):
            before, after = getattr(old_edge, key), getattr(config.edge, key)
            if before != after:
                log.warning(
                    "reload: edge.%s changed from %s:%d to %s:%d, which needs a restart; "
                    "still on %s:%d",
                    key,
                    *before,
                    *after,
                    *before,
                )
        config = replace(
            config,
            edge=replace(config.edge, listen=old_edge.listen, admin_listen=old_edge.admin_listen),
        )
        generation = await self._start_generation(config, text)
        if generation is None:
            self.reloads["failed"] += 1
            log.error("reload failed, keeping the running config")
            return
        old_control, old_logs = self.config.control, self.config.logs
        old, self.current, self.config = self.current, generation, config
        self.reloads["applied"] += 1
        if self.follower is not None and config.control != old_control:
            assert config.control is not None
            log.info("reload: [control] changed, reconnecting to %s", config.control.url)
            await self.follower.stop()
            await self._start_follower(config.control, wait=False)
        if config.logs != old_logs or config.control != old_control:
            before, self.logs = self.logs, None
            if before is not None:
                await before.stop()
            self._start_logs(before)
        # Fewer workers now: the old workers of the slots that go away hold those sockets alone
        # and close them when they stop accepting, so nothing queues where nobody will accept.
        for slot in self.sockets.slots():
            if slot >= config.edge.workers:
                self.sockets.release(slot)
        log.info(
            "reloaded: generation %d serving %d domains with %d workers",
            generation.number,
            len(config.domains),
            config.edge.workers,
        )
        if old is not None:
            self._own(self._drains, self._stop_generation(old), f"drain-{old.number}")

    async def _run_periodic(self, name: str, interval: float, job: PeriodicJob) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job(self)
            except Exception:
                log.exception("periodic job %s failed", name)

    # --- metrics ------------------------------------------------------------------------------

    def workers(self) -> Iterator[WorkerProcess]:
        """Every worker process not yet accounted as exited, of every generation."""
        for generation in self._generations:
            for worker in generation.workers.values():
                if not worker.retired:
                    yield worker

    async def refresh_metrics(self) -> None:
        """Ask every worker for its counters (concurrently; the slow are counted as before)."""
        answers = await asyncio.gather(*(w.stats(STATS_TIMEOUT) for w in list(self.workers())))
        self.stats_timeouts += answers.count(False)

    def snapshot(self) -> Snapshot:
        """The sum over every worker, live or exited (gauges: live ones only)."""
        live = [w.last for w in self.workers() if w.last is not None]
        return merge_snapshots([self._retired, *live])

    def requests_by_slot(self) -> dict[int, int]:
        by_slot: dict[int, int] = {}
        for worker in self.workers():
            if worker.last is not None:
                by_slot[worker.slot] = by_slot.get(worker.slot, 0) + request_count(worker.last)
        return by_slot


class SupervisorCollector(Collector):
    """The workers' metrics added up, and the supervisor's own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self._supervisor
        yield from families(sup.snapshot())
        current = sup.current
        yield GaugeMetricFamily(
            "cdn_edge_workers",
            "Worker processes of the current config that are up and serving",
            value=sum(1 for w in current.workers.values() if w.ready and not w.exited)
            if current is not None
            else 0,
        )
        yield GaugeMetricFamily(
            "cdn_edge_workers_configured",
            "Worker processes the config asks for",
            value=sup.config.edge.workers,
        )
        yield CounterMetricFamily(
            "cdn_edge_worker_restarts",
            "Worker processes restarted after they died",
            value=sup.restarts,
        )
        per_slot = GaugeMetricFamily(
            "cdn_edge_worker_requests",
            "Requests answered by the process(es) now running in each worker slot; "
            "starts again from 0 when a worker restarts",
            labels=["worker"],
        )
        for slot, n in sorted(sup.requests_by_slot().items()):
            per_slot.add_metric([str(slot)], n)
        yield per_slot
        reloads = CounterMetricFamily(
            "cdn_edge_config_reloads",
            "SIGHUP reloads by result (applied, refused, failed)",
            labels=["result"],
        )
        for result in ("applied", "refused", "failed"):
            reloads.add_metric([result], sup.reloads[result])
        yield reloads
        yield CounterMetricFamily(
            "cdn_edge_worker_stats_timeouts",
            "Scrapes in which a worker did not answer in time (its previous answer was used)",
            value=sup.stats_timeouts,
        )
        usage = sup.usage
        if usage is not None:
            yield from usage_families(usage)
        if sup.logs is not None:
            yield from log_families(sup.logs)
        follower = sup.follower
        if follower is None:
            return
        yield GaugeMetricFamily(
            "cdn_edge_config_version",
            "Version of the control plane's state that every worker enforces",
            value=sup.applied_version(),
        )
        yield GaugeMetricFamily(
            "cdn_edge_control_contact_age_seconds",
            "Seconds since the control plane last sent anything, heartbeats included (since "
            "the edge started, if it never did)",
            value=follower.contact_age(),
        )
        yield GaugeMetricFamily(
            "cdn_edge_control_connected",
            "1 while the edge holds the control plane's feed",
            value=int(follower.connected),
        )
        yield CounterMetricFamily(
            "cdn_edge_control_bad_events",
            "Feed events the edge could not parse or apply (it then asked for a snapshot)",
            value=follower.bad_events,
        )


def usage_families(usage: UsageSink) -> Iterator[Metric]:
    """The usage spool's metrics (configs/edge.example.toml, "Usage metering")."""
    yield GaugeMetricFamily(
        "cdn_edge_usage_spooled_batches",
        "Usage batches sealed and waiting in state_dir/usage (to be shipped, or kept without a "
        "control plane)",
        value=usage.spool.pending_count(),
    )
    shipper = usage.shipper
    yield CounterMetricFamily(
        "cdn_edge_usage_shipped_batches",
        "Usage batches the control plane acknowledged",
        value=shipper.shipped if shipper is not None else 0,
    )
    yield CounterMetricFamily(
        "cdn_edge_usage_ship_failures",
        "Usage POSTs to the control plane that failed (retried with backoff)",
        value=shipper.failures if shipper is not None else 0,
    )
    yield CounterMetricFamily(
        "cdn_edge_usage_spool_errors",
        "Writes to the usage spool that failed (the counts stay in memory and are retried)",
        value=usage.errors,
    )
    yield CounterMetricFamily(
        "cdn_edge_usage_dropped_batches",
        "Usage batches deleted unshipped past edge.usage_keep_batches (no control plane)",
        value=usage.dropped,
    )


async def supervise(
    config: EdgeConfig,
    text: str,
    *,
    loop_name: str = "uvloop",
    log_level: str = "INFO",
    drain_timeout: float = DRAIN_TIMEOUT,
) -> int:
    """`cdn edge`: run the supervisor until SIGTERM/SIGINT; the process exit code."""
    log.info("edge supervisor pid %d, config %s", os.getpid(), config.source)
    supervisor = Supervisor(
        config, text, loop_name=loop_name, log_level=log_level, drain_timeout=drain_timeout
    )
    return await supervisor.run()
