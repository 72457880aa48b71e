"""The caching policy of the cdn-edge shared cache.

This module decides; it never acts. It answers the questions the proxy asks on every request:
may this response be stored, how long is it fresh, how old is it, may a stored response answer
this request (fresh, stale, or only after validation), how is it validated and updated by a 304,
which conditional request can be answered locally, what does an unsafe request invalidate, how
does Vary split the cache key, and what goes into the Cache-Status field.

Everything here is pure: no sockets, no files, no logging, no clock reads and no mutable module
state. Times (``now``, ``request_time``, ``response_time``, ``stored_time``) are passed in as
float seconds since the epoch, so every rule is deterministic and cheap enough to run on every
cache hit. Header fields arrive as :data:`Headers` (lowercase field name -> field lines combined
with ", ", RFC 9110 5.3); the functions that must see individual field lines (hop-by-hop
stripping, merging a 304) take ``(name, value)`` pairs instead.

The cache is a *shared* cache (RFC 9111 1): s-maxage applies and implies proxy-revalidate,
``private`` responses and responses to authenticated requests are not stored unless explicitly
allowed, and CDN-Cache-Control (RFC 9213) replaces Cache-Control when present.

Rule for this file: every public function's docstring names the RFC section it implements
(RFC 9111 caching, RFC 9110 semantics, RFC 5861 stale extensions, RFC 9213 targeted cache
control, RFC 9211 Cache-Status, RFC 8941 structured fields) and states where and why it departs
from the RFC. Keep it that way when a rule changes.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from string import ascii_letters, ascii_lowercase, digits
from typing import Literal, TypeAlias

__all__ = [
    "CACHE_NAME",
    "HEURISTICALLY_CACHEABLE",
    "HEURISTIC_CAP",
    "HEURISTIC_FRACTION",
    "Freshness",
    "Headers",
    "RequestDirectives",
    "ResponseDirectives",
    "cache_status",
    "combine_fields",
    "connection_nominated",
    "current_age",
    "evaluate_conditional",
    "format_http_date",
    "freshness_lifetime",
    "initial_age",
    "invalidates",
    "lookup_freshness",
    "may_serve_stale_if_error",
    "merge_not_modified",
    "parse_cache_control",
    "parse_http_date",
    "request_directives",
    "response_directives",
    "strip_hop_by_hop",
    "unstorable_reason",
    "validation_headers",
    "vary_names",
    "vary_values",
]

Headers: TypeAlias = Mapping[str, str]
"""Lowercase field name -> combined field value (RFC 9110 5.3)."""

Freshness: TypeAlias = Literal["fresh", "stale-ok", "stale-while-revalidate", "must-validate"]

CACHE_NAME = "cdn-edge"
"""Our member name in Cache-Status (RFC 9211 2); a valid sf-token."""

HEURISTIC_FRACTION = 0.1
"""RFC 9111 4.2.2: the customary 10 % of the time since Last-Modified."""

HEURISTIC_CAP = 86400.0
"""Upper bound of a heuristic lifetime. RFC 9111 4.2.2 sets none, but a wrong or ancient
Last-Modified would otherwise pin an object for weeks with nobody having asked for it; one day is
the age past which RFC 7234 4.2.2 asked for a Warning 113, i.e. where heuristics turn risky."""

HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
"""RFC 9110 15.1: status codes cacheable by default (with a heuristic lifetime)."""

# Final status codes whose caching requirements we implement (must-understand, RFC 9111
# 5.2.2.3): those defined by RFC 9110 15, minus 206 and 304, which we never store.
_UNDERSTOOD = frozenset(
    {200, 201, 202, 203, 204, 205}
    | {300, 301, 302, 303, 305, 307, 308}
    | set(range(400, 418))
    | {421, 422, 426}
    | set(range(500, 506))
)

_DELTA_MAX = 2**31  # RFC 9111 1.2.2
_MISSING = "\x00"  # RFC 9110 5.5 forbids NUL in field values, so it cannot collide with one
_OWS = " \t"
_TCHARS = "!#$%&'*+-.^_`|~" + digits + ascii_letters  # RFC 9110 5.6.2
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 9.2.1

# RFC 9110 7.6.1 names Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and
# Upgrade. RFC 9110 does NOT make Trailer hop-by-hop (6.6.2), and "Trailers", listed in RFC 2616
# 13.5.1, is no field at all (the field is Trailer), so it is not in the set. We still drop
# "trailer": we de-chunk and store whole bodies, discarding trailer fields (RFC 9112 7.1.2
# allows that), so a Trailer announcing them would be false in anything we send.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
    }
)

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name: i for i, name in enumerate(_MONTHS, 1)}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # time.struct_time.tm_wday order
_SHORT_DAYS = frozenset(_DAYS)
_LONG_DAYS = frozenset(
    {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"}
)

# RFC 8941 3.1.2, 3.3.4, 3.3.5 character classes
_SF_KEY_START = ascii_lowercase + "*"
_SF_KEY_CHARS = ascii_lowercase + digits + "_-.*"
_SF_TOKEN_START = ascii_letters + "*"
_SF_TOKEN_CHARS = _TCHARS + ":/"
_BASE64 = ascii_letters + digits + "+/="


# --------------------------------------------------------------------------- fields


def combine_fields(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Combine field lines into one value per lowercase name (RFC 9110 5.3).

    Lines of the same name are joined with ", " in order; each value loses its leading and
    trailing whitespace (RFC 9110 5.5), and empty lines are dropped when joining, since empty
    list elements carry nothing (RFC 9110 5.6.1). A lone empty line stays "" (present, empty).
    Set-Cookie cannot be combined losslessly (RFC 9110 5.3); keep its raw lines for forwarding.
    """
    combined: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        value = value.strip(_OWS)
        previous = combined.get(key)
        if not previous:  # first line, or only empty ones so far
            combined[key] = value
        elif value:
            combined[key] = f"{previous}, {value}"
    return combined


