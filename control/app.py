"""The control plane's aiohttp application: lifecycle, authentication and error rendering.

Routes live one module per concern, each with its own `RouteTable`, and are added by `make_app`;
each handler finds the caller in `request[PRINCIPAL]` (set here from the bearer token) and raises
`Problem` for any error. The app keys live in `control.api` (handlers need them without importing
this module) and are re-exported here.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from control import (
    accounts,
    billing,
    blocks,
    domains,
    edges,
    logs,
    notices,
    openapi,
    purge,
    subaccounts,
    usage,
)
from control.api import (
    CNAME_SUFFIX,
    ENGINE,
    FEED,
    OPERATOR_TOKEN,
    ORIGIN_DENY,
    SECRET_CIPHER,
    Handler,
    Route,
)
from control.auth import PRINCIPAL, Principal, bearer_token, principal_for
from control.cipher import fernet
from control.config import ControlConfig
from control.db import engine_for, migrate
from control.feed import Feed
from control.logstore import LocalLogStore
from control.problems import Problem
from control.scheduler import CLOCK, SCHEDULER, Clock, Scheduler
from control.signing_keys import seal_stored_keys

__all__ = [
    "CNAME_SUFFIX",
    "ENGINE",
    "FEED",
    "OPERATOR_TOKEN",
    "ORIGIN_DENY",
    "RETENTION",
    "ROUTES",
    "SECRET_CIPHER",
    "errors_and_auth",
    "make_app",
]

log = logging.getLogger("control")

# The route table: what the app serves and what /v1/openapi.json documents.
ROUTES: tuple[Route, ...] = (
    *accounts.routes.routes,
    *edges.routes.routes,
    *domains.routes.routes,
    *purge.routes.routes,
    *blocks.routes.routes,
    *subaccounts.routes.routes,
    *usage.routes.routes,
    *notices.routes.routes,
    *billing.routes.routes,
    *logs.routes.routes,
    *openapi.routes.routes,
)

# The log retention job's scheduler (control.logs.enforce_retention).
RETENTION = web.AppKey("log_retention", Scheduler)

# Largest request body read whole: 1000 URLs of a few KiB each (log uploads stream past it).
MAX_BODY = 8 * 2**20

# Paths served without a token.
PUBLIC_PATHS = frozenset({"/v1/openapi.json", "/healthz"})


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every `/v1` call, then render `Problem`s (and anything unexpected)."""
    try:
        if request.path.startswith("/v1/") and request.path not in PUBLIC_PATHS:
            request[PRINCIPAL] = await authenticate(request)
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own 404 / 405 / 413, as problem details
        return Problem(exc.status, exc.reason or "error").response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return Problem(500, "internal error; the control plane logged it").response()


async def authenticate(request: web.Request) -> Principal:
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise Problem(401, "an Authorization: Bearer token is required")
    async with request.app[ENGINE].connect() as conn:
        principal = await principal_for(conn, token, request.app[OPERATOR_TOKEN])
    if principal is None:
        raise Problem(401, "the token is unknown or revoked")
    return principal


def make_app(config: ControlConfig, engine: AsyncEngine | None = None) -> web.Application:
    """The control plane on `engine`; without one, an engine for `config.database` that the app
    migrates on startup and disposes of on cleanup (tests pass their own, already migrated)."""
    owned = engine is None
    store = engine_for(config.database) if engine is None else engine
    cipher = fernet(config.secret_key)
    feed = Feed(store, heartbeat=config.heartbeat, keep=config.change_log_keep, cipher=cipher)
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[ENGINE] = store
    app[OPERATOR_TOKEN] = config.admin_token
    app[CNAME_SUFFIX] = config.cname_suffix
    app[ORIGIN_DENY] = config.origin_deny
    app[FEED] = feed
    app[SECRET_CIPHER] = cipher
    deliveries = notices.Deliverer(store, config.secret_key, config.origin_deny)
    app[notices.DELIVERIES] = deliveries
    clock = app[CLOCK] = Clock()
    grace = timedelta(seconds=config.arrears_grace)

    async def settle_due(at: datetime) -> object:
        return await billing.settle(store, at, clock=clock, grace=grace, changed=feed.changed)

    scheduler = app[SCHEDULER] = Scheduler(settle_due, clock, config.settle_every)
    log_store = app[logs.LOG_STORE] = LocalLogStore(Path(config.log_dir))
    log_settings = app[logs.LOG_SETTINGS] = logs.settings_of(config)

    async def expire_logs(at: datetime) -> object:
        return await logs.enforce_retention(
            store, log_store, log_settings, at, stopping=retention.stopping
        )

    retention = app[RETENTION] = Scheduler(
        expire_logs, clock, config.log_retention_every, name="log-retention"
    )
    app[openapi.DOCUMENT] = openapi.document([*ROUTES, *openapi.EDGE_ROUTES])
    for route in ROUTES:
        assert route.handler is not None
        app.router.add_route(route.method, route.router_path, route.handler)
    app.add_routes(feed.routes())

    async def start(_: web.Application) -> None:
        if owned:
            await migrate(store)
        # Rows an older version wrote with plaintext signing keys (control.signing_keys).
        await seal_stored_keys(store, cipher)
        await feed.start()
        await deliveries.start()
        scheduler.start()
        retention.start()

    async def end_streams(_: web.Application) -> None:
        # on_shutdown runs before the server waits for open requests: edge streams never end
        # by themselves and would hold a graceful stop for the whole shutdown timeout.
        await feed.stop()

    async def stop(_: web.Application) -> None:
        await scheduler.stop()
        await retention.stop()
        await deliveries.stop()
        await feed.stop()
        if owned:
            await store.dispose()

    app.on_startup.append(start)
    app.on_shutdown.append(end_streams)
    app.on_cleanup.append(stop)
    return app
