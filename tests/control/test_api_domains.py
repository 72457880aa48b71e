"""Domains through the API: validation by the edge's parser, ownership, sub-account limits, the
changes edges receive, and the operator's and account-wide state changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from control.schema import audit_log, domains
from edge.config import parse_domain
from tests.control.conftest import CNAME_SUFFIX, Api

RULES = [
    {"suffix": [".JPG", ".png"], "ttl": "1h"},
    {"prefix": ["/video/"], "ttl": 600, "respect_origin": False, "slice": "1MiB"},
]


async def test_create_normalises_publishes_and_reads_back(api: Api) -> None:
    _, token = await api.account()
    before = await api.version()
    made = await api.domain(
        token,
        "WWW.Example.COM.",
        origin_host="origin.example",
        rules=RULES,
        query={"mode": "drop", "params": ["utm_source"]},
    )
    assert made["name"] == "www.example.com"
    assert made["state"] == "active" and made["reason"] == ""
    assert made["cname"] == f"www.example.com.{CNAME_SUFFIX}"
    assert made["rules"][0] == {"suffix": [".jpg", ".png"], "ttl": 3600}
    assert made["rules"][1] == {
        "prefix": ["/video/"],
        "ttl": 600,
        "respect_origin": False,
        "slice": 2**20,
    }
    [change] = await api.changes(before)
    assert change.version == before + 1 and change.kind == "domain.upsert"
    config = change.payload["domain"]["config"]
    assert change.payload == {
        "domain": {"name": "www.example.com", "state": "active", "reason": "", "config": config}
    }
    assert "name" not in config and config["origins"] == ["http://origin.example:8080"]
    # what edges receive parses back, with the edge's own parser, to the domain as submitted
    submitted = parse_domain(
        {
            "name": "www.example.com",
            "origins": ["http://origin.example:8080"],
            "origin_host": "origin.example",
            "rules": RULES,
            "query": {"mode": "drop", "params": ["utm_source"]},
        },
        "x",
    )
    assert parse_domain({"name": "www.example.com", **config}, "x") == submitted
    assert await api.ok("GET", "/v1/domains/www.example.com", token) == made
    assert await api.ok("GET", "/v1/domains/WWW.EXAMPLE.COM", token) == made
    assert (await api.ok("GET", "/v1/domains", token))["domains"] == [made]


async def test_update_and_delete_publish_their_changes(api: Api) -> None:
    _, token = await api.account()
    await api.domain(token, "a.example.com")
    before = await api.version()
    updated = await api.ok(
        "PUT", "/v1/domains/a.example.com", token, {"origins": ["https://new.example"]}
    )
    assert updated["origins"] == ["https://new.example"]
    assert (await api.call("DELETE", "/v1/domains/a.example.com", token)).status == 204
    upsert, gone = await api.changes(before)
    assert (upsert.kind, gone.kind) == ("domain.upsert", "domain.delete")
    assert upsert.payload["domain"]["config"] == {"origins": ["https://new.example"]}
    assert gone.payload == {"name": "a.example.com"}
    assert (upsert.version, gone.version) == (before + 1, before + 2)
    assert (await api.call("GET", "/v1/domains/a.example.com", token)).status == 404
    # a body naming the domain is refused: the path names it
    await api.domain(token, "b.example.com")
    reply = await api.call(
        "PUT",
        "/v1/domains/b.example.com",
        token,
        {"name": "c.example.com", "origins": ["http://o"]},
    )
    assert reply.status == 422 and reply.body["errors"][0]["field"] == "name"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "www.example.com", "origins": ["http://o"], "colour": "red"}, "colour"),
        ({"name": "www.example.com", "origins": "http://o"}, "origins"),
        ({"name": 42, "origins": ["http://o"]}, "name"),
        ({"name": "bad_name!.example", "origins": ["http://o"]}, "name"),
        ({"name": "www.example.com", "origins": ["ftp://o"]}, "origins[0]"),
        ({"name": "www.example.com", "origins": ["http://o", "http://o/path"]}, "origins[1]"),
        ({"name": "www.example.com", "origins": []}, "origins"),
        ({"origins": ["http://o"]}, "name"),
        (
            {"name": "www.example.com", "origins": ["http://o"], "rules": [{"suffix": ["jpg"]}]},
            "rules[0].suffix[0]",
        ),
        (
            {"name": "www.example.com", "origins": ["http://o"], "rules": [{"ttl": "1h"}]},
            "rules[0]",
        ),
        (
            {
                "name": "www.example.com",
                "origins": ["http://o"],
                "rules": [{"path": ["/"], "ttl": True}],
            },
            "rules[0].ttl",
        ),
        (
            {"name": "www.example.com", "origins": ["http://o"], "query": {"mode": "sometimes"}},
            "query.mode",
        ),
        ([1, 2], "(body)"),
    ],
)
async def test_invalid_bodies_are_422_naming_the_field(api: Api, body: Any, field: str) -> None:
    _, token = await api.account()
    reply = await api.call("POST", "/v1/domains", token, body)
    assert reply.status == 422, reply.body
    assert reply.content_type == "application/problem+json"
    assert reply.body["errors"][0]["field"] == field
    assert reply.body["detail"].startswith(f"{field}: ")
    assert await api.rows(domains) == []


async def test_malformed_or_missing_json_is_400(api: Api) -> None:
    _, token = await api.account()
    for raw in (b'{"name": "www.example.com", ', b"", b"\xff\xfe"):
        reply = await api.call("POST", "/v1/domains", token, raw=raw)
        assert reply.status == 400, raw
        assert reply.content_type == "application/problem+json"
        assert "\n" not in reply.body["detail"]
    too_big = await api.call("POST", "/v1/domains", token, raw=b" " * (9 * 2**20))
    assert too_big.status == 413 and too_big.content_type == "application/problem+json"


async def test_names_are_unique_across_accounts(api: Api) -> None:
    _, first = await api.account("first")
    _, second = await api.account("second")
    await api.domain(first, "www.example.com")
    reply = await api.call(
        "POST", "/v1/domains", second, {"name": "WWW.example.com", "origins": ["http://o"]}
    )
    assert reply.status == 409
    assert reply.content_type == "application/problem+json"


async def test_another_accounts_domain_is_404_like_a_missing_one(api: Api) -> None:
    _, first = await api.account("first")
    _, second = await api.account("second")
    await api.domain(first, "www.example.com")
    assert (await api.ok("GET", "/v1/domains", second))["domains"] == []
    for method, body in (("GET", None), ("PUT", {"origins": ["http://o"]}), ("DELETE", None)):
        theirs = await api.call(method, "/v1/domains/www.example.com", second, body)
        missing = await api.call(method, "/v1/domains/nothing.example.com", second, body)
        assert theirs.status == missing.status == 404, method
        assert theirs.body["title"] == missing.body["title"]
    assert (await api.call("GET", "/v1/domains/www.example.com", first)).status == 200


async def test_a_sub_accounts_domain_limit(api: Api) -> None:
    _, token = await api.account()
    await api.domain(token, "mine.example.com")
    await api.domain(token, "other.example.com")
    _, sub = await api.subaccount(
        token, ["domains:read", "domains:write"], domains=["Mine.example.com", "new.example.com"]
    )
    listed = await api.ok("GET", "/v1/domains", sub)
    assert [d["name"] for d in listed["domains"]] == ["mine.example.com"]
    assert (await api.call("GET", "/v1/domains/other.example.com", sub)).status == 404
    assert (await api.call("DELETE", "/v1/domains/other.example.com", sub)).status == 404
    refused = await api.call(
        "POST", "/v1/domains", sub, {"name": "extra.example.com", "origins": ["http://o"]}
    )
    assert refused.status == 403
    await api.domain(sub, "new.example.com")
    assert (await api.call("GET", "/v1/domains/new.example.com", sub)).status == 200


async def test_writes_are_audited_with_the_acting_sub_account(api: Api) -> None:
    account_id, token = await api.account()
    sub_id, sub = await api.subaccount(token, ["domains:write"])
    await api.domain(sub, "www.example.com")
    await api.ok("PUT", "/v1/domains/www.example.com", token, {"origins": ["http://o2"]})
    entries = [r for r in await api.rows(audit_log) if r.action.startswith("domain.")]
    assert [(e.account_id, e.actor, e.subaccount_id, e.action, e.target) for e in entries] == [
        (account_id, "subaccount", sub_id, "domain.create", "www.example.com"),
        (account_id, "account", None, "domain.update", "www.example.com"),
    ]
    log = await api.ok("GET", "/v1/audit", token)
    assert log["entries"][0]["action"] == "domain.update"
    assert log["entries"][1]["subaccount_id"] == sub_id


async def test_operator_suspends_resumes_and_terminates_a_domain(api: Api) -> None:
    account_id, token = await api.account()
    await api.domain(token, "www.example.com")
    before = await api.version()
    path = "/v1/domains/www.example.com"
    suspended = await api.ok("POST", f"{path}/suspend", body={"reason": "abuse report"})
    assert (suspended["state"], suspended["reason"]) == ("suspended", "abuse report")
    assert (await api.ok("POST", f"{path}/resume"))["state"] == "active"
    assert (await api.ok("POST", f"{path}/terminate", body={"reason": "court order"}))[
        "state"
    ] == "terminated"
    assert [(c.kind, c.payload) for c in await api.changes(before)] == [
        ("domain.state", {"name": "www.example.com", "state": s, "reason": r})
        for s, r in (("suspended", "abuse report"), ("active", ""), ("terminated", "court order"))
    ]
    # terminated is final, for the operator and the account alike
    assert (await api.call("POST", f"{path}/resume")).status == 409
    assert (await api.call("PUT", path, token, {"origins": ["http://o"]})).status == 409
    assert (await api.call("DELETE", path, token)).status == 409
    assert (await api.call("POST", "/v1/domains/none.example.com/resume")).status == 404
    actions = [(r.account_id, r.actor, r.action) for r in await api.rows(audit_log)]
    assert (account_id, "operator", "domain.terminate") in actions


async def test_account_suspension_and_resume_keep_the_operators_own_domain_suspension(
    api: Api,
) -> None:
    account_id, token = await api.account()
    for name in ("a.example.com", "b.example.com", "c.example.com"):
        await api.domain(token, name)
    await api.ok("POST", "/v1/domains/b.example.com/suspend", body={"reason": "phishing"})
    before = await api.version()
    await api.ok("POST", f"/v1/accounts/{account_id}/suspend", body={"reason": "unpaid"})
    suspended = await api.changes(before)
    assert [(c.kind, c.payload["name"], c.payload["state"]) for c in suspended] == [
        ("domain.state", "a.example.com", "suspended"),
        ("domain.state", "c.example.com", "suspended"),
    ]
    assert suspended[0].payload["reason"] == "account suspended: unpaid"
    # a suspended account may read, but not make its domains serve or change
    assert (await api.call("GET", "/v1/domains", token)).status == 200
    refused = await api.call(
        "POST", "/v1/domains", token, {"name": "d.example", "origins": ["http://o"]}
    )
    assert refused.status == 403
    assert (await api.call("POST", "/v1/domains/a.example.com/resume")).status == 409
    before = await api.version()
    await api.ok("POST", f"/v1/accounts/{account_id}/resume")
    assert [(c.payload["name"], c.payload["state"]) for c in await api.changes(before)] == [
        ("a.example.com", "active"),
        ("c.example.com", "active"),
    ]
    states = {d["name"]: d["state"] for d in (await api.ok("GET", "/v1/domains", token))["domains"]}
    assert states == {
        "a.example.com": "active",
        "b.example.com": "suspended",
        "c.example.com": "active",
    }


async def test_terminating_an_account_kills_its_tokens_and_terminates_every_domain(
    api: Api,
) -> None:
    account_id, token = await api.account()
    _, sub = await api.subaccount(token, ["domains:read"])
    for name in ("a.example.com", "b.example.com"):
        await api.domain(token, name)
    before = await api.version()
    done = await api.ok("POST", f"/v1/accounts/{account_id}/terminate", body={"reason": "closed"})
    assert done["state"] == "terminated"
    assert [(c.kind, c.payload) for c in await api.changes(before)] == [
        ("domain.state", {"name": n, "state": "terminated", "reason": "closed"})
        for n in ("a.example.com", "b.example.com")
    ]
    assert (await api.call("GET", "/v1/domains", token)).status == 401
    assert (await api.call("GET", "/v1/domains", sub)).status == 401
    assert (await api.call("POST", f"/v1/accounts/{account_id}/resume")).status == 409
    assert (
        await api.call("POST", f"/v1/accounts/{account_id}/tokens", body={"label": "x"})
    ).status == 409


async def test_concurrent_writes_all_land_with_gap_free_versions(api: Api) -> None:
    _, token = await api.account()
    before = await api.version()
    names = [f"d{n}.example.com" for n in range(12)]
    replies = await asyncio.gather(
        *(
            api.call("POST", "/v1/domains", token, {"name": n, "origins": ["http://o"]})
            for n in names
        ),
        *(
            api.call("POST", "/v1/domains", token, {"name": names[0], "origins": ["http://o"]})
            for _ in range(3)
        ),
    )
    statuses = sorted(r.status for r in replies)
    assert statuses == [201] * len(names) + [409] * 3
    changes = await api.changes(before)
    assert [c.version for c in changes] == list(range(before + 1, before + 1 + len(names)))
    assert sorted(c.payload["domain"]["name"] for c in changes) == sorted(names)
