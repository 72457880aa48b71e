"""Sub-accounts, their tokens and the audit log (account tokens only)."""

from __future__ import annotations

from control.schema import audit_log
from tests.control.conftest import Api


async def test_sub_accounts_are_created_listed_and_deleted(api: Api) -> None:
    account_id, token = await api.account()
    made = await api.ok(
        "POST",
        "/v1/subaccounts",
        token,
        {"name": "ops", "scopes": ["purge", "domains:read", "purge"], "domains": ["A.example.com"]},
        status=201,
    )
    sub = made["subaccount"]
    assert (sub["name"], sub["scopes"], sub["domains"]) == (
        "ops",
        ["domains:read", "purge"],
        ["a.example.com"],
    )
    assert made["token"].startswith("cdn_sub_")
    extra = await api.ok("POST", f"/v1/subaccounts/{sub['id']}/tokens", token, {}, status=201)
    assert (await api.call("GET", "/v1/domains", extra["token"])).status == 200
    assert (await api.ok("GET", "/v1/subaccounts", token))["subaccounts"] == [sub]
    assert (
        await api.call("POST", "/v1/subaccounts", token, {"name": "ops", "scopes": []})
    ).status == 409
    assert (await api.call("DELETE", f"/v1/subaccounts/{sub['id']}", token)).status == 204
    assert (await api.ok("GET", "/v1/subaccounts", token))["subaccounts"] == []
    assert (await api.call("GET", "/v1/domains", extra["token"])).status == 401
    actions = [(e.account_id, e.actor, e.action) for e in await api.rows(audit_log)]
    assert (account_id, "account", "subaccount.create") in actions
    assert (account_id, "account", "subaccount.delete") in actions


async def test_sub_account_bodies_are_validated(api: Api) -> None:
    _, token = await api.account()
    cases = [
        ({"name": "x", "scopes": ["root"]}, "scopes[0]"),
        ({"name": "x", "scopes": "purge"}, "scopes"),
        ({"name": "x", "scopes": [], "domains": ["not a domain"]}, "domains[0]"),
        ({"name": "x", "scopes": [], "admin": True}, "admin"),
    ]
    for body, field in cases:
        reply = await api.call("POST", "/v1/subaccounts", token, body)
        assert reply.status == 422, body
        assert reply.body["errors"][0]["field"] == field


async def test_another_accounts_sub_accounts_are_404_like_missing_ones(api: Api) -> None:
    _, first = await api.account("first")
    _, second = await api.account("second")
    sub_id, _ = await api.subaccount(first, ["purge"])
    for method, path in (
        ("DELETE", f"/v1/subaccounts/{sub_id}"),
        ("POST", f"/v1/subaccounts/{sub_id}/tokens"),
    ):
        theirs = await api.call(method, path, second, {})
        missing = await api.call(method, path.replace(str(sub_id), "9999"), second, {})
        assert theirs.status == missing.status == 404, path
    assert (await api.ok("GET", "/v1/subaccounts", second))["subaccounts"] == []


async def test_audit_log_is_the_accounts_own_newest_first_and_paged(api: Api) -> None:
    _, token = await api.account()
    _, other = await api.account("other")
    sub_id, sub = await api.subaccount(token, ["domains:write"])
    for n in range(3):
        await api.domain(sub, f"d{n}.example.com")
    await api.domain(other, "theirs.example.com")
    entries = (await api.ok("GET", "/v1/audit", token))["entries"]
    assert [e["target"] for e in entries[:3]] == [
        "d2.example.com",
        "d1.example.com",
        "d0.example.com",
    ]
    assert all(e["subaccount_id"] == sub_id and e["actor"] == "subaccount" for e in entries[:3])
    assert "theirs.example.com" not in [e["target"] for e in entries]
    page = (await api.ok("GET", "/v1/audit?limit=2", token))["entries"]
    rest = (await api.ok("GET", f"/v1/audit?limit=2&before={page[-1]['id']}", token))["entries"]
    assert [e["id"] for e in page + rest] == [e["id"] for e in entries[:4]]
    for query in ("limit=0", "before=x", "limit=\u00b2", "limit=\uff11", "before=" + "1" * 5000):
        reply = await api.call("GET", f"/v1/audit?{query}", token)
        assert reply.status == 400, query
        assert reply.content_type == "application/problem+json"
