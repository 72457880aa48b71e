"""Accounts, for the operator: create (with a first token), list, suspend, resume, terminate, and
more account tokens. Suspending or terminating an account changes what edges serve for every one
of its domains, one `domain.state` change each (see control.domains for how resume restores them).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Row, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control import domains as domain_routes
from control.api import (
    OPERATOR,
    RouteTable,
    audit,
    caller,
    issue_token,
    now,
    path_id,
    reading,
    token_response,
    writing,
)
from control.models import (
    AccountCreated,
    AccountList,
    AccountOut,
    NewAccount,
    NewToken,
    StateChange,
    TokenCreated,
)
from control.problems import Problem
from control.scheduler import CLOCK
from control.schema import accounts, api_tokens, domains, iso

routes = RouteTable()


def view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "billing": row.billing,
        "timezone": row.timezone,
        "state": row.state,
        "reason": row.state_reason,
        "created_at": iso(row.created_at),
    }


async def account_row(conn: AsyncConnection, account_id: int) -> Row[Any]:
    """The account's row; 404 when there is no such account."""
    row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()
    if row is None:
        raise Problem(404, f"no account {account_id}")
    return row


async def _live_account(conn: AsyncConnection, account_id: int) -> Row[Any]:
    row = await account_row(conn, account_id)
    if row.state == "terminated":
        raise Problem(409, f"account {account_id} was terminated: {row.state_reason}")
    return row


async def _domains_of(conn: AsyncConnection, account_id: int) -> list[Row[Any]]:
    rows = await conn.execute(
        select(domains).where(domains.c.account_id == account_id).order_by(domains.c.name)
    )
    return list(rows)


async def _set_account(conn: AsyncConnection, account_id: int, state: str, reason: str) -> Row[Any]:
    await conn.execute(
        update(accounts).where(accounts.c.id == account_id).values(state=state, state_reason=reason)
    )
    return await account_row(conn, account_id)


@routes.route_with_body(
    "POST",
    "/v1/accounts",
    "Create an account and its first token (shown once)",
    NewAccount,
    who=OPERATOR,
    status=201,
    response=AccountCreated,
)
async def create_account(request: web.Request, body: NewAccount) -> web.StreamResponse:
    async with writing(request) as conn:
        account_id = (
            await conn.execute(
                insert(accounts)
                .values(
                    name=body.name,
                    billing=body.billing,
                    timezone=body.timezone,
                    state="active",
                    state_reason="",
                    # billing's clock: the account's billing starts on this day (control.billing)
                    created_at=request.app[CLOCK].now(),
                )
                .returning(accounts.c.id)
            )
        ).scalar_one()
        token_id, token = await issue_token(conn, "account", label="initial", account_id=account_id)
        await audit(
            conn,
            caller(request),
            account_id,
            "account.create",
            f"account {account_id}",
            {"name": body.name, "billing": body.billing, "timezone": body.timezone},
        )
        await audit(conn, caller(request), account_id, "token.create", f"token {token_id}")
        row = await account_row(conn, account_id)
    return token_response({"account": view(row), "token": token})


@routes.route("GET", "/v1/accounts", "List accounts", who=OPERATOR, response=AccountList)
async def list_accounts(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        rows = await conn.execute(select(accounts).order_by(accounts.c.id))
        return web.json_response({"accounts": [view(row) for row in rows]})


@routes.route("GET", "/v1/accounts/{id}", "One account", who=OPERATOR, response=AccountOut)
async def get_account(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        return web.json_response(view(await account_row(conn, path_id(request))))


@routes.route_with_body(
    "POST",
    "/v1/accounts/{id}/suspend",
    "Suspend an account and its active domains (edges answer 403)",
    StateChange,
    who=OPERATOR,
    response=AccountOut,
)
async def suspend_account(request: web.Request, body: StateChange) -> web.StreamResponse:
    account_id = path_id(request)
    reason = domain_routes.ACCOUNT_SUSPENDED + body.reason
    async with writing(request) as conn:
        await _live_account(conn, account_id)
        row = await _set_account(conn, account_id, "suspended", body.reason)
        for domain in await _domains_of(conn, account_id):
            by_account = domain.state == "suspended" and domain.state_reason.startswith(
                domain_routes.ACCOUNT_SUSPENDED
            )
            if domain.state == "active" or (by_account and domain.state_reason != reason):
                await domain_routes.set_state(conn, domain, "suspended", reason)
        await audit(
            conn,
            caller(request),
            account_id,
            "account.suspend",
            f"account {account_id}",
            {"reason": body.reason},
        )
    return web.json_response(view(row))


@routes.route(
    "POST",
    "/v1/accounts/{id}/resume",
    "Resume an account and the domains its suspension suspended",
    who=OPERATOR,
    response=AccountOut,
)
async def resume_account(request: web.Request) -> web.StreamResponse:
    account_id = path_id(request)
    async with writing(request) as conn:
        await _live_account(conn, account_id)
        row = await _set_account(conn, account_id, "active", "")
        for domain in await _domains_of(conn, account_id):
            if domain.state == "suspended" and domain.state_reason.startswith(
                domain_routes.ACCOUNT_SUSPENDED
            ):
                await domain_routes.set_state(conn, domain, "active", "")
        await audit(conn, caller(request), account_id, "account.resume", f"account {account_id}")
    return web.json_response(view(row))


async def terminate(conn: AsyncConnection, account_id: int, reason: str) -> Row[Any]:
    """Terminate an account in the caller's transaction: its tokens die, every domain is
    terminated on every edge (which deletes its caches, agreement 6.3). Shared with billing's
    scheduled termination (5.3, 5.5). 404 or 409 as the route."""
    await _live_account(conn, account_id)
    row = await _set_account(conn, account_id, "terminated", reason)
    await conn.execute(
        update(api_tokens)
        .where(api_tokens.c.account_id == account_id, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now())
    )
    for domain in await _domains_of(conn, account_id):
        if domain.state != "terminated":
            await domain_routes.set_state(conn, domain, "terminated", reason)
    return row


@routes.route_with_body(
    "POST",
    "/v1/accounts/{id}/terminate",
    "Terminate an account: its tokens die, its domains are terminated on every edge; final",
    StateChange,
    who=OPERATOR,
    response=AccountOut,
)
async def terminate_account(request: web.Request, body: StateChange) -> web.StreamResponse:
    account_id = path_id(request)
    async with writing(request) as conn:
        row = await terminate(conn, account_id, body.reason)
        await audit(
            conn,
            caller(request),
            account_id,
            "account.terminate",
            f"account {account_id}",
            {"reason": body.reason},
        )
    return web.json_response(view(row))


@routes.route_with_body(
    "POST",
    "/v1/accounts/{id}/tokens",
    "Make another token for an account (shown once)",
    NewToken,
    who=OPERATOR,
    status=201,
    response=TokenCreated,
)
async def create_account_token(request: web.Request, body: NewToken) -> web.StreamResponse:
    account_id = path_id(request)
    async with writing(request) as conn:
        await _live_account(conn, account_id)
        token_id, token = await issue_token(
            conn, "account", label=body.label, account_id=account_id
        )
        await audit(
            conn,
            caller(request),
            account_id,
            "token.create",
            f"token {token_id}",
            {"label": body.label},
        )
    return token_response({"id": token_id, "token": token})
