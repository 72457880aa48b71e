"""control.logrules: hour and piece names, RFC 9530 Content-Digest, ranges, ages, retention."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from control.logrules import (
    DigestError,
    content_digest,
    content_digest_sha256,
    floor_hour,
    hour_at_or_after,
    hour_name,
    last_hour_past,
    parse_hour,
    passes,
    retention_days,
    valid_piece,
)

H = datetime(2026, 11, 26, 13, tzinfo=UTC)
BODY_SHA = hashlib.sha256(b"body").digest()


def test_hours_round_trip_and_bad_ones_are_none() -> None:
    assert parse_hour("2026-11-26T13") == H
    assert hour_name(H) == "2026-11-26T13"
    assert hour_name(H.astimezone(datetime.now().astimezone().tzinfo)) == "2026-11-26T13"
    for bad in (
        "2026-11-26T24",
        "2026-02-30T01",
        "2026-11-26 13",
        "2026-11-26T1",
        "1999-12-31T23",
        "9000-01-01T00",
        "\uff12\uff1026-11-26T13",  # fullwidth digits
        "2026-11-26T13:00",
        "",
    ):
        assert parse_hour(bad) is None, bad


def test_piece_names() -> None:
    assert valid_piece("w0") and valid_piece("a" * 64) and valid_piece("edge-1.w_3")
    for bad in ("", "a" * 65, "w/0", "w 0", "é", "w0\n"):
        assert not valid_piece(bad), bad


def test_content_digest_rfc9530() -> None:
    value = content_digest(BODY_SHA)
    assert value == "sha-256=:" + base64.b64encode(BODY_SHA).decode() + ":"
    assert content_digest_sha256(value) == BODY_SHA
    # other algorithms beside it are skipped, parameters ignored, whitespace allowed
    other = base64.b64encode(hashlib.sha512(b"body").digest()).decode()
    assert content_digest_sha256(f"sha-512=:{other}:,  {value};x=1") == BODY_SHA


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "required"),
        ("  ", "required"),
        ("sha-512=:AAAA:", "no sha-256"),
        ("sha-256=abc", "byte sequence"),
        ("sha-256=:not base64!:", "base64"),
        ("sha-256=:AAAA:", "3 bytes"),
        ("SHA-256=:AAAA:", "structured"),
        ("garbage", "structured"),
    ],
)
def test_bad_content_digests_say_why(header: str | None, says: str) -> None:
    with pytest.raises(DigestError, match=says):
        content_digest_sha256(header)


def test_ranges_are_hour_starts() -> None:
    assert floor_hour(H + timedelta(minutes=59)) == H
    assert hour_at_or_after(H) == H
    assert hour_at_or_after(H + timedelta(microseconds=1)) == H + timedelta(hours=1)


def test_an_hour_passes_n_days_after_its_end() -> None:
    assert passes(H, 180) == H + timedelta(hours=1, days=180)
    at = passes(H, 180)
    assert last_hour_past(at, 180) == H  # exactly then: expired
    assert last_hour_past(at - timedelta(microseconds=1), 180) < H  # a moment before: not yet


def test_retention_never_below_the_floor() -> None:
    assert retention_days(None, 180, 180) == 180
    assert retention_days(365, 180, 180) == 365
    assert retention_days(30, 180, 180) == 180
    assert retention_days(None, 90, 30) == 90
