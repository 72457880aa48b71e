"""Notices and their webhook deliveries, on both backends, with a real webhook receiver on a
socket: signatures, retries, redirects, the secret's handling, and who may see what."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from aiohttp import web

from control.config import ORIGIN_DENY, parse_config
from control.notices import DELIVERIES, NOTICE_KINDS, notify
from control.schema import account_webhooks, audit_log
from edge.config import ConfigError
from edge.netguard import DenyingResolver
from tests.control.conftest import Api

SECRET_KEY = "test-secret-key-0123456789abcdefghijklmnop"
T = TypeVar("T")


@pytest.fixture
def api_settings() -> dict[str, Any]:
    """A secret_key, and no origin_deny: the receiver listens on 127.0.0.1."""
    return {"secret_key": SECRET_KEY, "origin_deny": ()}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook endpoint answering `statuses` in turn (then 200); a 3xx points elsewhere."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(Hit(request.path, dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return web.Response(status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield found
    finally:
        await runner.cleanup()


async def until(check: Callable[[], Awaitable[T | None]], timeout: float = 10.0) -> T:
    """The first truthy value of `check`, polled every 20 ms."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def record(
    api: Api, account_id: int, kind: str = "balance_low", key: str | None = None
) -> int | None:
    async with api.engine.begin() as conn:
        return await notify(
            conn, account_id, kind, {"balance": 1234}, datetime.now(UTC), dedupe_key=key
        )


async def listed(api: Api, token: str, query: str = "") -> list[dict[str, Any]]:
    notices: list[dict[str, Any]] = (await api.ok("GET", f"/v1/notices{query}", token))["notices"]
    return notices


async def delivery(api: Api, token: str, notice_id: int) -> dict[str, Any]:
    [notice] = [n for n in await listed(api, token) if n["id"] == notice_id]
    [found] = notice["deliveries"]
    return dict(found)


async def set_webhook(api: Api, token: str, url: str) -> str:
    answer = await api.ok("PUT", "/v1/webhook", token, {"url": url}, status=200)
    assert answer["url"] == url
    return str(answer["secret"])


# --- notify ---------------------------------------------------------------------------------------


async def test_notify_records_once_per_dedupe_key(api: Api) -> None:
    account_id, token = await api.account()
    first = await record(api, account_id, "arrears", key="2026-03-14")
    assert first is not None
    assert await record(api, account_id, "arrears", key="2026-03-14") is None
    assert await record(api, account_id, "arrears", key="2026-03-15") is not None
    assert await record(api, account_id, "suspended", key="2026-03-14") is not None
    without_key = [await record(api, account_id, "resumed") for _ in range(2)]
    assert None not in without_key

    notices = await listed(api, token)
    assert [n["kind"] for n in notices] == ["arrears", "arrears", "suspended", "resumed", "resumed"]
    assert notices[0] == {
        "id": first,
        "account": account_id,
        "kind": "arrears",
        "detail": {"balance": 1234},
        "created_at": notices[0]["created_at"],
        "deliveries": [],  # no webhook set
    }
    with pytest.raises(ValueError, match="unknown notice kind"):
        await record(api, account_id, "lunch")


async def test_notices_page_oldest_first(api: Api) -> None:
    account_id, token = await api.account()
    ids = [await record(api, account_id, kind) for kind in NOTICE_KINDS[:3]]
    assert [n["id"] for n in await listed(api, token, "?limit=2")] == ids[:2]
    assert [n["id"] for n in await listed(api, token, f"?since_id={ids[1]}")] == ids[2:]
    for bad in ("?limit=0", "?limit=x", "?since_id=-1"):
        assert (await api.call("GET", f"/v1/notices{bad}", token)).status == 400


# --- delivery -------------------------------------------------------------------------------------


