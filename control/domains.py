"""Domains: an account's own (validated by the edge's config parser) and the operator's suspend,
resume and terminate. Every write publishes the change edges act on, in its own transaction.

A domain row holds the state edges enforce. Suspending an account suspends its active domains
with the reason prefixed by `ACCOUNT_SUSPENDED`; resuming the account restores exactly those, so a
domain the operator suspended on its own stays suspended until the operator resumes it.

Agreement 4.1 (prepaid: service begins after payment): a prepaid account that may not serve
(`rating.may_serve`: no positive balance and no live package; an account without billing terms
has neither) gets its new domains suspended with `AWAITING_REASON`. `control.billing` activates
exactly those in the transaction of the payment or package grant that lets the account serve.
That gate is only at the start: a prepaid account that later runs out goes through the arrears
path (notice, grace, suspension; 4.3), as a postpaid one does. Such a domain may be deleted by
its account: adding it again would only make it wait again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import Row, Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from control.api import (
    ACCOUNTS,
    CNAME_SUFFIX,
    OPERATOR,
    ORIGIN_DENY,
    SECRET_CIPHER,
    RouteTable,
    account_of,
    audit,
    caller,
    invalid,
    now,
    reading,
    writing,
)
from control.auth import Principal
from control.feed import publish
from control.models import DomainList, DomainOut, DomainSettings, NewDomain, StateChange
from control.problems import Problem
from control.rating import Package, may_serve
from control.scheduler import CLOCK
from control.schema import account_billing, accounts, domains, iso, packages
from control.signing_keys import (
    KEY_FIELD,
    KEY_FIELDS,
    MASK,
    audited,
    masked,
    opened,
    sealed,
)
from edge.config import DomainConfig, InvalidValue, QueryPolicy, access_table, parse_domain
from edge.netguard import Network, deny_reason

ACCOUNT_SUSPENDED = "account suspended: "
AWAITING_PREPAYMENT = "awaiting prepayment: "
"""Prefix of the reason of a prepaid account's domains held until it may serve (4.1)."""
AWAITING_REASON = AWAITING_PREPAYMENT + "add balance or a package"

routes = RouteTable()


# --- helpers other modules use --------------------------------------------------------------------


def domain_config(parsed: DomainConfig) -> dict[str, Any]:
    """The normalised `[[domains]]` table without `name`, as edges receive it: only what differs
    from the defaults, in the form `edge.config.parse_domain` reads back to the same domain."""
    config: dict[str, Any] = {"origins": list(parsed.origins)}
    if parsed.origin_host is not None:
        config["origin_host"] = parsed.origin_host
    if parsed.rules:
        rules = []
        for rule in parsed.rules:
            table: dict[str, Any] = {rule.kind: list(rule.values)}
            if rule.ttl is not None:
                table["ttl"] = rule.ttl
            if not rule.respect_origin:
                table["respect_origin"] = False
            if rule.slice is not None:
                table["slice"] = rule.slice
            rules.append(table)
        config["rules"] = rules
    if parsed.query != QueryPolicy():
        query: dict[str, Any] = {"mode": parsed.query.mode}
        if parsed.query.params:
            query["params"] = list(parsed.query.params)
        config["query"] = query
    if parsed.access is not None:
        config["access"] = access_table(parsed.access)
    return config


def stored_config(request: web.Request, parsed: DomainConfig) -> dict[str, Any]:
    """`domain_config(parsed)` as stored: its signing keys sealed (control.signing_keys); a
    domain with keys is a 422 naming the key when the operator has set no `secret_key`."""
    config = domain_config(parsed)
    if parsed.access is None or parsed.access.signed_url is None:
        return config
    for field, key in zip(KEY_FIELDS, parsed.access.signed_url.keys, strict=False):
        if key == MASK:
            problem = "is the mask read-only callers see, not a key"
            raise invalid([{"field": f"access.signed_url.{field}", "problem": problem}])
    cipher = request.app[SECRET_CIPHER]
    if cipher is None:
        raise invalid([{
            "field": KEY_FIELD,
            "problem": "signing keys are stored encrypted: the operator must set secret_key "
            "in the control plane's config first",
        }])  # fmt: skip
    return sealed(config, cipher)


