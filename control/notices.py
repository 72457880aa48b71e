"""Notices to accounts (agreement 11) and their webhook deliveries.

`notify` records a notice in the caller's transaction and queues a delivery when the account has
a webhook, so a notice exists exactly when the write that caused it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cryptography.fernet import InvalidToken
from pydantic import Field, field_validator
from sqlalchemy import Row, Select, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.accounts import account_row
from control.api import (
    ACCOUNT_ONLY,
    ACCOUNTS,
    OPERATOR,
    ORIGIN_DENY,
    QueryParam,
    RouteTable,
    account_of,
    audit,
    caller,
    invalid,
    now,
    path_id,
    query_int,
    reading,
    writing,
)
from control.background import stop_at_safe_point
from control.cipher import fernet
from control.db import write_transaction
from control.models import Body, Out, Url
from control.problems import Problem
from control.schema import account_webhooks, iso, notices, webhook_deliveries
from edge.netguard import DenyingResolver, Network, deny_reason

log = logging.getLogger("control.notices")

# A row of a query with any columns (the delivery worker's join).
AnyRow = Row[*tuple[Any, ...]]

NOTICE_KINDS = (
    "balance_low",
    "arrears",
    "suspended",
    "resumed",
    "package_90",
    "package_expiring",
    "termination_scheduled",
    "terminated",
)

# This process's delivery worker per engine, told of each queued delivery (see `Deliverer.expect`).
_WORKERS: weakref.WeakKeyDictionary[Engine, Deliverer] = weakref.WeakKeyDictionary()


async def notify(
    conn: AsyncConnection,
    account_id: int,
    kind: str,
    detail: dict[str, Any],
    at: datetime,
    *,
    dedupe_key: str | None = None,
) -> int | None:
    """Record a notice in the caller's transaction and return its id; with `dedupe_key`, a notice
    of the same account, kind and key recorded before makes this one a no-op (None), so a job
    that runs again does not notify twice. Queues a webhook delivery when the account has one."""
    if kind not in NOTICE_KINDS:
        raise ValueError(f"unknown notice kind {kind!r}")
    values = {
        "account_id": account_id,
        "kind": kind,
        "detail": detail,
        "created_at": at,
        "dedupe_key": dedupe_key,
    }
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    notice_id = (
        await conn.execute(
            dialect_insert(notices).values(values).on_conflict_do_nothing().returning(notices.c.id)
        )
    ).scalar_one_or_none()
    if notice_id is None:
        return None
    url = (
        await conn.execute(
            select(account_webhooks.c.url).where(account_webhooks.c.account_id == account_id)
        )
    ).scalar_one_or_none()
    if url is not None:
        # Deliveries run on the real clock, whatever clock `at` came from.
        await conn.execute(
            insert(webhook_deliveries).values(
                notice_id=notice_id, url=url, attempts=0, next_attempt_at=datetime.now(UTC)
            )
        )
        worker = _WORKERS.get(conn.sync_engine)
        if worker is not None:
            worker.expect(int(notice_id))
    return int(notice_id)


# --- webhook secrets -----------------------------------------------------------------------------


def signature(secret: str, body: bytes) -> str:
    """The `X-CDN-Signature` value: HMAC-SHA256 of the raw body, keyed by the secret's UTF-8."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# --- delivery ------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


