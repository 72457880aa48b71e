"""Edges, for the operator: register one (its token is shown once), list them with how far each
has applied the change log, and remove one (its token stops working at once)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from control.api import (
    FEED,
    OPERATOR,
    RouteTable,
    issue_token,
    now,
    path_id,
    reading,
    token_response,
    writing,
)
from control.models import EdgeCreated, EdgeList, NewEdge
from control.problems import Problem
from control.schema import api_tokens, edges, iso

routes = RouteTable()


def view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "applied_version": row.applied_version,
        "last_seen": iso(row.last_seen),
        "created_at": iso(row.created_at),
    }


@routes.route_with_body(
    "POST",
    "/v1/edges",
    "Register an edge and make its token (shown once)",
    NewEdge,
    who=OPERATOR,
    status=201,
    response=EdgeCreated,
)
async def create_edge(request: web.Request, body: NewEdge) -> web.StreamResponse:
    # Names stay taken after removal, so an edge's history is never mixed up.
    taken = f"an edge named {body.name!r} exists or existed"
    try:
        async with writing(request) as conn:
            exists = await conn.execute(select(edges.c.id).where(edges.c.name == body.name))
            if exists.first() is not None:
                raise Problem(409, taken)
            edge_id = (
                await conn.execute(
                    insert(edges).values(name=body.name, created_at=now()).returning(edges.c.id)
                )
            ).scalar_one()
            _, token = await issue_token(conn, "edge", label=body.name, edge_id=edge_id)
            row = (await conn.execute(select(edges).where(edges.c.id == edge_id))).one()
    except IntegrityError:  # registered by a concurrent request since the check (PostgreSQL)
        raise Problem(409, taken) from None
    return token_response({"edge": view(row), "token": token})


@routes.route(
    "GET",
    "/v1/edges",
    "List edges and how far each has applied the change log",
    who=OPERATOR,
    response=EdgeList,
)
async def list_edges(request: web.Request) -> web.StreamResponse:
    async with reading(request) as conn:
        rows = await conn.execute(
            select(edges).where(edges.c.deleted_at.is_(None)).order_by(edges.c.name)
        )
        return web.json_response({"edges": [view(row) for row in rows]})


@routes.route(
    "DELETE", "/v1/edges/{id}", "Remove an edge; its token stops working", who=OPERATOR, status=204
)
async def delete_edge(request: web.Request) -> web.StreamResponse:
    edge_id = path_id(request)
    async with writing(request) as conn:
        at = now()
        removed = await conn.execute(
            update(edges)
            .where(edges.c.id == edge_id, edges.c.deleted_at.is_(None))
            .values(deleted_at=at)
        )
        if removed.rowcount == 0:
            raise Problem(404, f"no edge {edge_id}")
        await conn.execute(
            update(api_tokens)
            .where(api_tokens.c.edge_id == edge_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=at)
        )
    # Its open feed ends now (other replicas' within a heartbeat); a reconnect gets 401.
    request.app[FEED].end_streams_of(edge_id)
    return web.Response(status=204)