def validated(table: dict[str, Any], deny: tuple[Network, ...]) -> DomainConfig:
    """`table` checked by the edge's own parser, its origins against `deny`; a 422 naming the
    field (`origins[0]`)."""
    try:
        parsed = parse_domain(table, "domain")
    except InvalidValue as exc:
        field = exc.key.removeprefix("domain").removeprefix(".") or "(body)"
        raise invalid([{"field": field, "problem": exc.problem}]) from None
    errors = [
        {"field": f"origins[{index}]", "problem": problem}
        for index, origin in enumerate(parsed.origins)
        if (problem := deny_reason(origin, deny))
    ]
    if errors:
        raise invalid(errors)
    return parsed


def change_payload(row: Row[Any]) -> dict[str, Any]:
    """DOMAIN as in control/README.md."""
    return {"name": row.name, "state": row.state, "reason": row.state_reason, "config": row.config}


def shown(request: web.Request, row: Row[Any]) -> dict[str, Any]:
    """The domain as the API answers the caller: its signing keys in plaintext for those who may
    change the domain (the operator, the account, a sub-account with `domains:write`), masked for
    the others."""
    principal = caller(request)
    if principal.kind == "operator" or principal.allows("domains:write"):
        config = opened(row.name, row.config, request.app[SECRET_CIPHER], otherwise=MASK)
    else:
        config = masked(row.config)
    return {
        "name": row.name,
        **config,
        "state": row.state,
        "reason": row.state_reason,
        "cname": f"{row.name}.{request.app[CNAME_SUFFIX]}",
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


async def set_state(conn: AsyncConnection, row: Row[Any], state: str, reason: str) -> None:
    """Store a domain's new state and publish the `domain.state` change."""
    await conn.execute(
        update(domains)
        .where(domains.c.id == row.id)
        .values(state=state, state_reason=reason, updated_at=now())
    )
    await publish(conn, "domain.state", {"name": row.name, "state": state, "reason": reason})


async def check_visible(
    conn: AsyncConnection,
    principal: Principal,
    account_id: int,
    name: str,
    records: Table,
) -> None:
    """404 unless the account owns the domain `name` now or has rows of it in `records` (usage,
    log pieces: what it was served under a name it no longer owns stays its own), and the caller
    sees it; worded as for a missing domain, so that it reveals nothing of other accounts."""
    owned = (
        await conn.execute(
            select(domains.c.id).where(domains.c.name == name, domains.c.account_id == account_id)
        )
    ).first()
    recorded = (
        await conn.execute(
            select(records.c.domain)
            .where(records.c.domain == name, records.c.account_id == account_id)
            .limit(1)
        )
    ).first()
    if not principal.sees_domain(name) or (owned is None and recorded is None):
        raise Problem(404, f"no domain {name!r}")


async def find(conn: AsyncConnection, name: str) -> Row[Any] | None:
    return (await conn.execute(select(domains).where(domains.c.name == name))).first()


async def _reload(conn: AsyncConnection, name: str) -> Row[Any]:
    return (await conn.execute(select(domains).where(domains.c.name == name))).one()


async def own(conn: AsyncConnection, principal: Principal, name: str) -> Row[Any]:
    """The caller's domain `name`; another account's, or one outside a sub-account's limit,
    is 404 exactly like a missing one."""
    row = await find(conn, name)
    if row is None or row.account_id != principal.account_id or not principal.sees_domain(name):
        raise Problem(404, f"no domain {name!r}")
    return row


async def require_active_account(conn: AsyncConnection, account_id: int) -> None:
    """Refuse writes that would make a suspended account's domains serve again."""
    account = (
        await conn.execute(
            select(accounts.c.state, accounts.c.state_reason).where(accounts.c.id == account_id)
        )
    ).one()
    if account.state != "active":
        raise Problem(403, f"the account is {account.state}: {account.state_reason}")


async def prepaid_may_serve(conn: AsyncConnection, account_id: int, at: datetime) -> bool:
    """4.1 for a prepaid account at `at`: a positive balance or a live package (without billing
    terms: neither); True for postpaid (4.2: use first; a negative balance is arrears, billing's).

    Locks the account's billing row (PostgreSQL), as payments and grants do, so a domain added
    while a payment commits is seen by it (or sees it) instead of waiting for a later one."""
    billing = (
        await conn.execute(select(accounts.c.billing).where(accounts.c.id == account_id))
    ).scalar_one()
    if billing != "prepaid":
        return True
    balance = (
        await conn.execute(
            select(account_billing.c.balance_fen)
            .where(account_billing.c.account_id == account_id)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if balance is None:
        return False
    rows = await conn.execute(select(packages).where(packages.c.account_id == account_id))
    held = [
        Package(
            str(row.id),
            int(row.quota_bytes),
            int(row.remaining_bytes),
            row.activated_at,
            row.expires_at,
            int(row.price_fen),
        )
        for row in rows
    ]
    return may_serve("prepaid", int(balance), held, at)


def path_name(request: web.Request) -> str:
    return request.match_info["name"].lower().removesuffix(".")


def _not_terminated(row: Row[Any]) -> None:
    if row.state == "terminated":
        raise Problem(409, f"domain {row.name!r} was terminated: {row.state_reason}")


# --- an account's domains -------------------------------------------------------------------------


@routes.route(
    "GET",
    "/v1/domains",
    "List the caller's domains",
    who=ACCOUNTS,
    scope="domains:read",
    response=DomainList,
)
async def list_domains(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    async with reading(request) as conn:
        rows = await conn.execute(
            select(domains)
            .where(domains.c.account_id == account_of(principal))
            .order_by(domains.c.name)
        )
        visible = [row for row in rows if principal.sees_domain(row.name)]
    return web.json_response({"domains": [shown(request, row) for row in visible]})


@routes.route_with_body(
    "POST",
    "/v1/domains",
    "Add a domain (the edge's [[domains]] table)",
    NewDomain,
    who=ACCOUNTS,
    scope="domains:write",
    status=201,
    response=DomainOut,
)
async def create_domain(request: web.Request, body: NewDomain) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    parsed = validated(
        body.model_dump(exclude_unset=True, exclude_none=True), request.app[ORIGIN_DENY]
    )
    if not principal.sees_domain(parsed.name):
        raise Problem(
            403, f"this sub-account may not add domains beyond its limit ({parsed.name!r})"
        )
    config = stored_config(request, parsed)
    try:
        async with writing(request) as conn:
            await require_active_account(conn, account_id)
            if await find(conn, parsed.name) is not None:
                raise Problem(409, f"domain {parsed.name!r} is already registered")
            serving = await prepaid_may_serve(conn, account_id, request.app[CLOCK].now())
            at = now()
            await conn.execute(
                insert(domains).values(
                    account_id=account_id,
                    name=parsed.name,
                    config=config,
                    state="active" if serving else "suspended",
                    state_reason="" if serving else AWAITING_REASON,
                    created_at=at,
                    updated_at=at,
                )
            )
            row = await _reload(conn, parsed.name)
            await publish(conn, "domain.upsert", {"domain": change_payload(row)})
            await audit(
                conn, principal, account_id, "domain.create", row.name,
                {"config": audited(config)},
            )
    except IntegrityError:  # registered by a concurrent request since the check
        raise Problem(409, f"domain {parsed.name!r} is already registered") from None
    response = web.json_response(shown(request, row), status=201)
    response.headers["Location"] = f"/v1/domains/{row.name}"
    return response


@routes.route(
    "GET",
    "/v1/domains/{name}",
    "One of the caller's domains",
    who=ACCOUNTS,
    scope="domains:read",
    response=DomainOut,
)
async def get_domain(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        row = await own(conn, caller(request), path_name(request))
    return web.json_response(shown(request, row))


@routes.route_with_body(
    "PUT",
    "/v1/domains/{name}",
    "Replace a domain's settings",
    DomainSettings,
    who=ACCOUNTS,
    scope="domains:write",
    response=DomainOut,
)
async def update_domain(request: web.Request, body: DomainSettings) -> web.StreamResponse:
    principal = caller(request)
    name = path_name(request)
    async with writing(request) as conn:
        row = await own(conn, principal, name)
        _not_terminated(row)
        await require_active_account(conn, row.account_id)
        table = {"name": name, **body.model_dump(exclude_unset=True, exclude_none=True)}
        config = stored_config(request, validated(table, request.app[ORIGIN_DENY]))
        await conn.execute(
            update(domains).where(domains.c.id == row.id).values(config=config, updated_at=now())
        )
        row = await _reload(conn, name)
        await publish(conn, "domain.upsert", {"domain": change_payload(row)})
        await audit(
            conn, principal, row.account_id, "domain.update", name, {"config": audited(config)}
        )
    return web.json_response(shown(request, row))


@routes.route(
    "DELETE",
    "/v1/domains/{name}",
    "Remove a domain (edges forget it and delete its cached objects)",
    who=ACCOUNTS,
    scope="domains:write",
    status=204,
)
async def delete_domain(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    name = path_name(request)
    async with writing(request) as conn:
        row = await own(conn, principal, name)
        _not_terminated(row)
        if row.state == "suspended" and not row.state_reason.startswith(AWAITING_PREPAYMENT):
            # deleting and adding it again would undo the suspension (a domain awaiting
            # prepayment would only wait again)
            raise Problem(409, "suspended domains cannot be deleted; ask the operator")
        await conn.execute(delete(domains).where(domains.c.id == row.id))
        await publish(conn, "domain.delete", {"name": name})
        await audit(conn, principal, row.account_id, "domain.delete", name)
    return web.Response(status=204)


# --- the operator's -------------------------------------------------------------------------------


async def _operator_domain(conn: AsyncConnection, name: str) -> Row[Any]:
    row = await find(conn, name)
    if row is None:
        raise Problem(404, f"no domain {name!r}")
    _not_terminated(row)
    return row


@routes.route_with_body(
    "POST",
    "/v1/domains/{name}/suspend",
    "Suspend a domain (edges answer 403 with the reason)",
    StateChange,
    who=OPERATOR,
    response=DomainOut,
)
async def suspend_domain(request: web.Request, body: StateChange) -> web.StreamResponse:
    return await _operator_sets(request, "suspended", body.reason, "domain.suspend")


@routes.route(
    "POST",
    "/v1/domains/{name}/resume",
    "Resume a suspended domain",
    who=OPERATOR,
    response=DomainOut,
)
async def resume_domain(request: web.Request) -> web.StreamResponse:
    name = path_name(request)
    async with writing(request) as conn:
        row = await _operator_domain(conn, name)
        account = (
            await conn.execute(select(accounts.c.state).where(accounts.c.id == row.account_id))
        ).one()
        if account.state != "active":
            raise Problem(409, f"the domain's account is {account.state}: resume the account")
        if row.state != "active":
            await set_state(conn, row, "active", "")
            await audit(conn, caller(request), row.account_id, "domain.resume", name)
            row = await _reload(conn, name)
    return web.json_response(shown(request, row))


@routes.route_with_body(
    "POST",
    "/v1/domains/{name}/terminate",
    "Terminate a domain (edges answer 404 and delete its cached objects); final",
    StateChange,
    who=OPERATOR,
    response=DomainOut,
)
async def terminate_domain(request: web.Request, body: StateChange) -> web.StreamResponse:
    return await _operator_sets(request, "terminated", body.reason, "domain.terminate")


async def _operator_sets(
    request: web.Request, state: str, reason: str, action: str
) -> web.StreamResponse:
    """Suspend or terminate the path's domain, audited under its account."""
    name = path_name(request)
    async with writing(request) as conn:
        row = await _operator_domain(conn, name)
        await set_state(conn, row, state, reason)
        await audit(conn, caller(request), row.account_id, action, name, {"reason": reason})
        row = await _reload(conn, name)
    return web.json_response(shown(request, row))
