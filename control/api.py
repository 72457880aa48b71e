"""What every `/v1` handler module shares: the app keys, the route table, access rules, request
bodies, and the audit log.

The route table is the single source of truth: `make_app` adds its routes to the router and
`control.openapi` documents the same entries, so the document cannot drift from what is served.
Who may call a route is declared in its entry and enforced by the wrapper the table puts around
the handler, so a handler never forgets a permission check.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from aiohttp import web
from cryptography.fernet import Fernet
from pydantic import BaseModel, ValidationError
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.auth import PRINCIPAL, Principal, TokenKind, new_token
from control.db import write_transaction
from control.digits import parse_digits
from control.feed import Feed
from control.problems import Problem
from control.schema import api_tokens, audit_log
from edge.config import InvalidValue, parse_domain
from edge.netguard import Network

ENGINE = web.AppKey("engine", AsyncEngine)
OPERATOR_TOKEN = web.AppKey("operator_token", str)
FEED = web.AppKey("feed", Feed)
CNAME_SUFFIX = web.AppKey("cname_suffix", str)
ORIGIN_DENY = web.AppKey("origin_deny", tuple[Network, ...])
# The cipher of secrets the control plane reads back (control.cipher); None: no secret_key.
SECRET_CIPHER: web.AppKey[Fernet | None] = web.AppKey("secret_cipher")

Kind = Literal["public", "operator", "account", "subaccount", "edge"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
B = TypeVar("B", bound=BaseModel)
BodyHandler = Callable[[web.Request, B], Awaitable[web.StreamResponse]]

ACCOUNTS: frozenset[Kind] = frozenset({"account", "subaccount"})
ACCOUNT_ONLY: frozenset[Kind] = frozenset({"account"})
OPERATOR: frozenset[Kind] = frozenset({"operator"})
PUBLIC: frozenset[Kind] = frozenset({"public"})
EDGE: frozenset[Kind] = frozenset({"edge"})

_MAX_ID = 2**31 - 1  # ids are 32-bit integers in both databases
_MAX_ID_DIGITS = 10


@dataclasses.dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    schema: dict[str, Any]
    description: str


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """One entry of the route table. `path` is in OpenAPI form (`/v1/accounts/{id}`); `{id}`
    parameters are integers. `handler` is None for routes served by another component (the
    edge feed), which the table only documents."""

    method: str
    path: str
    summary: str
    who: frozenset[Kind]
    handler: Handler | None = None
    scope: str | None = None
    body: type[BaseModel] | None = None
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    produces: str = "application/json"
    response: type[BaseModel] | None = None  # the success body's model (documentation, tests)
    consumes: str | None = None  # a raw request body's media type (the handler streams it)
    errors: tuple[int, ...] = ()  # problem statuses beyond those every route of its kind has

    @property
    def router_path(self) -> str:
        """The path for aiohttp's router: integer ids only match digits (else a plain 404)."""
        return self.path.replace("{id}", "{id:[0-9]+}")


class RouteTable:
    """Collects a module's routes; decorating a handler wraps it with the access check (and,
    for routes with a body, the body's validation) declared in the entry."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        who: frozenset[Kind],
        scope: str | None = None,
        status: int = 200,
        query: tuple[QueryParam, ...] = (),
        response: type[BaseModel] | None = None,
        produces: str = "application/json",
        consumes: str | None = None,
        errors: tuple[int, ...] = (),
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            entry = Route(
                method,
                path,
                summary,
                who,
                None,
                scope,
                None,
                status,
                query,
                produces=produces,
                response=response,
                consumes=consumes,
                errors=errors,
            )

            async def guarded(request: web.Request) -> web.StreamResponse:
                check_access(request, entry)
                return await handler(request)

            self.routes.append(_with_handler(entry, guarded, handler))
            return handler

        return register

    def route_with_body(
        self,
        method: str,
        path: str,
        summary: str,
        body: type[B],
        *,
        who: frozenset[Kind],
        scope: str | None = None,
        status: int = 200,
        response: type[BaseModel] | None = None,
        produces: str = "application/json",
    ) -> Callable[[BodyHandler[B]], BodyHandler[B]]:
        def register(handler: BodyHandler[B]) -> BodyHandler[B]:
            entry = Route(
                method,
                path,
                summary,
                who,
                None,
                scope,
                body,
                status,
                produces=produces,
                response=response,
            )

            async def guarded(request: web.Request) -> web.StreamResponse:
                check_access(request, entry)
                return await handler(request, await read_body(request, body))

            self.routes.append(_with_handler(entry, guarded, handler))
            return handler

        return register


def _with_handler(entry: Route, guarded: Handler, original: Callable[..., Any]) -> Route:
    guarded.__name__ = original.__name__  # the OpenAPI operationId
    guarded.__doc__ = original.__doc__
    return dataclasses.replace(entry, handler=guarded)


_WHO_TEXT = {
    OPERATOR: "only the operator's token may call this route",
    ACCOUNT_ONLY: "only an account's own token (not a sub-account's) may call this route",
    ACCOUNTS: "only an account or sub-account token may call this route",
}


def check_access(request: web.Request, route: Route) -> None:
    """403 unless the caller's kind is one the route is for and, for a sub-account, it holds
    the route's scope."""
    if "public" in route.who:
        return
    principal = caller(request)
    if principal.kind not in route.who:
        detail = _WHO_TEXT.get(
            route.who, f"only these token kinds may call this route: {', '.join(sorted(route.who))}"
        )
        raise Problem(403, detail)
    if principal.kind == "subaccount" and route.scope and not principal.allows(route.scope):
        raise Problem(403, f"this sub-account lacks the scope {route.scope!r}", scope=route.scope)


