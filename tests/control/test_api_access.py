"""A domain's access rules through the API (issue 7): validated by the edge's own parser (422
naming the field), stored normalised, returned, carried to edges in the domain's change, and
their signing keys kept out of the audit log."""

from __future__ import annotations

import json
from typing import Any

import pytest

from control.models import MAX_ACCESS_BYTES
from control.schema import audit_log, domains
from edge.config import parse_domain
from tests.control.conftest import Api

ACCESS = {
    "signed_url": {"type": "A", "key": "k-primary-123", "secondary_key": "k-second-456",
                   "ttl": "1h"},
    "referer": {"allow": ["*.Example.com"], "allow_empty": False},
    "ip": {"deny": ["192.0.2.9/24", "2001:db8::/32"]},
    "user_agent": {"deny": ["*curl*"]},
    "rate_limit": {"rate": 20},
    "speed_limits": [{"suffix": [".mp4"], "rate": "1MiB", "after": "4MiB"}],
}
NORMALISED = {
    "signed_url": {"type": "A", "key": "k-primary-123", "secondary_key": "k-second-456",
                   "ttl": 3600, "param": "auth_key"},
    "referer": {"allow": ["*.example.com"], "allow_empty": False},
    "ip": {"deny": ["192.0.2.0/24", "2001:db8::/32"]},
    "user_agent": {"deny": ["*curl*"]},
    "rate_limit": {"rate": 20, "burst": 20},
    "speed_limits": [{"suffix": [".mp4"], "rate": 2**20, "after": 4 * 2**20}],
}


async def test_access_rules_are_stored_returned_and_published(api: Api) -> None:
    _, token = await api.account()
    before = await api.version()
    made = await api.domain(token, "www.example.com", access=ACCESS)
    assert made["access"] == NORMALISED
    [change] = await api.changes(before)
    config = change.payload["domain"]["config"]
    assert config["access"] == NORMALISED
    # What edges receive parses, with the edge's parser, to the rules as submitted.
    submitted = parse_domain(
        {"name": "www.example.com", "origins": ["http://origin.example:8080"], "access": ACCESS},
        "x",
    )
    assert parse_domain({"name": "www.example.com", **config}, "x") == submitted
    assert await api.ok("GET", "/v1/domains/www.example.com", token) == made

    # PUT replaces the settings: without access, the domain has no rules any more.
    updated = await api.ok(
        "PUT", "/v1/domains/www.example.com", token, {"origins": ["http://o2.example"]}
    )
    assert "access" not in updated
    [change] = await api.changes(before + 1)
    assert "access" not in change.payload["domain"]["config"]


async def test_signing_keys_stay_out_of_the_audit_log(api: Api) -> None:
    _, token = await api.account()
    await api.domain(token, "www.example.com", access=ACCESS)
    await api.ok("PUT", "/v1/domains/www.example.com", token,
                 {"origins": ["http://o2.example"], "access": ACCESS})
    entries = [r for r in await api.rows(audit_log) if r.action.startswith("domain.")]
    assert len(entries) == 2
    text = json.dumps([e.detail for e in entries]) + json.dumps(await api.ok("GET", "/v1/audit",
                                                                            token))
    assert "k-primary-123" not in text and "k-second-456" not in text
    assert entries[0].detail["config"]["access"]["signed_url"]["key"] == "(hidden)"
    assert entries[0].detail["config"]["access"]["ip"] == NORMALISED["ip"]


@pytest.mark.parametrize(
    ("access", "field"),
    [
        ({"signed_url": {"type": "E", "key": "k"}}, "access.signed_url.type"),
        ({"signed_url": {"type": "A", "key": ""}}, "access.signed_url.key"),
        ({"signed_url": {"type": "A"}}, "access.signed_url.key"),
        ({"referer": {"allow": ["a.test"], "deny": ["b.test"]}}, "access.referer"),
        ({"ip": {"allow": ["10.0.0.0/8", "10.0.0.0/40"]}}, "access.ip.allow[1]"),
        ({"user_agent": {"deny": "curl"}}, "access.user_agent.deny"),
        ({"rate_limit": {"rate": -1}}, "access.rate_limit.rate"),
        ({"speed_limits": [{"rate": "fast"}]}, "access.speed_limits[0].rate"),
        ({"cors": {}}, "access.cors"),
        ("none", "access"),
        ({"ip": {"deny": ["10.0.0.1"] * (MAX_ACCESS_BYTES // 10)}}, "access"),
    ],
)
async def test_bad_access_rules_are_422_naming_the_field(
    api: Api, access: Any, field: str
) -> None:
    _, token = await api.account()
    body = {"name": "www.example.com", "origins": ["http://o.example"], "access": access}
    reply = await api.call("POST", "/v1/domains", token, body)
    assert reply.status == 422, reply.body
    assert reply.content_type == "application/problem+json"
    assert reply.body["errors"][0]["field"] == field, reply.body
    assert "k-" not in json.dumps(reply.body)
    assert await api.rows(domains) == []
    await api.domain(token, "ok.example.com")
    reply = await api.call(
        "PUT", "/v1/domains/ok.example.com", token, {"origins": ["http://o"], "access": access}
    )
    assert reply.status == 422 and reply.body["errors"][0]["field"] == field