async def test_receiver_gets_a_body_signed_with_the_secret_shown_once(
    api: Api, receiver: Receiver
) -> None:
    account_id, token = await api.account()
    secret = await set_webhook(api, token, receiver.url)
    notice_id = await record(api, account_id, "package_90")
    assert notice_id is not None

    # Well within the 5 s poll: notify wakes the sender once its transaction commits.
    await until(lambda: _some(receiver.hits), timeout=3.0)
    [hit] = receiver.hits
    expected = hmac.new(secret.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["X-CDN-Signature"] == f"sha256={expected}"
    assert hit.headers["X-CDN-Notice-Id"] == str(notice_id)
    assert hit.headers["Content-Type"] == "application/json"
    assert "Cookie" not in hit.headers
    body = json.loads(hit.body)
    assert body == {
        "id": notice_id,
        "kind": "package_90",
        "account": account_id,
        "detail": {"balance": 1234},
        "created_at": body["created_at"],
    }
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None

    done = await until(lambda: _delivered(api, token, notice_id))
    assert done["attempts"] == 1 and done["last_status"] == 200 and done["url"] == receiver.url
    assert done["next_attempt_at"] is None and done["last_error"] == ""


async def test_failures_are_retried_with_backoff_until_delivered(
    api: Api, receiver: Receiver
) -> None:
    api.app[DELIVERIES].backoff = 0.05
    account_id, token = await api.account()
    await set_webhook(api, token, receiver.url)
    receiver.statuses = [500, 500]
    notice_id = await record(api, account_id)
    assert notice_id is not None

    done = await until(lambda: _delivered(api, token, notice_id))
    assert len(receiver.hits) == 3
    assert len({hit.body for hit in receiver.hits}) == 1  # the same notice each time
    assert done["attempts"] == 3 and done["last_status"] == 200 and done["last_error"] == ""


async def test_a_failing_receiver_is_given_up_after_the_last_attempt(
    api: Api, receiver: Receiver
) -> None:
    deliveries = api.app[DELIVERIES]
    deliveries.backoff = 0.01
    deliveries.MAX_ATTEMPTS = 3
    account_id, token = await api.account()
    await set_webhook(api, token, receiver.url)
    receiver.statuses = [503] * 10
    notice_id = await record(api, account_id)
    assert notice_id is not None

    async def failed() -> dict[str, Any] | None:
        found = await delivery(api, token, notice_id)
        return found if found["state"] == "failed" else None

    gone = await until(failed)
    assert gone["attempts"] == 3 and gone["last_status"] == 503 and gone["last_error"] == "HTTP 503"
    assert gone["next_attempt_at"] is None and gone["delivered_at"] is None
    assert len(receiver.hits) == 3


async def test_redirects_are_not_followed(api: Api, receiver: Receiver) -> None:
    account_id, token = await api.account()
    await set_webhook(api, token, receiver.url)
    receiver.statuses = [302]
    notice_id = await record(api, account_id)
    assert notice_id is not None

    async def tried() -> dict[str, Any] | None:
        found = await delivery(api, token, notice_id)
        return found if found["attempts"] == 1 else None

    pending = await until(tried)
    assert pending["state"] == "pending"  # retried later, after 30 s
    assert pending["last_status"] == 302 and pending["last_error"] == "HTTP 302"
    assert [hit.path for hit in receiver.hits] == ["/hook"]


async def test_the_secret_is_neither_stored_in_clear_nor_logged(
    api: Api, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.app[DELIVERIES].backoff = 0.05
    account_id, token = await api.account()
    secret = await set_webhook(api, token, receiver.url)
    receiver.statuses = [500]  # a failure is logged too
    notice_id = await record(api, account_id)
    assert notice_id is not None
    await until(lambda: _delivered(api, token, notice_id))

    [stored] = await api.rows(account_webhooks)
    assert secret not in stored.secret_encrypted
    assert secret.encode() not in stored.secret_encrypted.encode()
    assert all(secret not in repr(row) for row in await api.rows(audit_log))
    shown = await api.call("GET", "/v1/webhook", token)
    assert shown.body["url"] == receiver.url and secret not in json.dumps(shown.body)
    assert "notice" in caplog.text  # the failure was logged...
    assert secret not in caplog.text  # ...without the secret


async def test_replacing_and_removing_the_webhook(api: Api, receiver: Receiver) -> None:
    account_id, token = await api.account()
    assert (await api.call("GET", "/v1/webhook", token)).status == 404
    first = await set_webhook(api, token, "https://hooks.example/a")
    second = await set_webhook(api, token, receiver.url)
    assert first != second
    shown = await api.ok("GET", "/v1/webhook", token)
    assert shown["url"] == receiver.url and shown["updated_at"] >= shown["created_at"]

    receiver.statuses = [500]  # stays pending (the next try is 30 s away)
    notice_id = await record(api, account_id)
    assert notice_id is not None

    async def tried() -> dict[str, Any] | None:
        found = await delivery(api, token, notice_id)
        return found if found["attempts"] == 1 else None

    await until(tried)
    assert (await api.call("DELETE", "/v1/webhook", token)).status == 204
    gone = await delivery(api, token, notice_id)
    assert gone["state"] == "failed" and gone["last_error"] == "webhook removed"
    assert (await api.call("GET", "/v1/webhook", token)).status == 404
    assert (await api.call("DELETE", "/v1/webhook", token)).status == 404
    # without a webhook, notices are still recorded, with no delivery
    later = await record(api, account_id)
    assert [n["deliveries"] for n in await listed(api, token) if n["id"] == later] == [[]]
    actions = [row.action for row in await api.rows(audit_log) if row.account_id == account_id]
    assert actions.count("webhook.set") == 2 and actions.count("webhook.delete") == 1


# --- who may see and set what ---------------------------------------------------------------------


async def test_an_account_sees_only_its_own_notices(api: Api) -> None:
    mine, my_token = await api.account("mine")
    other, other_token = await api.account("other")
    my_notice = await record(api, mine)
    other_notice = await record(api, other)
    assert [n["id"] for n in await listed(api, my_token)] == [my_notice]
    assert [n["id"] for n in await listed(api, other_token)] == [other_notice]
    # ...and the operator sees any account's
    seen = await api.ok("GET", f"/v1/accounts/{other}/notices")
    assert [n["id"] for n in seen["notices"]] == [other_notice]
    assert (await api.call("GET", "/v1/accounts/99999/notices")).status == 404
    assert (await api.call("GET", "/v1/notices")).status == 403  # the operator has no account
    assert (await api.call("GET", f"/v1/accounts/{mine}/notices", my_token)).status == 403


async def test_subaccounts_need_billing_read_and_never_set_webhooks(api: Api) -> None:
    account_id, token = await api.account()
    notice_id = await record(api, account_id)
    _, reader = await api.subaccount(token, ["billing:read"], name="reader")
    _, other = await api.subaccount(token, ["domains:read", "usage:read"], name="other")
    assert [n["id"] for n in await listed(api, reader)] == [notice_id]
    refused = await api.call("GET", "/v1/notices", other)
    assert refused.status == 403 and "billing:read" in refused.body["detail"]
    for method, body in (("PUT", {"url": "https://hooks.example/"}), ("GET", None)):
        assert (await api.call(method, "/v1/webhook", reader, body)).status == 403


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example/",
        "hooks.example/path",
        "https://",
        "https://user:pw@hooks.example/",
        "https://hooks.example/a b",
        "",
        42,
    ],
)
async def test_a_bad_webhook_url_is_a_422_naming_url(api: Api, url: Any) -> None:
    _, token = await api.account()
    reply = await api.call("PUT", "/v1/webhook", token, {"url": url})
    assert reply.status == 422, reply
    assert [e["field"] for e in reply.body["errors"]] == ["url"]
    assert (await api.call("GET", "/v1/webhook", token)).status == 404


