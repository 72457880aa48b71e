"""The access-log line format (issue 6; the contract in control/README.md "Access logs"):
JSON Lines, one object per request, UTF-8, with exactly these keys in this order.

    time           ISO 8601 UTC with milliseconds and offset, "2026-11-26T13:05:01.123+00:00":
                   when the exchange ended (its last byte handed over, or the connection cut).
                   The line belongs to this time's hour file.
    edge           this edge's `edge.edge_id`.
    client_ip      the client's address: the socket peer (or, where access rules trust a proxy,
                   the address it forwarded for).
    domain         the routed domain; in the files of `_` (no domain routed: unknown host,
                   malformed request), the Host as received, or null when there was none.
    method         the request method as received; null when the request line was unreadable.
    url            the request-target as received (path and query; an absolute-form target
                   reduced to its path and query); for a refused malformed request, the raw
                   second word of its request line (at most RAW_URL_MAX bytes); null if none.
    protocol       "HTTP/1.1" or "HTTP/1.0" (a higher 1.x minor is served, and logged, as 1.1);
                   null when the request line was unreadable.
    status         the response status sent (0 when none was: the client went away first).
    bytes_sent     bytes of the response the client got: status line, header block, framing
                   and body (a cut response counts what the client acknowledged, as metered).
    body_bytes     body bytes among them.
    request_ms     milliseconds from the complete request head to the end of the exchange:
                   a number with 3 decimals.
    ttfb_ms        milliseconds from the complete request head to the response head handed to
                   the socket; null if no response head was sent.
    cache          what the cache did (a Cache-Status outcome: hit, stale, revalidated, miss,
                   uri-miss, vary-miss, request, bypass, method, refused, error).
    range          the Range request header; null when absent (as every absent header below).
    referer        the Referer request header.
    user_agent     the User-Agent request header.
    content_type   the Content-Type of the response sent.
    origin_status  the status of the origin's answer this response came from (a request that
                   joined another's whole-object fetch reports that fetch's answer; a sliced
                   response, the first slice fetch it started, none when every slice was
                   stored or fetched for another request); null when the origin was not asked
                   (also by another worker process whose fetch it followed) or did not answer.
    origin_ms      milliseconds from sending the request to the origin to its response head (up
                   to the failure when it did not answer); null when the origin was not asked.

Strings from the request or the response (method, url, range, referer, user_agent,
content_type, and domain in `_`) are their exact bytes: decoded as UTF-8 with `surrogateescape`
and written with `ensure_ascii`, so non-ASCII characters appear as \\uXXXX escapes and a byte
that is not UTF-8 as a lone surrogate escape \\udc80-\\udcff. `parse_line` returns those fields as
the bytes received.

`LineFormatter` turns what the data path collected (`Entry`, raw values, no formatting done
there) into lines; `encode_record` and `parse_line` are the documented record's two ways.
`python -m edge.accesslog FILE...` (gzip or not, "-" for stdin) checks every line and prints
it in a readable one-line form.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii  # the C encoder json.dumps uses
from typing import BinaryIO

from edge.http1 import RequestHead

FIELDS = (
    "time",
    "edge",
    "client_ip",
    "domain",
    "method",
    "url",
    "protocol",
    "status",
    "bytes_sent",
    "body_bytes",
    "request_ms",
    "ttfb_ms",
    "cache",
    "range",
    "referer",
    "user_agent",
    "content_type",
    "origin_status",
    "origin_ms",
)
# The directory of lines no domain was routed for (operator only, never a customer's).
UNROUTED = "_"
RAW_URL_MAX = 8192

# What `edge.server` hands over per exchange, unformatted (raw values, cheap to collect):
# (end wall time, end monotonic, head-complete monotonic, response-head monotonic or 0.0,
#  client_ip, routed domain or edge.server.UNKNOWN_DOMAIN, the parsed head or the raw bytes
#  of a refused request, status, bytes_sent, body_bytes, cache outcome, the response's header
#  block (b"" if none), origin_status, origin_ms)
Entry = tuple[
    float,
    float,
    float,
    float,
    str,
    str,
    RequestHead | bytes,
    int,
    int,
    int,
    str,
    bytes,
    int | None,
    float | None,
]


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One line, parsed. Fields from the request or the response are bytes as received."""

    time: datetime  # aware, UTC, whole milliseconds
    edge: str
    client_ip: str
    domain: bytes | None
    method: bytes | None
    url: bytes | None
    protocol: str | None
    status: int
    bytes_sent: int
    body_bytes: int
    request_ms: float
    ttfb_ms: float | None
    cache: str
    range: bytes | None
    referer: bytes | None
    user_agent: bytes | None
    content_type: bytes | None
    origin_status: int | None
    origin_ms: float | None


