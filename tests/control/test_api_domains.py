"""Domains through the API: validation by the edge's parser, ownership, sub-account limits, the
changes edges receive, and the operator's and account-wide state changes."""

from __future__ import annotations

import asyncio
from ipaddress import ip_network
from typing import Any

import pytest

from control.models import (
    MAX_ORIGINS,
    MAX_QUERY_PARAMS,
    MAX_RULE_VALUES,
    MAX_RULES,
    MAX_STRING,
)
from control.schema import audit_log, domains
from edge.config import parse_domain
from tests.control.conftest import CNAME_SUFFIX, Api, on_one_backend

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


@on_one_backend
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
        # size caps: one account must not make the change feed or the state huge
        (
            {"name": "www.example.com", "origins": ["http://o"] * (MAX_ORIGINS + 1)},
            "origins",
        ),
        (
            {"name": "www.example.com", "origins": ["http://" + "o" * MAX_STRING]},
            "origins[0]",
        ),
        (
            {"name": "www.example.com", "origins": ["http://o"], "origin_host": "h" * 1025},
            "origin_host",
        ),
        (
            {
                "name": "www.example.com",
                "origins": ["http://o"],
                "rules": [{"path": ["/"]}] * (MAX_RULES + 1),
            },
            "rules",
        ),
        (
            {
                "name": "www.example.com",
                "origins": ["http://o"],
                "rules": [{"suffix": [".a"] * (MAX_RULE_VALUES + 1)}],
            },
            "rules[0].suffix",
        ),
        (
            {
                "name": "www.example.com",
                "origins": ["http://o"],
                "rules": [{"prefix": ["/" * (MAX_STRING + 1)]}],
            },
            "rules[0].prefix[0]",
        ),
        (
            {
                "name": "www.example.com",
                "origins": ["http://o"],
                "query": {"mode": "keep", "params": ["p"] * (MAX_QUERY_PARAMS + 1)},
            },
            "query.params",
        ),
        (
            {
                "name": "www.example.com",
                "origins": ["http://o"],
                "query": {"mode": "drop", "params": ["p" * (MAX_STRING + 1)]},
            },
            "query.params[0]",
        ),
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


async def test_a_domain_at_every_size_cap_is_accepted(api: Api) -> None:
    _, token = await api.account()
    made = await api.domain(
        token,
        "www.example.com",
        origins=[f"http://o{n}.example" for n in range(MAX_ORIGINS)],
        origin_host="h" * 63,
        rules=[{"path": [f"/{n}/{v}" for v in range(MAX_RULE_VALUES)]} for n in range(MAX_RULES)],
        query={
            "mode": "keep",
            "params": [f"p{n}" for n in range(MAX_QUERY_PARAMS - 1)] + ["p" * MAX_STRING],
        },
    )
    assert len(made["origins"]) == MAX_ORIGINS and len(made["rules"]) == MAX_RULES


DENIED = [
    ("http://127.0.0.1:8080", "127.0.0.1 is in a denied range (origin_deny)"),
    ("https://[::1]", "::1 is in a denied range (origin_deny)"),
    ("http://169.254.169.254", "169.254.169.254 is in a denied range (origin_deny)"),
    ("http://[fe80::1]", "fe80::1 is in a denied range (origin_deny)"),
    ("http://0.0.0.0", "0.0.0.0 is in a denied range (origin_deny)"),
    ("http://[::]", ":: is in a denied range (origin_deny)"),
    ("http://224.0.0.1", "224.0.0.1 is in a denied range (origin_deny)"),
    ("http://[ff02::1]", "ff02::1 is in a denied range (origin_deny)"),
    ("http://10.1.2.3", "10.1.2.3 is in a denied range (origin_deny)"),
    ("http://172.31.255.255", "172.31.255.255 is in a denied range (origin_deny)"),
    ("http://192.168.0.10", "192.168.0.10 is in a denied range (origin_deny)"),
    ("http://[fd12::3]", "fd12::3 is in a denied range (origin_deny)"),
    ("http://100.64.0.1", "100.64.0.1 is in a denied range (origin_deny)"),
    # spellings that reach the same addresses
    ("http://[::ffff:127.0.0.1]", "::ffff:127.0.0.1 is in a denied range (origin_deny)"),
    ("http://0x7f.1", "0x7f.1 is in a denied range (origin_deny)"),
    ("http://localhost:3000", "localhost is a loopback name (origin_deny)"),
    ("http://api.LOCALHOST", "api.localhost is a loopback name (origin_deny)"),
]


