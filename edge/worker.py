"""One edge worker: data-path server, origin client, cache, and (standalone) admin listener.

Explicit lifecycle: `start()` binds and serves, `stop()` drains in-flight responses (bounded),
then cancels and awaits everything it started.

Two ways to run it:
- in-process, `EdgeWorker(config)`: binds `listen` itself and serves its own admin listener
  (the test suite, the demo);
- as a worker process of the supervisor (`python -m edge.worker`, started by
  edge/supervisor.py): it inherits its listening socket and a control socket, serves no admin
  listener, and answers the supervisor's stats requests over the control socket instead.

Domains come from the config file's `[[domains]]`, or, with `control_state` (the control
plane's STATE, control/README.md), from the control plane: then each change and each new
STATE the supervisor relays is enforced at once (`apply_change`, `replace_state`), and the
purges of changes a restarted worker may have missed are applied again (`replay`).

Usage (issue 5): the worker's `edge.meter.Meter` counts every exchange (edge.server) and every
origin byte (edge.request); a supervised worker sends what it counted to the supervisor every
USAGE_INTERVAL s and once more after draining, so a worker that is killed loses at most its
last interval (and with the supervisor's write every edge.spool.USAGE_TICK s, a hard kill of
the whole edge loses at most 1 s: see USAGE_TICK). Requests for unknown hosts
(edge.server.UNKNOWN_DOMAIN) are in /metrics only: they belong to no customer, and are never
sent on. An in-process worker
(tests, the demo) meters without sending: its `take_usage` is the caller's to call.

Access log (issue 6): with `[logs] enabled`, the worker's `edge.logwriter.AccessLogWriter`
writes every exchange to state_dir/logs under the worker's slot (0 in-process), started before
the data path and stopped after it drained. While it cannot write, `on_log_failure = "refuse"`
swaps the data path's handler for `RefuseWhileLogFails` (503 to every request) until it can;
"serve" keeps serving. /readyz reports it (`edge.logwriter.readiness`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge import controlstate
from edge.admin import make_admin_app
from edge.config import EdgeConfig, parse_config
from edge.controlstate import Applied, ControlState, Purge
from edge.fetch import OriginClient
from edge.logwriter import AccessLogWriter, RefuseWhileLogFails, readiness
from edge.meter import Bucket, Meter
from edge.metrics import EdgeStats, Snapshot, StatsCollector, worker_snapshot
from edge.purge import bans_for
from edge.request import EdgeProxy
from edge.server import UNKNOWN_DOMAIN, HttpServer
from edge.store import MemoryTier

log = logging.getLogger("edge.worker")

# After it stops accepting, a stopping worker waits this long before it closes connections that
# have no request in progress: a connection accepted an instant before has not had its request
# read yet, and closing it would fail a request the client already sent.
ACCEPT_SETTLE = 0.2

USAGE_INTERVAL = 0.25  # seconds between a supervised worker's usage messages (see USAGE_TICK)

# The control socket's longest line: the first one carries the whole config file.
CONTROL_LINE_LIMIT = 2**26

# What a change's bans are durable by (the lead's ban file); None: nothing to wait for.
Durable = asyncio.Future[None] | None


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; SO_REUSEPORT so that several workers can share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class EdgeWorker:
    def __init__(
        self,
        config: EdgeConfig,
        *,
        admin: bool = True,
        sock: socket.socket | None = None,
        accept_settle: float = 0.0,
        control_state: Mapping[str, Any] | None = None,
        flush: bool = False,
        slot: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`admin`: serve `admin_listen` here (False under the supervisor, which serves it).

        `sock`: an already listening socket to serve (the supervisor's); None binds `listen`.
        `accept_settle`: see ACCEPT_SETTLE; worth it only where another process keeps
        accepting on the same socket, so 0 in-process.
        `control_state`: the control plane's STATE; its domains replace the config's.
        `flush`: purges of it may have been missed (see `replace_state`): at start, nothing
        stored before is served.
        `slot`: the supervisor's worker slot, which names this worker's access-log files.
        `clock`: wall time of the data path's meter and access log (tests move it).
        """
        self.config = config
        self.stats = EdgeStats()
        self.meter = Meter()
        self.store = MemoryTier(config.cache.memory)
        self.origin = OriginClient(config.origin)
        self.proxy = EdgeProxy(config, self.store, self.origin, self.stats, self.meter)
        self.server = HttpServer(
            self.proxy,
            max_header_bytes=config.edge.max_header_bytes,
            keepalive_timeout=config.edge.keepalive_timeout,
            head_timeout=config.edge.request_head_timeout,
            send_timeout=config.edge.send_timeout,
            meter=self.meter,
            account=self.proxy.account,
            clock=clock,
        )
        self.access_log: AccessLogWriter | None = None
        if config.logs.enabled:
            self.access_log = AccessLogWriter(
                Path(config.edge.state_dir) / "logs",
                slot,
                config.edge.edge_id,
                UNKNOWN_DOMAIN,
                self.stats,
                clock=clock,
                on_change=self._log_failing,
            )
            self.server.access_log = self.access_log.record
        self._refusal = RefuseWhileLogFails(self.proxy, self._route)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StatsCollector(self.stats, self.proxy.tiers))
        self._with_admin = admin
        self._sock = sock
        self._accept_settle = accept_settle
        self._admin: web.AppRunner | None = None
        self._ready = False
        self.port = 0
        self.admin_port = 0
        self.control: ControlState | None = None
        self.lead = False  # the last change named this worker the one doing host-wide work
        self._flush_at_start = flush and control_state is not None
        if control_state is not None:
            # The first STATE purges nothing (or everything, flushed, at `start`); the bans
            # of before are loaded at start.
            self._enforce(controlstate.parse_state(control_state))

    @property
    def config_version(self) -> int:
        """The control plane's version this worker enforces; 0 without a control plane."""
        return self.control.version if self.control is not None else 0

    def apply_change(
        self, version: int, kind: str, payload: Mapping[str, Any], lead: bool
    ) -> Durable:
        """Enforce one change of the feed (`{"op": "change"}`); an old version is a no-op.
        `lead`: this worker also does the host-wide part (purged objects on disk).
        Returns what is done once the change's bans are on disk (None: nothing to wait for)."""
        if self.control is None:
            log.warning("change %d ignored: this edge has no control plane", version)
            return None
        self.lead = lead
        applied = self._enforce(controlstate.apply(self.control, version, kind, payload))
        return self._purge((applied.state.version, p) for p in applied.purges)

    def replace_state(self, state: Mapping[str, Any], *, flush: bool = False) -> Durable:
        """Enforce a whole new STATE (`{"op": "state"}`, after the feed sent a snapshot).
        `flush`: purges may have been missed meanwhile (the edge was offline past the change
        log, lost its saved state, or the control plane was restored): whatever was stored
        before now is banned, in every domain."""
        old = self.control or controlstate.EMPTY
        applied = self._enforce(controlstate.apply_snapshot(old, state, flush=flush))
        return self._purge((applied.state.version, p) for p in applied.purges)

    def replay(self, changes: list[Any], lead: bool) -> tuple[int, Durable]:
        """The purges of `changes` a restarted worker may have missed (`{"op": "replay"}`),
        whatever their versions; the rest of them is in its state already. Returns the
        newest version replayed and, as `apply_change`, what says they are on disk."""
        if self.control is None:
            log.warning("replay ignored: this edge has no control plane")
            return 0, None
        self.lead = lead
        replayed = controlstate.replay(self.control, changes)
        for problem in replayed.problems:
            log.warning("control plane: %s", problem)
        return replayed.version, self._purge(replayed.purges)

    def _enforce(self, applied: Applied) -> Applied:
        for problem in applied.problems:
            log.warning("control plane: %s", problem)
        self.control = applied.state
        self.proxy.enforce(applied.state)
        return applied

    def _purge(self, purges: Iterable[tuple[int, Purge]]) -> Durable:
        return self.proxy.purge(bans_for(purges, time.time()), lead=self.lead)

    def take_usage(self) -> list[Bucket]:
        """Everything metered since the last call, responses in progress included so far; the
        buckets of unknown hosts are dropped (module docstring)."""
        self.server.meter_progress()
        return [b for b in self.meter.take_all() if b.domain != UNKNOWN_DOMAIN]

    def _route(self, host: str) -> str | None:
        domain = self.proxy.config.domain_for_host(host)
        return domain.name if domain is not None else None

    def _log_failing(self, failing: bool) -> None:
        if self.config.logs.on_log_failure == "refuse":
            self.server.handler = self._refusal if failing else self.proxy

    async def readiness_notes(self) -> list[tuple[bool, str]]:
        """What /readyz adds (edge.admin): the access log's state."""
        if self.access_log is None:
            return []
        refuse = self.config.logs.on_log_failure == "refuse"
        return [readiness(self.snapshot(), refuse=refuse)]

    def snapshot(self) -> Snapshot:
        snap = worker_snapshot(self.stats, self.proxy.tiers)
        if self.control is not None:
            snap["gauges"]["config_version"] = self.control.version
        return snap

    async def start(self) -> None:
        await self.origin.start()
        await self.proxy.start()
        if self.access_log is not None:
            await self.access_log.start()
        if self._flush_at_start:  # after the bans of before were loaded
            self._purge([(self.config_version, controlstate.EVERYTHING)])
        sock = self._sock
        if sock is None:
            sock = listen_socket(*self.config.edge.listen)
        sock.setblocking(False)
        host, self.port = sock.getsockname()[:2]
        await self.server.start(sock)
        if self._with_admin:
            admin_host, admin_port = self.config.edge.admin_listen
            self._admin = web.AppRunner(
                make_admin_app(
                    self.registry, lambda: self._ready, notes=self.readiness_notes
                ),
                access_log=None,
                keepalive_timeout=15,
            )
            await self._admin.setup()
            site = web.TCPSite(self._admin, admin_host, admin_port, reuse_address=True)
            await site.start()
            # Port 0 means "any free port" (tests): read back what was bound.
            self.admin_port = self._admin.addresses[0][1]
            log.info(
                "edge serving on %s:%d, admin on %s:%d",
                host,
                self.port,
                admin_host,
                self.admin_port,
            )
        else:
            log.info("edge worker serving on %s:%d", host, self.port)
        self._ready = True

    async def stop(self, grace: float = 10.0) -> None:
        self._ready = False
        settle = min(self._accept_settle, grace / 4)
        # HttpServer.stop() closes idle connections right after it stops accepting; stop
        # accepting first and give just-accepted connections time to deliver their request.
        # (Under the supervisor the listening socket stays open in the supervisor and the next
        # generation: connections waiting in its queue are not lost.)
        if settle > 0:
            self.server.stop_accepting()
            await asyncio.sleep(settle)
        await self.server.stop(grace - settle)
        if self.access_log is not None:
            await self.access_log.stop()  # every exchange has ended: all of them are written
        await self.proxy.close()
        await self.origin.close()
        if self._admin is not None:
            await self._admin.cleanup()


