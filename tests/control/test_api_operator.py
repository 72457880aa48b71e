"""The operator's routes: accounts, edges and URL blocks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from control.schema import audit_log
from tests.control.conftest import ADMIN_TOKEN, SSE, Api


async def test_accounts_are_created_listed_and_read(api: Api) -> None:
    made = await api.ok(
        "POST",
        "/v1/accounts",
        body={"name": "acme", "billing": "postpaid", "timezone": "UTC"},
        status=201,
    )
    account = made["account"]
    assert (account["name"], account["billing"], account["timezone"], account["state"]) == (
        "acme",
        "postpaid",
        "UTC",
        "active",
    )
    assert made["token"].startswith("cdn_acct_")
    default = (await api.ok("POST", "/v1/accounts", body={"name": "b", "billing": "prepaid"}))[
        "account"
    ]
    assert default["timezone"] == "Asia/Shanghai"
    assert [a["id"] for a in (await api.ok("GET", "/v1/accounts"))["accounts"]] == [
        account["id"],
        default["id"],
    ]
    assert await api.ok("GET", f"/v1/accounts/{account['id']}") == account
    assert (await api.call("GET", "/v1/accounts/999")).status == 404
    entries = await api.rows(audit_log)
    assert ("operator", "account.create") in [(e.actor, e.action) for e in entries]
    assert all(made["token"] not in str(e.detail) for e in entries)


async def test_account_bodies_are_validated(api: Api) -> None:
    cases = [
        ({"name": "x", "billing": "free"}, "billing"),
        ({"name": "x", "billing": "prepaid", "timezone": "Mars/Olympus"}, "timezone"),
        ({"name": "", "billing": "prepaid"}, "name"),
        ({"billing": "prepaid"}, "name"),
        ({"name": "x", "billing": "prepaid", "plan": "gold"}, "plan"),
    ]
    for body, field in cases:
        reply = await api.call("POST", "/v1/accounts", body=body)
        assert reply.status == 422, body
        assert reply.body["errors"][0]["field"] == field
    reply = await api.call("POST", "/v1/accounts/1/suspend", body={"reason": 7})
    assert reply.status == 422 and reply.body["errors"][0]["field"] == "reason"


async def test_more_account_tokens_work_at_once(api: Api) -> None:
    account_id, _ = await api.account()
    made = await api.ok(
        "POST", f"/v1/accounts/{account_id}/tokens", body={"label": "deploy"}, status=201
    )
    assert (await api.call("GET", "/v1/domains", made["token"])).status == 200
    listing = await api.ok("GET", "/v1/tokens", made["token"])
    assert {t["label"] for t in listing["tokens"]} == {"initial", "deploy"}


async def test_edges_are_registered_listed_and_removed(api: Api) -> None:
    edge_id, token = await api.edge("edge-sh-1")
    assert token.startswith("cdn_edge_")
    [listed] = (await api.ok("GET", "/v1/edges"))["edges"]
    assert (listed["id"], listed["name"], listed["applied_version"]) == (edge_id, "edge-sh-1", 0)
    assert (await api.call("POST", "/v1/edges", body={"name": "edge-sh-1"})).status == 409
    assert (await api.call("POST", "/v1/edges", body={"name": "bad name"})).status == 422
    assert (await api.call("DELETE", f"/v1/edges/{edge_id}")).status == 204
    assert (await api.ok("GET", "/v1/edges"))["edges"] == []
    assert (await api.call("DELETE", f"/v1/edges/{edge_id}")).status == 404


async def test_blocks_publish_block_and_unblock(api: Api) -> None:
    account_id, token = await api.account()
    await api.domain(token, "www.example.com")
    before = await api.version()
    exact = await api.ok(
        "POST",
        "/v1/blocks",
        body={"url": "https://WWW.example.com/bad.html?x=1", "reason": "court"},
        status=201,
    )
    prefix = await api.ok(
        "POST",
        "/v1/blocks",
        body={"url": "http://gone.example.org/leak/*", "reason": "dmca"},
        status=201,
    )
    assert (exact["domain"], exact["pattern"]) == ("www.example.com", "/bad.html")
    assert (prefix["domain"], prefix["pattern"]) == ("gone.example.org", "/leak/*")
    again = await api.call(
        "POST", "/v1/blocks", body={"url": "http://www.example.com/bad.html", "reason": "again"}
    )
    assert again.status == 409
    for url in ("ftp://www.example.com/x", "http://www.example.com/a*b", "http://bad_host!/x"):
        reply = await api.call("POST", "/v1/blocks", body={"url": url, "reason": "r"})
        assert reply.status == 422 and reply.body["errors"][0]["field"] == "url", url
    assert [b["id"] for b in (await api.ok("GET", "/v1/blocks"))["blocks"]] == [
        exact["id"],
        prefix["id"],
    ]
    assert (await api.call("DELETE", f"/v1/blocks/{exact['id']}")).status == 204
    assert (await api.call("DELETE", f"/v1/blocks/{exact['id']}")).status == 404
    assert [(c.kind, c.payload) for c in await api.changes(before)] == [
        ("block", {"domain": "www.example.com", "pattern": "/bad.html", "reason": "court"}),
        ("block", {"domain": "gone.example.org", "pattern": "/leak/*", "reason": "dmca"}),
        ("unblock", {"domain": "www.example.com", "pattern": "/bad.html"}),
    ]
    # blocking an account's domain is recorded in that account's audit log
    audited = [(e.account_id, e.actor, e.action) for e in await api.rows(audit_log)]
    assert (account_id, "operator", "block.create") in audited
    assert (account_id, "operator", "block.delete") in audited
    log = await api.ok("GET", "/v1/audit", token)
    assert "block.create" in [e["action"] for e in log["entries"]]


@pytest.mark.parametrize("api_settings", [{"heartbeat": 60.0}])
async def test_deleting_an_edge_ends_its_open_feed_at_once(api: Api, api_settings: Any) -> None:
    edge_id, token = await api.edge()
    _, other = await api.edge("edge-2")
    headers = {"Authorization": f"Bearer {token}"}
    async with api.client.get("/v1/edge/events", headers=headers) as response:
        stream = SSE(response)
        assert (await stream.next()).kind == "snapshot"
        started = time.monotonic()
        assert (await api.call("DELETE", f"/v1/edges/{edge_id}")).status == 204
        with pytest.raises(EOFError):  # long before the next heartbeat
            await stream.next(timeout=10)
        assert time.monotonic() - started < 10
    reconnect = await api.call("GET", "/v1/edge/snapshot", token)
    assert reconnect.status == 401
    assert (await api.call("GET", "/v1/edge/snapshot", other)).status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/edges", {"name": "edge-x"}), ("/v1/subaccounts", {"name": "ops", "scopes": []})],
)
async def test_concurrent_identical_creates_are_one_201_and_409s(
    api: Api, path: str, body: dict[str, Any]
) -> None:
    """The name check and the insert race on PostgreSQL: the loser is a 409 too, never a 500."""
    _, account = await api.account()
    token = account if path == "/v1/subaccounts" else ADMIN_TOKEN
    replies = await asyncio.gather(*(api.call("POST", path, token, body) for _ in range(5)))
    assert sorted(r.status for r in replies) == [201] + [409] * 4, [r.body for r in replies]
    assert all("exists or existed" in r.body["detail"] for r in replies if r.status == 409)


@pytest.mark.parametrize("path", ["/v1/accounts/", "/v1/tasks/", "/v1/edges/"])
async def test_an_id_of_thousands_of_digits_is_404(api: Api, path: str) -> None:
    method = "DELETE" if path == "/v1/edges/" else "GET"
    assert (await api.call(method, path + "9" * 5000)).status == 404
