"""edge.accesslog: the line format round-trips every field, hostile values included."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edge.accesslog import (
    FIELDS,
    UNROUTED,
    AccessRecord,
    Ended,
    Entry,
    LineFormatter,
    encode_record,
    parse_line,
)
from edge.http1 import parse_head

HOSTILE = [
    b'say "hi"',
    b"back\\slash \\\\ \\u0041",
    b"new\nline\r\nand\ttab",
    b"nul\x00byte",
    b"\xff\xfe not utf-8 \x80",
    b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",  # valid UTF-8, non-ASCII
    b"\xed\xa0\x80 encoded surrogate",  # not UTF-8 (a surrogate's encoding)
    b"\xc3",  # truncated sequence
    b"</script><!--",
    b"",
]

RECORD = AccessRecord(
    time=datetime(2026, 11, 26, 13, 5, 1, 123000, tzinfo=UTC),
    edge="edge-1",
    client_ip="2001:db8::1",
    domain=b"www.example.com",
    method=b"GET",
    url=b"/a/b?c=d&e=%20",
    protocol="HTTP/1.1",
    status=206,
    bytes_sent=1234,
    body_bytes=1000,
    request_ms=12.345,
    ttfb_ms=1.5,
    cache="miss",
    range=b"bytes=0-999",
    referer=b"https://ref.example/",
    user_agent=b"curl/8.0",
    content_type=b"video/mp4",
    origin_status=206,
    origin_ms=9.875,
)


def test_fields_in_contract_order() -> None:
    line = encode_record(RECORD)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == [
        "2026-11-26T13:05:01.123+00:00", "edge-1", "2001:db8::1", "www.example.com", "GET",
        "/a/b?c=d&e=%20", "HTTP/1.1", 206, 1234, 1000, 12.345, 1.5, "miss", "bytes=0-999",
        "https://ref.example/", "curl/8.0", "video/mp4", 206, 9.875,
    ]  # fmt: skip
    assert len(FIELDS) == 19
    assert parse_line(line) == RECORD


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    "field", ["method", "url", "range", "referer", "user_agent", "content_type", "domain"]
)
def test_every_byte_field_round_trips_hostile_values(field: str, value: bytes) -> None:
    record = replace(RECORD, **{field: value})
    line = encode_record(record)
    assert line.isascii()
    assert line.count(b"\n") == 1 and line.endswith(b"\n")  # one line whatever the value
    assert parse_line(line) == record
    assert parse_line(line.rstrip(b"\n")) == record


def test_nulls_round_trip() -> None:
    record = replace(
        RECORD,
        domain=None,
        method=None,
        url=None,
        protocol=None,
        ttfb_ms=None,
        range=None,
        referer=None,
        user_agent=None,
        content_type=None,
        origin_status=None,
        origin_ms=None,
    )
    line = encode_record(record)
    assert json.loads(line)[FIELDS.index("referer")] is None
    assert parse_line(line) == record


def test_time_is_utc_with_milliseconds_whatever_the_zone() -> None:
    east = timezone(timedelta(hours=8))
    record = replace(RECORD, time=datetime(2026, 11, 26, 21, 5, 1, 7000, tzinfo=east))
    line = encode_record(record)
    assert json.loads(line)[0] == "2026-11-26T13:05:01.007+00:00"
    assert parse_line(line).time == datetime(2026, 11, 26, 13, 5, 1, 7000, tzinfo=UTC)


def test_strings_and_numbers_round_trip() -> None:
    record = replace(
        RECORD,
        edge='e"dge',
        client_ip="10.0.0.1",
        cache="refused",
        status=0,
        bytes_sent=0,
        body_bytes=0,
        request_ms=0.0,
        ttfb_ms=0.001,
        origin_ms=60000.5,
    )
    assert parse_line(encode_record(record)) == record


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda o: o.pop("origin_ms"), "18 fields"),
        (lambda o: o.update(extra=1), "20 fields"),
        (lambda o: o.update(time="yesterday"), "time"),
        (lambda o: o.update(time="2026-11-26T13:05:01.123"), "offset"),
        (lambda o: o.update(status="200"), "status"),
        (lambda o: o.update(bytes_sent=-1), "bytes_sent"),
        (lambda o: o.update(request_ms=True), "request_ms"),
        (lambda o: o.update(user_agent=5), "user_agent"),
        (lambda o: o.update(referer="\ud800"), "referer"),
    ],
)
def test_parse_line_refuses_what_is_not_the_format(change: object, problem: str) -> None:
    obj = dict(zip(FIELDS, json.loads(encode_record(RECORD)), strict=True))
    change(obj)  # type: ignore[operator]
    with pytest.raises(ValueError, match=problem):
        parse_line(json.dumps(list(obj.values())).encode())


def test_parse_line_refuses_non_json_objects_and_swapped_fields() -> None:
    with pytest.raises(ValueError, match="JSON"):
        parse_line(b"not json\n")
    values = json.loads(encode_record(RECORD))
    with pytest.raises(ValueError, match="array"):
        parse_line(json.dumps(dict(zip(FIELDS, values, strict=True))).encode())
    values[1], values[7] = values[7], values[1]  # edge and status swapped
    with pytest.raises(ValueError, match="edge"):
        parse_line(json.dumps(values).encode())


# --- from what the data path collects -----------------------------------------------------

T = 1_795_698_301.123456  # 2026-11-26T13:05:01.123 UTC


def entry(request: object, **over: object) -> Entry:
    values: dict[str, Any] = dict(
        end=T,
        end_mono=100.5,
        started=100.0,
        head_at=100.25,
        client_ip="192.0.2.7",
        domain="www.example.com",
        head=request,
        status=200,
        bytes_sent=300,
        body_bytes_sent=100,
        outcome="hit",
        response_head=b"Content-Length: 100\r\nContent-Type: text/html\r\n",
        origin_status=None,
        origin_ms=None,
    )
    values.update(over)
    return values.pop("end"), values.pop("end_mono"), Ended(**values)


def test_formatter_takes_hostile_request_headers_byte_for_byte() -> None:
    ua = b'Mozilla "x" \\ \xff\xfe caf\xc3\xa9'
    referer = b"http://r.example/\x80?q=\"'"
    head = parse_head(
        b"GET /p?q=%22x%22 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: "
        + ua
        + b"\r\nReferer: "
        + referer
        + b"\r\nRange: bytes=5-\r\n\r\n"
    )
    directory, hour, line = LineFormatter("e1", "-").format(
        *entry(head, origin_status=200, origin_ms=3.25)
    )
    assert (directory, hour) == ("www.example.com", "2026-11-26T13")
    rec = parse_line(line)
    assert rec == AccessRecord(
        time=datetime(2026, 11, 26, 13, 5, 1, 123000, tzinfo=UTC), edge="e1",
        client_ip="192.0.2.7", domain=b"www.example.com", method=b"GET", url=b"/p?q=%22x%22",
        protocol="HTTP/1.1", status=200, bytes_sent=300, body_bytes=100, request_ms=500.0,
        ttfb_ms=250.0, cache="hit", range=b"bytes=5-", referer=referer, user_agent=ua,
        content_type=b"text/html", origin_status=200, origin_ms=3.25,
    )  # fmt: skip


def test_formatter_unrouted_goes_to_underscore_with_the_host() -> None:
    head = parse_head(b"GET / HTTP/1.0\r\nHost: Other.Example:8080\r\n\r\n")
    directory, _, line = LineFormatter("e1", "-").format(
        *entry(head, domain="-", status=404, outcome="refused", head_at=0.0, response_head=b"")
    )
    assert directory == UNROUTED
    rec = parse_line(line)
    assert (rec.domain, rec.protocol, rec.ttfb_ms, rec.content_type) == (
        b"Other.Example:8080",
        "HTTP/1.0",
        None,
        None,
    )


def test_formatter_refused_raw_request_keeps_its_bytes() -> None:
    raw = b'GET /\xff"bad\\ HTTP/1.1\r\nHost: x\r\n'
    _, _, line = LineFormatter("e1", "-").format(*entry(raw, domain="-", status=400))
    rec = parse_line(line)
    assert (rec.method, rec.url, rec.protocol, rec.domain) == (
        b"GET",
        b'/\xff"bad\\',
        "HTTP/1.1",
        None,
    )
    _, _, line = LineFormatter("e1", "-").format(*entry(b"\x00\x01garbage", status=400))
    rec = parse_line(line)
    assert (rec.method, rec.url, rec.protocol) == (b"\x00\x01garbage", None, None)
    _, _, line = LineFormatter("e1", "-").format(*entry(b"", status=408))
    assert parse_line(line).method is None


@pytest.mark.parametrize("value", [b'q "x" \\ y', b"tab\tnul\x00del\x7f", b"", b"/path?a=1&b=2"])
def test_ascii_values_take_the_fast_path_and_round_trip(value: bytes) -> None:
    """ASCII values, control characters, quotes and backslashes included, go through orjson;
    the line is ASCII, parses back to the same bytes, and equals what the exact path writes."""
    head = parse_head(
        b"GET /x HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: " + value.replace(b"\x00", b"")
        + b"\r\nReferer: " + value.replace(b"\x00", b"") + b"\r\n\r\n"
    )  # fmt: skip
    line = LineFormatter("e1", "-").format(*entry(head))[2]
    assert line.isascii() and line.count(b"\n") == 1
    rec = parse_line(line)
    sent = head.headers["user-agent"].encode("latin-1")  # as the edge parsed it (OWS off)
    assert rec.user_agent == rec.referer == sent
    assert parse_line(encode_record(rec)) == rec  # the exact path reads the same


def test_content_type_from_any_position_and_case() -> None:
    fmt = LineFormatter("e1", "-")
    head = parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    for block, expected in [
        (b"content-type:  a/b \r\n", b"a/b"),
        (b"X-Content-Type: no\r\nCONTENT-TYPE: c/d; charset=\xff\r\n", b"c/d; charset=\xff"),
        (b"X-Content-Type: no\r\n", None),
    ]:
        rec = parse_line(fmt.format(*entry(head, response_head=block))[2])
        assert rec.content_type == expected


def test_hour_follows_each_line_time() -> None:
    fmt = LineFormatter("e1", "-")
    head = parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    boundary = 1_795_701_600.0  # 2026-11-26T14:00:00 UTC
    before = fmt.format(*entry(head, end=boundary - 0.001))
    after = fmt.format(*entry(head, end=boundary))
    assert before[1] == "2026-11-26T13" and after[1] == "2026-11-26T14"
    assert json.loads(before[2])[0] == "2026-11-26T13:59:59.999+00:00"
    assert json.loads(after[2])[0] == "2026-11-26T14:00:00.000+00:00"


def test_reader_prints_gzip_files_and_flags_bad_lines(tmp_path: Path) -> None:
    good = encode_record(replace(RECORD, user_agent=b'\xff"ua'))
    path = tmp_path / "2026-11-26T13.0.jsonl.gz"
    path.write_bytes(gzip.compress(good + b"{broken\n"))
    done = subprocess.run(
        [sys.executable, "-m", "edge.accesslog", str(path)], capture_output=True, check=False
    )
    assert done.returncode == 1
    out = done.stdout.decode()
    assert out.count("\n") == 1
    assert "2026-11-26T13:05:01.123+00:00 edge-1 2001:db8::1" in out
    assert '"\\\\xff\\"ua"' in out
    assert f"{path}:2: not a JSON line" in done.stderr.decode()
    as_json = subprocess.run(
        [sys.executable, "-m", "edge.accesslog", "--json", "-"],
        input=good,
        capture_output=True,
        check=True,
    )
    assert as_json.stdout == good


def test_a_non_ascii_content_type_is_escaped_like_every_other_field() -> None:
    """The format writes non-ASCII text as \\u escapes (module docstring); a UTF-8 Content-Type
    went out as raw UTF-8 through the fast path."""
    head = parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    for compiled in (True, False):
        fmt = LineFormatter("e1", "-", compiled=compiled)
        for _ in range(2):  # the second time from the memo
            line = fmt.format(*entry(head, response_head=b"Content-Type: caf\xc3\xa9\r\n"))[2]
            assert line.isascii() and b"caf\\u00e9" in line
            assert parse_line(line).content_type == b"caf\xc3\xa9"
