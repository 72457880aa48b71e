"""A domain's access rules through the API (issue 7): validated by the edge's own parser (422
naming the field), stored normalised, returned, carried to edges in the domain's change, and
their signing keys kept secret: encrypted in the database and the change log, in plaintext only
for edges and for those who may change the domain, masked for read-only callers, hidden in the
audit log, refused without a `secret_key`; plaintext keys an older version stored are encrypted
at startup."""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from control.app import make_app
from control.config import ControlConfig
from control.feed import publish
from control.models import MAX_ACCESS_BYTES
from control.schema import accounts, audit_log, changes, domains
from edge.config import InvalidValue, parse_domain
from tests.control.conftest import ADMIN_TOKEN, CNAME_SUFFIX, SSE, Api

SECRET_KEY = "test-secret-key-for-signing-keys-0123456789"
KEYS = ("k-primary-123", "k-second-456")
MASK = "********"
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
MASKED = {
    **NORMALISED,
    "signed_url": {**NORMALISED["signed_url"], "key": MASK, "secondary_key": MASK},
}


@pytest.fixture
def api_settings() -> dict[str, Any]:
    """A secret_key: signing keys are stored encrypted with it."""
    return {"secret_key": SECRET_KEY}


def no_plaintext_key(rows: list[Any]) -> None:
    """The rows, as the database holds them, do not contain a signing key."""
    text = json.dumps([list(row) for row in rows], default=str)
    assert not any(key in text for key in KEYS), text


