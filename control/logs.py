"""Access logs at the control plane (issue 6; agreement 2.6, 6.1, 6.2): the edges' pieces in
(`PUT /v1/edge/logs/{domain}/{hour}/{piece}`), the customers' listing and download, the
operator's export, legal holds and retention settings, customers' delete requests, and the
retention job.

The bytes live in a `control.logstore.LogStore`; the database says which pieces exist (table
`log_pieces`). The control plane never parses a line: a domain-hour's download is the gzip
members of its pieces concatenated, itself one valid gzip file of JSON Lines.

Decisions where the agreement and the issue leave a choice:
- A piece belongs to the account that owned its domain when it arrived (as usage does), so logs
  of a deleted or re-registered domain stay with the account whose traffic they record; pieces of
  a domain nobody had (and of `_`, the unrouted requests) are the operator's only. Customers see
  their own pieces only: another account's domain is a 404, worded as a missing one.
- An hour is downloadable as soon as a piece of it is stored: nothing here waits (the 5-minute
  target is the edges' shipping delay). Pieces arriving later for the same hour are added to it.
- Retention: `log_retention_days` by default; the operator sets an account's own
  (`PUT /v1/accounts/{id}/log-retention`, never below `log_retention_floor_days`, which only the
  config moves); customers read theirs in `GET /v1/logs`. An hour is deleted once it is that
  many days old (`control.logrules.passes`), by the job, unless its domain is under a legal hold.
- Delete requests (6.2) are the account's own token's (not a sub-account's: `logs:read` grants no
  deletion), for its own pieces of one domain, hours in [from, to) before the current hour.
  Hours past the floor go at once, the rest as each passes the floor (the job). A domain under
  a legal hold refuses the request (409) and nothing is deleted; a hold set after a request
  pauses it until lifted. The request and every scheduled deletion are in the account's audit log.
- Exports and legal holds are the operator's acts for a lawful request (2.6, 6.1): audited with
  the reason in the operator's part of the audit log (account null), not in the account's,
  since an investigation may require that the customer is not told.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tarfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import Field
from sqlalchemy import ColumnElement, Row, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.api import (
    ACCOUNT_ONLY,
    ACCOUNTS,
    EDGE,
    ENGINE,
    OPERATOR,
    QueryParam,
    RouteTable,
    account_of,
    audit,
    caller,
    domain_name,
    path_id,
    reading,
)
from control.auth import Principal
from control.config import MAX_LOG_DAYS, ControlConfig
from control.db import write_transaction
from control.domains import check_visible
from control.logrules import (
    HOUR,
    UNROUTED,
    DigestError,
    content_digest_sha256,
    floor_hour,
    hour_at_or_after,
    hour_name,
    last_hour_past,
    parse_hour,
    passes,
    retention_days,
    valid_piece,
)
from control.logstore import LogStore, LogStoreError, Staged, TooLarge
from control.models import Body, Out, Reason
from control.problems import Problem
from control.scheduler import CLOCK
from control.schema import (
    accounts,
    domains,
    edges,
    iso,
    log_deletions,
    log_holds,
    log_pieces,
    log_retention,
)
from control.usage import query_instant

log = logging.getLogger("control.logs")

routes = RouteTable()


@dataclass(frozen=True, slots=True)
class LogSettings:
    """The `[control]` log keys the handlers and the job need."""

    max_upload: int = 4 * 2**30
    default_days: int = 180
    floor_days: int = 180


LOG_STORE = web.AppKey("log_store", LogStore)
LOG_SETTINGS = web.AppKey("log_settings", LogSettings)

_BODY_CHUNK = 256 * 1024
_BATCH = 500  # pieces deleted per transaction
_MAX_LIST = timedelta(days=400)
_DEFAULT_LIST = timedelta(days=7)


# --- bodies and answers ---------------------------------------------------------------------------


class LogPieceOut(Out):
    domain: str
    hour: str = Field(description="YYYY-MM-DDTHH (UTC)")
    piece: str
    size: int
    sha256: str = Field(description="hex")
    stored_at: datetime


class LogPieceAck(Out):
    piece: LogPieceOut
    duplicate: bool = Field(description="true (status 200): this piece was stored before")


class LogHour(Out):
    hour: str = Field(description="YYYY-MM-DDTHH (UTC); its lines ended in [start, start + 1h)")
    start: datetime
    pieces: int = Field(description="files shipped for this hour so far (one per edge worker)")
    size: int = Field(description="bytes of the download (the pieces' gzip members together)")
    last_stored_at: datetime
    download: str = Field(description="the path to GET it")


class LogList(Out):
    domain: str
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    retention_days: int | None = Field(description="the account's; null for the operator")
    hours: list[LogHour]


Instant = Annotated[str, Field(description="ISO 8601 date-time with a UTC offset")]


class LogDeleteIn(Body):
    domain: Annotated[str, Field(min_length=1, max_length=253)]
    start: Instant | None = Field(None, alias="from", description="absent: from the first hour")
    end: Instant | None = Field(
        None, alias="to", description="excluded; absent or later: the start of the current hour"
    )


class LogDeleteOut(Out):
    id: int
    domain: str
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    deleted_pieces: int = Field(description="deleted now: their hours had passed the floor")
    scheduled_pieces: int = Field(description="stored now, deleted as each passes the floor")
    complete_at: datetime = Field(description="when the last hour of the range passes the floor")


class LogExportIn(Body):
    domain: Annotated[str, Field(min_length=1, max_length=253)]
    start: Instant = Field(alias="from")
    end: Instant = Field(alias="to", description="excluded")
    reason: Reason = Field(description="the lawful request (authority, reference): audited")


class LogHoldIn(Body):
    domain: Annotated[str, Field(min_length=1, max_length=253)]
    reason: Reason


class LogHoldOut(Out):
    domain: str
    reason: str
    set_by: str
    set_at: datetime


class LogHoldList(Out):
    holds: list[LogHoldOut]


class LogRetentionIn(Body):
    days: int = Field(description="at least log_retention_floor_days", ge=0, le=MAX_LOG_DAYS)


class LogRetentionOut(Out):
    account: int
    days: int
    floor_days: int


# --- names ----------------------------------------------------------------------------------------


def _log_domain(raw: str, field: str) -> str:
    """A domain as logs name it: a DNS name, or `_` (unrouted requests); 422 otherwise."""
    return raw if raw == UNROUTED else domain_name(raw, field)


def _storage_key(edge_id: int, domain: str, hour: datetime, piece: str) -> str:
    return f"{domain}/{hour_name(hour)}/{edge_id}-{piece}.gz"


def _download_path(domain: str, hour: datetime) -> str:
    return f"/v1/logs/{domain}/{hour_name(hour)}"


# --- ingest ---------------------------------------------------------------------------------------


@routes.route(
    "PUT",
    "/v1/edge/logs/{domain}/{hour}/{piece}",
    "Store a closed access-log file (gzip, with Content-Digest); a retry of a stored one is 200",
    who=EDGE,
    status=201,
    response=LogPieceAck,
    consumes="application/gzip",
    errors=(400, 409, 413, 503),
)
async def put_log_piece(request: web.Request) -> web.StreamResponse:
    """Streamed to the log store, never read whole: `client_max_size` does not apply to this
    route, `log_max_upload` does (413)."""
    edge_id = caller(request).edge_id
    assert edge_id is not None
    raw_domain, raw_hour, piece = (request.match_info[k] for k in ("domain", "hour", "piece"))
    try:
        domain = _log_domain(raw_domain, "domain")
    except Problem:
        raise Problem(400, f"{raw_domain[:100]!r} is not a domain name or '_'") from None
    hour = parse_hour(raw_hour)
    if hour is None:
        raise Problem(400, f"hour {raw_hour[:100]!r} is not YYYY-MM-DDTHH (UTC)")
    if not valid_piece(piece):
        raise Problem(400, "piece must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    try:
        expected = content_digest_sha256(request.headers.get("Content-Digest"))
    except DigestError as exc:
        raise Problem(400, str(exc)) from None
    settings, store = request.app[LOG_SETTINGS], request.app[LOG_STORE]
    too_large = Problem(413, f"the piece is larger than log_max_upload ({settings.max_upload} B)")
    if request.content_length is not None and request.content_length > settings.max_upload:
        raise too_large
    try:
        staged = await store.stage(request.content.iter_chunked(_BODY_CHUNK), settings.max_upload)
    except TooLarge:
        raise too_large from None
    except LogStoreError as exc:
        raise Problem(503, f"{exc}; retry later") from None
    except (HttpProcessingError, ConnectionError):
        raise Problem(400, "the body ended before its Content-Length") from None
    try:
        if staged.sha256 != expected:
            raise Problem(400, "Content-Digest does not match the body (damaged on the way?)")
        row, fresh = await _store(request, store, staged, edge_id, domain, hour, piece)
    finally:
        await store.discard(staged)
    view = {
        "domain": row.domain,
        "hour": hour_name(row.hour),
        "piece": row.piece,
        "size": row.size,
        "sha256": row.sha256,
        "stored_at": iso(row.stored_at),
    }
    return web.json_response({"piece": view, "duplicate": not fresh}, status=201 if fresh else 200)


async def _store(
    request: web.Request,
    store: LogStore,
    staged: Staged,
    edge_id: int,
    domain: str,
    hour: datetime,
    piece: str,
) -> tuple[Row[Any], bool]:
    """Record the piece and move its bytes into place in one transaction; the stored row and
    whether this call stored it. Of concurrent uploads of one piece, the first insert wins and
    the others wait for its commit, then compare digests: 200 for the same, 409 for another."""
    key = _storage_key(edge_id, domain, hour, piece)
    which = and_(
        log_pieces.c.edge_id == edge_id,
        log_pieces.c.domain == domain,
        log_pieces.c.hour == hour,
        log_pieces.c.piece == piece,
    )
    try:
        async with write_transaction(request.app[ENGINE]) as conn:
            owner = (
                await conn.execute(select(domains.c.account_id).where(domains.c.name == domain))
            ).scalar_one_or_none()
            inserted = (
                await conn.execute(
                    _insert(conn)(log_pieces)
                    .values(
                        edge_id=edge_id,
                        domain=domain,
                        hour=hour,
                        piece=piece,
                        size=staged.size,
                        sha256=staged.sha256.hex(),
                        account_id=owner,
                        stored_at=request.app[CLOCK].now(),
                        storage_key=key,
                    )
                    # no conflict target: with one, PostgreSQL raises on a race over the other
                    # unique index (storage_key, derived from the same four columns)
                    .on_conflict_do_nothing()
                    .returning(log_pieces.c.id)
                )
            ).first()
            if inserted is not None:
                await store.commit(staged, key)  # before COMMIT: a failure rolls the row back
            row = (await conn.execute(select(log_pieces).where(which))).one()
    except LogStoreError as exc:
        raise Problem(503, f"{exc}; retry later") from None
    if inserted is None and row.sha256 != staged.sha256.hex():
        raise Problem(
            409,
            f"piece {piece} of {domain} at {hour_name(hour)} was stored before with another "
            f"digest (sha-256 {row.sha256})",
        )
    return row, inserted is not None


def _insert(conn: AsyncConnection) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (both databases spell it alike)."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


# --- the customer's view ------------------------------------------------------------------------


async def _reader_account(conn: AsyncConnection, principal: Principal, domain: str) -> int | None:
    """The account whose pieces of `domain` the caller reads (None: the operator reads all).
    404 unless the account owns the domain now or has pieces of it, and the caller sees it;
    worded as for a missing domain, so that it reveals nothing about other accounts (6.1)."""
    if principal.kind == "operator":
        return None
    account_id = account_of(principal)
    await check_visible(conn, principal, account_id, domain, log_pieces)
    return account_id


def _of(domain: str, account_id: int | None) -> list[ColumnElement[bool]]:
    where = [log_pieces.c.domain == domain]
    if account_id is not None:
        where.append(log_pieces.c.account_id == account_id)
    return where


async def _account_days(conn: AsyncConnection, account_id: int, settings: LogSettings) -> int:
    days = (
        await conn.execute(
            select(log_retention.c.days).where(log_retention.c.account_id == account_id)
        )
    ).scalar_one_or_none()
    return retention_days(days, settings.default_days, settings.floor_days)


_LIST_QUERY = (
    QueryParam("domain", {"type": "string"}, "required: the domain (`_`: unrouted, operator only)"),
    QueryParam(
        "from",
        {"type": "string", "format": "date-time"},
        "hours starting at or after this (ISO 8601 with offset); default: 7 days before `to`",
    ),
    QueryParam(
        "to",
        {"type": "string", "format": "date-time"},
        "hours starting before this; default: now; at most 400 days after `from`",
    ),
)


@routes.route(
    "GET",
    "/v1/logs",
    "The stored access-log hours of one domain, oldest first",
    who=ACCOUNTS | OPERATOR,
    scope="logs:read",
    query=_LIST_QUERY,
    response=LogList,
    errors=(422,),
)
async def list_logs(request: web.Request) -> web.StreamResponse:
    query = request.query
    for name in query:
        if name not in ("domain", "from", "to"):
            raise Problem(422, f"{name}: unknown parameter")
        if len(query.getall(name)) > 1:
            raise Problem(400, f"{name}: given more than once")
    raw_domain = query.get("domain")
    if raw_domain is None:
        raise Problem(422, "domain: required")
    domain = _log_domain(raw_domain, "domain")
    now = request.app[CLOCK].now()
    end = query_instant(query["to"], "to") if "to" in query else now
    start = query_instant(query["from"], "from") if "from" in query else end - _DEFAULT_LIST
    if start >= end:
        raise Problem(422, "to: must be after from")
    if end - start > _MAX_LIST:
        raise Problem(422, f"to: at most {_MAX_LIST.days} days after from")
    principal = caller(request)
    async with reading(request) as conn:
        account_id = await _reader_account(conn, principal, domain)
        rows = await conn.execute(
            select(
                log_pieces.c.hour,
                func.count(),
                func.sum(log_pieces.c.size),
                func.max(log_pieces.c.stored_at),
            )
            .where(
                *_of(domain, account_id),
                log_pieces.c.hour >= hour_at_or_after(start),
                log_pieces.c.hour < hour_at_or_after(end),
            )
            .group_by(log_pieces.c.hour)
            .order_by(log_pieces.c.hour)
        )
        hours = [
            {
                "hour": hour_name(hour),
                "start": iso(hour),
                "pieces": int(count),
                "size": int(size),
                "last_stored_at": iso(last),
                "download": _download_path(domain, hour),
            }
            for hour, count, size, last in rows
        ]
        days = (
            None
            if account_id is None
            else await _account_days(conn, account_id, request.app[LOG_SETTINGS])
        )
    listed = {"domain": domain, "from": iso(start), "to": iso(end), "retention_days": days}
    return web.json_response({**listed, "hours": hours})


@routes.route(
    "GET",
    "/v1/logs/{domain}/{hour}",
    "One hour of a domain's access logs: a gzip file of JSON Lines (every edge's pieces)",
    who=ACCOUNTS | OPERATOR,
    scope="logs:read",
    produces="application/gzip",
)
async def get_log_hour(request: web.Request) -> web.StreamResponse:
    raw_domain, raw_hour = request.match_info["domain"], request.match_info["hour"]
    hour = parse_hour(raw_hour)
    if hour is None:
        raise Problem(404, f"no logs at {raw_hour[:100]!r} (hours are YYYY-MM-DDTHH, UTC)")
    try:
        domain = _log_domain(raw_domain, "domain")
    except Problem:
        raise Problem(404, f"no domain {raw_domain[:100]!r}") from None
    async with reading(request) as conn:
        account_id = await _reader_account(conn, caller(request), domain)
        pieces = list(
            await conn.execute(
                select(log_pieces.c.storage_key, log_pieces.c.size)
                .where(*_of(domain, account_id), log_pieces.c.hour == hour)
                .order_by(log_pieces.c.edge_id, log_pieces.c.piece)
            )
        )
    if not pieces:
        raise Problem(404, f"no logs of {domain} at {hour_name(hour)}")
    filename = f"{domain}_{hour_name(hour)}.jsonl.gz"
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, no-store",
        }
    )
    response.content_length = sum(int(p.size) for p in pieces)
    await response.prepare(request)
    if await _send(request, response, [p.storage_key for p in pieces]):
        await response.write_eof()
    return response


async def _send(request: web.Request, response: web.StreamResponse, keys: Sequence[str]) -> bool:
    """Every piece's bytes in order; False when one could not be read (deleted by retention
    meanwhile, an I/O error): the connection is then closed, so the client sees fewer bytes
    than Content-Length, never a wrong or silently shortened file."""
    store = request.app[LOG_STORE]
    for key in keys:
        try:
            async for chunk in store.read(key):
                await response.write(chunk)
        except LogStoreError as exc:
            log.warning("log download cut short: %s", exc)
            if request.transport is not None:
                request.transport.close()
            return False
    return True


# --- the operator's: export, legal holds, retention -----------------------------------------------


def _tar_member(name: str, size: int, mtime: datetime) -> tuple[bytes, bytes]:
    """A ustar/pax header for a member of `size` bytes, and the padding after its data."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime.timestamp()), 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT), b"\0" * (-size % tarfile.BLOCKSIZE)


