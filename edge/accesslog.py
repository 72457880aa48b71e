"""The access-log line format (issue 6; the contract in control/README.md "Access logs"):
JSON Lines, one JSON array per request, UTF-8, holding exactly these fields in this order (a
documented field order rather than an object: key names would be nearly half of every line,
and an object costs six times the CPU of an array to write):

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
content_type, and domain in `_`) are their exact bytes: ASCII as it is (JSON-escaped), anything
else decoded as UTF-8 with `surrogateescape` and written with `ensure_ascii`, so non-ASCII
characters appear as \\uXXXX escapes and a byte that is not UTF-8 as a lone surrogate escape
\\udc80-\\udcff. `parse_line` returns those fields as the bytes received.

An example (one line): ["2026-11-26T13:05:01.123+00:00","edge-1","192.0.2.7","www.example.com",
"GET","/img/logo.png?v=2","HTTP/1.1",200,4432,4096,0.412,0.388,"hit",null,null,"curl/8.5.0",
"image/png",null,null]. `jq -c '{time: .[0], url: .[5], status: .[7]}'` picks fields by
position.

`LineFormatter` turns what the data path collected (an `Exchanged`, raw values, no formatting
done there) into lines; `encode_record` and `parse_line` are the documented record's two ways.
`python -m edge.accesslog FILE...` (gzip or not, "-" for stdin) checks every line and prints
it in a readable one-line form.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, NamedTuple, Protocol

import orjson

from edge.http1 import RequestHead

try:  # the C line maker (edge/_logline.c, built by the install when a C compiler is there)
    from edge import _logline
except ImportError:  # pragma: no cover - an install without a C compiler
    _logline = None  # type: ignore[assignment]

# Lines of ordinary requests are made in C (LineFormatter.format); False: all in Python.
COMPILED = _logline is not None

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

class Exchanged(Protocol):
    """What a line is made of: an ended exchange's values as the data path left them, raw
    (edge.server.Exchange, or `Ended` for a request refused before it had one)."""

    @property
    def started(self) -> float: ...  # monotonic s: the request head was complete
    @property
    def head_at(self) -> float: ...  # monotonic s: the response head went out; 0.0 if never
    @property
    def client_ip(self) -> str: ...
    @property
    def domain(self) -> str: ...  # the routed domain, or edge.server.UNKNOWN_DOMAIN
    @property
    def head(self) -> RequestHead | bytes: ...  # the parsed head, or a refused one's raw bytes
    @property
    def status(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def body_bytes_sent(self) -> int: ...
    @property
    def outcome(self) -> str: ...  # the cache outcome
    @property
    def response_head(self) -> bytes: ...  # the response's header block, b"" if none
    @property
    def origin_status(self) -> int | None: ...
    @property
    def origin_ms(self) -> float | None: ...


class Ended(NamedTuple):
    """An `Exchanged` made of plain values: a request refused before it became an exchange."""

    started: float
    head_at: float
    client_ip: str
    domain: str
    head: RequestHead | bytes
    status: int
    bytes_sent: int
    body_bytes_sent: int
    outcome: str
    response_head: bytes
    origin_status: int | None
    origin_ms: float | None


# What the data path hands over per exchange: (end wall time, end monotonic, the exchange).
# It is made a line at once, so it keeps nothing alive.
Entry = tuple[float, float, Exchanged]


# A formatted line: (directory, hour "YYYY-MM-DDTHH", the line with its newline).
Line = tuple[str, str, bytes]


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
# The formatter runs once per request on the worker's CPU (the issue allows logging 10 % of a
# small hit's cost), so the common line is made in C (edge/_logline.c, `LineFormatter.format`).
# The Python path below is the reference and takes the rest: a line is one orjson call on a
# tuple of values that need no conversion: numbers, None, and strings known to be ASCII or to be
# text (the routed domain, the outcome, the edge id). Header values arrive decoded as latin-1
# (one character per byte), so only ASCII ones can go as they are; a line with any other byte
# takes the exact but slower path (`_exact_line`). A response's Content-Type is remembered per
# header block (a hit's block is the same bytes object for every hit of its second), the time
# text per millisecond.

CONTENT_TYPE_MEMO = 4096  # header blocks remembered; the memo starts over past this
_DUMPS_OPTIONS = orjson.OPT_APPEND_NEWLINE


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _header_text(value: str | None) -> str | None:
    """A request field value (edge.http1 decodes them as latin-1) as the text of its bytes."""
    if value is None or value.isascii():
        return value
    return value.encode("latin-1").decode("utf-8", "surrogateescape")


def _exact_line(values: tuple[object, ...]) -> bytes:
    """A line whose strings may stand for any bytes (lone surrogate escapes included)."""
    return (json.dumps(values, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def format_time(moment: datetime) -> str:
    """`time`'s form: UTC, milliseconds (truncated), "+00:00"."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+00:00"


def _bytes_text(raw: bytes | None) -> str | None:
    return None if raw is None else _text(raw)


def encode_record(rec: AccessRecord) -> bytes:
    """`rec` as one line, newline included."""
    t = _bytes_text
    return _exact_line((
        format_time(rec.time), rec.edge, rec.client_ip, t(rec.domain), t(rec.method), t(rec.url),
        rec.protocol, int(rec.status), int(rec.bytes_sent), int(rec.body_bytes),
        float(rec.request_ms), rec.ttfb_ms, rec.cache, t(rec.range), t(rec.referer),
        t(rec.user_agent), t(rec.content_type), rec.origin_status, rec.origin_ms,
    ))  # fmt: skip