def connection_nominated(fields: Headers) -> frozenset[str]:
    """Names of the hop-by-hop fields of a message (RFC 9110 7.6.1).

    The fixed connection-specific fields, plus every name listed in Connection (lowercased).
    Trailer is included: not because RFC 9110 calls it hop-by-hop (it does not), but because we
    drop trailer fields when de-chunking a body (RFC 9112 7.1.2), so announcing them would lie.
    """
    connection = fields.get("connection")
    if not connection:
        return _HOP_BY_HOP
    listed = {option.strip(_OWS).lower() for option in connection.split(",")}
    listed.discard("")
    return _HOP_BY_HOP | listed


def strip_hop_by_hop(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop and Connection-nominated field lines (RFC 9110 7.6.1, RFC 9111 3.1).

    The remaining lines keep their original name case and order.
    """
    lines = list(fields)
    connection = ", ".join(value for name, value in lines if name.lower() == "connection")
    drop = connection_nominated({"connection": connection})
    return [(name, value) for name, value in lines if name.lower() not in drop]


# --------------------------------------------------------------------------- dates


def _digits(text: str, size: int) -> bool:
    # isdigit() alone accepts non-ASCII digits such as "²", which int() rejects
    return len(text) == size and text.isascii() and text.isdigit()


def parse_http_date(value: str | None) -> float | None:
    """Parse an HTTP-date (RFC 9110 5.6.7) to epoch seconds; None when it is not one.

    Accepts the three formats recipients must: IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"),
    rfc850-date ("Sunday, 06-Nov-94 08:49:37 GMT") and asctime-date ("Sun Nov  6 08:49:37
    1994"), case-sensitively as the ABNF says; runs of whitespace are tolerated. The weekday is
    checked to be a weekday name but not against the date, which the RFC does not require.

    Deviation: the RFC maps a two-digit rfc850 year that looks more than 50 years ahead to the
    past century, which needs the current time; this function reads no clock, so it uses the
    fixed POSIX pivot instead (00-69 -> 20xx, 70-99 -> 19xx). They disagree only on years that
    rfc850 senders (long obsolete) do not produce.

    A list of dates (two Expires lines combined) is not a date, so it yields None, which makes
    the response stale (RFC 9111 4.2.1 permits that for duplicated values).
    """
    if not value:
        return None
    parts = value.split()
    if len(parts) == 6:  # IMF-fixdate
        weekday, day, month_name, year_text, clock, zone = parts
        if weekday[:-1] not in _SHORT_DAYS or weekday[-1] != "," or not _digits(year_text, 4):
            return None
        year = int(year_text)
    elif len(parts) == 4:  # rfc850-date
        weekday, day_month_year, clock, zone = parts
        day, _, rest = day_month_year.partition("-")
        month_name, _, year_text = rest.partition("-")
        if weekday[:-1] not in _LONG_DAYS or weekday[-1] != "," or not _digits(year_text, 2):
            return None
        year = int(year_text)
        year += 2000 if year < 70 else 1900
    elif len(parts) == 5:  # asctime-date; the day may be one digit, space-padded
        weekday, month_name, day, clock, year_text = parts
        zone = "GMT"
        if weekday not in _SHORT_DAYS or not _digits(year_text, 4):
            return None
        if len(day) == 1:
            day = "0" + day
        year = int(year_text)
    else:
        return None
    month = _MONTH_NUMBER.get(month_name)
    if (
        month is None
        or zone != "GMT"
        or not _digits(day, 2)
        or len(clock) != 8
        or clock[2] != ":"
        or clock[5] != ":"
        or not _digits(clock[:2], 2)
        or not _digits(clock[3:5], 2)
        or not _digits(clock[6:], 2)
    ):
        return None
    mday, hour, minute, second = int(day), int(clock[:2]), int(clock[3:5]), int(clock[6:])
    # second 60 is a leap second (RFC 5322 3.3); timegm carries it into the next minute
    if year < 1 or hour > 23 or minute > 59 or second > 60:
        return None
    if not 1 <= mday <= calendar.monthrange(year, month)[1]:
        return None
    return float(calendar.timegm((year, month, mday, hour, minute, second)))


def format_http_date(ts: float) -> str:
    """Format epoch seconds as an IMF-fixdate (RFC 9110 5.6.7), truncating to whole seconds.

    Locale-independent (no strftime). ``ts`` must be finite and within years 1-9999.
    """
    t = time.gmtime(int(ts))
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


# --------------------------------------------------------------------------- directives


def _is_token(text: str) -> bool:
    # strip() removes only leading/trailing set members: "" is left iff every char is a tchar
    return bool(text) and not text.strip(_TCHARS)


def _unquote(value: str, start: int) -> tuple[str, int]:
    # RFC 9110 5.6.4 quoted-string starting at value[start] == '"'; returns the unescaped text
    # and the index after the closing quote. Unterminated: the rest of the value is the text.
    chars: list[str] = []
    i = start + 1
    end = len(value)
    while i < end:
        char = value[i]
        if char == '"':
            return "".join(chars), i + 1
        if char == "\\" and i + 1 < end:
            i += 1
            char = value[i]
        chars.append(char)
        i += 1
    return "".join(chars), end


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Parse a Cache-Control field value into {directive: argument or None} (RFC 9111 5.2).

    Directive names are case-insensitive, so they are lowercased. Arguments may be a token or a
    quoted-string (RFC 9111 5.2: recipients accept both forms for every directive); quoted
    strings are unescaped and may contain commas. Whitespace around "=" is tolerated. Members
    whose name is not a token are junk and skipped; this function never raises.

    The first occurrence of a directive wins. RFC 9111 4.2.1 lets a cache use either the first
    of duplicated values or treat the response as stale; "first" applies uniformly to every
    directive, and a duplicate appended by an intermediary cannot override the origin's value.
    """
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    if '"' not in value:  # the common case: plain split, no quoting to honour
        for member in value.split(","):
            name, equals, raw = member.partition("=")
            name = name.strip(_OWS)
            if _is_token(name):
                directives.setdefault(name.lower(), raw.strip(_OWS) if equals else None)
        return directives
    end = len(value)
    i = 0
    while i < end:
        comma = value.find(",", i)
        if comma < 0:
            comma = end
        equals_at = value.find("=", i, comma)
        argument: str | None = None
        if equals_at < 0:
            name = value[i:comma]
        else:
            name = value[i:equals_at]
            j = equals_at + 1
            while j < end and value[j] in _OWS:
                j += 1
            if j < end and value[j] == '"':
                argument, j = _unquote(value, j)
                comma = value.find(",", j)  # anything between the quote and the comma is junk
                if comma < 0:
                    comma = end
            else:
                argument = value[j:comma].strip(_OWS)
        name = name.strip(_OWS)
        if _is_token(name):
            directives.setdefault(name.lower(), argument)
        i = comma + 1
    return directives


def _delta(argument: str | None) -> int | None:
    # RFC 9111 1.2.2 delta-seconds; None when invalid. The length check comes first because
    # int() refuses strings over 4300 digits (and is slow before that).
    if not argument or not argument.isascii() or not argument.isdigit():
        return None
    if len(argument) > 10:
        return _DELTA_MAX
    return min(int(argument), _DELTA_MAX)


def _delta_or_stale(directives: Mapping[str, str | None], name: str) -> int | None:
    # For freshness-limiting directives an invalid value means 0, never "absent": RFC 9111
    # 4.2.1 encourages treating invalid freshness information as stale.
    if name not in directives:
        return None
    seconds = _delta(directives[name])
    return 0 if seconds is None else seconds


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """Request cache directives (RFC 9111 5.2.1, Pragma 5.4, stale-if-error RFC 5861 4)."""

    max_age: int | None = None
    max_stale: float | None = None  # math.inf for a bare max-stale
    min_fresh: int | None = None
    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    stale_if_error: int | None = None


def request_directives(req: Headers) -> RequestDirectives:
    """Read a request's cache directives (RFC 9111 5.2.1 and 5.4, RFC 5861 4).

    Pragma: no-cache counts only when the request has no Cache-Control field at all (5.4).
    Invalid delta-seconds (missing, negative, non-digit) make a directive absent, except
    max-age, which becomes 0: the client asked for a bound on age, so the conservative reading
    of an unreadable bound is "validate". Values above 2**31 become 2**31 (1.2.2).
    """
    cache_control = req.get("cache-control")
    directives = parse_cache_control(cache_control)
    no_cache = "no-cache" in directives
    if cache_control is None:
        pragma = req.get("pragma")
        if pragma:
            no_cache = any(item.strip(_OWS).lower() == "no-cache" for item in pragma.split(","))
    max_stale: float | None = None
    if "max-stale" in directives:
        argument = directives["max-stale"]
        if argument is None:
            max_stale = math.inf
        else:
            seconds = _delta(argument)
            max_stale = None if seconds is None else float(seconds)
    return RequestDirectives(
        max_age=_delta_or_stale(directives, "max-age"),
        max_stale=max_stale,
        min_fresh=_delta(directives.get("min-fresh")),
        no_cache=no_cache,
        no_store="no-store" in directives,
        only_if_cached="only-if-cached" in directives,
        stale_if_error=_delta(directives.get("stale-if-error")),
    )


@dataclass(frozen=True, slots=True)
class ResponseDirectives:
    """Response cache directives (RFC 9111 5.2.2, RFC 5861, RFC 8246 immutable, RFC 9213)."""

    max_age: int | None = None
    s_maxage: int | None = None
    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    must_understand: bool = False
    immutable: bool = False
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    from_cdn_cache_control: bool = False  # CDN-Cache-Control was present, valid and used


class _SFError(ValueError):
    """The field is not a valid Structured Field; RFC 8941 4.2 fails the whole field."""


def _sf_key(s: str, i: int) -> tuple[str, int]:
    if i >= len(s) or s[i] not in _SF_KEY_START:
        raise _SFError
    j = i + 1
    while j < len(s) and s[j] in _SF_KEY_CHARS:
        j += 1
    return s[i:j], j


def _sf_number(s: str, i: int) -> tuple[str, int]:
    # RFC 8941 4.2.4: at most 15 integer digits, or 12 before and 1-3 after a decimal point
    j = i + 1 if s[i] == "-" else i
    start = j
    while j < len(s) and "0" <= s[j] <= "9":
        j += 1
    whole = j - start
    if whole == 0:
        raise _SFError
    if j < len(s) and s[j] == ".":
        k = j + 1
        while k < len(s) and "0" <= s[k] <= "9":
            k += 1
        if whole > 12 or not 1 <= k - j - 1 <= 3:
            raise _SFError
        return s[i:k], k
    if whole > 15:
        raise _SFError
    return s[i:j], j


def _sf_string(s: str, i: int) -> tuple[str, int]:
    # RFC 8941 4.2.5: printable ASCII; only \" and \\ are escapes
    chars: list[str] = []
    j = i + 1
    while j < len(s):
        char = s[j]
        if char == '"':
            return "".join(chars), j + 1
        if char == "\\":
            if s[j + 1 : j + 2] not in ('"', "\\"):
                raise _SFError
            chars.append(s[j + 1])
            j += 2
        elif " " <= char <= "~":
            chars.append(char)
            j += 1
        else:
            raise _SFError
    raise _SFError


def _sf_bare_item(s: str, i: int) -> tuple[str | bool, int]:
    # RFC 8941 4.2.3.1; integers, decimals, tokens and byte sequences are kept as their text
    if i >= len(s):
        raise _SFError
    char = s[i]
    if char == "-" or "0" <= char <= "9":
        return _sf_number(s, i)
    if char == '"':
        return _sf_string(s, i)
    if char in _SF_TOKEN_START:
        j = i + 1
        while j < len(s) and s[j] in _SF_TOKEN_CHARS:
            j += 1
        return s[i:j], j
    if char == ":":
        j = s.find(":", i + 1)
        if j < 0 or s[i + 1 : j].strip(_BASE64):
            raise _SFError
        return s[i + 1 : j], j + 1
    if char == "?" and s[i + 1 : i + 2] in ("0", "1"):
        return s[i + 1] == "1", i + 2
    raise _SFError


def _sf_parameters(s: str, i: int) -> int:
    # RFC 8941 4.2.3.2; no cache directive defines parameters, so they are only skipped
    while i < len(s) and s[i] == ";":
        i += 1
        while i < len(s) and s[i] == " ":
            i += 1
        _, i = _sf_key(s, i)
        if i < len(s) and s[i] == "=":
            _, i = _sf_bare_item(s, i + 1)
    return i


def _sf_member_value(s: str, i: int) -> tuple[str | bool, int]:
    # RFC 8941 4.2.1.1 item or inner list; an inner list means nothing as a cache directive
    # argument, so it is kept as "" (present, never a valid delta-seconds)
    if i < len(s) and s[i] == "(":
        i += 1
        while True:
            while i < len(s) and s[i] == " ":
                i += 1
            if i < len(s) and s[i] == ")":
                return "", _sf_parameters(s, i + 1)
            _, i = _sf_bare_item(s, i)
            i = _sf_parameters(s, i)
            if i >= len(s) or s[i] not in " )":
                raise _SFError
    item, i = _sf_bare_item(s, i)
    return item, _sf_parameters(s, i)


def _parse_targeted(value: str) -> dict[str, str | None] | None:
    """Parse a targeted cache-control field as an RFC 8941 4.2.2 Dictionary (RFC 9213 2.1).

    Boolean true (a bare key) maps to a directive without argument, Boolean false to an absent
    directive, everything else to its text. A later duplicate key overwrites an earlier one, as
    RFC 8941 requires (unlike Cache-Control). None when the field is empty or fails to parse.
    """
    s = value.strip(_OWS)
    if not s:
        return None
    directives: dict[str, str | None] = {}
    i = 0
    try:
        while True:
            key, i = _sf_key(s, i)
            item: str | bool
            if i < len(s) and s[i] == "=":
                item, i = _sf_member_value(s, i + 1)
            else:
                item, i = True, _sf_parameters(s, i)
            directives.pop(key, None)
            if item is not False:
                directives[key] = None if item is True else str(item)
            while i < len(s) and s[i] in _OWS:
                i += 1
            if i == len(s):
                return directives
            if s[i] != ",":
                raise _SFError
            i += 1
            while i < len(s) and s[i] in _OWS:
                i += 1
            if i == len(s):  # trailing comma
                raise _SFError
    except _SFError:
        return None


def response_directives(resp: Headers) -> ResponseDirectives:
    """Read a response's cache directives (RFC 9111 5.2.2, RFC 5861, RFC 8246, RFC 9213 2).

    RFC 9213 2.2: a CDN-Cache-Control field that is present, non-empty and valid (parsed as an
    RFC 8941 Dictionary, 2.1) replaces Cache-Control, and Expires, for this cache; otherwise
    Cache-Control is used. ``from_cdn_cache_control`` records which, because Expires must then be
    ignored too (see :func:`freshness_lifetime`).

    An invalid max-age or s-maxage counts as 0 (stale; RFC 9111 4.2.1 encourages this); an
    invalid stale-while-revalidate or stale-if-error counts as absent, since they only grant.
    Field-qualified no-cache="f" and private="f" act as their unqualified forms: we do not strip
    or revalidate individual fields, so we take the stricter reading (5.2.2.4, 5.2.2.7).
    """
    directives: Mapping[str, str | None] | None = None
    targeted = resp.get("cdn-cache-control")
    if targeted:
        directives = _parse_targeted(targeted)
    from_cdn = directives is not None
    if directives is None:
        directives = parse_cache_control(resp.get("cache-control"))
    return ResponseDirectives(
        max_age=_delta_or_stale(directives, "max-age"),
        s_maxage=_delta_or_stale(directives, "s-maxage"),
        no_store="no-store" in directives,
        no_cache="no-cache" in directives,
        private="private" in directives,
        public="public" in directives,
        must_revalidate="must-revalidate" in directives,
        proxy_revalidate="proxy-revalidate" in directives,
        must_understand="must-understand" in directives,
        immutable="immutable" in directives,
        stale_while_revalidate=_delta(directives.get("stale-while-revalidate")),
        stale_if_error=_delta(directives.get("stale-if-error")),
        from_cdn_cache_control=from_cdn,
    )


# --------------------------------------------------------------------------- storing


def _has_explicit_expiry(resp: Headers, rd: ResponseDirectives) -> bool:
    # RFC 9213 2.2: a used CDN-Cache-Control makes this cache ignore Expires
    return (
        rd.s_maxage is not None
        or rd.max_age is not None
        or (not rd.from_cdn_cache_control and "expires" in resp)
    )


def unstorable_reason(
    method: str, status: int, req: Headers, resp: Headers, rd: ResponseDirectives
) -> str | None:
    """Why a shared cache must not store this response (RFC 9111 3, 3.5); None if it may.

    Checks, in order, each giving its token:

    - "method": the method is not GET. HEAD is answered from stored GETs elsewhere.
    - "status": not a final status (1xx, or outside 100-599); 206 or 304 (we store whole objects
      and serve ranges and 304s from them, so a partial or a bodiless response is never an
      object); must-understand with a status we do not implement (5.2.2.3); or neither
      heuristically cacheable (RFC 9110 15.1) nor given explicit freshness (max-age, s-maxage,
      Expires) nor public (3).
    - "no-store": in the request (5.2.1.5) or the response (5.2.2.5), unless the response also
      has must-understand and its status is understood, which overrides it (5.2.2.3).
    - "private": unqualified or qualified, see :func:`response_directives` (5.2.2.7).
    - "authorization": the request has Authorization and the response lacks public, s-maxage
      and must-revalidate (3.5).
    - "set-cookie": product policy, not RFC: a Set-Cookie response is almost always personal, so
      we do not store it, although RFC 9111 7.3 (security considerations) lets a cache do so.
    - "vary-star": Vary contains "*", which never matches a later request (4.1).
    - "no-freshness": no explicit freshness, not public, and no validator (ETag, Last-Modified).
      With a validator the response is worth storing even at lifetime 0, since every reuse costs
      only a 304; Last-Modified also enables the heuristic (4.2.2). Without one, every reuse
      would be an unconditional refetch, so storing it (even with no-cache) gains nothing.
    """
    if method != "GET":
        return "method"
    if not 200 <= status <= 599 or status in (206, 304):
        return "status"
    if rd.must_understand and status not in _UNDERSTOOD:
        return "status"
    explicit = _has_explicit_expiry(resp, rd)
    if status not in HEURISTICALLY_CACHEABLE and not explicit and not rd.public:
        return "status"
    # here must_understand implies an understood status, which lifts the response no-store
    if (rd.no_store and not rd.must_understand) or "no-store" in parse_cache_control(
        req.get("cache-control")
    ):
        return "no-store"
    if rd.private:
        return "private"
    if "authorization" in req and not (rd.public or rd.s_maxage is not None or rd.must_revalidate):
        return "authorization"
    if "set-cookie" in resp:
        return "set-cookie"
    if vary_names(resp) is None:
        return "vary-star"
    if not (explicit or rd.public or resp.get("etag") or resp.get("last-modified")):
        return "no-freshness"
    return None


# --------------------------------------------------------------------------- freshness and age


def freshness_lifetime(
    status: int, resp: Headers, rd: ResponseDirectives, *, response_time: float
) -> float:
    """Freshness lifetime in seconds for a shared cache (RFC 9111 4.2.1, 4.2.2).

    s-maxage, else max-age, else Expires minus Date (an Expires that does not parse means
    already expired, 5.3; Expires is ignored when CDN-Cache-Control is used, RFC 9213 2.2).
    A missing or invalid Date is replaced by ``response_time``, the time the response was
    received (RFC 9110 6.6.1 has the recipient supply the Date in that case).

    Without explicit expiry, and only for a heuristically cacheable status (RFC 9110 15.1) or a
    public response, the heuristic is HEURISTIC_FRACTION of (Date - Last-Modified), capped at
    HEURISTIC_CAP and never negative (4.2.2). Otherwise 0.
    """
    if rd.s_maxage is not None:
        return float(rd.s_maxage)
    if rd.max_age is not None:
        return float(rd.max_age)
    date = parse_http_date(resp.get("date"))
    if date is None:
        date = response_time
    if not rd.from_cdn_cache_control and "expires" in resp:
        expires = parse_http_date(resp["expires"])
        return 0.0 if expires is None else max(0.0, expires - date)
    if status in HEURISTICALLY_CACHEABLE or rd.public:
        last_modified = parse_http_date(resp.get("last-modified"))
        if last_modified is not None:
            return min(HEURISTIC_CAP, max(0.0, HEURISTIC_FRACTION * (date - last_modified)))
    return 0.0


def initial_age(resp: Headers, *, request_time: float, response_time: float) -> float:
    """corrected_initial_age of a response as received (RFC 9111 4.2.3).

    max(apparent_age, corrected_age_value), where apparent_age = max(0, response_time - Date)
    and corrected_age_value = Age + (response_time - request_time). Age is delta-seconds; of a
    list only the first member counts, and an invalid Age is ignored (5.1). A missing or invalid
    Date gives apparent_age 0 (the recipient supplies Date = response_time, RFC 9110 6.6.1).
    """
    date = parse_http_date(resp.get("date"))
    apparent_age = 0.0 if date is None else max(0.0, response_time - date)
    age_field = resp.get("age")
    age_value = _delta(age_field.partition(",")[0].strip(_OWS)) if age_field else None
    response_delay = response_time - request_time
    return max(apparent_age, (age_value or 0) + response_delay)


def current_age(initial: float, response_time: float, now: float) -> float:
    """Current age of a stored response (RFC 9111 4.2.3): initial age plus resident time.

    Resident time is clamped at 0 so a wall clock stepping back cannot make a response younger
    (and so fresher) than when it was stored.
    """
    return initial + max(0.0, now - response_time)


def _stale_forbidden(rd: ResponseDirectives) -> bool:
    # RFC 9111 4.2.4: never serve stale against must-revalidate (5.2.2.2), proxy-revalidate
    # (5.2.2.8), s-maxage (implies proxy-revalidate, 5.2.2.10) or no-cache (5.2.2.4)
    return rd.must_revalidate or rd.proxy_revalidate or rd.s_maxage is not None or rd.no_cache


def lookup_freshness(
    req: RequestDirectives, rd: ResponseDirectives, *, age: float, lifetime: float
) -> Freshness:
    """How a stored response may answer a request (RFC 9111 4, 4.2, 4.2.4, 5.2.1, 5.2.2; RFC
    5861 3).

    - "must-validate" when the request or the response has no-cache (5.2.1.4, 5.2.2.4), or the
      age exceeds the request's max-age (5.2.1.1, whatever else allows).
    - "fresh" when lifetime > age (4.2) and the request's min-fresh still fits
      (lifetime - age >= min-fresh, 5.2.1.3); a fresh response failing min-fresh must validate.
    - When stale, and serving stale is not forbidden (must-revalidate, proxy-revalidate,
      s-maxage, 4.2.4): "stale-ok" if staleness <= request max-stale (5.2.1.2), else
      "stale-while-revalidate" if age < lifetime + stale-while-revalidate (RFC 5861 3).
      A request min-fresh rules both out: no stale response stays fresh for another N seconds.
    - Otherwise "must-validate".
    """
    if req.no_cache or rd.no_cache or (req.max_age is not None and age > req.max_age):
        return "must-validate"
    if lifetime > age:
        if req.min_fresh is None or lifetime - age >= req.min_fresh:
            return "fresh"
        return "must-validate"
    if _stale_forbidden(rd) or req.min_fresh is not None:
        return "must-validate"
    if req.max_stale is not None and age - lifetime <= req.max_stale:
        return "stale-ok"
    if rd.stale_while_revalidate is not None and age < lifetime + rd.stale_while_revalidate:
        return "stale-while-revalidate"
    return "must-validate"


def may_serve_stale_if_error(
    req: RequestDirectives, rd: ResponseDirectives, *, age: float, lifetime: float
) -> bool:
    """Whether a stored response may answer when validation or refetch failed (RFC 5861 4).

    True when the response's or the request's stale-if-error window (either grants, RFC 9111
    4.2.4 accepts permission from client or origin) covers the staleness max(0, age -
    lifetime). Never with must-revalidate, proxy-revalidate, s-maxage or a response no-cache
    (RFC 9111 4.2.4). A request no-cache does not prevent it: it asks for validation, and when
    validation fails the client's own stale-if-error, or the origin's, decides.
    """
    if _stale_forbidden(rd):
        return False
    windows = [w for w in (rd.stale_if_error, req.stale_if_error) if w is not None]
    return bool(windows) and max(0.0, age - lifetime) <= max(windows)


# --------------------------------------------------------------------------- validation


def validation_headers(stored: Headers) -> dict[str, str]:
    """Conditional request fields for validating a stored response (RFC 9111 4.3.1).

    If-None-Match from ETag (MUST when there is one) and If-Modified-Since from Last-Modified
    (SHOULD when only it exists, MAY alongside an ETag: we send both, for origins that
    understand only dates). Empty values are not validators.
    """
    headers: dict[str, str] = {}
    etag = stored.get("etag")
    if etag:
        headers["if-none-match"] = etag
    last_modified = stored.get("last-modified")
    if last_modified:
        headers["if-modified-since"] = last_modified
    return headers


def merge_not_modified(
    stored: list[tuple[str, str]], fresh: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Update a stored response's field lines with those of a 304 (RFC 9111 4.3.4, 3.2).

    Each field in the 304 replaces all stored lines of that name (case-insensitively), placed
    where the first stored line of that name was; fields new to the response are appended, and
    stored order is kept. Content-Length is never taken from a 304 (it describes no content,
    3.2), nor are hop-by-hop fields (3.1, removed here too in case the caller did not).
    """
    updates: dict[str, list[tuple[str, str]]] = {}
    for name, value in strip_hop_by_hop(fresh):
        key = name.lower()
        if key != "content-length":
            updates.setdefault(key, []).append((name, value))
    if not updates:
        return list(stored)
    merged: list[tuple[str, str]] = []
    placed: set[str] = set()
    for name, value in stored:
        key = name.lower()
        if key not in updates:
            merged.append((name, value))
        elif key not in placed:
            merged.extend(updates[key])
            placed.add(key)
    for key, lines in updates.items():
        if key not in placed:
            merged.extend(lines)
    return merged


def _entity_tags(value: str) -> list[tuple[bool, str]]:
    # RFC 9110 8.8.3 entity-tag list as (weak, opaque-tag). Quoted tags may contain commas.
    # Lenient: an unquoted tag (common from broken origins) is its text up to the next comma.
    tags: list[tuple[bool, str]] = []
    end = len(value)
    i = 0
    while i < end:
        if value[i] in " \t,":
            i += 1
            continue
        weak = value.startswith("W/", i)
        if weak:
            i += 2
        if i < end and value[i] == '"':
            close = value.find('"', i + 1)
            if close < 0:
                close = end
            tags.append((weak, value[i + 1 : close]))
            i = close + 1
        else:
            comma = value.find(",", i)
            if comma < 0:
                comma = end
            tags.append((weak, value[i:comma].strip(_OWS)))
            i = comma
    return tags


def _etag_matches(condition: str, etag: str | None, *, strong: bool) -> bool:
    # RFC 9110 13.1.1 (strong) / 13.1.2 (weak comparison, 8.8.3.2); "*" matches any stored
    # response, since one exists whenever we evaluate
    if condition.strip(_OWS) == "*":
        return True
    stored_tags = _entity_tags(etag) if etag else []
    if not stored_tags:
        return False
    stored_weak, opaque = stored_tags[0]
    if strong and stored_weak:
        return False
    return any(tag == opaque and not (strong and weak) for weak, tag in _entity_tags(condition))


def evaluate_conditional(
    method: str, req: Headers, stored: Headers, *, stored_time: float | None = None
) -> int | None:
    """Answer a conditional request from a stored response (RFC 9110 13.2.2, RFC 9111 4.3.2).

    In RFC 9110 13.2.2 order: If-Match with no strong match -> 412; else (no If-Match) an
    If-Unmodified-Since earlier than Last-Modified -> 412; If-None-Match that matches (weak
    comparison, "*" matches) -> 304 for GET and HEAD, 412 otherwise; else, without
    If-None-Match and for GET/HEAD only, a valid If-Modified-Since at or after the stored
    modification time -> 304. The modification time is Last-Modified, else the stored Date,
    else ``stored_time`` (RFC 9111 4.3.2). None means: send the full stored response.

    Preconditions of the caller: the stored response is fresh (or just validated) and has a 2xx
    status; RFC 9110 13.2.1 ignores preconditions for any other status, and this function does
    not see it. Deviation: RFC 9111 4.3.2 calls If-Match and If-Unmodified-Since "not
    applicable to a cache"; we evaluate them against the stored response, treating it as the
    selected representation (as nginx does). Forward such requests to keep the RFC reading.
    """
    etag = stored.get("etag")
    if_match = req.get("if-match")
    if if_match is not None:
        if not _etag_matches(if_match, etag, strong=True):
            return 412
    else:
        unmodified_since = parse_http_date(req.get("if-unmodified-since"))
        last_modified = parse_http_date(stored.get("last-modified"))
        if (
            unmodified_since is not None
            and last_modified is not None
            and last_modified > unmodified_since
        ):
            return 412
    if_none_match = req.get("if-none-match")
    if if_none_match is not None:
        if _etag_matches(if_none_match, etag, strong=False):
            return 304 if method in ("GET", "HEAD") else 412
        return None
    if method in ("GET", "HEAD"):
        modified_since = parse_http_date(req.get("if-modified-since"))
        if modified_since is not None:
            modified = parse_http_date(stored.get("last-modified"))
            if modified is None:
                modified = parse_http_date(stored.get("date"))
            if modified is None:
                modified = stored_time
            if modified is not None and modified <= modified_since:
                return 304
    return None


def invalidates(method: str, status: int) -> bool:
    """Whether a response to this request invalidates stored responses (RFC 9111 4.4).

    True for an unsafe method (anything but GET, HEAD, OPTIONS, TRACE, RFC 9110 9.2.1; methods
    are case-sensitive) with a non-error (2xx or 3xx) status.
    """
    return method not in _SAFE_METHODS and 200 <= status <= 399


# --------------------------------------------------------------------------- vary


def vary_names(resp: Headers) -> tuple[str, ...] | None:
    """Request field names a response varies on (RFC 9110 12.5.5, RFC 9111 4.1).

    Lowercased, de-duplicated and sorted, so equal sets of names give equal keys. () when there
    is no Vary (or it is empty); None when it contains "*", which never matches (4.1).
    """
    vary = resp.get("vary")
    if not vary:
        return ()
    names = {name.strip(_OWS).lower() for name in vary.split(",")}
    if "*" in names:
        return None
    names.discard("")
    return tuple(sorted(names))


def vary_values(names: tuple[str, ...], req: Headers) -> tuple[str, ...]:
    """The request's values for the Vary names, normalised for matching (RFC 9111 4.1).

    4.1 lets matching ignore whitespace differences and how lines were combined: values arrive
    combined, lose leading and trailing whitespace, and whitespace around commas is removed
    ("gzip ,  br" -> "gzip,br"). No field-specific normalisation (e.g. case, order) is done.
    A missing field is "\\x00" (a NUL can never appear in a field value, RFC 9110 5.5), which
    keeps it distinct from a field present but empty (""), as 4.1 requires.
    """
    values: list[str] = []
    for name in names:
        value = req.get(name)
        if value is None:
            values.append(_MISSING)
        elif "," in value:
            values.append(",".join(part.strip(_OWS) for part in value.split(",")))
        else:
            values.append(value.strip(_OWS))
    return tuple(values)


# --------------------------------------------------------------------------- cache-status


def _is_sf_token(text: str) -> bool:
    # RFC 8941 3.3.4: ( ALPHA / "*" ) *( tchar / ":" / "/" )
    return bool(text) and text[0] in _SF_TOKEN_START and not text[1:].strip(_SF_TOKEN_CHARS)


def _sf_quote(text: str) -> str:
    # RFC 8941 4.1.6: an sf-string holds printable ASCII only, so anything else becomes "?"
    # rather than failing (keys and details can carry client-chosen bytes)
    if not (text.isascii() and text.isprintable()):
        text = "".join(char if " " <= char <= "~" else "?" for char in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cache_status(
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    stored: bool = False,
    collapsed: bool = False,
    ttl: int | None = None,
    detail: str | None = None,
    key: str | None = None,
) -> str:
    """Our member of the Cache-Status field (RFC 9211 2), an RFC 8941 List member.

    E.g. ``cdn-edge; hit`` or ``cdn-edge; fwd=miss; fwd-status=200; stored; ttl=60``.
    Parameters in the order hit, fwd, fwd-status, stored, collapsed, ttl, key, detail; booleans
    are bare keys, only emitted when true; fwd is a token (RFC 9211 2.2: bypass, method,
    uri-miss, vary-miss, miss, request, stale, partial), key an sf-string, detail a token when
    it is a valid sf-token else an sf-string. Raises ValueError if fwd is not an sf-token.
    """
    members = [CACHE_NAME]
    if hit:
        members.append("hit")
    if fwd is not None:
        if not _is_sf_token(fwd):
            raise ValueError(f"Cache-Status fwd must be an sf-token: {fwd!r}")
        members.append(f"fwd={fwd}")
    if fwd_status is not None:
        members.append(f"fwd-status={fwd_status}")
    if stored:
        members.append("stored")
    if collapsed:
        members.append("collapsed")
    if ttl is not None:
        members.append(f"ttl={ttl}")
    if key is not None:
        members.append(f"key={_sf_quote(key)}")
    if detail is not None:
        members.append(f"detail={detail if _is_sf_token(detail) else _sf_quote(detail)}")
    return "; ".join(members)