@routes.route_with_body(
    "POST",
    "/v1/logs/export",
    "Export a domain's access logs of a time range as one tar archive (a lawful request, 2.6)",
    LogExportIn,
    who=OPERATOR,
    produces="application/x-tar",
)
async def export_logs(request: web.Request, body: LogExportIn) -> web.StreamResponse:
    """A tar of every stored piece (any owner) of the domain with hours in [from, to), each as
    `<domain>/<hour>/<edge>-<piece>.jsonl.gz`, after a `manifest.json` listing them with their
    owner and SHA-256. Audited with the reason before the first byte is sent. A piece deleted by
    retention while the archive streams cuts it short (set a legal hold first)."""
    domain = _log_domain(body.domain, "domain")
    start, end = query_instant(body.start, "from"), query_instant(body.end, "to")
    if start >= end:
        raise Problem(422, "to: must be after from")
    now = request.app[CLOCK].now()
    async with write_transaction(request.app[ENGINE]) as conn:
        pieces = list(
            await conn.execute(
                select(log_pieces, edges.c.name.label("edge"))
                .join(edges, edges.c.id == log_pieces.c.edge_id)
                .where(
                    log_pieces.c.domain == domain,
                    log_pieces.c.hour >= hour_at_or_after(start),
                    log_pieces.c.hour < hour_at_or_after(end),
                )
                .order_by(log_pieces.c.hour, log_pieces.c.edge_id, log_pieces.c.piece)
            )
        )
        detail = {
            "domain": domain,
            "from": iso(start),
            "to": iso(end),
            "reason": body.reason,
            "pieces": len(pieces),
            "bytes": sum(int(p.size) for p in pieces),
        }
        await audit(conn, caller(request), None, "log.export", domain, detail)
    members = [(f"{domain}/{hour_name(p.hour)}/{p.edge}-{p.piece}.jsonl.gz", p) for p in pieces]
    manifest = json.dumps(
        {
            **detail,
            "exported_at": iso(now),
            "files": [
                {
                    "name": name,
                    "edge": p.edge,
                    "account": p.account_id,
                    "hour": hour_name(p.hour),
                    "piece": p.piece,
                    "size": p.size,
                    "sha256": p.sha256,
                    "stored_at": iso(p.stored_at),
                }
                for name, p in members
            ],
        },
        indent=1,
    ).encode()
    head, pad = _tar_member("manifest.json", len(manifest), now)
    filename = f"logs_{domain}_{hour_name(start)}_{hour_name(end)}.tar"
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, no-store",
        }
    )
    headers = [_tar_member(name, int(p.size), p.stored_at) for name, p in members]
    sizes = (len(h) + int(p.size) + len(t) for (h, t), (_, p) in zip(headers, members, strict=True))
    response.content_length = (
        len(head) + len(manifest) + len(pad) + sum(sizes) + 2 * tarfile.BLOCKSIZE
    )
    await response.prepare(request)
    await response.write(head + manifest + pad)
    for (member_head, member_pad), (_, p) in zip(headers, members, strict=True):
        await response.write(member_head)
        if not await _send(request, response, [p.storage_key]):
            return response
        await response.write(member_pad)
    await response.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    await response.write_eof()
    return response


