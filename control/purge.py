"""Purge and prefetch tasks, and their progress across edges.

A task is one `tasks` row and one `purge` / `prefetch` change carrying its id. A purge is done
when every edge has applied the change's version (its `applied_version`); a prefetch when every
edge has reported a result. Edges registered after the task was made are not waited for: they
start from a snapshot, not from the task.

A URL naming a host that is not one of the caller's domains (or is outside a sub-account's limit,
or terminated) is refused as a 422 naming the URL, worded the same whether the domain is missing
or someone else's, so the answer reveals nothing about other accounts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from sqlalchemy import Row, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control.api import (
    ACCOUNTS,
    RouteTable,
    account_of,
    audit,
    caller,
    invalid,
    now,
    path_id,
    reading,
    writing,
)
from control.auth import Principal
from control.domains import require_active_account
from control.feed import publish
from control.models import MAX_PURGE_ITEMS, PrefetchRequest, PurgeRequest, TaskOut
from control.problems import Problem
from control.schema import domains, edges, iso, task_results, tasks

routes = RouteTable()

# Which list each purge type takes, and which it requires.
_LISTS = {
    "url": ({"urls"}, "urls"),
    "prefix": ({"prefixes"}, "prefixes"),
    "domain": ({"domains"}, "domains"),
    "tag": ({"tags", "domains"}, "tags"),
}


async def _visible_domains(conn: AsyncConnection, principal: Principal) -> list[str]:
    """The caller's domains a purge may name: not terminated, within a sub-account's limit."""
    rows = await conn.execute(
        select(domains.c.name)
        .where(domains.c.account_id == account_of(principal), domains.c.state != "terminated")
        .order_by(domains.c.name)
    )
    return [name for (name,) in rows if principal.sees_domain(name)]


def _url_items(
    urls: list[str], field: str, known: set[str], *, prefix: bool
) -> list[dict[str, str]]:
    """`{domain, value}` for each URL: value is the path with its query (a prefix: the path)."""
    items: list[dict[str, str]] = []
    errors: list[dict[str, str]] = []
    for index, url in enumerate(urls):
        where = f"{field}[{index}]"
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").removesuffix(".")
        except ValueError:
            errors.append({"field": where, "problem": f"{url!r} is not a valid URL"})
            continue
        if parts.scheme not in ("http", "https") or any(c.isspace() for c in url):
            errors.append({"field": where, "problem": f"{url!r} is not an http(s):// URL"})
        elif host not in known:
            errors.append({"field": where, "problem": f"{host!r} is not one of your domains"})
        elif prefix and parts.query:
            errors.append({"field": where, "problem": f"{url!r}: a prefix has no query"})
        else:
            value = parts.path or "/"
            if parts.query and not prefix:
                value += "?" + parts.query
            items.append({"domain": host, "value": value})
    if errors:
        raise invalid(errors)
    return _unique(items)


def _names(names: list[str], field: str, known: set[str]) -> list[str]:
    wanted = [name.lower().removesuffix(".") for name in names]
    errors = [
        {"field": f"{field}[{index}]", "problem": f"{name!r} is not one of your domains"}
        for index, name in enumerate(wanted)
        if name not in known
    ]
    if errors:
        raise invalid(errors)
    return list(dict.fromkeys(wanted))


def _unique(items: list[dict[str, str]]) -> list[dict[str, str]]:
    seen = dict.fromkeys((item["domain"], item["value"]) for item in items)
    return [{"domain": domain, "value": value} for domain, value in seen]


def _purge_items(body: PurgeRequest, known: set[str], ordered: list[str]) -> list[dict[str, str]]:
    allowed, required = _LISTS[body.type]
    given = {name for name in ("urls", "prefixes", "domains", "tags") if getattr(body, name)}
    errors = [
        {"field": name, "problem": f"not allowed with type {body.type!r}"}
        for name in sorted(given - allowed)
    ]
    if required not in given:
        errors.append({"field": required, "problem": f"is required with type {body.type!r}"})
    if errors:
        raise invalid(errors)
    if body.type == "url":
        assert body.urls is not None
        return _url_items(body.urls, "urls", known, prefix=False)
    if body.type == "prefix":
        assert body.prefixes is not None
        return _url_items(body.prefixes, "prefixes", known, prefix=True)
    if body.type == "domain":
        assert body.domains is not None
        return [{"domain": name, "value": ""} for name in _names(body.domains, "domains", known)]
    assert body.tags is not None
    names = _names(body.domains, "domains", known) if body.domains else ordered
    if not names:
        raise invalid([{"field": "domains", "problem": "you have no domain to purge"}])
    tags = list(dict.fromkeys(body.tags))
    if len(names) * len(tags) > MAX_PURGE_ITEMS:
        problem = (
            f"{len(names)} domains x {len(tags)} tags is {len(names) * len(tags)} purge items, "
            f"more than {MAX_PURGE_ITEMS}: name fewer tags or domains"
        )
        raise invalid([{"field": "tags", "problem": problem}])
    return [{"domain": name, "value": tag} for name in names for tag in tags]


async def _create_task(
    conn: AsyncConnection, principal: Principal, kind: str, payload: dict[str, Any]
) -> Row[Any]:
    """The task row and its change, which carries the task's id: the row is written first and
    given the change's version after, all in the caller's transaction."""
    account_id = account_of(principal)
    task_id = (
        await conn.execute(
            insert(tasks)
            .values(account_id=account_id, kind=kind, payload={}, version=0, created_at=now())
            .returning(tasks.c.id)
        )
    ).scalar_one()
    change = {"task": task_id, **payload}
    version = await publish(conn, kind, change)
    await conn.execute(
        update(tasks).where(tasks.c.id == task_id).values(payload=change, version=version)
    )
    # The items are in the task row; the log says what kind and how many.
    detail = {**{k: v for k, v in payload.items() if k != "items"}, "items": len(payload["items"])}
    await audit(conn, principal, account_id, kind, f"task {task_id}", detail)
    return (await conn.execute(select(tasks).where(tasks.c.id == task_id))).one()


async def task_status(conn: AsyncConnection, task: Row[Any]) -> dict[str, Any]:
    """What README calls a task: done once every edge that existed when it was made applied it."""
    rows = list(
        await conn.execute(
            select(edges.c.id, edges.c.name, edges.c.applied_version)
            .where(edges.c.deleted_at.is_(None), edges.c.created_at <= task.created_at)
            .order_by(edges.c.name)
        )
    )
    status: dict[str, Any] = {"id": task.id, "kind": task.kind}
    if task.kind == "prefetch":
        results = {
            edge_id: result
            for edge_id, result in await conn.execute(
                select(task_results.c.edge_id, task_results.c.result).where(
                    task_results.c.task_id == task.id
                )
            )
        }
        pending = [row.name for row in rows if row.id not in results]
        status["results"] = {row.name: results[row.id] for row in rows if row.id in results}
    else:
        pending = [row.name for row in rows if row.applied_version < task.version]
    status.update(
        state="pending" if pending else "done",
        edges={"total": len(rows), "applied": len(rows) - len(pending)},
        pending=pending,
        version=task.version,
        created_at=iso(task.created_at),
    )
    return status


@routes.route_with_body(
    "POST",
    "/v1/purge",
    "Purge URLs, prefixes, whole domains or tags on every edge",
    PurgeRequest,
    who=ACCOUNTS,
    scope="purge",
    status=202,
    response=TaskOut,
)
async def purge(request: web.Request, body: PurgeRequest) -> web.StreamResponse:
    principal = caller(request)
    async with writing(request) as conn:
        await require_active_account(conn, account_of(principal))
        ordered = await _visible_domains(conn, principal)
        items = _purge_items(body, set(ordered), ordered)
        task = await _create_task(conn, principal, "purge", {"type": body.type, "items": items})
        status = await task_status(conn, task)
    return web.json_response(status, status=202)


@routes.route_with_body(
    "POST",
    "/v1/prefetch",
    "Have every edge fetch and store URLs",
    PrefetchRequest,
    who=ACCOUNTS,
    scope="purge",
    status=202,
    response=TaskOut,
)
async def prefetch(request: web.Request, body: PrefetchRequest) -> web.StreamResponse:
    principal = caller(request)
    async with writing(request) as conn:
        await require_active_account(conn, account_of(principal))
        known = set(await _visible_domains(conn, principal))
        items = _url_items(body.urls, "urls", known, prefix=False)
        task = await _create_task(conn, principal, "prefetch", {"items": items})
        status = await task_status(conn, task)
    return web.json_response(status, status=202)


@routes.route(
    "GET",
    "/v1/tasks/{id}",
    "A purge or prefetch task's progress",
    who=frozenset({"operator", "account", "subaccount"}),
    scope="purge",
    response=TaskOut,
)
async def get_task(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    task_id = path_id(request)
    async with reading(request) as conn:
        task = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).first()
        if task is None or (principal.kind != "operator" and not _sees(principal, task)):
            raise Problem(404, f"no task {task_id}")
        return web.json_response(await task_status(conn, task))


def _sees(principal: Principal, task: Row[Any]) -> bool:
    if task.account_id != principal.account_id:
        return False
    return all(principal.sees_domain(item["domain"]) for item in task.payload.get("items", []))