# --- encoding ---------------------------------------------------------------------------------
#
# Both ways of writing a line (`encode_record`, `LineFormatter.format`) prepare each value as a
# JSON fragment and hand them to `_render`, the one place that knows the keys and their order.
# The formatter runs once per request on the worker's CPU, so it avoids work where it can:
# values that cannot hold a quote, a backslash or a control character (a routed domain name, a
# parsed method, a cache outcome, numbers) are written without escaping, ASCII header values skip
# the bytes round trip, and a response's Content-Type is remembered per header block (a hit's
# block is the same bytes object for every hit of its second).

CONTENT_TYPE_MEMO = 4096  # header blocks remembered; the memo starts over past this


def _render(
    time_text: str, edge: str, client_ip: str, domain: str, method: str, url: str,
    protocol: str, status: int, bytes_sent: int, body_bytes: int, request_ms: float, ttfb_ms: str,
    cache: str, range_: str, referer: str, user_agent: str, content_type: str,
    origin_status: str, origin_ms: str,
) -> bytes:  # fmt: skip
    """A line from JSON fragments (strings quoted and escaped, or null), FIELDS in order."""
    return (
        f'{{"time":"{time_text}","edge":{edge},"client_ip":{client_ip},"domain":{domain},'
        f'"method":{method},"url":{url},"protocol":{protocol},"status":{status},'
        f'"bytes_sent":{bytes_sent},"body_bytes":{body_bytes},"request_ms":{request_ms:.3f},'
        f'"ttfb_ms":{ttfb_ms},"cache":{cache},"range":{range_},"referer":{referer},'
        f'"user_agent":{user_agent},"content_type":{content_type},'
        f'"origin_status":{origin_status},"origin_ms":{origin_ms}}}\n'
    ).encode("ascii")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _json_str(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _json_raw(raw: bytes | None) -> str:
    return "null" if raw is None else encode_basestring_ascii(_text(raw))


def _json_header(value: str | None) -> str:
    """A request field value (edge.http1 decodes them as latin-1) as the JSON of its bytes."""
    if value is None:
        return "null"
    if not value.isascii():
        value = value.encode("latin-1").decode("utf-8", "surrogateescape")
    return encode_basestring_ascii(value)


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def _json_ms(value: float | None) -> str:
    return "null" if value is None else format(value, ".3f")


def format_time(moment: datetime) -> str:
    """`time`'s form: UTC, milliseconds (truncated), "+00:00"."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+00:00"


def encode_record(rec: AccessRecord) -> bytes:
    """`rec` as one line, newline included."""
    j = _json_raw
    return _render(
        format_time(rec.time), _json_str(rec.edge), _json_str(rec.client_ip), j(rec.domain),
        j(rec.method), j(rec.url), _json_str(rec.protocol), int(rec.status),
        int(rec.bytes_sent), int(rec.body_bytes), float(rec.request_ms),
        _json_ms(rec.ttfb_ms), _json_str(rec.cache), j(rec.range), j(rec.referer),
        j(rec.user_agent), j(rec.content_type), _json_int(rec.origin_status),
        _json_ms(rec.origin_ms),
    )  # fmt: skip


class LineFormatter:
    """`Entry`s into (directory, hour, line): the background writer's side of the data path."""

    def __init__(self, edge: str, unknown_domain: str) -> None:
        self.edge = encode_basestring_ascii(edge)
        self.unknown_domain = unknown_domain
        self._second = -1
        self._prefix = ""  # "YYYY-MM-DDTHH:MM:SS" of `_second`
        self._hour = ""  # "YYYY-MM-DDTHH" of `_second`
        self._content_types: dict[bytes, str] = {}

    def stamp(self, moment: float) -> tuple[str, str]:
        """(`time` text, hour "YYYY-MM-DDTHH") of a wall-clock time; one strftime a second."""
        ms = int(moment * 1000)
        if ms // 1000 != self._second:
            self._second = ms // 1000
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._second))
            self._hour = self._prefix[:13]
        return f"{self._prefix}.{ms % 1000:03d}+00:00", self._hour

    def hour(self, moment: float) -> str:
        return self.stamp(moment)[1]

    def _content_type(self, block: bytes) -> str:
        known = self._content_types.get(block)
        if known is None:
            if len(self._content_types) >= CONTENT_TYPE_MEMO:
                self._content_types.clear()
            value = _content_type(block)
            known = "null" if value is None else encode_basestring_ascii(value)
            self._content_types[block] = known
        return known

    def format(self, entry: Entry) -> tuple[str, str, bytes]:
        (end, end_mono, start_mono, head_mono, client_ip, routed, request, status, sent, body,
         cache, response_head, origin_status, origin_ms) = entry  # fmt: skip
        time_text, hour = self.stamp(end)
        content_type = self._content_type(response_head)
        ttfb = "null" if not head_mono else format((head_mono - start_mono) * 1000, ".3f")
        request_ms = max(end_mono - start_mono, 0.0) * 1000
        origin_s = "null" if origin_status is None else str(origin_status)
        origin_t = "null" if origin_ms is None else format(origin_ms, ".3f")
        client = encode_basestring_ascii(client_ip)
        if isinstance(request, RequestHead):
            headers = request.headers
            target = request.received_target or request.target
            url = target.decode("ascii") if target.isascii() else _text(target)
            if routed != self.unknown_domain:
                directory, domain = routed, f'"{routed}"'  # a DNS name: nothing to escape
            else:
                directory, domain = UNROUTED, _json_header(headers.get("host") or None)
            line = _render(
                time_text, self.edge, client, domain, f'"{request.method}"',  # a token
                encode_basestring_ascii(url),
                '"HTTP/1.1"' if request.version == 11 else '"HTTP/1.0"', status, sent, body,
                request_ms, ttfb, f'"{cache}"', _json_header(headers.get("range")),
                _json_header(headers.get("referer")), _json_header(headers.get("user-agent")),
                content_type, origin_s, origin_t,
            )  # fmt: skip
            return directory, hour, line
        method, url_raw, protocol = _request_line(request)
        line = _render(
            time_text, self.edge, client, "null", _json_str(method), _json_str(url_raw),
            _json_str(protocol), status, sent, body, request_ms, ttfb, f'"{cache}"', "null",
            "null", "null", content_type, origin_s, origin_t,
        )  # fmt: skip
        return UNROUTED, hour, line


