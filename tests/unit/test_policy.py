"""Unit tests for edge.policy: one table per rule, a few properties, hishel as a partial oracle.

hishel 2.0's sans-I/O spec is used as an oracle only where it implements the shared-cache rules
correctly (s-maxage, private, no-store, Authorization, Vary matching); it is wrong or differs by
design on upstream Age, stale-while-revalidate, Range, Vary: * storage, request no-store and
responses without any freshness, so those are tested against the RFC text alone.
"""

from __future__ import annotations

import calendar
import dataclasses
import email.utils
import math
import time
import uuid

import hishel
import pytest
from hishel._core._spec import vary_headers_match
from hypothesis import given
from hypothesis import strategies as st

from edge.policy import (
    CACHE_NAME,
    HEURISTIC_CAP,
    HEURISTICALLY_CACHEABLE,
    RequestDirectives,
    ResponseDirectives,
    _parse_targeted,
    cache_status,
    combine_fields,
    connection_nominated,
    current_age,
    evaluate_conditional,
    format_http_date,
    freshness_lifetime,
    initial_age,
    invalidates,
    lookup_freshness,
    may_serve_stale_if_error,
    merge_not_modified,
    parse_cache_control,
    parse_http_date,
    request_directives,
    response_directives,
    strip_hop_by_hop,
    unstorable_reason,
    validation_headers,
    vary_names,
    vary_values,
)

T = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
T_HTTP = "Tue, 14 Nov 2023 22:13:20 GMT"
DAY = 86400.0
HOP = {"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"}


def http(ts: float) -> str:
    return format_http_date(ts)


# --------------------------------------------------------------------------- fields


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], {}),
        ([("Host", "a")], {"host": "a"}),
        ([("Accept", "a"), ("ACCEPT", "b"), ("accept", "c")], {"accept": "a, b, c"}),
        ([("X", "  padded \t")], {"x": "padded"}),
        ([("X", "")], {"x": ""}),
        ([("X", ""), ("X", "a")], {"x": "a"}),
        ([("X", "a"), ("X", ""), ("X", "b")], {"x": "a, b"}),
        ([("B", "1"), ("A", "2"), ("B", "3")], {"b": "1, 3", "a": "2"}),
    ],
)
def test_combine_fields(lines: list[tuple[str, str]], expected: dict[str, str]) -> None:
    assert combine_fields(lines) == expected


def test_combine_fields_keeps_first_seen_order() -> None:
    assert list(combine_fields([("B", "1"), ("A", "2"), ("b", "3")])) == ["b", "a"]


@pytest.mark.parametrize(
    ("fields", "extra"),
    [
        ({}, set()),
        ({"connection": ""}, set()),
        ({"connection": "close"}, {"close"}),
        ({"connection": "X-Foo, keep-alive ,,\tX-BAR"}, {"x-foo", "x-bar"}),
        ({"connection": "Upgrade"}, set()),
    ],
)
def test_connection_nominated(fields: dict[str, str], extra: set[str]) -> None:
    # trailer is dropped too (we de-chunk and discard trailer fields); "trailers" is no field
    assert connection_nominated(fields) == frozenset(HOP | {"trailer"} | extra)
    assert "trailers" not in connection_nominated(fields)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([("Host", "h"), ("Accept", "*/*")], [("Host", "h"), ("Accept", "*/*")]),
        (
            [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Host", "h")],
            [("Host", "h")],
        ),
        (
            [("TE", "trailers"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c")],
            [],
        ),
        ([("Proxy-Connection", "x"), ("Trailer", "Digest"), ("Via", "1.1 a")], [("Via", "1.1 a")]),
        (
            [("Connection", "X-Secret"), ("x-secret", "1"), ("X-Other", "2")],
            [("X-Other", "2")],
        ),
        (
            # nominations from several Connection lines all count
            [("Connection", "a"), ("A", "1"), ("Connection", "B"), ("b", "2"), ("C", "3")],
            [("C", "3")],
        ),
        (
            [("Cache-Control", "max-age=1"), ("ETag", '"x"')],
            [("Cache-Control", "max-age=1"), ("ETag", '"x"')],
        ),
    ],
)
def test_strip_hop_by_hop(lines: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    assert strip_hop_by_hop(lines) == expected
    assert strip_hop_by_hop(iter(lines)) == expected  # any iterable, consumed once


field_names = st.sampled_from(
    ["Host", "Connection", "X-A", "x-a", "Keep-Alive", "TE", "Vary", "ETag", "Upgrade", "X-B"]
)
field_lines = st.lists(st.tuples(field_names, st.sampled_from(["", "x-a", "close", "X-B, x-a"])))


@given(field_lines)
def test_strip_hop_by_hop_properties(lines: list[tuple[str, str]]) -> None:
    kept = strip_hop_by_hop(lines)
    dropped = connection_nominated(combine_fields(lines))
    assert all(name.lower() not in dropped for name, _ in kept)
    assert kept == [line for line in lines if line[0].lower() not in dropped]  # order, case kept


# --------------------------------------------------------------------------- dates

SUNDAY = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT, the RFC 9110 5.6.7 example


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", SUNDAY),
        ("Sunday, 06-Nov-94 08:49:37 GMT", SUNDAY),
        ("Sun Nov  6 08:49:37 1994", SUNDAY),
        ("Sun Nov 06 08:49:37 1994", SUNDAY),
        ("  Sun,  06 Nov 1994   08:49:37 GMT ", SUNDAY),  # runs of whitespace tolerated
        ("Mon, 06 Nov 1994 08:49:37 GMT", SUNDAY),  # wrong weekday: not checked
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0),
        ("Thu, 29 Feb 2024 12:00:00 GMT", 1709208000.0),
        ("Wednesday, 01-Jan-20 00:00:00 GMT", 1577836800.0),  # 00-69 -> 20xx
        ("Thursday, 01-Jan-70 00:00:00 GMT", 0.0),  # 70-99 -> 19xx
        ("Sat, 31 Dec 2016 23:59:60 GMT", 1483228800.0),  # leap second rolls over
        (T_HTTP, T),
    ],
)
def test_parse_http_date_valid(text: str, expected: float) -> None:
    assert parse_http_date(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "0",
        "-1",
        "never",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 gmt",
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "sun, 06 Nov 1994 08:49:37 GMT",
        "Sun 06 Nov 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sun, 06 Nov 1994 8:49:37 GMT",
        "Sun, 06 Nov 1994 08.49.37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, 31 Nov 1994 08:49:37 GMT",
        "Sun, 29 Feb 2023 08:49:37 GMT",
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 0000 08:49:37 GMT",
        "Sun, \uff106 Nov 1994 08:49:37 GMT",  # fullwidth digit zero
        "Sun, \u00b26 Nov 1994 08:49:37 GMT",  # superscript two
        "Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT",  # two Expires lines
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sun, 06-Nov-94 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 UTC",
        "Sunday 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 94",
        "Sunday Nov  6 08:49:37 1994",
        "Sun Nov 106 08:49:37 1994",
        "1994-11-06T08:49:37Z",
    ],
)
def test_parse_http_date_invalid(text: str | None) -> None:
    assert parse_http_date(text) is None


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (SUNDAY, "Sun, 06 Nov 1994 08:49:37 GMT"),
        (SUNDAY + 0.999, "Sun, 06 Nov 1994 08:49:37 GMT"),
        (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
        (T, T_HTTP),
        (253402300799, "Fri, 31 Dec 9999 23:59:59 GMT"),
    ],
)
def test_format_http_date(ts: float, expected: str) -> None:
    assert format_http_date(ts) == expected