def _hold_view(row: Row[Any]) -> dict[str, Any]:
    return {
        "domain": row.domain,
        "reason": row.reason,
        "set_by": row.set_by,
        "set_at": iso(row.set_at),
    }


@routes.route_with_body(
    "POST",
    "/v1/log-holds",
    "Put a domain's access logs under a legal hold: nothing of them is deleted until lifted",
    LogHoldIn,
    who=OPERATOR,
    status=201,
    response=LogHoldOut,
)
async def create_log_hold(request: web.Request, body: LogHoldIn) -> web.StreamResponse:
    domain = _log_domain(body.domain, "domain")
    conflict = Problem(409, f"the logs of {domain} are already under a legal hold")
    principal = caller(request)
    try:
        async with write_transaction(request.app[ENGINE]) as conn:
            if (await conn.execute(select(log_holds).where(log_holds.c.domain == domain))).first():
                raise conflict
            await conn.execute(
                insert(log_holds).values(
                    domain=domain,
                    reason=body.reason,
                    set_by=principal.kind,
                    set_at=request.app[CLOCK].now(),
                )
            )
            await audit(conn, principal, None, "log.hold", domain, {"reason": body.reason})
            row = (await conn.execute(select(log_holds).where(log_holds.c.domain == domain))).one()
    except IntegrityError:  # held by a concurrent request since the check
        raise conflict from None
    return web.json_response(_hold_view(row), status=201)