# --- worker process under the supervisor ------------------------------------------------------
#
# Control socket protocol: one JSON object per line, both ways.
#   supervisor -> worker, first line: {"op": "config", "source": PATH, "text": TOML, "grace": S,
#   "prefetch_secret": SECRET} (its prefetch requests carry it: access rules let them through)
#   worker -> supervisor, once serving: {"op": "ready", "pid": PID}
#   supervisor -> worker: {"op": "stats", "id": N}
#   its answer: {"op": "stats", "id": N, "snapshot": {...}}
#   worker -> supervisor, every USAGE_INTERVAL s when it metered anything, and after draining
#   (before "final"): {"op": "usage", "buckets": [BUCKET...]} (edge.meter.Bucket.to_json;
#   counts since the previous usage message: the supervisor adds them up)
#   worker -> supervisor, after draining: {"op": "final", "snapshot": {...}}
#   worker -> supervisor, after a write invalidated keys: {"op": "invalidate", "keys": [...]}
#   supervisor -> every other worker: the same message (they drop their memory copies)
#   with a control plane (control/README.md "The edge's side"):
#   in the first line, "control": STATE (absent without one);
#   supervisor -> worker: {"op": "change", "version": V, "kind": K, "payload": P, "lead": bool}
#   supervisor -> worker: {"op": "state", "state": STATE} (a snapshot replaced the whole state)
#   worker -> supervisor, once it enforces either: {"op": "applied", "version": V}
#   "flush": true, in the first line or a "state" message: purges may have been missed (the
#   edge was offline past the change log, lost its saved state, or the control plane was
#   restored): whatever was stored before is banned, every domain, memory at once, the lead
#   walking the disk;
#   supervisor -> a worker just started (before or after its "ready"):
#   {"op": "replay", "changes": [{"version": V, "kind": K, "payload": P}...], "lead": bool}:
#   only their purges (purge items, domain.delete, terminations) are applied again, whatever
#   their versions; answered {"op": "applied", "version": the newest V, or its own when none};
#   the lead answers "applied" (to a change, state or replay) only once the bans it made are
#   durable in bans.json; answers keep the order of the messages.
# SIGTERM, or end of file on the control socket (the supervisor is gone), drains and exits.