@pytest.mark.parametrize("api_settings", [{"secret_key": SECRET_KEY}])
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hook", "https://localhost/", "http://[::1]/"]
)
async def test_webhooks_at_denied_addresses_are_refused(api: Api, url: str) -> None:
    _, token = await api.account()
    reply = await api.call("PUT", "/v1/webhook", token, {"url": url})
    assert reply.status == 422 and reply.body["errors"][0]["field"] == "url"
    assert "origin_deny" in reply.body["detail"]


async def test_names_resolving_only_to_denied_addresses_are_not_connected_to() -> None:
    resolver = DenyingResolver(ORIGIN_DENY)
    try:
        with pytest.raises(OSError, match="origin_deny"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


@pytest.mark.parametrize("api_settings", [{"origin_deny": ()}])
async def test_without_secret_key_setting_a_webhook_is_a_409(api: Api) -> None:
    _, token = await api.account()
    reply = await api.call("PUT", "/v1/webhook", token, {"url": "https://hooks.example/"})
    assert reply.status == 409
    assert reply.body["detail"] == "the operator has not configured secret_key"
    assert (await api.call("GET", "/v1/webhook", token)).status == 404


async def test_the_routes_are_in_the_openapi_document(api: Api) -> None:
    paths = (await api.ok("GET", "/v1/openapi.json", None))["paths"]
    assert set(paths["/v1/webhook"]) >= {"put", "get", "delete"}
    assert "get" in paths["/v1/notices"] and "get" in paths["/v1/accounts/{id}/notices"]


# --- config ---------------------------------------------------------------------------------------

_CONFIG = '[control]\nadmin_token = "t"\ncname_suffix = "cdn.test"\n'


def test_secret_key_comes_from_the_file_or_the_environment() -> None:
    from_file = parse_config(_CONFIG + f'secret_key = "{SECRET_KEY}"\n', "c.toml", env={})
    assert from_file.secret_key == SECRET_KEY
    assert SECRET_KEY not in repr(from_file)
    from_env = parse_config(_CONFIG, "c.toml", env={"CDN_SECRET_KEY": SECRET_KEY})
    assert from_env.secret_key == SECRET_KEY
    assert parse_config(_CONFIG, "c.toml", env={}).secret_key == ""
    with pytest.raises(ConfigError, match="secret_key"):
        parse_config(_CONFIG + 'secret_key = "short"\n', "c.toml", env={})


# --- helpers --------------------------------------------------------------------------------------


async def _some(items: list[Hit]) -> list[Hit]:
    return items


async def _delivered(api: Api, token: str, notice_id: int) -> dict[str, Any] | None:
    found = await delivery(api, token, notice_id)
    return found if found["state"] == "delivered" else None
