"""The admin listener: /healthz, /readyz and /metrics (Prometheus), on aiohttp.

Kept off the data path on its own (loopback by default) port; aiohttp's per-request cost is
irrelevant here. A single in-process worker serves it itself; under the supervisor the
supervisor serves it, and `/metrics` first asks every worker for its counters (`refresh`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadyCheck = Callable[[], bool]
Refresh = Callable[[], Awaitable[None]]
READY_KEY: web.AppKey[ReadyCheck] = web.AppKey("ready")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
REFRESH_KEY: web.AppKey[Refresh | None] = web.AppKey("refresh")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[READY_KEY]():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="starting\n")


async def metrics(request: web.Request) -> web.Response:
    # Collectors are synchronous; whatever must be awaited (other processes) is gathered first.
    refresh = request.app[REFRESH_KEY]
    if refresh is not None:
        await refresh()
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_admin_app(
    registry: CollectorRegistry, ready: ReadyCheck, refresh: Refresh | None = None
) -> web.Application:
    app = web.Application()
    app[REGISTRY_KEY] = registry
    app[READY_KEY] = ready
    app[REFRESH_KEY] = refresh
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
