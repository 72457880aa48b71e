"""Legal URL blocks, for the operator: edges answer 451 for a blocked path (or path prefix ending
in `*`) of a domain. A block names a domain, not a domain row, so it outlives the domain's removal
and applies again if the name comes back."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from sqlalchemy import Row, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from control.api import (
    OPERATOR,
    RouteTable,
    audit,
    caller,
    domain_name,
    invalid,
    now,
    path_id,
    reading,
    writing,
)
from control.domains import find
from control.feed import publish
from control.models import BlockList, BlockOut, NewBlock
from control.problems import Problem
from control.schema import iso, url_blocks

routes = RouteTable()


def view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "domain": row.domain,
        "pattern": row.pattern,
        "reason": row.reason,
        "created_at": iso(row.created_at),
    }


def _target(url: str) -> tuple[str, str]:
    """(domain, pattern) of a block URL; the query is ignored, as edges ignore it."""
    problem = f"{url!r} is not http(s)://domain/path (a prefix ends in '*')"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise invalid([{"field": "url", "problem": problem}]) from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not parts.path.startswith("/")
        or any(c.isspace() for c in url)
        or "*" in parts.path[:-1]
    ):
        raise invalid([{"field": "url", "problem": problem}])
    return domain_name(parts.hostname, "url"), parts.path


async def _owner(conn: AsyncConnection, domain: str) -> int | None:
    """The account a blocked domain belongs to: the block goes in its audit log."""
    row = await find(conn, domain)
    return None if row is None else int(row.account_id)


@routes.route_with_body(
    "POST",
    "/v1/blocks",
    "Block a URL or URL prefix (edges answer 451)",
    NewBlock,
    who=OPERATOR,
    status=201,
    response=BlockOut,
)
async def create_block(request: web.Request, body: NewBlock) -> web.StreamResponse:
    domain, pattern = _target(body.url)
    conflict = Problem(409, f"{domain}{pattern} is already blocked")
    try:
        async with writing(request) as conn:
            exists = await conn.execute(
                select(url_blocks.c.id).where(
                    url_blocks.c.domain == domain, url_blocks.c.pattern == pattern
                )
            )
            if exists.first() is not None:
                raise conflict
            block_id = (
                await conn.execute(
                    insert(url_blocks)
                    .values(domain=domain, pattern=pattern, reason=body.reason, created_at=now())
                    .returning(url_blocks.c.id)
                )
            ).scalar_one()
            await publish(
                conn, "block", {"domain": domain, "pattern": pattern, "reason": body.reason}
            )
            await audit(
                conn,
                caller(request),
                await _owner(conn, domain),
                "block.create",
                f"{domain}{pattern}",
                {"reason": body.reason},
            )
            row = (await conn.execute(select(url_blocks).where(url_blocks.c.id == block_id))).one()
    except IntegrityError:  # the same block made concurrently
        raise conflict from None
    return web.json_response(view(row), status=201)


@routes.route("GET", "/v1/blocks", "List URL blocks", who=OPERATOR, response=BlockList)
async def list_blocks(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        rows = await conn.execute(select(url_blocks).order_by(url_blocks.c.id))
        return web.json_response({"blocks": [view(row) for row in rows]})


@routes.route("DELETE", "/v1/blocks/{id}", "Lift a URL block", who=OPERATOR, status=204)
async def delete_block(request: web.Request) -> web.StreamResponse:
    block_id = path_id(request)
    async with writing(request) as conn:
        row = (await conn.execute(select(url_blocks).where(url_blocks.c.id == block_id))).first()
        if row is None:
            raise Problem(404, f"no block {block_id}")
        await conn.execute(delete(url_blocks).where(url_blocks.c.id == block_id))
        await publish(conn, "unblock", {"domain": row.domain, "pattern": row.pattern})
        await audit(
            conn,
            caller(request),
            await _owner(conn, row.domain),
            "block.delete",
            f"{row.domain}{row.pattern}",
        )
    return web.Response(status=204)