@routes.route("GET", "/v1/log-holds", "The legal holds", who=OPERATOR, response=LogHoldList)
async def list_log_holds(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        rows = await conn.execute(select(log_holds).order_by(log_holds.c.domain))
        return web.json_response({"holds": [_hold_view(row) for row in rows]})


@routes.route(
    "DELETE",
    "/v1/log-holds/{domain}",
    "Lift a legal hold: retention and delete requests apply again",
    who=OPERATOR,
    status=204,
)
async def delete_log_hold(request: web.Request) -> web.StreamResponse:
    domain = request.match_info["domain"]
    async with write_transaction(request.app[ENGINE]) as conn:
        row = (await conn.execute(select(log_holds).where(log_holds.c.domain == domain))).first()
        if row is None:
            raise Problem(404, f"no legal hold on {domain[:100]!r}")
        await conn.execute(delete(log_holds).where(log_holds.c.domain == domain))
        await audit(conn, caller(request), None, "log.hold.lift", domain, {"reason": row.reason})
    return web.Response(status=204)


@routes.route_with_body(
    "PUT",
    "/v1/accounts/{id}/log-retention",
    "Set how many days an account's access logs are kept (never below the legal floor)",
    LogRetentionIn,
    who=OPERATOR,
    response=LogRetentionOut,
)
async def put_log_retention(request: web.Request, body: LogRetentionIn) -> web.StreamResponse:
    account_id = path_id(request)
    floor = request.app[LOG_SETTINGS].floor_days
    if body.days < floor:
        problem = f"at least {floor} (log_retention_floor_days, the legal minimum)"
        raise Problem(422, f"days: {problem}", errors=[{"field": "days", "problem": problem}])
    async with write_transaction(request.app[ENGINE]) as conn:
        exists = await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))
        if exists.first() is None:
            raise Problem(404, f"no account {account_id}")
        set_at = request.app[CLOCK].now()
        stmt = _insert(conn)(log_retention).values(
            account_id=account_id, days=body.days, set_at=set_at
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["account_id"], set_={"days": body.days, "set_at": set_at}
            )
        )
        await audit(
            conn, caller(request), account_id, "log.retention", str(account_id), {"days": body.days}
        )
    return web.json_response({"account": account_id, "days": body.days, "floor_days": floor})


