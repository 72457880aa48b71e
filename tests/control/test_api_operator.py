"""The operator's routes: accounts, edges and URL blocks."""

from __future__ import annotations

from control.schema import audit_log
from tests.control.conftest import Api


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