def send_message(writer: asyncio.StreamWriter, message: dict[str, object]) -> None:
    """One control-socket message: a JSON object on one line."""
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


async def _answer_control(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    worker: EdgeWorker,
    stop: asyncio.Event,
) -> None:
    """Answer the supervisor's messages until it closes the socket (which also means: stop)."""
    applied: asyncio.Queue[tuple[int, Durable]] = asyncio.Queue()
    answers = asyncio.create_task(_answer_applied(applied, writer), name="applied")
    try:
        while line := await reader.readline():
            message = json.loads(line)
            if message.get("op") == "stats":
                answer = {"op": "stats", "id": message["id"], "snapshot": worker.snapshot()}
                send_message(writer, answer)
                await writer.drain()
            elif message.get("op") == "invalidate":
                worker.proxy.forget([str(k) for k in message["keys"]], disk=False)
            elif message.get("op") == "change":
                version = int(message["version"])
                durable = worker.apply_change(
                    version, str(message["kind"]), message["payload"], bool(message.get("lead"))
                )
                applied.put_nowait((version, durable))
            elif message.get("op") == "state":
                durable = worker.replace_state(message["state"], flush=bool(message.get("flush")))
                applied.put_nowait((worker.config_version, durable))
            elif message.get("op") == "replay":
                applied.put_nowait(
                    worker.replay(list(message["changes"]), bool(message.get("lead")))
                )
            else:
                log.warning("unknown control message %.100r", line)
    except ConnectionError:
        pass
    finally:
        answers.cancel()
    stop.set()