timestamps = st.floats(min_value=0, max_value=253402300799, allow_nan=False)


@given(timestamps)
def test_http_date_round_trip(ts: float) -> None:
    assert parse_http_date(format_http_date(ts)) == int(ts)


@given(st.integers(min_value=0, max_value=253402300799))
def test_format_http_date_matches_stdlib(ts: int) -> None:
    assert format_http_date(ts) == email.utils.formatdate(ts, usegmt=True)


@given(st.integers(min_value=0, max_value=2**31))
def test_parse_http_date_obsolete_formats_agree(ts: int) -> None:
    # asctime is accepted for any year; rfc850 only where the two-digit pivot is exact
    t = time.gmtime(ts)
    asctime = time.strftime("%a %b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S %Y", t)
    assert parse_http_date(asctime) == ts
    if 1970 <= t.tm_year <= 2069:
        assert parse_http_date(time.strftime("%A, %d-%b-%y %H:%M:%S GMT", t)) == ts


@given(st.text())
def test_parse_http_date_never_raises(text: str) -> None:
    result = parse_http_date(text)
    assert result is None or math.isfinite(result)


# --------------------------------------------------------------------------- cache-control


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {}),
        ("", {}),
        (" , ,, ", {}),
        ("max-age=60", {"max-age": "60"}),
        ("Max-Age=60, PUBLIC", {"max-age": "60", "public": None}),
        ("no-cache,no-store", {"no-cache": None, "no-store": None}),
        ("  max-age = 60 ,\tpublic\t", {"max-age": "60", "public": None}),
        ('max-age="60"', {"max-age": "60"}),
        ('private="set-cookie, x-a", max-age=5', {"private": "set-cookie, x-a", "max-age": "5"}),
        ('ext="a\\"b\\\\c"', {"ext": 'a"b\\c'}),
        ('ext="a\\zb"', {"ext": "azb"}),
        ('ext = "quoted" junk , public', {"ext": "quoted", "public": None}),
        ('ext="unterminated, public', {"ext": "unterminated, public"}),
        ("max-age=", {"max-age": ""}),
        ('max-age=""', {"max-age": ""}),
        # first occurrence wins (RFC 9111 4.2.1)
        ("max-age=60, max-age=0", {"max-age": "60"}),
        ('max-age="1", max-age=2', {"max-age": "1"}),
        ("no-cache, no-cache=x", {"no-cache": None}),
        # junk: names that are not tokens are skipped
        ("=60, public", {"public": None}),
        ("max age=60, public", {"public": None}),
        ("max-age=60; public", {"max-age": "60; public"}),
        ('"quoted", public', {"public": None}),
        ("nö-store, public", {"public": None}),
        ("a=1=2", {"a": "1=2"}),
    ],
)
def test_parse_cache_control(value: str | None, expected: dict[str, str | None]) -> None:
    assert parse_cache_control(value) == expected


@given(st.text())
def test_parse_cache_control_never_raises(text: str) -> None:
    for name, argument in parse_cache_control(text).items():
        assert name == name.lower() and name and "," not in name and "=" not in name
        assert argument is None or isinstance(argument, str)


directive_names = st.from_regex(r"[a-z][a-z0-9-]{0,11}", fullmatch=True)
directive_args = st.none() | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12
)


@given(st.dictionaries(directive_names, directive_args, max_size=6))
def test_parse_cache_control_round_trip(directives: dict[str, str | None]) -> None:
    def quote(arg: str) -> str:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'

    value = ", ".join(
        name if arg is None else f"{name}={quote(arg)}" for name, arg in directives.items()
    )
    assert parse_cache_control(value) == directives


# --------------------------------------------------------------------------- request directives


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        ({}, RequestDirectives()),
        ({"cache-control": "max-age=10"}, RequestDirectives(max_age=10)),
        ({"cache-control": "max-age=0"}, RequestDirectives(max_age=0)),
        # invalid max-age: validate (0), not absent
        ({"cache-control": "max-age"}, RequestDirectives(max_age=0)),
        ({"cache-control": "max-age=-1"}, RequestDirectives(max_age=0)),
        ({"cache-control": "max-age=1.5"}, RequestDirectives(max_age=0)),
        ({"cache-control": "max-age=+5"}, RequestDirectives(max_age=0)),
        ({"cache-control": "max-age=99999999999"}, RequestDirectives(max_age=2**31)),
        ({"cache-control": "max-age=2147483649"}, RequestDirectives(max_age=2**31)),
        ({"cache-control": "max-age=" + "9" * 5000}, RequestDirectives(max_age=2**31)),
        ({"cache-control": "max-age=007"}, RequestDirectives(max_age=7)),
        ({"cache-control": "max-stale"}, RequestDirectives(max_stale=math.inf)),
        ({"cache-control": "max-stale=30"}, RequestDirectives(max_stale=30.0)),
        ({"cache-control": "max-stale=-3"}, RequestDirectives()),
        ({"cache-control": "max-stale="}, RequestDirectives()),
        ({"cache-control": "min-fresh=5"}, RequestDirectives(min_fresh=5)),
        ({"cache-control": "min-fresh"}, RequestDirectives()),
        ({"cache-control": "min-fresh=x"}, RequestDirectives()),
        ({"cache-control": "no-cache"}, RequestDirectives(no_cache=True)),
        ({"cache-control": "no-store"}, RequestDirectives(no_store=True)),
        ({"cache-control": "only-if-cached"}, RequestDirectives(only_if_cached=True)),
        ({"cache-control": "stale-if-error=60"}, RequestDirectives(stale_if_error=60)),
        ({"cache-control": "stale-if-error"}, RequestDirectives()),
        ({"cache-control": '"max-age=5"'}, RequestDirectives()),
        # Pragma counts only without any Cache-Control field (RFC 9111 5.4)
        ({"pragma": "no-cache"}, RequestDirectives(no_cache=True)),
        ({"pragma": "x, No-Cache"}, RequestDirectives(no_cache=True)),
        ({"pragma": "no-cache=1"}, RequestDirectives()),
        ({"pragma": "no-store"}, RequestDirectives()),
        ({"pragma": "no-cache", "cache-control": ""}, RequestDirectives()),
        ({"pragma": "no-cache", "cache-control": "max-age=5"}, RequestDirectives(max_age=5)),
        (
            {"cache-control": "max-age=5, max-stale=10, min-fresh=1, no-cache"},
            RequestDirectives(max_age=5, max_stale=10.0, min_fresh=1, no_cache=True),
        ),
    ],
)
def test_request_directives(req: dict[str, str], expected: RequestDirectives) -> None:
    assert request_directives(req) == expected