@pytest.mark.parametrize(("origin", "problem"), DENIED)
async def test_origins_at_internal_addresses_are_refused(
    api: Api, origin: str, problem: str
) -> None:
    _, token = await api.account()
    body = {"name": "www.example.com", "origins": ["http://origin.example", origin]}
    reply = await api.call("POST", "/v1/domains", token, body)
    assert reply.status == 422, reply.body
    assert reply.body["detail"] == f"origins[1]: {problem}"
    assert reply.body["errors"] == [{"field": "origins[1]", "problem": problem}]
    await api.domain(token, "www.example.com")
    reply = await api.call("PUT", "/v1/domains/www.example.com", token, {"origins": [origin]})
    assert reply.status == 422 and reply.body["detail"] == f"origins[0]: {problem}"
    assert (await api.ok("GET", "/v1/domains/www.example.com", token))["origins"] == [
        "http://origin.example:8080"
    ]


async def test_public_origins_pass_the_default_deny_list(api: Api) -> None:
    _, token = await api.account()
    origins = ["http://203.0.113.7", "https://[2001:db8::1]:8443", "http://172.32.0.1"]
    assert (await api.domain(token, "www.example.com", origins=origins))["origins"] == origins


@pytest.mark.parametrize(
    "api_settings", [{"origin_deny": ()}, {"origin_deny": (ip_network("10.0.0.0/8"),)}]
)
async def test_the_operator_chooses_the_deny_list(api: Api, api_settings: dict[str, Any]) -> None:
    _, token = await api.account()
    made = await api.domain(token, "www.example.com", origins=["http://127.0.0.1:8080"])
    assert made["origins"] == ["http://127.0.0.1:8080"]
    local = await api.call(
        "POST", "/v1/domains", token, {"name": "b.example.com", "origins": ["http://localhost"]}
    )
    assert local.status == 201  # a loopback name is refused only while loopback is denied
    ten = await api.call(
        "POST", "/v1/domains", token, {"name": "c.example.com", "origins": ["http://10.0.0.1"]}
    )
    assert ten.status == (201 if not api_settings["origin_deny"] else 422)


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


async def test_an_account_cannot_delete_a_suspended_domain(api: Api) -> None:
    """Deleting and re-adding it would undo the operator's suspension."""
    account_id, token = await api.account()
    await api.domain(token, "www.example.com")
    path = "/v1/domains/www.example.com"
    await api.ok("POST", f"{path}/suspend", body={"reason": "phishing"})
    before = await api.version()
    reply = await api.call("DELETE", path, token)
    assert reply.status == 409
    assert reply.body["detail"] == "suspended domains cannot be deleted; ask the operator"
    assert (await api.ok("GET", path, token))["state"] == "suspended"
    again = await api.call(
        "POST", "/v1/domains", token, {"name": "www.example.com", "origins": ["http://o"]}
    )
    assert again.status == 409 and "already registered" in again.body["detail"]
    assert await api.version() == before
    # suspended with its account: the same
    await api.domain(token, "b.example.com")
    await api.ok("POST", f"/v1/accounts/{account_id}/suspend", body={"reason": "unpaid"})
    assert (await api.call("DELETE", "/v1/domains/b.example.com", token)).status == 409
    await api.ok("POST", f"/v1/accounts/{account_id}/resume")
    assert (await api.call("DELETE", "/v1/domains/b.example.com", token)).status == 204


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