class LineFormatter:
    """Ended exchanges into (directory, hour, line).

    `format` is the one call per exchange. With the C line maker built (`COMPILED`) it makes
    the line of a routed request with an all-ASCII head in C and hands any other to
    `format_in_python`, the format's reference, which makes the same bytes (a line in Python
    costs ~12.5k instructions, over a tenth of a small hit's; in C ~3.6k). `compiled=False`: every
    line in Python."""

    format: Callable[[float, float, Exchanged], Line]

    def __init__(self, edge: str, unknown_domain: str, *, compiled: bool = COMPILED) -> None:
        self.edge = edge
        self.unknown_domain = unknown_domain
        self._second = -1
        self._ms = -1.0
        self._prefix = ""  # "YYYY-MM-DDTHH:MM:SS" of `_second`
        self._hour = ""  # "YYYY-MM-DDTHH" of `_second`
        self._time_text = ""  # of `_ms`
        # Header block -> Content-Type; the C maker reads it, the Python path fills it.
        self._content_types: dict[bytes, str | None] = {}
        self.compiled = compiled and _logline is not None
        if self.compiled:
            maker = _logline.LineMaker(
                edge, unknown_domain, self._content_types, self.format_in_python, RequestHead
            )
            self.format = maker.format
        else:
            self.format = self.format_in_python

    def stamp(self, moment: float) -> tuple[str, str]:
        """(`time` text, hour "YYYY-MM-DDTHH") of a wall-clock time; one strftime a second."""
        ms_float = moment * 1e3 // 1.0  # a float: `format` compares it without converting
        if ms_float != self._ms:
            self._ms = ms_float
            ms = int(ms_float)
            if ms // 1000 != self._second:
                self._second = ms // 1000
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._second))
                self._hour = self._prefix[:13]
            self._time_text = f"{self._prefix}.{ms % 1000:03d}+00:00"
        return self._time_text, self._hour

    def hour(self, moment: float) -> str:
        return self.stamp(moment)[1]

    def _content_type(self, block: bytes) -> str | None:
        known = self._content_types.get(block, False)
        if known is False:
            if len(self._content_types) >= CONTENT_TYPE_MEMO:
                self._content_types.clear()
            known = self._content_types[block] = _content_type(block)
        return known  # type: ignore[return-value]

    def format_in_python(self, end: float, end_mono: float, ex: Exchanged) -> Line:
        """The line of `ex`, which ended at `end` (wall clock) and `end_mono` (monotonic).
        Values are read off the exchange rather than handed over in a tuple: building and
        taking apart a tuple of 14 cost a tenth of the line."""
        # Inline rather than through stamp() and _content_type(): a call costs as much as
        # what each does, and this runs for every request (milliseconds: truncated to the µs).
        if end * 1e3 // 1.0 != self._ms:
            self.stamp(end)
        hour = self._hour
        response_head = ex.response_head
        content_type = self._content_types.get(response_head, False)
        if content_type is False:
            content_type = self._content_type(response_head)
        # Durations truncated to the µs: `x // 1.0` rather than int(x), which costs a type
        # call (monotonic times never go back: the floor of a difference is its truncation),
        # float literals so that no operation mixes types (that costs a subtype check).
        started = ex.started
        request_ms = (end_mono - started) * 1e6 // 1.0 / 1e3
        ttfb = None
        head_at = ex.head_at
        if head_at:
            ttfb = (head_at - started) * 1e6 // 1.0 / 1e3
        origin_ms = ex.origin_ms
        if origin_ms is not None:
            origin_ms = origin_ms * 1e3 // 1.0 / 1e3
        request = ex.head
        if not isinstance(request, RequestHead):  # refused: what could be read of its line
            method, url_raw, protocol = _request_line(request)
            return UNROUTED, hour, _exact_line((
                self._time_text, self.edge, ex.client_ip, None, method, url_raw, protocol,
                ex.status, ex.bytes_sent, ex.body_bytes_sent, request_ms, ttfb, ex.outcome,
                None, None, None, content_type, ex.origin_status, origin_ms,
            ))  # fmt: skip
        headers = request.headers
        ascii_head = request.ascii
        directory = domain = ex.domain
        if domain == self.unknown_domain:
            directory, domain = UNROUTED, headers.get("host")  # type: ignore[assignment]
            if not ascii_head:
                domain = _header_text(domain)  # type: ignore[assignment]
        target = request.received_target or request.target
        range_, referer = headers.get("range"), headers.get("referer")
        agent = headers.get("user-agent")
        if ascii_head:
            url = target.decode("ascii")
        else:  # field values arrive decoded as latin-1: each becomes the text of its bytes
            url, h = _text(target), _header_text
            range_, referer, agent = h(range_), h(referer), h(agent)
        values = (
            self._time_text, self.edge, ex.client_ip, domain, request.method, url,
            "HTTP/1.1" if request.version == 11 else "HTTP/1.0", ex.status, ex.bytes_sent,
            ex.body_bytes_sent, request_ms, ttfb, ex.outcome, range_, referer, agent,
            content_type, ex.origin_status, origin_ms,
        )  # fmt: skip
        # Strings that need no escaping beyond JSON's: one orjson call (which would write
        # other text as UTF-8 rather than escape it).
        ascii_type = content_type is None or content_type.isascii()  # type: ignore[union-attr]
        if ascii_head and ascii_type:
            try:
                return directory, hour, orjson.dumps(values, option=_DUMPS_OPTIONS)
            except orjson.JSONEncodeError:  # an integer past 64 bits: exact below
                pass
        return directory, hour, _exact_line(values)


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
        obj: Any = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, list):
        raise ValueError("not a JSON array")
    if len(obj) != len(FIELDS):
        raise ValueError(f"{len(obj)} fields instead of {len(FIELDS)}")
    obj = dict(zip(FIELDS, obj, strict=True))
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