class Deliverer:
    """POSTs queued notices to webhooks: the app's background task.

    Due deliveries are claimed by pushing their next attempt `LEASE` seconds ahead in a short
    transaction (FOR UPDATE SKIP LOCKED on PostgreSQL, so replicas never claim the same one), then
    sent outside it; a replica that dies mid-send leaves a claim that expires and is retried.
    """

    BATCH = 20
    LEASE = 60.0  # longer than a send can take
    TIMEOUT = 10.0
    MAX_ATTEMPTS = 20
    MAX_BACKOFF = 3600.0
    HURRY = 2.0  # how long to look for a notice `notify` announced before its commit

    def __init__(
        self, engine: AsyncEngine, secret_key: str, deny: tuple[Network, ...], *, poll: float = 5.0
    ) -> None:
        self.engine = engine
        self.deny = deny
        self.poll = poll
        self.backoff = 30.0  # the first retry's delay, doubling; tests shorten it
        self._fernet = fernet(secret_key)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._expected: dict[int, float] = {}  # notice id -> loop time to stop hurrying for it
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def encrypt(self, secret: str) -> str:
        if self._fernet is None:
            raise Problem(409, "the operator has not configured secret_key")
        return self._fernet.encrypt(secret.encode()).decode()

    def expect(self, notice_id: int) -> None:
        """`notify` queued a delivery for `notice_id`, not yet committed: poll briefly until it
        is, so it goes out right after the commit rather than at the next poll."""
        self._expected[notice_id] = asyncio.get_running_loop().time() + self.HURRY
        self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=DenyingResolver(self.deny)),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self.TIMEOUT),
        )
        self._task = asyncio.create_task(self._run(), name="webhook-deliveries")
        _WORKERS[self.engine.sync_engine] = self

    async def stop(self) -> None:
        _WORKERS.pop(self.engine.sync_engine, None)
        if self._task is not None:
            self._wake.set()
            # A send takes at most TIMEOUT; the claim and record transactions are short.
            await stop_at_safe_point(self._task, self._stopping, self.TIMEOUT + 5)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                claimed = await self.deliver_due()
            except Exception:
                log.exception("webhook deliveries: pass failed; retrying at the next poll")
                claimed = 0
            if claimed or self._stopping.is_set():
                continue  # there may be more due; or stop now
            now = loop.time()
            self._expected = {n: t for n, t in self._expected.items() if t > now}
            wait = 0.05 if self._expected else await self._until_next_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def _until_next_due(self) -> float:
        """Seconds to the earliest retry, at most `poll` (which also finds other replicas')."""
        try:
            async with self.engine.connect() as conn:
                due: datetime | None = (
                    await conn.execute(select(func.min(webhook_deliveries.c.next_attempt_at)))
                ).scalar_one_or_none()
        except Exception:
            log.exception("webhook deliveries: cannot read the next retry time")
            return self.poll
        if due is None:
            return self.poll
        return max(0.01, min(self.poll, (due - datetime.now(UTC)).total_seconds()))

    async def deliver_due(self) -> int:
        """Claim and send the due deliveries (one batch); returns how many were claimed."""
        rows = await self._claim()
        for row in rows:
            self._expected.pop(row.notice_id, None)
        results = await asyncio.gather(*(self._send(row) for row in rows))
        if rows:
            async with write_transaction(self.engine) as conn:
                for row, (status, error) in zip(rows, results, strict=True):
                    await self._record(conn, row, status, error)
        return len(rows)

    async def _claim(self) -> list[AnyRow]:
        now = datetime.now(UTC)
        query = (
            select(
                webhook_deliveries.c.id,
                webhook_deliveries.c.notice_id,
                webhook_deliveries.c.url,
                webhook_deliveries.c.attempts,
                notices.c.account_id,
                notices.c.kind,
                notices.c.detail,
                notices.c.created_at,
                account_webhooks.c.secret_encrypted,
            )
            .join(notices, notices.c.id == webhook_deliveries.c.notice_id)
            .outerjoin(account_webhooks, account_webhooks.c.account_id == notices.c.account_id)
            .where(
                webhook_deliveries.c.next_attempt_at <= now,
                webhook_deliveries.c.delivered_at.is_(None),
            )
            .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
            .limit(self.BATCH)
        )
        async with write_transaction(self.engine) as conn:
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=webhook_deliveries)
            rows = list(await conn.execute(query))
            if rows:
                await conn.execute(
                    update(webhook_deliveries)
                    .where(webhook_deliveries.c.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=now + timedelta(seconds=self.LEASE))
                )
        return rows

    async def _send(self, row: AnyRow) -> tuple[int | None, str]:
        """POST one notice: (HTTP status or None, "" or a one-line error)."""
        if row.secret_encrypted is None:
            return None, "webhook removed"
        if self._fernet is None:
            return None, "the operator has not configured secret_key"
        try:
            secret = self._fernet.decrypt(row.secret_encrypted.encode()).decode()
        except InvalidToken:
            return None, "cannot decrypt the webhook secret (was secret_key changed?)"
        denied = deny_reason(row.url, self.deny)
        if denied:
            return None, f"refused: {denied}"
        body = json.dumps(
            {
                "id": row.notice_id,
                "kind": row.kind,
                "account": row.account_id,
                "detail": row.detail,
                "created_at": iso(row.created_at),
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "X-CDN-Signature": signature(secret, body),
            "X-CDN-Notice-Id": str(row.notice_id),
        }
        assert self._session is not None, "deliveries run only between start and stop"
        try:
            async with self._session.post(
                row.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, _one_line(f"{type(exc).__name__}: {exc}") or type(exc).__name__
        return status, "" if 200 <= status < 300 else f"HTTP {status}"

    async def _record(
        self, conn: AsyncConnection, row: AnyRow, status: int | None, error: str
    ) -> None:
        now = datetime.now(UTC)
        attempts = row.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status": status, "last_error": error}
        if not error:
            values.update(delivered_at=now, next_attempt_at=None)
        elif attempts >= self.MAX_ATTEMPTS or row.secret_encrypted is None:
            values["next_attempt_at"] = None  # given up
            log.warning("notice %d: webhook delivery abandoned: %s", row.notice_id, error)
        else:
            delay = min(self.backoff * 2 ** (attempts - 1), self.MAX_BACKOFF)
            values["next_attempt_at"] = now + timedelta(seconds=delay)
            log.info(
                "notice %d: webhook delivery failed (%s); retry in %.0f s",
                row.notice_id,
                error,
                delay,
            )
        await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == row.id, webhook_deliveries.c.delivered_at.is_(None))
            .values(**values)
        )