async def edge_view(api: Api, since: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What an edge receives: the domains of a snapshot (`GET /v1/edge/snapshot`), by name, and
    the domains of the `domain.upsert` changes the stream sends after version `since` (that of
    an earlier change)."""
    _, token = await api.edge(f"edge-{secrets.token_hex(4)}")
    headers = {"Authorization": f"Bearer {token}"}
    async with api.client.get("/v1/edge/snapshot", headers=headers) as reply:
        snapshot = await reply.json()
    response = await api.client.get("/v1/edge/events", params={"since": since}, headers=headers)
    assert response.status == 200
    stream, published, version = SSE(response), [], since
    try:
        while version < snapshot["version"]:
            event = await stream.next()
            assert event.kind == "change" and event.id is not None, event
            version = event.id
            if event.data["kind"] == "domain.upsert":
                published.append(event.data["payload"]["domain"])
    finally:
        await stream.close()
    return {d["name"]: d for d in snapshot["domains"]}, published


async def test_access_rules_are_stored_returned_and_published(api: Api) -> None:
    _, token = await api.account()
    await api.domain(token, "first.example.com")
    before = await api.version()
    made = await api.domain(token, "www.example.com", access=ACCESS)
    assert made["access"] == NORMALISED
    assert await api.ok("GET", "/v1/domains/www.example.com", token) == made
    assert (await api.ok("GET", "/v1/domains", token))["domains"][1] == made

    # At rest, in the domain's row and in its change, the keys are encrypted.
    no_plaintext_key(await api.rows(domains))
    no_plaintext_key(await api.rows(changes))
    [change] = await api.changes(before)
    stored = change.payload["domain"]["config"]["access"]["signed_url"]
    assert set(stored["key"]) == set(stored["secondary_key"]) == {"fernet"}
    assert {k: v for k, v in stored.items() if "key" not in k} == {"type": "A", "ttl": 3600,
                                                                  "param": "auth_key"}

    # Edges receive them in plaintext, in the change and in snapshots; what they receive
    # parses, with the edge's parser, to the rules as submitted.
    snapshot, [published] = await edge_view(api, before)
    assert published == snapshot["www.example.com"]
    config = published["config"]
    assert config["access"] == NORMALISED
    submitted = parse_domain(
        {"name": "www.example.com", "origins": ["http://origin.example:8080"], "access": ACCESS},
        "x",
    )
    assert parse_domain({"name": "www.example.com", **config}, "x") == submitted

    # PUT replaces the settings: without access, the domain has no rules any more.
    updated = await api.ok(
        "PUT", "/v1/domains/www.example.com", token, {"origins": ["http://o2.example"]}
    )
    assert "access" not in updated
    [change] = await api.changes(before + 1)
    assert "access" not in change.payload["domain"]["config"]


async def test_keys_are_shown_to_writers_and_masked_for_readers(api: Api) -> None:
    _, token = await api.account()
    _, reader = await api.subaccount(token, ["domains:read"], name="reader")
    _, writer = await api.subaccount(token, ["domains:read", "domains:write"], name="writer")
    made = await api.domain(writer, "www.example.com", access=ACCESS)
    assert made["access"] == NORMALISED

    for who in (token, writer):
        assert (await api.ok("GET", "/v1/domains/www.example.com", who))["access"] == NORMALISED
        [listed] = (await api.ok("GET", "/v1/domains", who))["domains"]
        assert listed["access"] == NORMALISED
    seen = await api.call("GET", "/v1/domains/www.example.com", reader)
    listing = await api.call("GET", "/v1/domains", reader)
    assert seen.body["access"] == listing.body["domains"][0]["access"] == MASKED
    assert not any(key in json.dumps([seen.body, listing.body]) for key in KEYS)
    # The operator may change the domain: its answers carry the keys.
    suspended = await api.ok("POST", "/v1/domains/www.example.com/suspend", body={"reason": "r"})
    assert suspended["access"] == NORMALISED

    # The mask is not a key: a writer sending back what a reader saw is told so.
    reply = await api.call(
        "PUT", "/v1/domains/www.example.com", token, {"origins": ["http://o"], "access": MASKED}
    )
    assert reply.status == 422 and reply.body["errors"][0]["field"] == "access.signed_url.key"


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
        ({"signed_url": {"type": "A", "key": {"fernet": "gAAAAA"}}}, "access.signed_url.key"),
        ({"signed_url": {"type": "A", "key": "k", "secondary_key": MASK}},
         "access.signed_url.secondary_key"),
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


@pytest.mark.parametrize("api_settings", [{}])
async def test_without_secret_key_signing_keys_are_refused(api: Api) -> None:
    _, token = await api.account()
    body = {"name": "www.example.com", "origins": ["http://o.example"], "access": ACCESS}
    reply = await api.call("POST", "/v1/domains", token, body)
    assert reply.status == 422 and reply.content_type == "application/problem+json"
    assert reply.body["errors"][0]["field"] == "access.signed_url.key"
    assert "the operator must set secret_key" in reply.body["detail"]
    assert not any(key in json.dumps(reply.body) for key in KEYS)
    assert await api.rows(domains) == []

    # Rules without keys need no secret_key.
    other = {k: v for k, v in ACCESS.items() if k != "signed_url"}
    made = await api.domain(token, "www.example.com", access=other)
    assert made["access"] == {k: v for k, v in NORMALISED.items() if k != "signed_url"}
    reply = await api.call(
        "PUT", "/v1/domains/www.example.com", token, {"origins": ["http://o"], "access": ACCESS}
    )
    assert reply.status == 422 and reply.body["errors"][0]["field"] == "access.signed_url.key"
    no_plaintext_key(await api.rows(domains) + await api.rows(changes))


# --- rows an older version wrote -------------------------------------------------------------


@pytest.fixture
async def legacy_rows(db: AsyncEngine) -> AsyncEngine:
    """A domain and its change as a version before encrypted keys stored them: in plaintext."""
    at = datetime.now(UTC)
    config = {"origins": ["http://origin.example:8080"], "access": NORMALISED}
    async with db.begin() as conn:
        account_id = (
            await conn.execute(
                insert(accounts)
                .values(name="acme", billing="postpaid", timezone="Asia/Shanghai",
                        state="active", created_at=at)
                .returning(accounts.c.id)
            )
        ).scalar_one()  # fmt: skip
        await conn.execute(
            insert(domains).values(
                account_id=account_id, name="old.example.com", config=config, state="active",
                state_reason="", created_at=at, updated_at=at,
            )
        )  # fmt: skip
        domain = {"name": "old.example.com", "state": "active", "reason": "", "config": config}
        await publish(conn, "purge", {"task": 0, "type": "domain", "items": []})  # version 1
        await publish(conn, "domain.upsert", {"domain": domain})
    return db


async def started(
    db: AsyncEngine, aiohttp_client: AiohttpClient, tmp: Path, **settings: Any
) -> Api:
    config = ControlConfig(
        source="test", admin_token=ADMIN_TOKEN, cname_suffix=CNAME_SUFFIX, heartbeat=1.0,
        change_log_keep=3600.0, log_dir=str(tmp / "logs"), **settings,
    )  # fmt: skip
    return Api(await aiohttp_client(make_app(config, db)), db)


async def test_plaintext_keys_stored_before_are_encrypted_at_startup(
    legacy_rows: AsyncEngine, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    api = await started(legacy_rows, aiohttp_client, tmp_path, secret_key=SECRET_KEY)
    no_plaintext_key(await api.rows(domains))
    no_plaintext_key(await api.rows(changes))
    snapshot, [published] = await edge_view(api, 1)
    assert snapshot["old.example.com"]["config"]["access"] == NORMALISED
    assert published["config"]["access"] == NORMALISED


async def test_without_secret_key_plaintext_keys_stored_before_keep_working(
    legacy_rows: AsyncEngine,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "control.signing_keys"):
        api = await started(legacy_rows, aiohttp_client, tmp_path)
    assert "1 domains and 1 changes hold signing keys in plaintext: set secret_key" in caplog.text
    assert not any(key in caplog.text for key in KEYS)
    [row] = await api.rows(domains)
    assert row.config["access"] == NORMALISED  # left as it was
    snapshot, [published] = await edge_view(api, 1)
    assert snapshot["old.example.com"]["config"]["access"] == NORMALISED
    assert published["config"]["access"] == NORMALISED


async def test_keys_sealed_under_another_secret_key_never_reach_edges_as_keys(
    api: Api, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    _, token = await api.account()
    await api.domain(token, "first.example.com")
    before = await api.version()
    await api.domain(token, "www.example.com", access=ACCESS)
    other = await started(api.engine, aiohttp_client, tmp_path, secret_key="x" * 40)
    # The domain is sent as stored: the edge's parser refuses it (the domain is absent there,
    # never served without its rule).
    snapshot, [published] = await edge_view(other, before)
    assert published == snapshot["www.example.com"]
    with pytest.raises(InvalidValue, match=r"access\.signed_url\.key"):
        parse_domain({"name": "www.example.com", **published["config"]}, "domain")
    # The account sees the mask, and may set new keys.
    seen = await other.ok("GET", "/v1/domains/www.example.com", token)
    assert seen["access"]["signed_url"]["key"] == MASK
    settings = {"origins": ["http://o"], "access": ACCESS}
    updated = await other.ok("PUT", "/v1/domains/www.example.com", token, settings)
    assert updated["access"] == NORMALISED
    snapshot, _ = await edge_view(other, before)
    assert snapshot["www.example.com"]["config"]["access"] == NORMALISED

