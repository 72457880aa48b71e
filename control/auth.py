"""Bearer tokens and who they name (agreement 3.6: scoped sub-account tokens).

A token is 256 random bits, shown once when it is made; only its SHA-256 is stored (a fast hash
is enough for random secrets of that size: there is nothing to brute-force). The operator's
bootstrap token comes from the config or the environment and is compared in constant time.
Tokens never reach a log: `Principal` has no field that holds one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from control.schema import accounts, api_tokens, edges, subaccounts

SCOPES: tuple[str, ...] = (
    "domains:read",
    "domains:write",
    "purge",
    "usage:read",
    "logs:read",
    "billing:read",
)

TokenKind = Literal["account", "subaccount", "edge"]
_PREFIX: dict[TokenKind, str] = {
    "account": "cdn_acct_",
    "subaccount": "cdn_sub_",
    "edge": "cdn_edge_",
}


def new_token(kind: TokenKind) -> tuple[str, str]:
    """A fresh token and the hash to store for it. The prefix only helps people (and secret
    scanners) recognise what a leaked token is; it grants nothing."""
    token = _PREFIX[kind] + secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Operators see everything; an account only its own resources; a
    sub-account its account's resources, within its scopes and domain limit; an edge only the
    edge endpoints."""

    kind: Literal["operator", "account", "subaccount", "edge"]
    account_id: int | None = None
    subaccount_id: int | None = None
    edge_id: int | None = None
    scopes: frozenset[str] = frozenset()
    # Domain names a sub-account is limited to; None: all of its account's.
    domains: frozenset[str] | None = None
    token_id: int | None = None

    def allows(self, scope: str) -> bool:
        """Whether this principal may act in `scope` on its account's resources."""
        if self.kind == "account":
            return True
        return self.kind == "subaccount" and scope in self.scopes

    def sees_domain(self, name: str) -> bool:
        return self.domains is None or name in self.domains


# The aiohttp request key holding the caller's Principal.
PRINCIPAL = web.RequestKey("principal", Principal)


def is_operator_token(token: str, operator_token: str) -> bool:
    return bool(operator_token) and hmac.compare_digest(
        token.encode("utf-8", "surrogateescape"), operator_token.encode("utf-8", "surrogateescape")
    )


async def principal_for(conn: AsyncConnection, token: str, operator_token: str) -> Principal | None:
    """The principal `token` names, or None for an unknown, revoked or orphaned token.

    Read on every request, never cached: a revoked token stops working at once, on every
    control replica. One query: every request pays for it (a fleet's acks on every change)."""
    if is_operator_token(token, operator_token):
        return Principal(kind="operator")
    row = (
        await conn.execute(
            select(
                api_tokens.c.id,
                api_tokens.c.kind,
                api_tokens.c.account_id,
                api_tokens.c.subaccount_id,
                api_tokens.c.edge_id,
                edges.c.id.label("edge_row"),
                edges.c.deleted_at.label("edge_deleted_at"),
                accounts.c.state.label("account_state"),
                subaccounts.c.id.label("sub_row"),
                subaccounts.c.deleted_at.label("sub_deleted_at"),
                subaccounts.c.scopes,
                subaccounts.c.domains,
            )
            .select_from(
                api_tokens.outerjoin(edges, edges.c.id == api_tokens.c.edge_id)
                .outerjoin(accounts, accounts.c.id == api_tokens.c.account_id)
                .outerjoin(subaccounts, subaccounts.c.id == api_tokens.c.subaccount_id)
            )
            .where(api_tokens.c.token_hash == hash_token(token), api_tokens.c.revoked_at.is_(None))
        )
    ).first()
    if row is None:
        return None
    if row.kind == "edge":
        if row.edge_row is None or row.edge_deleted_at is not None:
            return None
        return Principal(kind="edge", edge_id=row.edge_id, token_id=row.id)
    # A terminated account's tokens are dead (agreement 6.3); a suspended one may still log in
    # to read its bills and pay.
    if row.account_state is None or row.account_state == "terminated":
        return None
    if row.kind == "account":
        return Principal(kind="account", account_id=row.account_id, token_id=row.id)
    if row.sub_row is None or row.sub_deleted_at is not None:
        return None
    return Principal(
        kind="subaccount",
        account_id=row.account_id,
        subaccount_id=row.subaccount_id,
        scopes=frozenset(row.scopes),
        domains=None if row.domains is None else frozenset(row.domains),
        token_id=row.id,
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token