# --- delete requests (6.2) and the retention job --------------------------------------------------


@routes.route_with_body(
    "POST",
    "/v1/logs/delete",
    "Delete the account's access logs of a domain: past the legal floor at once, the rest when "
    "they pass it",
    LogDeleteIn,
    who=ACCOUNT_ONLY,
    response=LogDeleteOut,
)
async def delete_logs(request: web.Request, body: LogDeleteIn) -> web.StreamResponse:
    principal = caller(request)
    account_id = account_of(principal)
    domain = _log_domain(body.domain, "domain")
    now = request.app[CLOCK].now()
    current = floor_hour(now)
    start = hour_at_or_after(query_instant(body.start, "from")) if body.start else None
    end = min(hour_at_or_after(query_instant(body.end, "to")), current) if body.end else current
    engine, settings = request.app[ENGINE], request.app[LOG_SETTINGS]
    async with write_transaction(engine) as conn:
        await _reader_account(conn, principal, domain)
        if (await conn.execute(select(log_holds).where(log_holds.c.domain == domain))).first():
            raise Problem(
                409, f"the logs of {domain} are under a legal hold: nothing can be deleted now"
            )
        if start is None:  # from the account's first stored hour of the domain
            first = (
                await conn.execute(
                    select(func.min(log_pieces.c.hour)).where(*_of(domain, account_id))
                )
            ).scalar_one_or_none()
            start = min(first, end) if first is not None else end
        if start > end:
            raise Problem(422, "to: must be after from (and from before the current hour)")
        request_id = (
            await conn.execute(
                insert(log_deletions)
                .values(
                    account_id=account_id,
                    domain=domain,
                    start_hour=start,
                    end_hour=end,
                    requested_at=now,
                )
                .returning(log_deletions.c.id)
            )
        ).scalar_one()
        request_row = (
            await conn.execute(select(log_deletions).where(log_deletions.c.id == request_id))
        ).one()
        cutoff = last_hour_past(now, settings.floor_days)
        scope = _deletion_scope(request_row)
        due = await _count(conn, [*scope, log_pieces.c.hour <= cutoff])
        result = {
            "id": request_id,
            "domain": domain,
            "from": iso(start),
            "to": iso(end),
            "deleted_pieces": due,
            "scheduled_pieces": await _count(conn, scope) - due,
            "complete_at": iso(passes(end - HOUR, settings.floor_days)),
        }
        await audit(conn, principal, account_id, "log.delete", domain, result)
    # Recorded first: should this stop half-way, the retention job carries the request out.
    try:
        await _carry_out(engine, request.app[LOG_STORE], request_row, settings, now)
    except LogStoreError as exc:
        log.error("delete request %d: %s", request_id, exc)
        raise Problem(
            503, f"delete request {request_id} is recorded, but {exc}; the retention job retries"
        ) from None
    return web.json_response(result)