def test_directives_are_frozen_and_slotted() -> None:
    for directives in (RequestDirectives(), ResponseDirectives()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            directives.no_cache = True  # type: ignore[misc]
        assert not hasattr(directives, "__dict__")


# --------------------------------------------------------------------------- response directives


@pytest.mark.parametrize(
    ("resp", "expected"),
    [
        ({}, ResponseDirectives()),
        ({"cache-control": "max-age=60"}, ResponseDirectives(max_age=60)),
        ({"cache-control": "s-maxage=30, max-age=60"}, ResponseDirectives(max_age=60, s_maxage=30)),
        # invalid freshness is stale (RFC 9111 4.2.1)
        ({"cache-control": "max-age=soon"}, ResponseDirectives(max_age=0)),
        ({"cache-control": "s-maxage"}, ResponseDirectives(s_maxage=0)),
        ({"cache-control": "max-age=99999999999999"}, ResponseDirectives(max_age=2**31)),
        (
            {"cache-control": "no-store, no-cache, private, public, must-revalidate"},
            ResponseDirectives(
                no_store=True, no_cache=True, private=True, public=True, must_revalidate=True
            ),
        ),
        (
            {"cache-control": "proxy-revalidate, must-understand, immutable"},
            ResponseDirectives(proxy_revalidate=True, must_understand=True, immutable=True),
        ),
        # qualified forms act unqualified
        ({"cache-control": 'no-cache="set-cookie"'}, ResponseDirectives(no_cache=True)),
        ({"cache-control": 'private="x-user, x-id"'}, ResponseDirectives(private=True)),
        (
            {"cache-control": "stale-while-revalidate=30, stale-if-error=600"},
            ResponseDirectives(stale_while_revalidate=30, stale_if_error=600),
        ),
        ({"cache-control": "stale-while-revalidate, stale-if-error=-1"}, ResponseDirectives()),
        ({"cache-control": "no-transform, x-ext=1"}, ResponseDirectives()),
        # RFC 9213: a valid CDN-Cache-Control replaces Cache-Control
        (
            {"cdn-cache-control": "max-age=600", "cache-control": "no-store, private"},
            ResponseDirectives(max_age=600, from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": "no-store", "cache-control": "max-age=60"},
            ResponseDirectives(no_store=True, from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": 'private="x", s-maxage=5;p=1, stale-while-revalidate=10'},
            ResponseDirectives(
                private=True, s_maxage=5, stale_while_revalidate=10, from_cdn_cache_control=True
            ),
        ),
        (
            # sf-dictionary: later duplicate overwrites; ?0 is absent, ?1 is present
            {"cdn-cache-control": "max-age=1, max-age=2, no-store=?0, public=?1"},
            ResponseDirectives(max_age=2, public=True, from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": "no-store=?0", "cache-control": "no-store"},
            ResponseDirectives(from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": "max-age=-5", "cache-control": "max-age=60"},
            ResponseDirectives(max_age=0, from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": "max-age=1.5", "cache-control": "max-age=60"},
            ResponseDirectives(max_age=0, from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": "no-cache=(a b);x", "cache-control": "max-age=60"},
            ResponseDirectives(no_cache=True, from_cdn_cache_control=True),
        ),
        (
            {"cdn-cache-control": "x=:aGk=:, max-age=9", "cache-control": "max-age=60"},
            ResponseDirectives(max_age=9, from_cdn_cache_control=True),
        ),
    ],
)
def test_response_directives(resp: dict[str, str], expected: ResponseDirectives) -> None:
    assert response_directives(resp) == expected


@pytest.mark.parametrize(
    "cdn",
    [
        "",
        "   ",
        "Max-Age=60",  # sf keys are lowercase
        "max-age = 60",
        "max-age=60,",
        "max-age=60,,public",
        "max-age=60 public",
        "max-age=",
        "9max-age=1",
        'private="unterminated',
        'private="bad \\x escape"',
        'private="tab\there"',
        "x=?2",
        "x=:not base64!:",
        "x=1234567890123456",
        "x=1234567890123.5",
        "x=1.2345",
        "x=1.",
        "x=(a b",
        "x=(a,b)",
        "x;=1",
        'x=%"display"',
        "x=@1659578233",
    ],
)
def test_invalid_cdn_cache_control_falls_back(cdn: str) -> None:
    resp = {"cdn-cache-control": cdn, "cache-control": "max-age=60"}
    assert response_directives(resp) == ResponseDirectives(max_age=60)


@given(st.text())
def test_parse_targeted_never_raises(text: str) -> None:
    parsed = _parse_targeted(text)
    assert parsed is None or all(isinstance(k, str) for k in parsed)


# --------------------------------------------------------------------------- storability


def reason(
    resp: dict[str, str],
    req: dict[str, str] | None = None,
    *,
    status: int = 200,
    method: str = "GET",
) -> str | None:
    return unstorable_reason(method, status, req or {}, resp, response_directives(resp))


MAX60 = {"cache-control": "max-age=60"}
LM = {"last-modified": "Sun, 06 Nov 1994 08:49:37 GMT"}


@pytest.mark.parametrize(
    ("method", "status", "req", "resp", "expected"),
    [
        ("GET", 200, {}, MAX60, None),
        ("GET", 200, {}, LM, None),  # heuristic
        ("GET", 200, {}, {"etag": '"v1"'}, None),  # validator: store, always revalidate
        ("GET", 200, {}, {"expires": T_HTTP}, None),
        ("GET", 200, {}, {"expires": "0"}, None),  # invalid Expires: stored, already stale
        ("GET", 200, {}, {"cache-control": "public"}, None),
        ("GET", 200, {}, {"cache-control": "s-maxage=0"}, None),
        ("GET", 200, {}, {"cache-control": "no-cache", "etag": '"a"'}, None),
        ("GET", 404, {}, LM, None),
        ("GET", 301, {}, {}, "no-freshness"),
        # method
        ("HEAD", 200, {}, MAX60, "method"),
        ("POST", 200, {}, MAX60, "method"),
        ("get", 200, {}, MAX60, "method"),  # methods are case-sensitive
        ("PUT", 200, {}, MAX60, "method"),
        # status
        ("GET", 100, {}, MAX60, "status"),
        ("GET", 103, {}, MAX60, "status"),
        ("GET", 206, {}, MAX60, "status"),
        ("GET", 304, {}, MAX60, "status"),
        ("GET", 600, {}, MAX60, "status"),
        ("GET", 99, {}, MAX60, "status"),
        ("GET", 500, {}, LM, "status"),
        ("GET", 302, {}, LM, "status"),
        ("GET", 201, {}, {"etag": '"a"'}, "status"),
        ("GET", 500, {}, MAX60, None),
        ("GET", 302, {}, {"cache-control": "s-maxage=5"}, None),
        ("GET", 307, {}, {"expires": T_HTTP}, None),
        ("GET", 503, {}, {"cache-control": "public"}, None),
        ("GET", 499, {}, MAX60, None),  # unknown status, explicit freshness: allowed (3)
        # must-understand: unknown status refused; understood status overrides no-store
        ("GET", 499, {}, {"cache-control": "must-understand, no-store, max-age=5"}, "status"),
        ("GET", 200, {}, {"cache-control": "must-understand, no-store, max-age=5"}, None),
        ("GET", 404, {}, {"cache-control": "must-understand, no-store, max-age=5"}, None),
        ("GET", 206, {}, {"cache-control": "must-understand, max-age=5"}, "status"),
        # no-store
        ("GET", 200, {}, {"cache-control": "no-store"}, "no-store"),
        ("GET", 200, {}, {"cache-control": "max-age=60, no-store"}, "no-store"),
        ("GET", 200, {"cache-control": "no-store"}, MAX60, "no-store"),
        (
            "GET",
            200,
            {"cache-control": "no-store"},
            {"cache-control": "must-understand, max-age=5"},
            "no-store",
        ),
        ("GET", 200, {"pragma": "no-store"}, MAX60, None),
        ("GET", 200, {}, {"cdn-cache-control": "no-store", **MAX60}, "no-store"),
        ("GET", 200, {}, {"cdn-cache-control": "max-age=5", "cache-control": "no-store"}, None),
        # private
        ("GET", 200, {}, {"cache-control": "private"}, "private"),
        ("GET", 200, {}, {"cache-control": "private, max-age=60"}, "private"),
        ("GET", 200, {}, {"cache-control": 'private="x-user", max-age=60'}, "private"),
        ("GET", 200, {}, {"cache-control": "public, private, max-age=60"}, "private"),
        # authorization
        ("GET", 200, {"authorization": "Bearer t"}, MAX60, "authorization"),
        ("GET", 200, {"authorization": ""}, MAX60, "authorization"),
        ("GET", 200, {"authorization": "Bearer t"}, {"cache-control": "public"}, None),
        ("GET", 200, {"authorization": "Bearer t"}, {"cache-control": "s-maxage=9"}, None),
        (
            "GET",
            200,
            {"authorization": "Bearer t"},
            {"cache-control": "must-revalidate, max-age=9"},
            None,
        ),
        (
            "GET",
            200,
            {"authorization": "Bearer t"},
            {"cache-control": "proxy-revalidate, max-age=9"},
            "authorization",
        ),
        # set-cookie (product policy)
        ("GET", 200, {}, {"set-cookie": "a=b", **MAX60}, "set-cookie"),
        (
            "GET",
            200,
            {},
            {"set-cookie": "a=b", "cache-control": "public, max-age=60"},
            "set-cookie",
        ),
        # vary
        ("GET", 200, {}, {"vary": "*", **MAX60}, "vary-star"),
        ("GET", 200, {}, {"vary": "accept, *", **MAX60}, "vary-star"),
        ("GET", 200, {}, {"vary": "accept-encoding", **MAX60}, None),
        # no-freshness
        ("GET", 200, {}, {}, "no-freshness"),
        ("GET", 200, {}, {"cache-control": "no-cache"}, "no-freshness"),
        ("GET", 200, {}, {"cache-control": "must-revalidate"}, "no-freshness"),
        ("GET", 200, {}, {"etag": ""}, "no-freshness"),
        # CDN-Cache-Control hides Expires (RFC 9213 2.2)
        (
            "GET",
            200,
            {},
            {"cdn-cache-control": "must-revalidate", "expires": T_HTTP},
            "no-freshness",
        ),
        ("GET", 500, {}, {"cdn-cache-control": "must-revalidate", "expires": T_HTTP}, "status"),
    ],
)
def test_unstorable_reason(
    method: str, status: int, req: dict[str, str], resp: dict[str, str], expected: str | None
) -> None:
    assert unstorable_reason(method, status, req, resp, response_directives(resp)) == expected


def hishel_stores(method: str, status: int, req: dict[str, str], resp: dict[str, str]) -> bool:
    state = hishel.CacheMiss(
        options={"shared": True},
        request=hishel.Request(
            method=method, url="https://example.com/", headers=hishel.Headers(req)
        ),
    ).next(hishel.Response(status_code=status, headers=hishel.Headers(resp)))
    return isinstance(state, hishel.StoreAndUse)


AUTH = {"authorization": "Basic dTpw"}


@pytest.mark.parametrize(
    ("method", "status", "req", "resp"),
    [
        ("GET", 200, {}, {"cache-control": "max-age=60"}),
        ("GET", 200, {}, {"cache-control": "s-maxage=60"}),
        ("GET", 200, {}, {"cache-control": "s-maxage=0, max-age=60"}),
        ("GET", 200, {}, {"cache-control": "no-store"}),
        ("GET", 200, {}, {"cache-control": "no-store, max-age=60"}),
        ("GET", 200, {}, {"cache-control": "max-age=60, no-store, public"}),
        ("GET", 200, {}, {"cache-control": "private"}),
        ("GET", 200, {}, {"cache-control": "private, max-age=60"}),
        ("GET", 200, {}, {"cache-control": "private, s-maxage=60"}),
        ("GET", 200, {}, {"cache-control": "public, max-age=60"}),
        ("GET", 200, AUTH, {"cache-control": "max-age=60"}),
        ("GET", 200, AUTH, {"cache-control": "s-maxage=60"}),
        ("GET", 200, AUTH, {"cache-control": "public"}),
        ("GET", 200, AUTH, {"cache-control": "public, max-age=60"}),
        ("GET", 200, AUTH, {"cache-control": "must-revalidate, max-age=60"}),
        ("GET", 200, AUTH, {"cache-control": "proxy-revalidate, max-age=60"}),
        ("GET", 200, AUTH, {"cache-control": "private, s-maxage=60"}),
        ("GET", 200, AUTH, {"cache-control": "no-store, public"}),
        ("GET", 200, {}, {"cache-control": "max-age=60", "vary": "accept-encoding"}),
        ("GET", 404, {}, {"cache-control": "max-age=60"}),
        ("GET", 500, {}, {}),
        ("GET", 500, {}, {"cache-control": "s-maxage=60"}),
        ("GET", 302, {}, {"expires": T_HTTP}),
        ("POST", 200, {}, {"cache-control": "max-age=60"}),
        ("GET", 101, {}, {"cache-control": "max-age=60"}),
        ("GET", 206, {}, {"cache-control": "max-age=60"}),
        ("GET", 304, {}, {"cache-control": "max-age=60"}),
    ],
)
def test_storability_matches_hishel(
    method: str, status: int, req: dict[str, str], resp: dict[str, str]
) -> None:
    ours = unstorable_reason(method, status, req, resp, response_directives(resp)) is None
    assert ours == hishel_stores(method, status, req, resp)


# --------------------------------------------------------------------------- freshness


def lifetime(resp: dict[str, str], status: int = 200, response_time: float = T) -> float:
    return freshness_lifetime(status, resp, response_directives(resp), response_time=response_time)


@pytest.mark.parametrize(
    ("resp", "status", "expected"),
    [
        ({}, 200, 0.0),
        ({"cache-control": "max-age=60"}, 200, 60.0),
        ({"cache-control": "max-age=60, s-maxage=5"}, 200, 5.0),
        ({"cache-control": "s-maxage=0, max-age=60"}, 200, 0.0),
        ({"cache-control": "max-age=bad"}, 200, 0.0),
        ({"cache-control": "max-age=60", "expires": http(T + 999)}, 200, 60.0),
        ({"cache-control": "s-maxage=7", "expires": http(T + 999)}, 200, 7.0),
        ({"expires": http(T + 100), "date": T_HTTP}, 200, 100.0),
        ({"expires": http(T + 100), "date": http(T - 50)}, 200, 150.0),
        ({"expires": http(T + 100)}, 200, 100.0),  # no Date: response_time stands in
        ({"expires": http(T + 100), "date": "garbage"}, 200, 100.0),
        ({"expires": http(T - 100), "date": T_HTTP}, 200, 0.0),
        ({"expires": "0", **LM}, 200, 0.0),  # invalid Expires: expired, no heuristic
        ({"expires": "", **LM}, 200, 0.0),
        ({"expires": http(T + 100)}, 500, 100.0),
        # heuristic: 10 % of Date - Last-Modified, capped, never negative
        ({"date": T_HTTP, "last-modified": http(T - 1000)}, 200, 100.0),
        ({"last-modified": http(T - 1000)}, 200, 100.0),
        ({"date": T_HTTP, "last-modified": http(T - 1000)}, 404, 100.0),
        ({"date": T_HTTP, "last-modified": http(T - 1000)}, 500, 0.0),
        ({"date": T_HTTP, "last-modified": http(T - 1000), "cache-control": "public"}, 500, 100.0),
        ({"date": T_HTTP, "last-modified": http(T - 365 * DAY)}, 200, HEURISTIC_CAP),
        ({"date": T_HTTP, "last-modified": http(T + 1000)}, 200, 0.0),
        ({"date": T_HTTP, "last-modified": "yesterday"}, 200, 0.0),
        ({"date": T_HTTP, "etag": '"x"'}, 200, 0.0),
        # RFC 9213: CDN-Cache-Control wins, and Expires is ignored under it
        ({"cdn-cache-control": "max-age=30", "cache-control": "max-age=60"}, 200, 30.0),
        ({"cdn-cache-control": "no-cache", "expires": http(T + 100)}, 200, 0.0),
        (
            {
                "cdn-cache-control": "public",
                "expires": http(T + 100),
                "last-modified": http(T - 50),
            },
            200,
            5.0,
        ),
    ],
)
def test_freshness_lifetime(resp: dict[str, str], status: int, expected: float) -> None:
    assert lifetime(resp, status) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("resp", "request_time", "response_time", "expected"),
    [
        ({}, T, T, 0.0),
        ({}, T - 2, T, 2.0),  # response delay counts
        ({"date": http(T - 10)}, T, T, 10.0),  # apparent age
        ({"date": http(T + 10)}, T, T, 0.0),  # clock skew: never negative
        ({"age": "30"}, T - 1, T, 31.0),
        ({"age": "30", "date": http(T - 100)}, T, T, 100.0),
        ({"age": "300", "date": http(T - 100)}, T - 1, T, 301.0),
        ({"age": "30, 60"}, T, T, 30.0),  # first member of a list
        ({"age": "-30"}, T, T, 0.0),  # invalid Age ignored
        ({"age": "soon"}, T - 1, T, 1.0),
        ({"age": "1e3"}, T, T, 0.0),
        ({"age": "99999999999999"}, T, T, float(2**31)),
        ({"date": "garbage", "age": "5"}, T, T, 5.0),
    ],
)
def test_initial_age(
    resp: dict[str, str], request_time: float, response_time: float, expected: float
) -> None:
    got = initial_age(resp, request_time=request_time, response_time=response_time)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("initial", "response_time", "now", "expected"),
    [
        (0.0, T, T, 0.0),
        (5.0, T, T + 10, 15.0),
        (5.0, T, T - 10, 5.0),  # clock stepped back: no younger than stored
    ],
)
def test_current_age(initial: float, response_time: float, now: float, expected: float) -> None:
    assert current_age(initial, response_time, now) == expected


# --------------------------------------------------------------------------- reuse

RQ = RequestDirectives
RS = ResponseDirectives


@pytest.mark.parametrize(
    ("req", "rd", "age", "life", "expected"),
    [
        (RQ(), RS(), 10, 60, "fresh"),
        (RQ(), RS(), 59.9, 60, "fresh"),
        (RQ(), RS(), 60, 60, "must-validate"),  # lifetime > age, strictly
        (RQ(), RS(), 61, 60, "must-validate"),
        (RQ(), RS(), 0, 0, "must-validate"),
        # no-cache, either side
        (RQ(no_cache=True), RS(), 1, 60, "must-validate"),
        (RQ(), RS(no_cache=True), 1, 60, "must-validate"),
        (RQ(max_stale=math.inf), RS(no_cache=True), 100, 60, "must-validate"),
        # request max-age
        (RQ(max_age=30), RS(), 10, 60, "fresh"),
        (RQ(max_age=10), RS(), 10, 60, "fresh"),
        (RQ(max_age=5), RS(), 10, 60, "must-validate"),
        (RQ(max_age=0), RS(), 0.5, 60, "must-validate"),
        (RQ(max_age=5, max_stale=math.inf), RS(), 100, 60, "must-validate"),
        (RQ(max_age=200, max_stale=math.inf), RS(), 100, 60, "stale-ok"),
        # request min-fresh
        (RQ(min_fresh=30), RS(), 10, 60, "fresh"),
        (RQ(min_fresh=50), RS(), 10, 60, "fresh"),
        (RQ(min_fresh=51), RS(), 10, 60, "must-validate"),
        (RQ(min_fresh=1, max_stale=math.inf), RS(), 100, 60, "must-validate"),
        (RQ(min_fresh=1), RS(stale_while_revalidate=100), 70, 60, "must-validate"),
        # request max-stale
        (RQ(max_stale=math.inf), RS(), 10_000, 60, "stale-ok"),
        (RQ(max_stale=10), RS(), 70, 60, "stale-ok"),
        (RQ(max_stale=10), RS(), 71, 60, "must-validate"),
        (RQ(max_stale=0), RS(), 60, 60, "stale-ok"),
        (RQ(max_stale=math.inf), RS(must_revalidate=True), 70, 60, "must-validate"),
        (RQ(max_stale=math.inf), RS(proxy_revalidate=True), 70, 60, "must-validate"),
        (RQ(max_stale=math.inf), RS(s_maxage=60), 70, 60, "must-validate"),
        (RQ(max_stale=math.inf), RS(must_revalidate=True), 10, 60, "fresh"),
        # stale-while-revalidate (RFC 5861 3)
        (RQ(), RS(stale_while_revalidate=30), 70, 60, "stale-while-revalidate"),
        (RQ(), RS(stale_while_revalidate=30), 89.9, 60, "stale-while-revalidate"),
        (RQ(), RS(stale_while_revalidate=30), 90, 60, "must-validate"),
        (RQ(), RS(stale_while_revalidate=30), 10, 60, "fresh"),
        (RQ(), RS(stale_while_revalidate=0), 60, 60, "must-validate"),
        (RQ(), RS(stale_while_revalidate=30, must_revalidate=True), 70, 60, "must-validate"),
        (RQ(), RS(stale_while_revalidate=30, proxy_revalidate=True), 70, 60, "must-validate"),
        (RQ(), RS(stale_while_revalidate=30, s_maxage=60), 70, 60, "must-validate"),
        (RQ(), RS(stale_while_revalidate=30, no_cache=True), 70, 60, "must-validate"),
        (RQ(max_stale=5), RS(stale_while_revalidate=30), 70, 60, "stale-while-revalidate"),
        (RQ(max_stale=50), RS(stale_while_revalidate=30), 70, 60, "stale-ok"),
        (RQ(max_age=5), RS(stale_while_revalidate=30), 70, 60, "must-validate"),
    ],
)
def test_lookup_freshness(
    req: RequestDirectives, rd: ResponseDirectives, age: float, life: float, expected: str
) -> None:
    assert lookup_freshness(req, rd, age=age, lifetime=life) == expected


ages = st.floats(min_value=0, max_value=1e9, allow_nan=False)
deltas = st.none() | st.integers(min_value=0, max_value=2**31)
request_strategy = st.builds(
    RequestDirectives,
    max_age=deltas,
    max_stale=st.none() | st.just(math.inf) | st.floats(min_value=0, max_value=1e9),
    min_fresh=deltas,
    no_cache=st.booleans(),
)
response_strategy = st.builds(
    ResponseDirectives,
    s_maxage=deltas,
    no_cache=st.booleans(),
    must_revalidate=st.booleans(),
    proxy_revalidate=st.booleans(),
    stale_while_revalidate=deltas,
    stale_if_error=deltas,
)


@given(request_strategy, response_strategy, ages, ages)
def test_lookup_freshness_invariants(
    req: RequestDirectives, rd: ResponseDirectives, age: float, life: float
) -> None:
    verdict = lookup_freshness(req, rd, age=age, lifetime=life)
    if verdict != "must-validate":
        assert not (req.no_cache or rd.no_cache)
        assert req.max_age is None or age <= req.max_age
    if verdict == "fresh":
        assert life > age
    if verdict in ("stale-ok", "stale-while-revalidate"):
        assert age >= life
        assert not (rd.must_revalidate or rd.proxy_revalidate or rd.s_maxage is not None)
    # growing older never makes a response more usable
    if verdict == "must-validate":
        assert lookup_freshness(req, rd, age=age + 1, lifetime=life) == "must-validate"


@pytest.mark.parametrize(
    ("req", "rd", "age", "life", "expected"),
    [
        (RQ(), RS(), 100, 60, False),
        (RQ(), RS(), 10, 60, False),  # no window granted at all
        (RQ(), RS(stale_if_error=60), 100, 60, True),
        (RQ(), RS(stale_if_error=60), 120, 60, True),
        (RQ(), RS(stale_if_error=60), 121, 60, False),
        (RQ(), RS(stale_if_error=0), 10, 60, True),  # not stale at all
        (RQ(stale_if_error=100), RS(), 100, 60, True),
        (RQ(stale_if_error=10), RS(stale_if_error=100), 100, 60, True),  # either window
        (RQ(stale_if_error=100), RS(stale_if_error=10), 100, 60, True),
        (RQ(stale_if_error=10), RS(stale_if_error=10), 100, 60, False),
        (RQ(), RS(stale_if_error=60, must_revalidate=True), 100, 60, False),
        (RQ(), RS(stale_if_error=60, proxy_revalidate=True), 100, 60, False),
        (RQ(), RS(stale_if_error=60, s_maxage=60), 100, 60, False),
        (RQ(), RS(stale_if_error=60, no_cache=True), 100, 60, False),
        (RQ(stale_if_error=60), RS(no_cache=True), 100, 60, False),
        (RQ(no_cache=True), RS(stale_if_error=60), 100, 60, True),
    ],
)
def test_may_serve_stale_if_error(
    req: RequestDirectives, rd: ResponseDirectives, age: float, life: float, expected: bool
) -> None:
    assert may_serve_stale_if_error(req, rd, age=age, lifetime=life) is expected


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ({}, {}),
        ({"etag": '"v1"'}, {"if-none-match": '"v1"'}),
        ({"etag": 'W/"v1"'}, {"if-none-match": 'W/"v1"'}),
        (LM, {"if-modified-since": LM["last-modified"]}),
        (
            {"etag": '"v1"', **LM},
            {"if-none-match": '"v1"', "if-modified-since": LM["last-modified"]},
        ),
        ({"etag": "", "last-modified": ""}, {}),
    ],
)
def test_validation_headers(stored: dict[str, str], expected: dict[str, str]) -> None:
    assert validation_headers(stored) == expected


@pytest.mark.parametrize(
    ("stored", "fresh", "expected"),
    [
        ([("A", "1")], [], [("A", "1")]),
        (
            [("ETag", '"a"'), ("Cache-Control", "max-age=1"), ("X", "x")],
            [("etag", '"b"'), ("Cache-Control", "max-age=60")],
            [("etag", '"b"'), ("Cache-Control", "max-age=60"), ("X", "x")],
        ),
        (
            # all stored lines of a name go; the 304's lines take the first one's place
            [("Link", "a"), ("Date", "d1"), ("Link", "b")],
            [("link", "c"), ("Link", "d")],
            [("link", "c"), ("Link", "d"), ("Date", "d1")],
        ),
        ([("A", "1")], [("New", "n"), ("Other", "o")], [("A", "1"), ("New", "n"), ("Other", "o")]),
        (
            [("Content-Length", "42"), ("Content-Type", "text/plain")],
            [("Content-Length", "0"), ("Content-Type", "text/html")],
            [("Content-Length", "42"), ("Content-Type", "text/html")],
        ),
        (
            [("A", "1")],
            [("Connection", "X-Hop"), ("X-Hop", "h"), ("Keep-Alive", "5"), ("A", "2")],
            [("A", "2")],
        ),
    ],
)
def test_merge_not_modified(
    stored: list[tuple[str, str]], fresh: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    assert merge_not_modified(stored, fresh) == expected


merge_names = st.sampled_from(["A", "a", "B", "Content-Length", "C", "Keep-Alive"])
merge_lines = st.lists(st.tuples(merge_names, st.sampled_from(["1", "2", "3"])), max_size=8)


@given(merge_lines, merge_lines)
def test_merge_not_modified_properties(
    stored: list[tuple[str, str]], fresh: list[tuple[str, str]]
) -> None:
    merged = merge_not_modified(stored, fresh)
    updated = {name.lower() for name, _ in strip_hop_by_hop(fresh)} - {"content-length"}
    for key in updated:
        assert [v for n, v in merged if n.lower() == key] == [
            v for n, v in fresh if n.lower() == key
        ]
    untouched = [line for line in stored if line[0].lower() not in updated]
    assert [line for line in merged if line[0].lower() not in updated] == untouched


ETAG = {"etag": '"v1"', "last-modified": http(T - 100), "date": http(T)}


@pytest.mark.parametrize(
    ("method", "req", "stored", "stored_time", "expected"),
    [
        ("GET", {}, ETAG, None, None),
        # If-None-Match: weak comparison
        ("GET", {"if-none-match": '"v1"'}, ETAG, None, 304),
        ("HEAD", {"if-none-match": '"v1"'}, ETAG, None, 304),
        ("GET", {"if-none-match": 'W/"v1"'}, ETAG, None, 304),
        ("GET", {"if-none-match": '"v1"'}, {"etag": 'W/"v1"'}, None, 304),
        ("GET", {"if-none-match": '"v0", "v1"'}, ETAG, None, 304),
        ("GET", {"if-none-match": '"v0" ,W/"v1"'}, ETAG, None, 304),
        ("GET", {"if-none-match": '"v0"'}, ETAG, None, None),
        ("GET", {"if-none-match": '"V1"'}, ETAG, None, None),  # case-sensitive
        ("GET", {"if-none-match": "*"}, ETAG, None, 304),
        ("GET", {"if-none-match": "*"}, {}, None, 304),
        ("GET", {"if-none-match": '"v1"'}, {}, None, None),
        ("GET", {"if-none-match": '"a,b"'}, {"etag": '"a,b"'}, None, 304),  # comma in a tag
        ("GET", {"if-none-match": '"a"'}, {"etag": '"a,b"'}, None, None),
        ("GET", {"if-none-match": "v1"}, {"etag": "v1"}, None, 304),  # unquoted, leniently
        ("POST", {"if-none-match": '"v1"'}, ETAG, None, 412),
        ("PUT", {"if-none-match": "*"}, ETAG, None, 412),
        # If-None-Match present: If-Modified-Since is ignored
        ("GET", {"if-none-match": '"v0"', "if-modified-since": http(T)}, ETAG, None, None),
        # If-Modified-Since
        ("GET", {"if-modified-since": http(T - 100)}, ETAG, None, 304),
        ("GET", {"if-modified-since": http(T)}, ETAG, None, 304),
        ("GET", {"if-modified-since": http(T - 101)}, ETAG, None, None),
        ("HEAD", {"if-modified-since": http(T)}, ETAG, None, 304),
        ("POST", {"if-modified-since": http(T)}, ETAG, None, None),
        ("GET", {"if-modified-since": "yesterday"}, ETAG, None, None),
        ("GET", {"if-modified-since": f"{http(T)}, {http(T)}"}, ETAG, None, None),
        # no Last-Modified: stored Date, then stored_time (RFC 9111 4.3.2)
        ("GET", {"if-modified-since": http(T)}, {"date": http(T - 5)}, None, 304),
        ("GET", {"if-modified-since": http(T)}, {"date": http(T + 5)}, None, None),
        ("GET", {"if-modified-since": http(T)}, {}, T - 5, 304),
        ("GET", {"if-modified-since": http(T)}, {}, T + 5, None),
        ("GET", {"if-modified-since": http(T)}, {}, None, None),
        ("GET", {"if-modified-since": http(T)}, {"date": "bad"}, T - 5, 304),
        ("GET", {"if-modified-since": http(0)}, {}, 0.0, 304),  # epoch 0 is a time, not "none"
        # If-Match: strong comparison, beats everything
        ("GET", {"if-match": '"v1"'}, ETAG, None, None),
        ("GET", {"if-match": '"v0", "v1"'}, ETAG, None, None),
        ("GET", {"if-match": '"v0"'}, ETAG, None, 412),
        ("GET", {"if-match": 'W/"v1"'}, ETAG, None, 412),
        ("GET", {"if-match": '"v1"'}, {"etag": 'W/"v1"'}, None, 412),
        ("GET", {"if-match": "*"}, ETAG, None, None),
        ("GET", {"if-match": '"v1"'}, {}, None, 412),
        ("GET", {"if-match": '"v0"', "if-none-match": '"v1"'}, ETAG, None, 412),
        ("GET", {"if-match": '"v1"', "if-none-match": '"v1"'}, ETAG, None, 304),
        # If-Match present: If-Unmodified-Since ignored
        ("GET", {"if-match": '"v1"', "if-unmodified-since": http(T - 200)}, ETAG, None, None),
        # If-Unmodified-Since
        ("GET", {"if-unmodified-since": http(T - 200)}, ETAG, None, 412),
        ("GET", {"if-unmodified-since": http(T - 100)}, ETAG, None, None),
        ("GET", {"if-unmodified-since": "bad"}, ETAG, None, None),
        ("GET", {"if-unmodified-since": http(T - 200)}, {"date": http(T)}, None, None),
        (
            "GET",
            {"if-unmodified-since": http(T - 200), "if-none-match": '"v1"'},
            ETAG,
            None,
            412,
        ),
        (
            "GET",
            {"if-unmodified-since": http(T), "if-modified-since": http(T)},
            ETAG,
            None,
            304,
        ),
    ],
)
def test_evaluate_conditional(
    method: str,
    req: dict[str, str],
    stored: dict[str, str],
    stored_time: float | None,
    expected: int | None,
) -> None:
    assert evaluate_conditional(method, req, stored, stored_time=stored_time) == expected


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [
        ("GET", 200, False),
        ("HEAD", 200, False),
        ("OPTIONS", 204, False),
        ("TRACE", 200, False),
        ("POST", 200, True),
        ("POST", 201, True),
        ("PUT", 204, True),
        ("DELETE", 202, True),
        ("PATCH", 303, True),
        ("PURGE", 200, True),
        ("post", 200, True),  # not the safe GET
        ("POST", 199, False),
        ("POST", 400, False),
        ("DELETE", 404, False),
        ("PUT", 500, False),
    ],
)
def test_invalidates(method: str, status: int, expected: bool) -> None:
    assert invalidates(method, status) is expected


# --------------------------------------------------------------------------- vary


@pytest.mark.parametrize(
    ("resp", "expected"),
    [
        ({}, ()),
        ({"vary": ""}, ()),
        ({"vary": " , "}, ()),
        ({"vary": "Accept-Encoding"}, ("accept-encoding",)),
        (
            {"vary": "User-Agent, accept-encoding ,ACCEPT-ENCODING"},
            ("accept-encoding", "user-agent"),
        ),
        ({"vary": "b, a, c"}, ("a", "b", "c")),
        ({"vary": "*"}, None),
        ({"vary": "Accept, * "}, None),
    ],
)
def test_vary_names(resp: dict[str, str], expected: tuple[str, ...] | None) -> None:
    assert vary_names(resp) == expected


@pytest.mark.parametrize(
    ("names", "req", "expected"),
    [
        ((), {"accept": "x"}, ()),
        (("accept",), {}, ("\x00",)),
        (("accept",), {"accept": ""}, ("",)),
        (("accept",), {"accept": "  text/html "}, ("text/html",)),
        (("accept-encoding",), {"accept-encoding": "gzip ,  br,\tzstd"}, ("gzip,br,zstd",)),
        (("a", "b"), {"b": "2", "a": "1"}, ("1", "2")),
        (("a", "b"), {"b": "2"}, ("\x00", "2")),
        (("accept",), {"accept": "Text/HTML"}, ("Text/HTML",)),  # no value case folding
    ],
)
def test_vary_values(
    names: tuple[str, ...], req: dict[str, str], expected: tuple[str, ...]
) -> None:
    assert vary_values(names, req) == expected


def test_vary_missing_differs_from_empty() -> None:
    assert vary_values(("x",), {}) != vary_values(("x",), {"x": ""})


vary_items = st.lists(st.sampled_from(["gzip", "br", "deflate", "x;q=0.5"]), min_size=1)


@given(vary_items, st.lists(st.sampled_from(["", " ", "\t", "  "]), min_size=8, max_size=8))
def test_vary_values_ignore_whitespace_around_commas(items: list[str], pads: list[str]) -> None:
    tight = ",".join(items)
    loose = pads[0] + f"{pads[1]},{pads[2]}".join(items) + pads[3]
    assert vary_values(("accept-encoding",), {"accept-encoding": tight}) == vary_values(
        ("accept-encoding",), {"accept-encoding": loose}
    )


@pytest.mark.parametrize(
    ("vary", "first", "second"),
    [
        ("Accept", {"accept": "a"}, {"accept": "a"}),
        ("Accept", {"accept": "a"}, {"accept": "b"}),
        ("Accept", {}, {}),
        ("Accept", {"accept": "a"}, {}),
        ("Accept", {"accept": ""}, {}),
        ("Accept", {"other": "x"}, {"other": "y"}),
        ("Accept, Accept-Language", {"accept": "a", "accept-language": "en"}, {"accept": "a"}),
        (
            "accept-language, Accept",
            {"accept": "a", "accept-language": "en"},
            {"accept-language": "en", "accept": "a"},
        ),
        ("User-Agent", {"user-agent": "x/1"}, {"user-agent": "X/1"}),
    ],
)
def test_vary_matching_matches_hishel(
    vary: str, first: dict[str, str], second: dict[str, str]
) -> None:
    names = vary_names({"vary": vary})
    assert names is not None
    ours = vary_values(names, first) == vary_values(names, second)
    entry = hishel.Entry(
        id=uuid.uuid4(),
        request=hishel.Request(method="GET", url="https://e/", headers=hishel.Headers(first)),
        response=hishel.Response(status_code=200, headers=hishel.Headers({"vary": vary})),
    )
    request = hishel.Request(method="GET", url="https://e/", headers=hishel.Headers(second))
    assert ours == vary_headers_match(request, entry)


# --------------------------------------------------------------------------- cache-status


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "cdn-edge"),
        ({"hit": True}, "cdn-edge; hit"),
        ({"hit": True, "ttl": 42}, "cdn-edge; hit; ttl=42"),
        ({"hit": True, "ttl": -5}, "cdn-edge; hit; ttl=-5"),
        (
            {"fwd": "miss", "fwd_status": 200, "stored": True, "ttl": 60},
            "cdn-edge; fwd=miss; fwd-status=200; stored; ttl=60",
        ),
        (
            {"fwd": "uri-miss", "fwd_status": 200, "collapsed": True},
            "cdn-edge; fwd=uri-miss; fwd-status=200; collapsed",
        ),
        ({"fwd": "stale", "fwd_status": 304}, "cdn-edge; fwd=stale; fwd-status=304"),
        ({"fwd": "bypass", "detail": "no-store"}, "cdn-edge; fwd=bypass; detail=no-store"),
        ({"fwd": "method"}, "cdn-edge; fwd=method"),
        ({"fwd": "vary-miss", "stored": False}, "cdn-edge; fwd=vary-miss"),
        (
            {"hit": True, "detail": "stale-while-revalidate"},
            "cdn-edge; hit; detail=stale-while-revalidate",
        ),
        ({"detail": "origin timed out"}, 'cdn-edge; detail="origin timed out"'),
        ({"detail": 'say "hi" \\o/'}, 'cdn-edge; detail="say \\"hi\\" \\\\o/"'),
        ({"detail": "1abc"}, 'cdn-edge; detail="1abc"'),
        ({"detail": ""}, 'cdn-edge; detail=""'),
        ({"detail": "café\n"}, 'cdn-edge; detail="caf??"'),
        ({"key": "https://e.com/a?b"}, 'cdn-edge; key="https://e.com/a?b"'),
        (
            {"hit": True, "ttl": 1, "key": "k", "detail": "d"},
            'cdn-edge; hit; ttl=1; key="k"; detail=d',
        ),
    ],
)
def test_cache_status(kwargs: dict[str, object], expected: str) -> None:
    assert cache_status(**kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("fwd", ["", "two words", "1miss", 'q"'])
def test_cache_status_rejects_bad_fwd(fwd: str) -> None:
    with pytest.raises(ValueError):
        cache_status(fwd=fwd)


@given(
    st.booleans(),
    st.none() | st.sampled_from(["miss", "uri-miss", "vary-miss", "stale", "request"]),
    st.none() | st.integers(min_value=100, max_value=599),
    st.none() | st.integers(min_value=-(10**9), max_value=10**9),
    st.none() | st.text(),
    st.none() | st.text(),
)
def test_cache_status_is_a_structured_field(
    hit: bool,
    fwd: str | None,
    fwd_status: int | None,
    ttl: int | None,
    detail: str | None,
    key: str | None,
) -> None:
    value = cache_status(hit=hit, fwd=fwd, fwd_status=fwd_status, ttl=ttl, detail=detail, key=key)
    # A one-member sf-list whose item is a lowercase token with parameters is also a valid
    # one-member sf-dictionary, so the RFC 8941 dictionary parser checks the syntax.
    assert _parse_targeted(value) == {CACHE_NAME: None}


# --------------------------------------------------------------------------- constants


def test_constants() -> None:
    assert CACHE_NAME == "cdn-edge"
    assert {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501} == HEURISTICALLY_CACHEABLE
    assert HEURISTIC_CAP == DAY
    assert calendar.timegm(time.gmtime(T)) == T
