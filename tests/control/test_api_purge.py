"""Purge and prefetch tasks: what edges are told, the limits, whose URLs they may name, and
progress as edges acknowledge or report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from control.models import (
    MAX_PREFETCH,
    MAX_PREFIXES,
    MAX_PURGE_ITEMS,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_URL_LENGTH,
    MAX_URLS,
)
from control.schema import audit_log, domains, tasks
from tests.control.conftest import Api


async def _setup(api: Api) -> str:
    _, token = await api.account()
    await api.domain(token, "a.example.com")
    await api.domain(token, "b.example.com")
    return token


@pytest.mark.parametrize(
    ("body", "kind", "items"),
    [
        (
            {
                "type": "url",
                "urls": ["https://A.example.com/x.jpg?v=1#frag", "http://b.example.com"],
            },
            "url",
            [("a.example.com", "/x.jpg?v=1"), ("b.example.com", "/")],
        ),
        (
            {"type": "prefix", "prefixes": ["http://a.example.com/img/"]},
            "prefix",
            [("a.example.com", "/img/")],
        ),
        (
            {"type": "domain", "domains": ["b.example.com", "B.example.com."]},
            "domain",
            [("b.example.com", "")],
        ),
        (
            {"type": "tag", "tags": ["product-7"]},
            "tag",
            [("a.example.com", "product-7"), ("b.example.com", "product-7")],
        ),
        (
            {"type": "tag", "tags": ["t"], "domains": ["a.example.com"]},
            "tag",
            [("a.example.com", "t")],
        ),
    ],
)
async def test_purge_makes_one_task_and_one_change(
    api: Api, body: dict[str, Any], kind: str, items: list[tuple[str, str]]
) -> None:
    token = await _setup(api)
    before = await api.version()
    task = await api.ok("POST", "/v1/purge", token, body, status=202)
    [change] = await api.changes(before)
    assert change.kind == "purge" and change.version == before + 1
    assert change.payload == {
        "task": task["id"],
        "type": kind,
        "items": [{"domain": d, "value": v} for d, v in items],
    }
    [row] = await api.rows(tasks)
    assert (row.id, row.kind, row.version, row.payload) == (
        task["id"],
        "purge",
        change.version,
        change.payload,
    )
    assert task["kind"] == "purge" and task["state"] == "done"  # no edges yet


async def test_purge_task_progress_follows_edge_acks(api: Api) -> None:
    token = await _setup(api)
    _, first = await api.edge("edge-1")
    _, second = await api.edge("edge-2")
    task = await api.ok(
        "POST", "/v1/purge", token, {"type": "url", "urls": ["http://a.example.com/"]}, status=202
    )
    assert (task["state"], task["edges"], task["pending"]) == (
        "pending",
        {"total": 2, "applied": 0},
        ["edge-1", "edge-2"],
    )
    version = await api.version()
    await api.ok("POST", "/v1/edge/ack", first, {"version": version})
    status = await api.ok("GET", f"/v1/tasks/{task['id']}", token)
    assert (status["state"], status["edges"], status["pending"]) == (
        "pending",
        {"total": 2, "applied": 1},
        ["edge-2"],
    )
    await api.ok("POST", "/v1/edge/ack", second, {"version": version})
    assert (await api.ok("GET", f"/v1/tasks/{task['id']}", token))["state"] == "done"
    # the operator sees every task
    assert (await api.ok("GET", f"/v1/tasks/{task['id']}"))["state"] == "done"


async def test_prefetch_is_done_when_every_edge_reported(api: Api) -> None:
    token = await _setup(api)
    _, edge_token = await api.edge()
    before = await api.version()
    task = await api.ok(
        "POST", "/v1/prefetch", token, {"urls": ["http://a.example.com/big.mp4?q=1"]}, status=202
    )
    [change] = await api.changes(before)
    assert (change.kind, change.payload) == (
        "prefetch",
        {"task": task["id"], "items": [{"domain": "a.example.com", "value": "/big.mp4?q=1"}]},
    )
    assert task["state"] == "pending"
    # applying the change is not enough for a prefetch: the edge must report
    await api.ok("POST", "/v1/edge/ack", edge_token, {"version": change.version})
    assert (await api.ok("GET", f"/v1/tasks/{task['id']}", token))["state"] == "pending"
    await api.ok(
        "POST", f"/v1/edge/tasks/{task['id']}/result", edge_token, {"fetched": 1, "failed": []}
    )
    status = await api.ok("GET", f"/v1/tasks/{task['id']}", token)
    assert status["state"] == "done" and status["edges"] == {"total": 1, "applied": 1}
    assert status["results"] == {"edge-1": {"fetched": 1, "failed": []}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "url", "urls": ["http://c.example.com/x"]}, "urls[0]"),
        ({"type": "url", "urls": ["http://a.example.com/", "ftp://a.example.com/x"]}, "urls[1]"),
        ({"type": "url", "urls": ["not a url"]}, "urls[0]"),
        ({"type": "url", "prefixes": ["http://a.example.com/"]}, "prefixes"),
        ({"type": "url"}, "urls"),
        ({"type": "url", "urls": []}, "urls"),
        ({"type": "prefix", "prefixes": ["http://a.example.com/x?y=1"]}, "prefixes[0]"),
        ({"type": "domain", "domains": ["c.example.com"]}, "domains[0]"),
        ({"type": "tag", "tags": ["t"], "domains": ["a.example.com", "zz.example"]}, "domains[1]"),
        ({"type": "everything"}, "type"),
        ({"type": "url", "urls": ["http://a.example.com/"] * (MAX_URLS + 1)}, "urls"),
        (
            {"type": "prefix", "prefixes": ["http://a.example.com/"] * (MAX_PREFIXES + 1)},
            "prefixes",
        ),
        ({"type": "url", "urls": ["http://a.example.com/"], "force": True}, "force"),
        (
            {"type": "url", "urls": ["http://a.example.com/" + "x" * MAX_URL_LENGTH]},
            "urls[0]",
        ),
        ({"type": "tag", "tags": [f"t{n}" for n in range(MAX_TAGS + 1)]}, "tags"),
        ({"type": "tag", "tags": ["t" * (MAX_TAG_LENGTH + 1)]}, "tags[0]"),
    ],
)
async def test_bad_purges_are_422_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    token = await _setup(api)
    before = await api.version()
    reply = await api.call("POST", "/v1/purge", token, body)
    assert reply.status == 422, reply.body
    assert field in [e["field"] for e in reply.body["errors"]]
    assert await api.version() == before and await api.rows(tasks) == []


async def test_prefetch_limit_and_urls_of_other_accounts(api: Api) -> None:
    token = await _setup(api)
    _, other = await api.account("other")
    await api.domain(other, "theirs.example.com")
    too_many = await api.call(
        "POST", "/v1/prefetch", token, {"urls": ["http://a.example.com/"] * (MAX_PREFETCH + 1)}
    )
    assert too_many.status == 422 and too_many.body["errors"][0]["field"] == "urls"
    theirs = await api.call("POST", "/v1/prefetch", token, {"urls": ["http://theirs.example.com/"]})
    missing = await api.call("POST", "/v1/prefetch", token, {"urls": ["http://none.example.com/"]})
    assert theirs.status == missing.status == 422
    assert theirs.body["errors"][0]["problem"].endswith("is not one of your domains")
    assert missing.body["errors"][0]["problem"].endswith("is not one of your domains")


async def test_tasks_of_other_accounts_and_outside_a_limit_are_404(api: Api) -> None:
    account_id, token = await api.account()
    await api.domain(token, "a.example.com")
    await api.domain(token, "b.example.com")
    _, other = await api.account("other")
    task = await api.ok(
        "POST", "/v1/purge", token, {"type": "domain", "domains": ["b.example.com"]}, status=202
    )
    path = f"/v1/tasks/{task['id']}"
    assert (await api.call("GET", path, other)).status == 404
    assert (await api.call("GET", "/v1/tasks/4242", other)).status == 404
    sub_id, limited = await api.subaccount(token, ["purge"], domains=["a.example.com"])
    assert (await api.call("GET", path, limited)).status == 404
    refused = await api.call(
        "POST", "/v1/purge", limited, {"type": "url", "urls": ["http://b.example.com/"]}
    )
    assert refused.status == 422
    mine = await api.ok("POST", "/v1/purge", limited, {"type": "tag", "tags": ["t"]}, status=202)
    assert (await api.ok("GET", f"/v1/tasks/{mine['id']}", limited))["id"] == mine["id"]
    [entry] = [
        r for r in await api.rows(audit_log) if r.subaccount_id == sub_id and r.action == "purge"
    ]
    assert (entry.account_id, entry.actor, entry.target) == (
        account_id,
        "subaccount",
        f"task {mine['id']}",
    )
    assert entry.detail == {"type": "tag", "items": 1}


async def test_a_tag_purge_expanding_to_too_many_items_is_422(api: Api) -> None:
    """domains x tags items in one change: a huge change would stall every edge."""
    account_id, token = await api.account()
    count = MAX_PURGE_ITEMS // MAX_TAGS + 1
    names = [f"d{n:03}.example.com" for n in range(count)]
    async with api.engine.begin() as conn:
        await conn.execute(
            domains.insert(),
            [
                {
                    "account_id": account_id,
                    "name": name,
                    "config": {"origins": ["http://o"]},
                    "state": "active",
                    "state_reason": "",
                    "created_at": datetime.now(UTC),
                    "updated_at": datetime.now(UTC),
                }
                for name in names
            ],
        )
    tags = [f"tag-{n}" for n in range(MAX_TAGS)]
    before = await api.version()
    reply = await api.call("POST", "/v1/purge", token, {"type": "tag", "tags": tags})
    assert reply.status == 422, reply.body
    assert reply.body["errors"][0]["field"] == "tags"
    assert "name fewer tags or domains" in reply.body["detail"]
    assert await api.version() == before and await api.rows(tasks) == []
    at_cap = {"type": "tag", "tags": tags, "domains": names[:-1]}
    task = await api.ok("POST", "/v1/purge", token, at_cap, status=202)
    [change] = await api.changes(before)
    assert change.payload["task"] == task["id"]
    assert len(change.payload["items"]) == MAX_PURGE_ITEMS