async def _count(conn: AsyncConnection, where: list[ColumnElement[bool]]) -> int:
    return int((await conn.execute(select(func.count()).where(*where))).scalar_one())


def _not_held() -> ColumnElement[bool]:
    return log_pieces.c.domain.not_in(select(log_holds.c.domain))


def _deletion_scope(request: Row[Any]) -> list[ColumnElement[bool]]:
    return [
        log_pieces.c.account_id == request.account_id,
        log_pieces.c.domain == request.domain,
        log_pieces.c.hour >= request.start_hour,
        log_pieces.c.hour < request.end_hour,
    ]


Audited = Callable[[AsyncConnection, int], Awaitable[None]]


async def _delete_pieces(
    engine: AsyncEngine,
    store: LogStore,
    where: list[ColumnElement[bool]],
    stopping: asyncio.Event | None,
    audited: Audited | None = None,
) -> int:
    """Delete the pieces matching `where` whose domain is not under a legal hold, a batch per
    transaction (with `audited(conn, count)` in it), their files before the rows' commit: a
    crash between leaves rows of missing files that the next run deletes, never a file past
    its deletion. Stops between batches when `stopping` is set. The number deleted."""
    deleted = 0
    while stopping is None or not stopping.is_set():
        async with write_transaction(engine) as conn:
            chosen = (
                select(log_pieces.c.id)
                .where(*where, _not_held())
                .order_by(log_pieces.c.id)
                .limit(_BATCH)
            )
            rows = await conn.execute(
                delete(log_pieces)
                .where(log_pieces.c.id.in_(chosen))
                .returning(log_pieces.c.storage_key)
            )
            keys = [row.storage_key for row in rows]
            for key in keys:
                await store.delete(key)
            if keys and audited is not None:
                await audited(conn, len(keys))
        deleted += len(keys)
        if len(keys) < _BATCH:
            break
    return deleted


