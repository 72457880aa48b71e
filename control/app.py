"""The control plane's aiohttp application: lifecycle, authentication and error rendering.

Routes live one module per concern and are added by `make_app`; each handler finds the caller in
`request[PRINCIPAL]` (set here from the bearer token) and raises `Problem` for any error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from control.auth import PRINCIPAL, Principal, bearer_token, principal_for
from control.problems import Problem

log = logging.getLogger("control")

ENGINE = web.AppKey("engine", AsyncEngine)
OPERATOR_TOKEN = web.AppKey("operator_token", str)

# Paths served without a token.
PUBLIC_PATHS = frozenset({"/v1/openapi.json", "/healthz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
