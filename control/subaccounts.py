"""What only an account's own token may do (agreement 3.6): grant sub-accounts scoped, optionally
domain-limited access, manage tokens, and read the audit log of everything done in its name."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Row, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from control.api import (
    ACCOUNT_ONLY,
    QueryParam,
    RouteTable,
    account_of,
    audit,
    caller,
    domain_name,
    issue_token,
    now,
    path_id,
    query_int,
    reading,
    token_response,
    writing,
)
from control.models import (
    AuditPage,
    NewSubaccount,
    NewToken,
    SubaccountCreated,
    SubaccountList,
    TokenCreated,
    TokenList,
)
from control.problems import Problem
from control.schema import api_tokens, audit_log, iso, subaccounts

routes = RouteTable()

AUDIT_PAGE = 100
AUDIT_PAGE_MAX = 1000


def view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "scopes": row.scopes,
        "domains": row.domains,
        "created_at": iso(row.created_at),
    }


async def _subaccount(conn: AsyncConnection, account_id: int, subaccount_id: int) -> Row[Any]:
    row = (
        await conn.execute(
            select(subaccounts).where(
                subaccounts.c.id == subaccount_id,
                subaccounts.c.account_id == account_id,
                subaccounts.c.deleted_at.is_(None),
            )
        )
    ).first()
    if row is None:
        raise Problem(404, f"no sub-account {subaccount_id}")
    return row


@routes.route_with_body(
    "POST",
    "/v1/subaccounts",
    "Create a sub-account and its first token (shown once)",
    NewSubaccount,
    who=ACCOUNT_ONLY,
    status=201,
    response=SubaccountCreated,
)
async def create_subaccount(request: web.Request, body: NewSubaccount) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    limit = None
    if body.domains is not None:
        limit = list(
            dict.fromkeys(
                domain_name(name, f"domains[{index}]") for index, name in enumerate(body.domains)
            )
        )
    scopes = sorted(set(body.scopes))
    taken = f"a sub-account named {body.name!r} exists or existed"
    try:
        async with writing(request) as conn:
            exists = await conn.execute(
                select(subaccounts.c.id).where(
                    subaccounts.c.account_id == account_id, subaccounts.c.name == body.name
                )
            )
            if exists.first() is not None:
                raise Problem(409, taken)
            subaccount_id = (
                await conn.execute(
                    insert(subaccounts)
                    .values(
                        account_id=account_id,
                        name=body.name,
                        scopes=scopes,
                        domains=limit,
                        created_at=now(),
                    )
                    .returning(subaccounts.c.id)
                )
            ).scalar_one()
            token_id, token = await issue_token(
                conn,
                "subaccount",
                label="initial",
                account_id=account_id,
                subaccount_id=subaccount_id,
            )
            await audit(
                conn,
                principal,
                account_id,
                "subaccount.create",
                f"subaccount {subaccount_id}",
                {"name": body.name, "scopes": scopes, "domains": limit},
            )
            await audit(conn, principal, account_id, "token.create", f"token {token_id}")
            row = await _subaccount(conn, account_id, subaccount_id)
    except IntegrityError:  # made by a concurrent request since the check (PostgreSQL)
        raise Problem(409, taken) from None
    return token_response({"subaccount": view(row), "token": token})


@routes.route(
    "GET", "/v1/subaccounts", "List sub-accounts", who=ACCOUNT_ONLY, response=SubaccountList
)
async def list_subaccounts(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        rows = await conn.execute(
            select(subaccounts)
            .where(
                subaccounts.c.account_id == account_of(caller(request)),
                subaccounts.c.deleted_at.is_(None),
            )
            .order_by(subaccounts.c.id)
        )
        return web.json_response({"subaccounts": [view(row) for row in rows]})


@routes.route(
    "DELETE",
    "/v1/subaccounts/{id}",
    "Remove a sub-account; its tokens stop working",
    who=ACCOUNT_ONLY,
    status=204,
)
async def delete_subaccount(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    subaccount_id = path_id(request)
    async with writing(request) as conn:
        await _subaccount(conn, account_id, subaccount_id)
        at = now()
        await conn.execute(
            update(subaccounts).where(subaccounts.c.id == subaccount_id).values(deleted_at=at)
        )
        await conn.execute(
            update(api_tokens)
            .where(api_tokens.c.subaccount_id == subaccount_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        await audit(conn, principal, account_id, "subaccount.delete", f"subaccount {subaccount_id}")
    return web.Response(status=204)


@routes.route_with_body(
    "POST",
    "/v1/subaccounts/{id}/tokens",
    "Make another token for a sub-account (shown once)",
    NewToken,
    who=ACCOUNT_ONLY,
    status=201,
    response=TokenCreated,
)
async def create_subaccount_token(request: web.Request, body: NewToken) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    subaccount_id = path_id(request)
    async with writing(request) as conn:
        await _subaccount(conn, account_id, subaccount_id)
        token_id, token = await issue_token(
            conn,
            "subaccount",
            label=body.label,
            account_id=account_id,
            subaccount_id=subaccount_id,
        )
        await audit(
            conn,
            principal,
            account_id,
            "token.create",
            f"token {token_id}",
            {"label": body.label, "subaccount": subaccount_id},
        )
    return token_response({"id": token_id, "token": token})


@routes.route(
    "GET",
    "/v1/tokens",
    "List the account's tokens (never the tokens themselves)",
    who=ACCOUNT_ONLY,
    response=TokenList,
)
async def list_tokens(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        rows = await conn.execute(
            select(
                api_tokens.c.id,
                api_tokens.c.kind,
                api_tokens.c.subaccount_id,
                api_tokens.c.label,
                api_tokens.c.created_at,
                api_tokens.c.revoked_at,
            )
            .where(api_tokens.c.account_id == account_of(caller(request)))
            .order_by(api_tokens.c.id)
        )
        tokens = [
            {
                "id": row.id,
                "kind": row.kind,
                "subaccount_id": row.subaccount_id,
                "label": row.label,
                "created_at": iso(row.created_at),
                "revoked_at": iso(row.revoked_at),
            }
            for row in rows
        ]
    return web.json_response({"tokens": tokens})


@routes.route(
    "DELETE",
    "/v1/tokens/{id}",
    "Revoke a token, with immediate effect",
    who=ACCOUNT_ONLY,
    status=204,
)
async def revoke_token(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    token_id = path_id(request)
    async with writing(request) as conn:
        row = (
            await conn.execute(
                select(api_tokens.c.revoked_at).where(
                    api_tokens.c.id == token_id, api_tokens.c.account_id == account_id
                )
            )
        ).first()
        if row is None:
            raise Problem(404, f"no token {token_id}")
        if row.revoked_at is None:
            await conn.execute(
                update(api_tokens).where(api_tokens.c.id == token_id).values(revoked_at=now())
            )
            await audit(conn, principal, account_id, "token.revoke", f"token {token_id}")
    return web.Response(status=204)


@routes.route(
    "GET",
    "/v1/audit",
    "The account's audit log, newest first",
    who=ACCOUNT_ONLY,
    query=(
        QueryParam(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": AUDIT_PAGE_MAX},
            f"entries per page (default {AUDIT_PAGE})",
        ),
        QueryParam(
            "before",
            {"type": "integer", "minimum": 1},
            "only entries with a smaller id (the next page)",
        ),
    ),
    response=AuditPage,
)
async def list_audit(request: web.Request) -> web.StreamResponse:
    limit = query_int(request, "limit", AUDIT_PAGE, 1, AUDIT_PAGE_MAX)
    before = query_int(request, "before", 2**31 - 1, 1, 2**31 - 1)
    async with reading(request) as conn:
        rows = await conn.execute(
            select(audit_log)
            .where(
                audit_log.c.account_id == account_of(caller(request)),
                audit_log.c.id < before,
            )
            .order_by(audit_log.c.id.desc())
            .limit(limit)
        )
        entries = [
            {
                "id": row.id,
                "at": iso(row.at),
                "actor": row.actor,
                "subaccount_id": row.subaccount_id,
                "action": row.action,
                "target": row.target,
                "detail": row.detail,
            }
            for row in rows
        ]
    return web.json_response({"entries": entries})