def _request_line(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """Method, target and protocol from the raw start of a refused request, as far as they
    can be read (nothing is trusted: a refused head may be anything)."""
    line = raw[: RAW_URL_MAX + 64].lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    words = line.split(b" ")
    method = _text(words[0]) if words[0] else None
    url = _text(words[1][:RAW_URL_MAX]) if len(words) > 1 and words[1] else None
    protocol = None
    if len(words) == 3 and words[2] in (b"HTTP/1.1", b"HTTP/1.0"):
        protocol = words[2].decode("ascii")
    return method, url, protocol


def _content_type(block: bytes) -> str | None:
    """The Content-Type field of a response header block (field lines, CRLF after each)."""
    if not block:
        return None
    lower = block.lower()
    if lower.startswith(b"content-type:"):
        start = len(b"content-type:")
    else:
        at = lower.find(b"\ncontent-type:")
        if at < 0:
            return None
        start = at + len(b"\ncontent-type:")
    end = block.find(b"\r\n", start)
    return _text(block[start : end if end >= 0 else len(block)].strip(b" \t"))


# --- parsing ----------------------------------------------------------------------------------


def parse_line(line: bytes) -> AccessRecord:
    """One line (with or without its newline) as a record; ValueError naming what is wrong."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if tuple(obj) != FIELDS:
        raise ValueError(f"keys must be exactly {', '.join(FIELDS)} in this order")
    try:
        moment = datetime.fromisoformat(_string(obj, "time"))
    except ValueError:
        raise ValueError("time: not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise ValueError("time: no offset")
    return AccessRecord(
        time=moment.astimezone(UTC),
        edge=_string(obj, "edge"),
        client_ip=_string(obj, "client_ip"),
        domain=_raw(obj, "domain"),
        method=_raw(obj, "method"),
        url=_raw(obj, "url"),
        protocol=_opt_string(obj, "protocol"),
        status=_int(obj, "status"),
        bytes_sent=_int(obj, "bytes_sent"),
        body_bytes=_int(obj, "body_bytes"),
        request_ms=_number(obj, "request_ms"),
        ttfb_ms=_opt_number(obj, "ttfb_ms"),
        cache=_string(obj, "cache"),
        range=_raw(obj, "range"),
        referer=_raw(obj, "referer"),
        user_agent=_raw(obj, "user_agent"),
        content_type=_raw(obj, "content_type"),
        origin_status=_opt_int(obj, "origin_status"),
        origin_ms=_opt_number(obj, "origin_ms"),
    )


def _string(obj: dict[str, object], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string")
    return value


def _opt_string(obj: dict[str, object], key: str) -> str | None:
    return None if obj[key] is None else _string(obj, key)


def _raw(obj: dict[str, object], key: str) -> bytes | None:
    text = _opt_string(obj, key)
    if text is None:
        return None
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{key}: a surrogate escape that stands for no byte") from None


def _int(obj: dict[str, object], key: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}: expected a whole number >= 0")
    return value


def _opt_int(obj: dict[str, object], key: str) -> int | None:
    return None if obj[key] is None else _int(obj, key)


def _number(obj: dict[str, object], key: str) -> float:
    value = obj[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}: expected a number >= 0")
    return float(value)


def _opt_number(obj: dict[str, object], key: str) -> float | None:
    return None if obj[key] is None else _number(obj, key)


# --- reader -----------------------------------------------------------------------------------


def _show(raw: bytes | None) -> str:
    """A field for people: "-" when absent, otherwise quoted with odd bytes escaped."""
    if raw is None:
        return "-"
    return json.dumps(raw.decode("utf-8", "backslashreplace"))


def readable(rec: AccessRecord) -> str:
    """One line in the spirit of the combined log format, every field kept."""
    protocol = rec.protocol or "-"
    request = f"{_show(rec.method)} {_show(rec.url)} {protocol}"
    origin = "-" if rec.origin_status is None else str(rec.origin_status)
    return (
        f"{format_time(rec.time)} {rec.edge} {rec.client_ip} {_show(rec.domain)} {request} "
        f"{rec.status} {rec.bytes_sent} {rec.body_bytes} {rec.request_ms:.3f}ms "
        f"ttfb={'-' if rec.ttfb_ms is None else f'{rec.ttfb_ms:.3f}'} {rec.cache} "
        f"range={_show(rec.range)} referer={_show(rec.referer)} ua={_show(rec.user_agent)} "
        f"type={_show(rec.content_type)} origin={origin}"
        f"/{'-' if rec.origin_ms is None else f'{rec.origin_ms:.3f}'}"
    )


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    if head == b"\x1f\x8b":
        yield from gzip.GzipFile(fileobj=stream)
    else:
        yield from stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge.accesslog",
        description="check access-log files (JSON Lines, gzip or not) and print them readably",
    )
    parser.add_argument("files", nargs="*", default=["-"], help='files; "-" is stdin')
    parser.add_argument("--json", action="store_true", help="print the lines as they are")
    args = parser.parse_args(argv)
    bad = 0
    for name in args.files:
        with (
            open(sys.stdin.fileno(), "rb", closefd=False)
            if name == "-"
            else open(name, "rb") as stream
        ):
            for number, line in enumerate(_lines(stream), 1):
                try:
                    rec = parse_line(line)
                except ValueError as exc:
                    print(f"{name}:{number}: {exc}", file=sys.stderr)
                    bad += 1
                    continue
                if args.json:
                    sys.stdout.buffer.write(line if line.endswith(b"\n") else line + b"\n")
                else:
                    sys.stdout.write(readable(rec) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