def caller(request: web.Request) -> Principal:
    principal = request[PRINCIPAL]
    if not isinstance(principal, Principal):  # the middleware always sets it on /v1 routes
        raise TypeError("no principal on an authenticated route")
    return principal


def account_of(principal: Principal) -> int:
    """The account an account or sub-account principal acts for."""
    if principal.account_id is None:
        raise TypeError(f"a {principal.kind} principal has no account")
    return principal.account_id


# --- bodies --------------------------------------------------------------------------------------


async def read_body(request: web.Request, model: type[B]) -> B:
    """The JSON body validated by `model`: 400 if it is not JSON, 422 naming every bad field."""
    raw = await request.read()
    if not raw.strip():
        raise Problem(400, "a JSON body is required")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Problem(400, "the body is not valid JSON: nested too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": field_name(error["loc"]), "problem": _problem_text(error)}
            for error in exc.errors(include_url=False)
        ]
        raise invalid(errors) from None


def invalid(errors: list[dict[str, str]]) -> Problem:
    """A 422 listing `errors` ({field, problem}); the detail repeats the first."""
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return Problem(422, f"{first['field']}: {first['problem']}{more}", errors=errors)


def field_name(loc: tuple[int | str, ...]) -> str:
    """`("origins", 0)` -> `origins[0]`, the way edge.config names keys."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name or "(body)"


def _problem_text(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "model_type":
        return "expected a JSON object"
    return str(error["msg"]).removeprefix("Value error, ")


def domain_name(raw: str, field: str) -> str:
    """`raw` as a domain name the edge accepts (lowercase, no trailing dot), or a 422 naming
    `field`. Checked by the edge's own parser so both sides agree on what a name is."""
    try:
        return parse_domain({"name": raw, "origins": ["http://127.0.0.1"]}, "x").name
    except InvalidValue as exc:
        raise invalid([{"field": field, "problem": exc.problem}]) from None


def path_id(request: web.Request) -> int:
    """The `{id}` of the path; an id beyond the column's range names nothing: 404."""
    value = parse_digits(request.match_info["id"], _MAX_ID_DIGITS)
    if value is None or value > _MAX_ID:
        raise Problem(404, f"no such resource: {request.path}")
    return value


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """The query parameter `name` as an integer from `low` to `high` (`default` when absent);
    anything else is a 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    value = parse_digits(raw, len(str(high)))
    if value is None or not low <= value <= high:
        raise Problem(400, f"query parameter {name!r} must be an integer from {low} to {high}")
    return value


# --- writing ---------------------------------------------------------------------------------


@asynccontextmanager
async def writing(request: web.Request) -> AsyncIterator[AsyncConnection]:
    """A write transaction (`control.db.write_transaction`: BEGIN IMMEDIATE on SQLite); after it
    commits, this process's feed is woken (other replicas hear PostgreSQL's NOTIFY from
    `publish`)."""
    async with write_transaction(request.app[ENGINE]) as conn:
        yield conn
    request.app[FEED].changed()


@asynccontextmanager
async def reading(request: web.Request) -> AsyncIterator[AsyncConnection]:
    async with request.app[ENGINE].connect() as conn:
        yield conn


def now() -> datetime:
    return datetime.now(UTC)


async def audit(
    conn: AsyncConnection,
    principal: Principal,
    account_id: int | None,
    action: str,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a write in the account's audit log, with the acting sub-account (agreement 3.6:
    what an authorised sub-account does counts as the account's own act). Never pass a token."""
    actor = principal.kind
    if actor not in ("operator", "account", "subaccount"):
        raise TypeError(f"a {actor} principal does not write audited resources")
    await conn.execute(
        insert(audit_log).values(
            account_id=account_id,
            actor=actor,
            subaccount_id=principal.subaccount_id,
            action=action,
            target=target,
            detail=detail or {},
            at=now(),
        )
    )


async def issue_token(
    conn: AsyncConnection,
    kind: TokenKind,
    *,
    label: str = "",
    account_id: int | None = None,
    subaccount_id: int | None = None,
    edge_id: int | None = None,
) -> tuple[int, str]:
    """A new token's id and the token itself, which the caller shows once: only its hash is
    stored."""
    token, token_hash = new_token(kind)
    token_id = (
        await conn.execute(
            insert(api_tokens)
            .values(
                token_hash=token_hash,
                kind=kind,
                account_id=account_id,
                subaccount_id=subaccount_id,
                edge_id=edge_id,
                label=label,
                created_at=now(),
            )
            .returning(api_tokens.c.id)
        )
    ).scalar_one()
    return int(token_id), token


def token_response(data: dict[str, Any]) -> web.Response:
    """201 with a new token in it: shown this once, and never kept by a cache on the way."""
    return web.json_response(data, status=201, headers={"Cache-Control": "no-store"})