# --- the API -------------------------------------------------------------------------------------

routes = RouteTable()
DELIVERIES = web.AppKey("deliveries", Deliverer)

NOTICE_PAGE = 100
NOTICE_PAGE_MAX = 1000


class WebhookBody(Body):
    url: Url = Field(description="http(s)://host[:port]/path the notices are POSTed to")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s):// URL with a host")
        if any(c.isspace() for c in value) or "#" in value:
            raise ValueError("must not contain whitespace or a fragment")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (the signature authenticates us)")
        return value


class WebhookCreated(Out):
    url: str
    secret: str = Field(
        description="shown only here: X-CDN-Signature is sha256=<hex HMAC-SHA256 of the raw "
        "body keyed by this string's UTF-8>"
    )


class WebhookOut(Out):
    url: str
    created_at: datetime
    updated_at: datetime


class DeliveryOut(Out):
    id: int
    url: str
    state: Literal["pending", "delivered", "failed"] = Field(
        description="failed: given up after the last attempt, or the webhook was removed"
    )
    attempts: int
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status: int | None = Field(description="the HTTP status of the last attempt")
    last_error: str


class NoticeOut(Out):
    id: int
    account: int
    kind: Literal[NOTICE_KINDS]  # type: ignore[valid-type]
    detail: dict[str, Any]
    created_at: datetime
    deliveries: list[DeliveryOut]


class NoticeList(Out):
    notices: list[NoticeOut]


_PAGE_QUERY = (
    QueryParam(
        "since_id",
        {"type": "integer", "minimum": 0},
        "only notices with a larger id: pass the last id seen for the next page (default 0)",
    ),
    QueryParam(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": NOTICE_PAGE_MAX},
        f"notices per page (default {NOTICE_PAGE})",
    ),
)


def _delivery_view(row: Row[Any]) -> dict[str, Any]:
    state = "delivered" if row.delivered_at else "pending" if row.next_attempt_at else "failed"
    return {
        "id": row.id,
        "url": row.url,
        "state": state,
        "attempts": row.attempts,
        "next_attempt_at": iso(row.next_attempt_at),
        "delivered_at": iso(row.delivered_at),
        "last_status": row.last_status,
        "last_error": row.last_error,
    }


async def _notice_page(request: web.Request, account_id: int) -> web.Response:
    since = query_int(request, "since_id", 0, 0, 2**31 - 1)
    limit = query_int(request, "limit", NOTICE_PAGE, 1, NOTICE_PAGE_MAX)
    async with reading(request) as conn:
        rows = list(
            await conn.execute(
                select(notices)
                .where(notices.c.account_id == account_id, notices.c.id > since)
                .order_by(notices.c.id)
                .limit(limit)
            )
        )
        deliveries: dict[int, list[dict[str, Any]]] = {row.id: [] for row in rows}
        if rows:
            for d in await conn.execute(
                select(webhook_deliveries)
                .where(webhook_deliveries.c.notice_id.in_(list(deliveries)))
                .order_by(webhook_deliveries.c.id)
            ):
                deliveries[d.notice_id].append(_delivery_view(d))
    return web.json_response(
        {
            "notices": [
                {
                    "id": row.id,
                    "account": row.account_id,
                    "kind": row.kind,
                    "detail": row.detail,
                    "created_at": iso(row.created_at),
                    "deliveries": deliveries[row.id],
                }
                for row in rows
            ]
        }
    )


