"""The admin listener: /healthz, /readyz and /metrics (Prometheus), on aiohttp.

Kept off the data path on its own (loopback by default) port; aiohttp's per-request cost is
irrelevant here. A single in-process worker serves it itself; under the supervisor the
supervisor serves it, and `/metrics` first asks every worker for its counters (`refresh`).

`/readyz` is 200 "ready" once serving, 503 "starting" before; `notes` adds what an operator
should know (the access log failing, lines lost), each with whether it makes the edge not
ready (503 "not ready"): the body's further lines.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadyCheck = Callable[[], bool]
Refresh = Callable[[], Awaitable[None]]
# (blocks readiness, what to say) pairs; "" says nothing.
Notes = Callable[[], Awaitable[list[tuple[bool, str]]]]
NOTES_KEY: web.AppKey[Notes | None] = web.AppKey("notes")
READY_KEY: web.AppKey[ReadyCheck] = web.AppKey("ready")
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
REFRESH_KEY: web.AppKey[Refresh | None] = web.AppKey("refresh")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if not request.app[READY_KEY]():
        return web.Response(status=503, text="starting\n")
    notes = request.app[NOTES_KEY]
    said = await notes() if notes is not None else []
    blocked = any(blocks for blocks, _ in said)
    text = "not ready\n" if blocked else "ready\n"
    text += "".join(f"{note}\n" for _, note in said if note)
    return web.Response(status=503 if blocked else 200, text=text)


async def metrics(request: web.Request) -> web.Response:
    # Collectors are synchronous; whatever must be awaited (other processes) is gathered first.
    refresh = request.app[REFRESH_KEY]
    if refresh is not None:
        await refresh()
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_admin_app(
    registry: CollectorRegistry,
    ready: ReadyCheck,
    refresh: Refresh | None = None,
    notes: Notes | None = None,
) -> web.Application:
    app = web.Application()
    app[REGISTRY_KEY] = registry
    app[READY_KEY] = ready
    app[REFRESH_KEY] = refresh
    app[NOTES_KEY] = notes
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
