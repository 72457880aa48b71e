"""Who may call what, checked against every entry of the route table (so a new route is covered
the day it is added), on SQLite and PostgreSQL, over a real socket."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from control.api import Route
from control.app import ROUTES
from control.auth import SCOPES, hash_token
from control.openapi import EDGE_ROUTES
from control.schema import api_tokens
from tests.control.conftest import ADMIN_TOKEN, Api

# Every route's path with sample parameters; a refusal comes before any lookup, so they need
# not exist.
SAMPLE = {
    "id": "1",
    "name": "www.example.com",
    "domain": "www.example.com",
    "hour": "2026-11-26T10",
    "piece": "w0",
}


def concrete(route: Route) -> str:
    return re.sub(r"{(\w+)}", lambda m: SAMPLE[m[1]], route.path)


def refusing(kind: str) -> list[Route]:
    return [r for r in ROUTES if "public" not in r.who and kind not in r.who]


SCOPED = sorted({r.scope for r in ROUTES if r.scope is not None})


async def test_no_unknown_or_malformed_token_is_401_with_www_authenticate(api: Api) -> None:
    for token in (None, "cdn_acct_not-a-real-token"):
        reply = await api.call("GET", "/v1/domains", token)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert reply.content_type == "application/problem+json"
        assert reply.body["status"] == 401 and reply.body["type"] == "about:blank"
    async with api.client.get("/v1/accounts", headers={"Authorization": "Basic abc"}) as resp:
        assert resp.status == 401


async def test_every_non_operator_route_refuses_the_operator(api: Api) -> None:
    for route in refusing("operator"):
        reply = await api.call(route.method, concrete(route), ADMIN_TOKEN, {})
        assert reply.status == 403, route
        assert reply.content_type == "application/problem+json"


@pytest.mark.parametrize("kind", ["account", "subaccount", "edge"])
async def test_every_route_not_meant_for_a_token_kind_answers_403(api: Api, kind: str) -> None:
    _, account_token = await api.account()
    tokens = {
        "account": account_token,
        "subaccount": (await api.subaccount(account_token, list(SCOPES)))[1],
        "edge": (await api.edge())[1],
    }
    routes = refusing(kind) + ([] if kind == "edge" else list(EDGE_ROUTES))
    assert routes
    for route in routes:
        reply = await api.call(route.method, concrete(route), tokens[kind], {})
        assert reply.status == 403, (kind, route.method, route.path, reply.body)
        assert reply.content_type == "application/problem+json"
    # operator-only routes say so
    reply = await api.call("GET", "/v1/accounts", tokens[kind])
    assert "operator" in reply.body["detail"]


@pytest.mark.parametrize("scope", SCOPED)
async def test_a_sub_account_lacking_a_scope_is_refused_naming_it(api: Api, scope: str) -> None:
    _, account_token = await api.account()
    await api.domain(account_token, "www.example.com")
    _, sub_token = await api.subaccount(account_token, [s for s in SCOPES if s != scope])
    needing = [r for r in ROUTES if r.scope == scope and "subaccount" in r.who]
    assert needing
    for route in needing:
        reply = await api.call(route.method, concrete(route), sub_token, {})
        assert reply.status == 403, (route.method, route.path, reply.body)
        assert scope in reply.body["detail"] and reply.body["scope"] == scope
    # holding the scope is enough to get past the check (to the lookup or the body's validation)
    _, holder = await api.subaccount(account_token, [scope], name="holder")
    for route in needing:
        reply = await api.call(route.method, concrete(route), holder, {})
        assert reply.status != 403, (route.method, route.path, reply.body)


async def test_account_only_routes_refuse_sub_accounts_even_with_every_scope(api: Api) -> None:
    _, account_token = await api.account()
    _, sub_token = await api.subaccount(account_token, list(SCOPES))
    for route in (r for r in ROUTES if r.who == frozenset({"account"})):
        reply = await api.call(route.method, concrete(route), sub_token, {})
        assert reply.status == 403, route
        assert "account" in reply.body["detail"]


async def test_tokens_are_shown_once_and_stored_only_as_sha256(api: Api) -> None:
    _, account_token = await api.account()
    made = await api.ok("POST", "/v1/accounts/1/tokens", body={"label": "ci"}, status=201)
    _, sub_token = await api.subaccount(account_token, ["purge"])
    _, edge_token = await api.edge()
    shown = [account_token, made["token"], sub_token, edge_token]
    again = await api.call("POST", "/v1/accounts/1/tokens", body={})
    assert again.status == 201 and again.headers["Cache-Control"] == "no-store"
    assert [t.split("_")[1] for t in shown] == ["acct", "acct", "sub", "edge"]
    rows = await api.rows(api_tokens)
    stored = {row.token_hash for row in rows}
    assert {hash_token(t) for t in shown} <= stored
    # no column of any token row holds a token, and no listing shows one or its hash
    for row in rows:
        assert not any(t in str(value) for t in shown for value in row)
    listing = await api.ok("GET", "/v1/tokens", account_token)
    text = str(listing)
    assert not any(t in text for t in shown) and not any(h in text for h in stored)
    assert {t["kind"] for t in listing["tokens"]} == {"account", "subaccount"}


async def test_revocation_is_immediate(api: Api) -> None:
    _, account_token = await api.account()
    _, sub_token = await api.subaccount(account_token, ["domains:read"])
    assert (await api.call("GET", "/v1/domains", sub_token)).status == 200
    async with api.engine.connect() as conn:
        sub_id = (
            await conn.execute(
                select(api_tokens.c.id).where(api_tokens.c.token_hash == hash_token(sub_token))
            )
        ).scalar_one()
    assert (await api.call("DELETE", f"/v1/tokens/{sub_id}", account_token)).status == 204
    assert (await api.call("GET", "/v1/domains", sub_token)).status == 401
    # an account may revoke the very token it calls with
    listing = await api.ok("GET", "/v1/tokens", account_token)
    own_id = next(t["id"] for t in listing["tokens"] if t["kind"] == "account")
    assert (await api.call("DELETE", f"/v1/tokens/{own_id}", account_token)).status == 204
    assert (await api.call("GET", "/v1/tokens", account_token)).status == 401


async def test_another_accounts_token_is_404_like_a_missing_one(api: Api) -> None:
    _, first = await api.account("first")
    _, second = await api.account("second")
    listing = await api.ok("GET", "/v1/tokens", first)
    theirs = listing["tokens"][0]["id"]
    other = await api.call("DELETE", f"/v1/tokens/{theirs}", second)
    missing = await api.call("DELETE", "/v1/tokens/999999", second)
    assert other.status == missing.status == 404
    assert (await api.call("GET", "/v1/tokens", first)).status == 200


async def test_deleted_edges_and_sub_accounts_lose_their_tokens(api: Api) -> None:
    _, account_token = await api.account()
    sub_id, sub_token = await api.subaccount(account_token, ["domains:read"])
    edge_id, edge_token = await api.edge()
    assert (await api.call("GET", "/v1/edge/snapshot", edge_token)).status == 200
    assert (await api.call("DELETE", f"/v1/subaccounts/{sub_id}", account_token)).status == 204
    assert (await api.call("DELETE", f"/v1/edges/{edge_id}")).status == 204
    assert (await api.call("GET", "/v1/domains", sub_token)).status == 401
    assert (await api.call("GET", "/v1/edge/snapshot", edge_token)).status == 401


async def test_ids_beyond_the_column_range_and_non_numbers_are_plain_404s(api: Api) -> None:
    for path in ("/v1/accounts/99999999999999999999", "/v1/accounts/abc"):
        reply = await api.call("GET", path)
        assert reply.status == 404
        assert reply.content_type == "application/problem+json"


async def test_a_wrong_method_is_405_problem(api: Api) -> None:
    reply = await api.call("PATCH", "/v1/accounts")
    assert reply.status == 405
    assert reply.content_type == "application/problem+json"