@routes.route(
    "GET",
    "/v1/notices",
    "The account's notices (agreement 11), oldest first, with their webhook deliveries",
    who=ACCOUNTS,
    scope="billing:read",
    query=_PAGE_QUERY,
    response=NoticeList,
)
async def list_notices(request: web.Request) -> web.StreamResponse:
    return await _notice_page(request, account_of(caller(request)))


@routes.route(
    "GET",
    "/v1/accounts/{id}/notices",
    "An account's notices, oldest first, with their webhook deliveries",
    who=OPERATOR,
    query=_PAGE_QUERY,
    response=NoticeList,
)
async def list_account_notices(request: web.Request) -> web.StreamResponse:
    account_id = path_id(request)
    async with reading(request) as conn:
        await account_row(conn, account_id)
    return await _notice_page(request, account_id)


@routes.route_with_body(
    "PUT",
    "/v1/webhook",
    "Set the URL notices are POSTed to; answers a new signing secret, shown only here",
    WebhookBody,
    who=ACCOUNT_ONLY,
    response=WebhookCreated,
)
async def set_webhook(request: web.Request, body: WebhookBody) -> web.StreamResponse:
    denied = deny_reason(body.url, request.app[ORIGIN_DENY])
    if denied:
        raise invalid([{"field": "url", "problem": denied}])
    secret = secrets.token_urlsafe(32)
    encrypted = request.app[DELIVERIES].encrypt(secret)
    principal = caller(request)
    account_id = account_of(principal)
    at = now()
    async with writing(request) as conn:
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        stmt = dialect_insert(account_webhooks).values(
            account_id=account_id,
            url=body.url,
            secret_encrypted=encrypted,
            created_at=at,
            updated_at=at,
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[account_webhooks.c.account_id],
                set_={"url": body.url, "secret_encrypted": encrypted, "updated_at": at},
            )
        )
        # Notices still waiting go to the new URL, signed with the new secret.
        await conn.execute(
            update(webhook_deliveries)
            .where(
                webhook_deliveries.c.notice_id.in_(_account_notices(account_id)),
                webhook_deliveries.c.next_attempt_at.is_not(None),
            )
            .values(url=body.url)
        )
        await audit(conn, principal, account_id, "webhook.set", body.url)
    return web.json_response(
        {"url": body.url, "secret": secret}, headers={"Cache-Control": "no-store"}
    )


def _account_notices(account_id: int) -> Select[int]:
    return select(notices.c.id).where(notices.c.account_id == account_id)


@routes.route(
    "GET",
    "/v1/webhook",
    "The webhook URL (never its secret)",
    who=ACCOUNT_ONLY,
    response=WebhookOut,
)
async def get_webhook(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        row = (
            await conn.execute(
                select(account_webhooks).where(
                    account_webhooks.c.account_id == account_of(caller(request))
                )
            )
        ).first()
    if row is None:
        raise Problem(404, "no webhook is set")
    return web.json_response(
        {"url": row.url, "created_at": iso(row.created_at), "updated_at": iso(row.updated_at)}
    )


@routes.route(
    "DELETE",
    "/v1/webhook",
    "Remove the webhook; deliveries still waiting are abandoned",
    who=ACCOUNT_ONLY,
    status=204,
)
async def delete_webhook(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    async with writing(request) as conn:
        removed = await conn.execute(
            delete(account_webhooks)
            .where(account_webhooks.c.account_id == account_id)
            .returning(account_webhooks.c.url)
        )
        url = removed.scalar_one_or_none()
        if url is None:
            raise Problem(404, "no webhook is set")
        await conn.execute(
            update(webhook_deliveries)
            .where(
                webhook_deliveries.c.notice_id.in_(_account_notices(account_id)),
                webhook_deliveries.c.next_attempt_at.is_not(None),
            )
            .values(next_attempt_at=None, last_error="webhook removed")
        )
        await audit(conn, principal, account_id, "webhook.delete", url)
    return web.Response(status=204)
