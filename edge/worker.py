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
STATE the supervisor relays is enforced at once (`apply_change`, `replace_state`).
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
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge import controlstate
from edge.admin import make_admin_app
from edge.config import EdgeConfig, parse_config
from edge.controlstate import Applied, ControlState
from edge.fetch import OriginClient
from edge.metrics import EdgeStats, Snapshot, StatsCollector, worker_snapshot
from edge.request import EdgeProxy
from edge.server import HttpServer
from edge.store import MemoryTier

log = logging.getLogger("edge.worker")

# After it stops accepting, a stopping worker waits this long before it closes connections that
# have no request in progress: a connection accepted an instant before has not had its request
# read yet, and closing it would fail a request the client already sent.
ACCEPT_SETTLE = 0.2

# The control socket's longest line: the first one carries the whole config file.
CONTROL_LINE_LIMIT = 2**26


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
    ) -> None:
        """`admin`: serve `admin_listen` here (False under the supervisor, which serves it).

        `sock`: an already listening socket to serve (the supervisor's); None binds `listen`.
        `accept_settle`: see ACCEPT_SETTLE; worth it only where another process keeps
        accepting on the same socket, so 0 in-process.
        `control_state`: the control plane's STATE; its domains replace the config's.
        """
        self.config = config
        self.stats = EdgeStats()
        self.store = MemoryTier(config.cache.memory)
        self.origin = OriginClient(config.origin)
        self.proxy = EdgeProxy(config, self.store, self.origin, self.stats)
        self.server = HttpServer(
            self.proxy,
            max_header_bytes=config.edge.max_header_bytes,
            keepalive_timeout=config.edge.keepalive_timeout,
            head_timeout=config.edge.request_head_timeout,
            send_timeout=config.edge.send_timeout,
        )
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
        if control_state is not None:
            self._enforce(controlstate.parse_state(control_state), initial=True)

    @property
    def config_version(self) -> int:
        """The control plane's version this worker enforces; 0 without a control plane."""
        return self.control.version if self.control is not None else 0

    def apply_change(
        self, version: int, kind: str, payload: Mapping[str, Any], lead: bool
    ) -> None:
        """Enforce one change of the feed (`{"op": "change"}`); an old version is a no-op.
        `lead`: this worker also does the host-wide part (purged objects on disk)."""
        if self.control is None:
            log.warning("change %d ignored: this edge has no control plane", version)
            return
        self.lead = lead
        self._enforce(controlstate.apply(self.control, version, kind, payload))

    def replace_state(self, state: Mapping[str, Any]) -> None:
        """Enforce a whole new STATE (`{"op": "state"}`, after the feed sent a snapshot)."""
        self._enforce(controlstate.apply_snapshot(self.control or controlstate.EMPTY, state))

    def _enforce(self, applied: Applied, *, initial: bool = False) -> None:
        for problem in applied.problems:
            log.warning("control plane: %s", problem)
        self.control = applied.state
        self.proxy.enforce(applied.state)
        if not initial:  # the first STATE purges nothing; its bans are loaded at start
            self.proxy.purge(applied.purges, applied.state.version, lead=self.lead)

    def snapshot(self) -> Snapshot:
        snap = worker_snapshot(self.stats, self.proxy.tiers)
        if self.control is not None:
            snap["gauges"]["config_version"] = self.control.version
        return snap

    async def start(self) -> None:
        await self.origin.start()
        await self.proxy.start()
        sock = self._sock
        if sock is None:
            sock = listen_socket(*self.config.edge.listen)
        sock.setblocking(False)
        host, self.port = sock.getsockname()[:2]
        await self.server.start(sock)
        if self._with_admin:
            admin_host, admin_port = self.config.edge.admin_listen
            self._admin = web.AppRunner(
                make_admin_app(self.registry, lambda: self._ready),
                access_log=None,
                keepalive_timeout=15,
            )
            await self._admin.setup()
            site = web.TCPSite(self._admin, admin_host, admin_port, reuse_address=True)
            await site.start()
            # Port 0 means "any free port" (tests): read back what was bound.
            self.admin_port = self._admin.addresses[0][1]
            log.info(
                "edge serving on %s:%d, admin on %s:%d", host, self.port, admin_host,
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
        await self.proxy.close()
        await self.origin.close()
        if self._admin is not None:
            await self._admin.cleanup()


# --- worker process under the supervisor ------------------------------------------------------
#
# Control socket protocol: one JSON object per line, both ways.
#   supervisor -> worker, first line: {"op": "config", "source": PATH, "text": TOML, "grace": S}
#   worker -> supervisor, once serving: {"op": "ready", "pid": PID}
#   supervisor -> worker: {"op": "stats", "id": N}
#   its answer: {"op": "stats", "id": N, "snapshot": {...}}
#   worker -> supervisor, after draining: {"op": "final", "snapshot": {...}}
#   worker -> supervisor, after a write invalidated keys: {"op": "invalidate", "keys": [...]}
#   supervisor -> every other worker: the same message (they drop their memory copies)
#   with a control plane (control/README.md "The edge's side"):
#   in the first line, "control": STATE (absent without one);
#   supervisor -> worker: {"op": "change", "version": V, "kind": K, "payload": P, "lead": bool}
#   supervisor -> worker: {"op": "state", "state": STATE} (a snapshot replaced the whole state)
#   worker -> supervisor, once it enforces either: {"op": "applied", "version": V}
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
                worker.apply_change(
                    int(message["version"]), str(message["kind"]), message["payload"],
                    bool(message.get("lead")),
                )
                send_message(writer, {"op": "applied", "version": int(message["version"])})
                await writer.drain()
            elif message.get("op") == "state":
                worker.replace_state(message["state"])
                send_message(writer, {"op": "applied", "version": worker.config_version})
                await writer.drain()
            else:
                log.warning("unknown control message %.100r", line)
    except ConnectionError:
        pass
    stop.set()


async def run_worker_process(control_fd: int, listen_fd: int) -> None:
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
    )
    worker.proxy.on_invalidate = lambda keys: send_message(
        writer, {"op": "invalidate", "keys": keys}
    )
    await worker.start()
    send_message(writer, {"op": "ready", "pid": os.getpid()})
    await writer.drain()
    control = asyncio.create_task(_answer_control(reader, writer, worker, stop), name="control")
    try:
        await stop.wait()
        log.info("draining (up to %.1fs)", grace)
        # Stats requests are still answered while draining: the supervisor's /metrics keeps
        # counting what this worker finishes.
        await worker.stop(grace)
        with contextlib.suppress(ConnectionError):
            send_message(writer, {"op": "final", "snapshot": worker.snapshot()})
            await writer.drain()
    finally:
        control.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await control
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
            f"%(asctime)s %(levelname)s %(name)s[worker {args.slot} pid %(process)d]: "
            "%(message)s"
        ),
    )
    # Ctrl-C and a terminal hangup reach the whole process group: the supervisor decides what
    # they mean (stop, reload) and tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    coro = run_worker_process(args.control_fd, args.listen_fd)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    sys.exit(0)


if __name__ == "__main__":
    main()