async def _carry_out(
    engine: AsyncEngine,
    store: LogStore,
    request: Row[Any],
    settings: LogSettings,
    now: datetime,
    stopping: asyncio.Event | None = None,
    audited: Audited | None = None,
) -> int:
    """Delete a delete request's pieces that have passed the floor (none of a held domain), and
    mark the request done once its last hour has and nothing of it is left. The number
    deleted."""
    cutoff = last_hour_past(now, settings.floor_days)
    scope = _deletion_scope(request)
    deleted = await _delete_pieces(
        engine, store, [*scope, log_pieces.c.hour <= cutoff], stopping, audited
    )
    if request.end_hour - HOUR <= cutoff:
        async with write_transaction(engine) as conn:
            if not await _count(conn, scope):
                await conn.execute(
                    update(log_deletions)
                    .where(log_deletions.c.id == request.id)
                    .values(done_at=now)
                )
    return deleted


@dataclass(frozen=True, slots=True)
class RetentionRun:
    expired: int  # pieces deleted for their owner's retention
    requested: int  # pieces deleted for delete requests

    def line(self) -> str:
        return f"deleted {self.expired} expired and {self.requested} requested log pieces"


async def enforce_retention(
    engine: AsyncEngine,
    store: LogStore,
    settings: LogSettings,
    now: datetime,
    stopping: asyncio.Event | None = None,
) -> RetentionRun:
    """The retention job: delete every piece older than its owner's retention (the default for
    pieces without an owner), then what delete requests may delete by now (each batch in the
    account's audit log); nothing of a domain under a legal hold. Idempotent; safe to run on
    several replicas at once (a piece deleted twice is deleted once). Stops between batches
    when `stopping` is set."""
    async with engine.connect() as conn:
        custom = {
            int(row.account_id): int(row.days) for row in await conn.execute(select(log_retention))
        }
        requests = list(
            await conn.execute(
                select(log_deletions)
                .where(log_deletions.c.done_at.is_(None))
                .order_by(log_deletions.c.id)
            )
        )
    default_cutoff = last_hour_past(
        now, retention_days(None, settings.default_days, settings.floor_days)
    )
    expired = await _delete_pieces(
        engine,
        store,
        [
            or_(
                log_pieces.c.account_id.is_(None),
                log_pieces.c.account_id.not_in(list(custom)),
            ),
            log_pieces.c.hour <= default_cutoff,
        ],
        stopping,
    )
    for account_id, days in custom.items():
        cutoff = last_hour_past(
            now, retention_days(days, settings.default_days, settings.floor_days)
        )
        expired += await _delete_pieces(
            engine,
            store,
            [log_pieces.c.account_id == account_id, log_pieces.c.hour <= cutoff],
            stopping,
        )
    requested = 0
    for request in requests:
        if stopping is not None and stopping.is_set():
            break

        async def audited(conn: AsyncConnection, count: int, request: Row[Any] = request) -> None:
            await audit(
                conn,
                Principal(kind="account", account_id=request.account_id),
                request.account_id,
                "log.delete.scheduled",
                request.domain,
                {"request": request.id, "deleted_pieces": count},
            )

        requested += await _carry_out(engine, store, request, settings, now, stopping, audited)
    return RetentionRun(expired, requested)


def retention_main(path: str) -> int:
    """`cdn control logs-retention --config FILE`: run the retention job once, now; exit 2 for
    a bad config, 1 when the database cannot be used."""
    from control.config import load_config
    from control.db import engine_for, migrate
    from control.logstore import LocalLogStore
    from control.scheduler import Clock
    from edge.config import ConfigError

    try:
        config = load_config(path, serving=False)
    except ConfigError as exc:
        print(f"cdn: {exc}", file=sys.stderr)
        return 2

    async def run() -> RetentionRun:
        engine = engine_for(config.database)
        try:
            await migrate(engine)
            return await enforce_retention(
                engine, LocalLogStore(Path(config.log_dir)), settings_of(config), Clock().now()
            )
        finally:
            await engine.dispose()

    try:
        done = asyncio.run(run())
    except SQLAlchemyError as exc:
        print(f"cdn: control logs-retention: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    print(done.line())
    return 0


def settings_of(config: ControlConfig) -> LogSettings:
    """The log settings of a `control.config.ControlConfig`."""
    return LogSettings(
        max_upload=config.log_max_upload,
        default_days=config.log_retention_days,
        floor_days=config.log_retention_floor_days,
    )
