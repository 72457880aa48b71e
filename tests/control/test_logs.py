"""Access logs at the control plane (issue 6): edges' uploads, customers' listing and download,
isolation between accounts, the operator's export and legal holds, retention and delete requests
on a controllable clock."""

from __future__ import annotations

import asyncio
import base64
import errno
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import tracemalloc
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient

from control.app import RETENTION, make_app
from control.config import load_config
from control.db import engine_for, migrate
from control.logrules import floor_hour, passes
from control.logs import LOG_SETTINGS, LOG_STORE, enforce_retention
from control.scheduler import CLOCK
from control.schema import audit_log, log_deletions, log_pieces
from tests.control.conftest import ADMIN_TOKEN, Api

ROOT = Path(__file__).resolve().parents[2]
H = datetime(2026, 5, 1, 10, tzinfo=UTC)  # a closed hour
NOW = datetime(2026, 11, 26, 13, 30, tzinfo=UTC)
HOUR = timedelta(hours=1)


def hour_name(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


def lines(domain: str, hour: datetime, tag: str, count: int = 3) -> list[bytes]:
    return [
        json.dumps(
            {"time": (hour + timedelta(seconds=i)).isoformat(), "domain": domain, "url": f"/{tag}"}
        ).encode()
        + b"\n"
        for i in range(count)
    ]


def gz(content: list[bytes]) -> bytes:
    return gzip.compress(b"".join(content))


def digest(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


@dataclass
class Raw:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw(
    api: Api, method: str, path: str, token: str | None, body: Any = None, **kwargs: Any
) -> Raw:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    if body is not None:
        kwargs["json"] = body
    async with api.client.request(method, path, headers=headers, **kwargs) as resp:
        return Raw(resp.status, resp.headers, await resp.read())


class Edge:
    def __init__(self, api: Api, token: str) -> None:
        self.api, self.token = api, token

    async def put(
        self,
        domain: str,
        hour: datetime | str,
        piece: str,
        body: bytes,
        *,
        content_digest: str | None = None,
        token: str | None = None,
    ) -> Raw:
        name = hour if isinstance(hour, str) else hour_name(hour)
        headers = {
            "Content-Type": "application/gzip",
            "Content-Digest": content_digest if content_digest is not None else digest(body),
        }
        return await raw(
            self.api,
            "PUT",
            f"/v1/edge/logs/{domain}/{name}/{piece}",
            token or self.token,
            data=body,
            headers=headers,
        )


async def edge(api: Api, name: str = "edge-1") -> Edge:
    _, token = await api.edge(name)
    return Edge(api, token)


@pytest.fixture
async def acme(api: Api) -> tuple[int, str]:
    api.app[CLOCK].set(NOW)
    account_id, token = await api.account("acme")
    await api.domain(token, "a.example")
    await api.domain(token, "b.example")
    return account_id, token


async def listing(api: Api, token: str, domain: str, start: datetime, end: datetime) -> Any:
    query = urlencode({"domain": domain, "from": start.isoformat(), "to": end.isoformat()})
    return await api.call("GET", f"/v1/logs?{query}", token)


async def download(api: Api, token: str, domain: str, hour: datetime) -> Raw:
    return await raw(api, "GET", f"/v1/logs/{domain}/{hour_name(hour)}", token)


def stored_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "logs"
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and ".staging" not in p.parts
    )


def staged_files(tmp_path: Path) -> list[str]:
    staging = tmp_path / "logs" / ".staging"
    return sorted(os.listdir(staging)) if staging.exists() else []


async def tick(api: Api) -> None:
    await api.app[RETENTION].tick()


# --- upload ---------------------------------------------------------------------------------------


async def test_round_trip_upload_list_download(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    """Two edges, three pieces of one hour: the list shows one hour, the download is the pieces'
    gzip members concatenated, which decodes to every line."""
    _, token = acme
    e1, e2 = await edge(api, "edge-1"), await edge(api, "edge-2")
    parts = [
        (e1, "w0", lines("a.example", H, "e1w0")),
        (e1, "w1", lines("a.example", H, "e1w1", 5)),
        (e2, "w0", lines("a.example", H, "e2w0", 1)),
    ]
    bodies = [gz(content) for _, _, content in parts]
    for (e, piece, _), body in zip(parts, bodies, strict=True):
        put = await e.put("a.example", H, piece, body)
        assert put.status == 201, put.body
        ack = put.json()
        assert ack["duplicate"] is False
        assert ack["piece"]["sha256"] == hashlib.sha256(body).hexdigest()
        assert ack["piece"]["size"] == len(body)
    await e1.put("a.example", H + HOUR, "w0", gz(lines("a.example", H + HOUR, "next")))

    reply = await listing(api, token, "a.example", H, H + 2 * HOUR)
    assert reply.status == 200
    assert reply.body["retention_days"] == 180
    first, second = reply.body["hours"]
    assert first["hour"] == "2026-05-01T10"
    assert (first["pieces"], first["size"]) == (3, sum(map(len, bodies)))
    assert first["download"] == "/v1/logs/a.example/2026-05-01T10"
    assert (second["hour"], second["pieces"]) == ("2026-05-01T11", 1)
    # only hours starting in [from, to)
    only = await listing(api, token, "a.example", H + timedelta(minutes=1), H + 2 * HOUR)
    assert [h["hour"] for h in only.body["hours"]] == ["2026-05-01T11"]

    got = await download(api, token, "a.example", H)
    assert got.status == 200
    assert got.headers["Content-Type"] == "application/gzip"
    assert got.headers["Content-Disposition"] == (
        'attachment; filename="a.example_2026-05-01T10.jsonl.gz"'
    )
    assert got.body == b"".join(bodies)  # edge-1 w0, w1, then edge-2 w0
    assert gzip.decompress(got.body) == b"".join(b"".join(c) for _, _, c in parts)
    assert len(stored_files(tmp_path)) == 4 and staged_files(tmp_path) == []


async def test_a_retry_is_200_and_a_conflicting_one_409(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    _, token = acme
    e = await edge(api)
    body = gz(lines("a.example", H, "one"))
    assert (await e.put("a.example", H, "w0", body)).status == 201
    again = await e.put("a.example", H, "w0", body)
    assert again.status == 200 and again.json()["duplicate"] is True
    other = await e.put("a.example", H, "w0", gz(lines("a.example", H, "two")))
    assert other.status == 409
    assert other.headers["Content-Type"] == "application/problem+json"
    assert "another digest" in other.json()["detail"]
    # another edge's piece of the same name is its own
    assert (await (await edge(api, "edge-2")).put("a.example", H, "w0", body)).status == 201
    got = await download(api, token, "a.example", H)
    assert got.body == body + body
    assert len(await api.rows(log_pieces)) == 2 and staged_files(tmp_path) == []


async def test_concurrent_retries_store_once(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    e = await edge(api)
    body = gz(lines("a.example", H, "same", 200))
    replies = await asyncio.gather(*(e.put("a.example", H, "w3", body) for _ in range(5)))
    assert sorted(r.status for r in replies) == [200, 200, 200, 200, 201]
    [row] = await api.rows(log_pieces)
    assert (row.size, row.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert len(stored_files(tmp_path)) == 1 and staged_files(tmp_path) == []


async def test_bad_digest_hour_piece_and_token(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    e = await edge(api)
    body = gz(lines("a.example", H, "x"))
    damaged = await e.put("a.example", H, "w0", body, content_digest=digest(body + b"!"))
    assert damaged.status == 400 and "does not match" in damaged.json()["detail"]
    missing = await e.put("a.example", H, "w0", body, content_digest="")
    assert missing.status == 400 and "Content-Digest" in missing.json()["detail"]
    malformed = await e.put("a.example", H, "w0", body, content_digest="sha-256=abc")
    assert malformed.status == 400
    assert (await e.put("a.example", "2026-05-01T24", "w0", body)).status == 400
    assert (await e.put("a.example", "2026-05-01", "w0", body)).status == 400
    assert (await e.put("a.example", H, "w" * 65, body)).status == 400
    assert (await e.put("a b", H, "w0", body)).status == 400
    assert (await e.put("a.example", H, "w0", body, token="cdn_edge_unknown")).status == 401
    _, account_token = acme
    assert (await e.put("a.example", H, "w0", body, token=account_token)).status == 403
    assert await api.rows(log_pieces) == []
    assert stored_files(tmp_path) == [] and staged_files(tmp_path) == []
    # after all that, the right upload is stored
    assert (await e.put("a.example", H, "w0", body)).status == 201


async def test_a_big_body_streams_past_client_max_size(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    """24 MiB, sent in chunks with a Content-Length: aiohttp's 8 MiB client_max_size does not
    apply to the upload, the control plane never holds it whole (Python's allocations during
    the upload peak far below its size), and the bytes come back identical."""
    _, token = acme
    e = await edge(api)
    chunk = os.urandom(256 * 1024)
    count = 96
    body = chunk * count

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    headers = {
        "Content-Type": "application/gzip",
        "Content-Digest": digest(body),
        "Content-Length": str(len(body)),
    }
    tracemalloc.start()
    try:
        put = await raw(
            api, "PUT", f"/v1/edge/logs/a.example/{hour_name(H)}/w0", e.token,
            data=chunks(), headers=headers,
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert put.status == 201, put.body
    assert peak < len(body) // 4, peak
    got = await download(api, token, "a.example", H)
    assert got.status == 200 and int(got.headers["Content-Length"]) == len(body)
    assert got.body == body


@pytest.mark.parametrize("api_settings", [{"log_max_upload": 1024 * 1024}])
async def test_larger_than_log_max_upload_is_413(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    e = await edge(api)
    body = os.urandom(1024 * 1024 + 1)
    declared = await e.put("a.example", H, "w0", body)
    assert declared.status == 413
    assert "log_max_upload" in declared.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = {"Content-Digest": digest(body)}
    streamed = await raw(
        api, "PUT", f"/v1/edge/logs/a.example/{hour_name(H)}/w0", e.token,
        data=chunks(), headers=headers,
    )  # fmt: skip
    assert streamed.status == 413
    assert await api.rows(log_pieces) == []
    assert staged_files(tmp_path) == []
    exact = body[:-1]
    assert (await e.put("a.example", H, "w0", exact)).status == 201


# --- who sees what --------------------------------------------------------------------------------


async def test_isolation_between_accounts_and_sub_accounts(
    api: Api, acme: tuple[int, str]
) -> None:
    _, token = acme
    e = await edge(api)
    body = gz(lines("a.example", H, "x"))
    await e.put("a.example", H, "w0", body)
    await e.put("b.example", H, "w0", gz(lines("b.example", H, "y")))
    _, other = await api.account("other")
    span = (H, H + HOUR)

    missing = await listing(api, other, "nowhere.example", *span)
    theirs = await listing(api, other, "a.example", *span)
    assert missing.status == theirs.status == 404
    assert theirs.body["detail"] == "no domain 'a.example'"
    assert (await download(api, other, "a.example", H)).status == 404

    _, no_scope = await api.subaccount(token, ["usage:read"], name="no-logs")
    denied = await listing(api, no_scope, "a.example", *span)
    assert denied.status == 403 and denied.body["scope"] == "logs:read"
    assert (await download(api, no_scope, "a.example", H)).status == 403

    _, limited = await api.subaccount(token, ["logs:read"], ["b.example"], name="b-only")
    assert (await listing(api, limited, "a.example", *span)).status == 404
    assert (await download(api, limited, "a.example", H)).status == 404
    assert (await listing(api, limited, "b.example", *span)).status == 200

    _, reader = await api.subaccount(token, ["logs:read"], name="reader")
    assert (await download(api, reader, "a.example", H)).body == body
    # an hour without logs, and a malformed hour
    assert (await download(api, token, "a.example", H + HOUR)).status == 404
    assert (await raw(api, "GET", "/v1/logs/a.example/yesterday", token)).status == 404


async def test_pieces_stay_with_the_owner_at_arrival_and_unowned_ones_with_the_operator(
    api: Api, acme: tuple[int, str]
) -> None:
    _, token = acme
    e = await edge(api)
    owned = gz(lines("a.example", H, "acme"))
    await e.put("a.example", H, "w0", owned)
    await api.ok("DELETE", "/v1/domains/a.example", token, status=204)
    _, other = await api.account("other")
    await api.domain(other, "a.example")  # registered by someone else afterwards
    later = gz(lines("a.example", H, "other"))
    await e.put("a.example", H, "w1", later)
    unowned = gz(lines("gone.example", H, "nobody"))
    await e.put("gone.example", H, "w0", unowned)
    unrouted = gz(lines("_", H, "nobody"))
    await e.put("_", H, "w0", unrouted)

    assert (await download(api, token, "a.example", H)).body == owned  # still acme's
    assert (await download(api, other, "a.example", H)).body == later
    assert (await download(api, token, "gone.example", H)).status == 404
    assert (await download(api, token, "_", H)).status == 404
    assert (await listing(api, token, "_", H, H + HOUR)).status == 404
    # the operator sees every piece
    assert (await download(api, ADMIN_TOKEN, "a.example", H)).body == owned + later
    assert (await download(api, ADMIN_TOKEN, "gone.example", H)).body == unowned
    assert (await download(api, ADMIN_TOKEN, "_", H)).body == unrouted
    listed = await listing(api, ADMIN_TOKEN, "_", H, H + HOUR)
    assert listed.body["retention_days"] is None and listed.body["hours"][0]["pieces"] == 1


# --- retention and legal holds ------------------------------------------------------------------


async def test_retention_deletes_an_hour_the_day_it_passes(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    account_id, token = acme
    e = await edge(api)
    await e.put("a.example", H, "w0", gz(lines("a.example", H, "old")))
    await e.put("a.example", H + HOUR, "w0", gz(lines("a.example", H + HOUR, "newer")))
    await e.put("gone.example", H, "w0", gz(lines("gone.example", H, "unowned")))
    clock = api.app[CLOCK]
    clock.set(passes(H, 180) - timedelta(microseconds=1))
    await tick(api)
    assert len(await api.rows(log_pieces)) == 3
    clock.set(passes(H, 180))
    await tick(api)
    rows = await api.rows(log_pieces)
    assert [(r.domain, r.hour) for r in rows] == [("a.example", H + HOUR)]
    assert stored_files(tmp_path) == ["a.example/2026-05-01T11/1-w0.gz"]
    assert (await download(api, token, "a.example", H)).status == 404
    await tick(api)  # again: nothing more
    assert len(await api.rows(log_pieces)) == 1

    # an account kept longer: the operator raises its retention, never below the floor
    low = await api.call(
        "PUT", f"/v1/accounts/{account_id}/log-retention", body={"days": 179}
    )
    assert low.status == 422 and "at least 180" in low.body["detail"]
    assert (
        await api.call("PUT", f"/v1/accounts/{account_id}/log-retention", token, {"days": 400})
    ).status == 403
    set_ = await api.ok("PUT", f"/v1/accounts/{account_id}/log-retention", body={"days": 365})
    assert set_ == {"account": account_id, "days": 365, "floor_days": 180}
    clock.set(passes(H + HOUR, 364))
    await tick(api)
    assert len(await api.rows(log_pieces)) == 1
    listed = await listing(api, token, "a.example", H, H + 2 * HOUR)
    assert listed.body["retention_days"] == 365
    clock.set(passes(H + HOUR, 365))
    await tick(api)
    assert await api.rows(log_pieces) == [] and stored_files(tmp_path) == []
    [entry] = [r for r in await api.rows(audit_log) if r.action == "log.retention"]
    assert (entry.account_id, entry.detail) == (account_id, {"days": 365})


async def test_a_legal_hold_stops_deletion_until_lifted(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    _, token = acme
    e = await edge(api)
    await e.put("a.example", H, "w0", gz(lines("a.example", H, "held")))
    await e.put("b.example", H, "w0", gz(lines("b.example", H, "not held")))
    hold = {"domain": "a.example", "reason": "Public Security Bureau request 2026-117"}
    made = await api.ok("POST", "/v1/log-holds", body=hold, status=201)
    assert (made["domain"], made["reason"], made["set_by"]) == (
        "a.example", hold["reason"], "operator"
    )  # fmt: skip
    assert (await api.call("POST", "/v1/log-holds", body=hold)).status == 409
    assert (await api.call("POST", "/v1/log-holds", token, hold)).status == 403
    assert (await api.ok("GET", "/v1/log-holds"))["holds"] == [made]

    api.app[CLOCK].set(passes(H, 200))
    await tick(api)
    assert [r.domain for r in await api.rows(log_pieces)] == ["a.example"]
    assert (await download(api, token, "a.example", H)).status == 200

    await api.ok("DELETE", "/v1/log-holds/a.example", status=204)
    assert (await api.call("DELETE", "/v1/log-holds/a.example")).status == 404
    await tick(api)
    assert await api.rows(log_pieces) == [] and stored_files(tmp_path) == []
    audited = [(r.action, r.account_id, r.target) for r in await api.rows(audit_log)]
    assert ("log.hold", None, "a.example") in audited
    assert ("log.hold.lift", None, "a.example") in audited


# --- delete requests (6.2) ------------------------------------------------------------------------


async def test_a_delete_request_deletes_past_the_floor_now_and_the_rest_later(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    account_id, token = acme
    await api.ok("PUT", f"/v1/accounts/{account_id}/log-retention", body={"days": 3650})
    e = await edge(api)
    old, recent = NOW - timedelta(days=200), NOW - timedelta(days=10)
    old_h, recent_h = old.replace(minute=0), recent.replace(minute=0)
    await e.put("a.example", old_h, "w0", gz(lines("a.example", old_h, "old")))
    await e.put("a.example", recent_h, "w0", gz(lines("a.example", recent_h, "recent")))
    await e.put("b.example", old_h, "w0", gz(lines("b.example", old_h, "other domain")))

    _, sub = await api.subaccount(token, ["logs:read"])
    assert (await api.call("POST", "/v1/logs/delete", sub, {"domain": "a.example"})).status == 403
    _, other = await api.account("other")
    assert (
        await api.call("POST", "/v1/logs/delete", other, {"domain": "a.example"})
    ).status == 404

    done = await api.ok("POST", "/v1/logs/delete", token, {"domain": "a.example"})
    assert (done["deleted_pieces"], done["scheduled_pieces"]) == (1, 1)
    assert done["from"] == old_h.isoformat(timespec="microseconds")
    assert done["to"] == NOW.replace(minute=0).isoformat(timespec="microseconds")
    complete_at = passes(NOW.replace(minute=0) - HOUR, 180)
    assert datetime.fromisoformat(done["complete_at"]) == complete_at
    assert sorted((r.domain, r.hour) for r in await api.rows(log_pieces)) == [
        ("a.example", recent_h), ("b.example", old_h)
    ]  # fmt: skip

    # the scheduled part goes the day it passes the floor
    api.app[CLOCK].set(passes(recent_h, 180) - timedelta(seconds=1))
    await tick(api)
    assert len(await api.rows(log_pieces)) == 2
    api.app[CLOCK].set(passes(recent_h, 180))
    await tick(api)
    assert [(r.domain, r.hour) for r in await api.rows(log_pieces)] == [("b.example", old_h)]
    [request] = await api.rows(log_deletions)
    assert request.done_at is None  # its range ends later
    api.app[CLOCK].set(complete_at)
    await tick(api)
    [request] = await api.rows(log_deletions)
    assert request.done_at == complete_at
    assert stored_files(tmp_path) == [f"b.example/{hour_name(old_h)}/1-w0.gz"]

    audited = [r for r in await api.rows(audit_log) if r.action.startswith("log.delete")]
    assert [(r.action, r.account_id) for r in audited] == [
        ("log.delete", account_id), ("log.delete.scheduled", account_id)
    ]  # fmt: skip
    assert audited[0].detail["deleted_pieces"] == 1
    assert audited[1].detail == {"request": request.id, "deleted_pieces": 1}


async def test_a_delete_request_under_a_legal_hold_is_refused(
    api: Api, acme: tuple[int, str]
) -> None:
    account_id, token = acme
    await api.ok("PUT", f"/v1/accounts/{account_id}/log-retention", body={"days": 3650})
    e = await edge(api)
    old_h = (NOW - timedelta(days=200)).replace(minute=0)
    await e.put("a.example", old_h, "w0", gz(lines("a.example", old_h, "old")))
    await api.ok("POST", "/v1/log-holds", body={"domain": "a.example", "reason": "court order"})
    refused = await api.call("POST", "/v1/logs/delete", token, {"domain": "a.example"})
    assert refused.status == 409 and "legal hold" in refused.body["detail"]
    assert len(await api.rows(log_pieces)) == 1 and await api.rows(log_deletions) == []
    bad = await api.call("POST", "/v1/logs/delete", token, {"domain": "a.example", "to": "x"})
    assert bad.status == 400


# --- the operator's export ------------------------------------------------------------------------


async def test_export_is_a_tar_of_every_piece_and_is_audited(
    api: Api, acme: tuple[int, str]
) -> None:
    e1, e2 = await edge(api, "edge-1"), await edge(api, "edge-2")
    bodies = {
        "a.example/2026-05-01T10/edge-1-w0.jsonl.gz": gz(lines("a.example", H, "1")),
        "a.example/2026-05-01T10/edge-2-w0.jsonl.gz": gz(lines("a.example", H, "2")),
        "a.example/2026-05-01T11/edge-1-w1.jsonl.gz": gz(lines("a.example", H + HOUR, "3")),
    }
    uploads = [(e1, H, "w0"), (e2, H, "w0"), (e1, H + HOUR, "w1")]
    for (e, hour, piece), body in zip(uploads, bodies.values(), strict=True):
        assert (await e.put("a.example", hour, piece, body)).status == 201
    await e1.put("a.example", H + 2 * HOUR, "w0", gz(lines("a.example", H, "outside")))
    request = {
        "domain": "a.example",
        "from": H.isoformat(),
        "to": (H + 2 * HOUR).isoformat(),
        "reason": "Ministry of Public Security, case 2026-0042",
    }
    _, token = acme
    assert (await raw(api, "POST", "/v1/logs/export", token, request)).status == 403
    no_reason = {k: v for k, v in request.items() if k != "reason"}
    assert (await raw(api, "POST", "/v1/logs/export", ADMIN_TOKEN, no_reason)).status == 422

    got = await raw(api, "POST", "/v1/logs/export", ADMIN_TOKEN, request)
    assert got.status == 200 and got.headers["Content-Type"] == "application/x-tar"
    assert int(got.headers["Content-Length"]) == len(got.body)
    with tarfile.open(fileobj=io.BytesIO(got.body)) as archive:
        names = archive.getnames()
        assert names == ["manifest.json", *bodies]
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name, body in bodies.items():
            assert archive.extractfile(name).read() == body  # type: ignore[union-attr]
    assert manifest["reason"] == request["reason"]
    assert [(f["name"], f["sha256"]) for f in manifest["files"]] == [
        (name, hashlib.sha256(body).hexdigest()) for name, body in bodies.items()
    ]
    [entry] = [r for r in await api.rows(audit_log) if r.action == "log.export"]
    assert (entry.account_id, entry.actor, entry.target) == (None, "operator", "a.example")
    assert entry.detail["reason"] == request["reason"] and entry.detail["pieces"] == 3


@pytest.mark.parametrize("api_settings", [{"log_retention_floor_days": 30}])
async def test_the_floor_moves_only_in_the_config(api: Api, acme: tuple[int, str]) -> None:
    account_id, _ = acme
    path = f"/v1/accounts/{account_id}/log-retention"
    assert (await api.ok("PUT", path, body={"days": 30}))["floor_days"] == 30
    assert (await api.call("PUT", path, body={"days": 29})).status == 422
    nobody = await api.call("PUT", "/v1/accounts/999/log-retention", body={"days": 30})
    assert nobody.status == 404


async def test_cdn_control_logs_retention_command(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """The retention job by hand, on the real clock: an hour older than 180 days goes, a recent
    one stays; a second run deletes nothing more."""
    database, log_dir = tmp_path / "control.db", tmp_path / "logs"
    config_file = tmp_path / "control.toml"
    config_file.write_text(
        f'[control]\ndatabase = "sqlite:///{database}"\nadmin_token = "{ADMIN_TOKEN}"\n'
        f'cname_suffix = "cdn.test"\nlog_dir = "{log_dir}"\n'
    )
    engine = engine_for(f"sqlite:///{database}")
    try:
        await migrate(engine)
        client = await aiohttp_client(make_app(load_config(config_file), engine))
        api = Api(client, engine)
        e = await edge(api)
        old = floor_hour(datetime.now(UTC) - timedelta(days=181))
        recent = floor_hour(datetime.now(UTC) - timedelta(days=1))
        await e.put("a.example", old, "w0", gz(lines("a.example", old, "old")))
        await e.put("a.example", recent, "w0", gz(lines("a.example", recent, "recent")))
        cdn = [sys.executable, "-m", "edge.cli", "control", "logs-retention"]
        outputs = []
        for _ in range(2):
            run = await asyncio.create_subprocess_exec(
                *cdn, "--config", str(config_file), cwd=ROOT, stdout=PIPE, stderr=PIPE
            )
            out, err = await run.communicate()
            assert run.returncode == 0, err
            outputs.append(out.decode())
        assert outputs == [
            "deleted 1 expired and 0 requested log pieces\n",
            "deleted 0 expired and 0 requested log pieces\n",
        ]
        assert [r.hour for r in await api.rows(log_pieces)] == [recent]
        assert stored_files(tmp_path) == [f"a.example/{hour_name(recent)}/1-w0.gz"]
    finally:
        await engine.dispose()


async def test_a_full_disk_is_503_and_leaves_nothing(
    api: Api, acme: tuple[int, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = await edge(api)
    body = gz(lines("a.example", H, "x"))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        put = await e.put("a.example", H, "w0", body)
    assert put.status == 503
    assert put.json()["detail"].startswith("cannot write the log store: no space left")
    assert await api.rows(log_pieces) == [] and staged_files(tmp_path) == []
    assert (await e.put("a.example", H, "w0", body)).status == 201  # the edge's retry


async def test_a_piece_deleted_while_downloading_cuts_the_answer_short(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    _, token = acme
    e1, e2 = await edge(api, "edge-1"), await edge(api, "edge-2")
    await e1.put("a.example", H, "w0", gz(lines("a.example", H, "1")))
    await e2.put("a.example", H, "w0", gz(lines("a.example", H, "2")))
    (tmp_path / "logs" / "a.example" / hour_name(H) / "2-w0.gz").unlink()
    with pytest.raises(aiohttp.ClientPayloadError):
        await download(api, token, "a.example", H)


async def test_a_hold_set_after_a_delete_request_pauses_it_until_lifted(
    api: Api, acme: tuple[int, str]
) -> None:
    account_id, token = acme
    await api.ok("PUT", f"/v1/accounts/{account_id}/log-retention", body={"days": 3650})
    e = await edge(api)
    recent_h = (NOW - timedelta(days=10)).replace(minute=0)
    await e.put("a.example", recent_h, "w0", gz(lines("a.example", recent_h, "recent")))
    done = await api.ok("POST", "/v1/logs/delete", token, {"domain": "a.example"})
    assert (done["deleted_pieces"], done["scheduled_pieces"]) == (0, 1)
    await api.ok("POST", "/v1/log-holds", body={"domain": "a.example", "reason": "court order"})
    complete_at = datetime.fromisoformat(done["complete_at"])
    api.app[CLOCK].set(complete_at)
    await tick(api)
    assert len(await api.rows(log_pieces)) == 1
    [request] = await api.rows(log_deletions)
    assert request.done_at is None
    await api.ok("DELETE", "/v1/log-holds/a.example", status=204)
    await tick(api)
    assert await api.rows(log_pieces) == []
    [request] = await api.rows(log_deletions)
    assert request.done_at == complete_at


async def test_the_retention_job_stops_between_batches(api: Api, acme: tuple[int, str]) -> None:
    e = await edge(api)
    await e.put("a.example", H, "w0", gz(lines("a.example", H, "old")))
    stopping = asyncio.Event()
    stopping.set()
    run = await enforce_retention(
        api.engine, api.app[LOG_STORE], api.app[LOG_SETTINGS], passes(H, 365), stopping
    )
    assert (run.expired, run.requested) == (0, 0)
    assert len(await api.rows(log_pieces)) == 1
    run = await enforce_retention(
        api.engine, api.app[LOG_STORE], api.app[LOG_SETTINGS], passes(H, 365)
    )
    assert (run.expired, run.requested) == (1, 0)


async def test_retention_deletes_the_row_of_a_file_already_gone(
    api: Api, acme: tuple[int, str], tmp_path: Path
) -> None:
    """A crash after a batch's files were removed but before its rows' commit leaves rows of
    missing files: the next run deletes them without trouble."""
    e = await edge(api)
    await e.put("a.example", H, "w0", gz(lines("a.example", H, "old")))
    (tmp_path / "logs" / "a.example" / hour_name(H) / "1-w0.gz").unlink()
    api.app[CLOCK].set(passes(H, 180))
    await tick(api)
    assert await api.rows(log_pieces) == []
    assert not (tmp_path / "logs" / "a.example").exists()  # emptied directories go too
