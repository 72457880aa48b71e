"""One edge worker process: data-path server, origin client, cache and admin listener.

Explicit lifecycle: `start()` binds and serves, `stop()` drains in-flight responses (bounded),
then cancels and awaits everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge.admin import make_admin_app
from edge.config import EdgeConfig
from edge.fetch import OriginClient
from edge.metrics import EdgeStats, StatsCollector
from edge.request import EdgeProxy
from edge.server import HttpServer
from edge.store import MemoryTier

log = logging.getLogger("edge.worker")


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
    def __init__(self, config: EdgeConfig) -> None:
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
        self.registry.register(StatsCollector(self.stats, self.store))
        self._admin: web.AppRunner | None = None
        self._ready = False
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        await self.origin.start()
        host, port = self.config.edge.listen
        sock = listen_socket(host, port)
        self.port = sock.getsockname()[1]
        await self.server.start(sock)
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
        self._ready = True
        log.info(
            "edge serving on %s:%d, admin on %s:%d", host, self.port, admin_host, self.admin_port
        )

    async def stop(self, grace: float = 10.0) -> None:
        self._ready = False
        await self.server.stop(grace)
        await self.proxy.close()
        await self.origin.close()
        if self._admin is not None:
            await self._admin.cleanup()


async def serve_until_signal(config: EdgeConfig) -> None:
    """Run one worker until SIGTERM or SIGINT, then drain and exit."""
    worker = EdgeWorker(config)
    await worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await worker.stop()