async def _answer_applied(
    applied: asyncio.Queue[tuple[int, Durable]], writer: asyncio.StreamWriter
) -> None:
    """Answer "applied" to each control message in order, once its bans are durable: the
    supervisor's ack must mean they survive a crash (the ban file, `edge.purge`)."""
    while True:
        version, durable = await applied.get()
        if durable is not None:
            await durable
        send_message(writer, {"op": "applied", "version": version})
        await writer.drain()


def send_usage(writer: asyncio.StreamWriter, worker: EdgeWorker) -> None:
    buckets = worker.take_usage()
    if buckets:
        send_message(writer, {"op": "usage", "buckets": [b.to_json() for b in buckets]})


async def _report_usage(writer: asyncio.StreamWriter, worker: EdgeWorker) -> None:
    while True:
        await asyncio.sleep(USAGE_INTERVAL)
        if writer.is_closing():  # a write failed: the supervisor is gone, nobody to tell
            return
        send_usage(writer, worker)
        await writer.drain()


async def run_worker_process(control_fd: int, listen_fd: int, slot: int = 0) -> None:
    """A supervised worker: read its config, serve, answer stats, drain on SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader, writer = await asyncio.open_unix_connection(
        sock=socket.socket(fileno=control_fd), limit=CONTROL_LINE_LIMIT
    )
    hello = json.loads(await reader.readline())
    config = parse_config(hello["text"], hello["source"])
    grace = float(hello["grace"])
    worker = EdgeWorker(
        config,
        admin=False,
        sock=socket.socket(fileno=listen_fd),
        accept_settle=ACCEPT_SETTLE,
        control_state=hello.get("control"),
        flush=bool(hello.get("flush")),
        slot=slot,
    )
    worker.proxy.prefetch_secret = str(hello.get("prefetch_secret") or "")
    worker.proxy.on_invalidate = lambda keys: send_message(
        writer, {"op": "invalidate", "keys": keys}
    )
    await worker.start()
    send_message(writer, {"op": "ready", "pid": os.getpid()})
    await writer.drain()
    control = asyncio.create_task(_answer_control(reader, writer, worker, stop), name="control")
    usage = asyncio.create_task(_report_usage(writer, worker), name="usage")
    try:
        await stop.wait()
        log.info("draining (up to %.1fs)", grace)
        # Stats requests and usage are still answered and sent while draining: the
        # supervisor's /metrics and spool keep counting what this worker finishes.
        await worker.stop(grace)
        usage.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await usage
        with contextlib.suppress(ConnectionError):
            if not writer.is_closing():  # a failed usage write closed it: the supervisor is gone
                send_usage(writer, worker)
                send_message(writer, {"op": "final", "snapshot": worker.snapshot()})
                await writer.drain()
    finally:
        for task in (usage, control):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m edge.worker",
        description="an edge worker process; started by `cdn edge`, not by hand",
    )
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=(
            f"%(asctime)s %(levelname)s %(name)s[worker {args.slot} pid %(process)d]: %(message)s"
        ),
    )
    # Ctrl-C and a terminal hangup reach the whole process group: the supervisor decides what
    # they mean (stop, reload) and tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    coro = run_worker_process(args.control_fd, args.listen_fd, args.slot)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    sys.exit(0)


if __name__ == "__main__":
    main()
