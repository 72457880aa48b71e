"""HTTP/1.1 request framing (RFC 9112), the *recv* step of the request path.

Pure functions and small state objects, no sockets: `parse_head` turns the bytes of a request
head into a `RequestHead` or raises `BadRequest` with the status to answer, and `ChunkedDecoder`
decodes a chunked request body. The rules are strict where leniency enables request smuggling
(RFC 9112 6.3, 11.2): conflicting Content-Length values (identical repeats count as one),
Content-Length together with Transfer-Encoding, obsolete line folding, whitespace before a
colon, bare CR, LF or NUL in a field value, a non-ASCII Host, and in chunked bodies whitespace
before a chunk size or a bare CR/LF in an extension or trailer are all refused.

Our own parser rather than llhttp (httptools) because llhttp refuses methods it does not know,
while a proxy must forward any token method (RFC 9110 9.1), and because it is as fast here:
about 1 us for a typical request head either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110 5.6.2 tchar
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Visible ASCII only in the request-target (RFC 3986 characters; RFC 9112 3.2). Checked with
# bytes.translate, which deletes these in C: a signed URL's long query costs no loop per byte.
_TARGET_OK = bytes(range(0x21, 0x7F))

_VERSION_SHAPE = re.compile(rb"HTTP/[0-9]\.[0-9]")

MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or one trailer line
MAX_TRAILERS = 16384  # the whole trailer section


class BadRequest(Exception):
    """A request the edge refuses before routing; `status` is what the client gets."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes  # request-target (origin-form), never re-quoted
    version: int  # 10 or 11
    fields: list[tuple[str, str]]  # field lines in order, names as sent (latin-1 decoded)
    headers: dict[str, str]  # lowercase name -> combined value (RFC 9110 5.3)
    host: str  # from Host, or from an absolute-form target (RFC 9112 3.2.2)
    keep_alive: bool
    content_length: int  # 0 when there is no body; meaningless when chunked
    chunked: bool
    expect_continue: bool
    # Every byte of the head is ASCII: field values (decoded as latin-1) are their bytes' text
    # as they are (the access log then needs no per-field check).
    ascii: bool
    # The target as the client sent it, once the admit step replaced `target` (a signed URL's
    # signature taken off for the origin); None while `target` is what was received.
    received_target: bytes | None = None

    @property
    def path(self) -> str:
        return self.target.partition(b"?")[0].decode("ascii")

    @property
    def query(self) -> str:
        return self.target.partition(b"?")[2].decode("ascii")


def skip_empty_lines(buf: bytes | bytearray) -> int:
    """Offset of the first byte after any empty lines (CRLF or LF) at the start of `buf`.

    RFC 9112 2.2: a server ignores at least one empty line received before a request-line
    (some clients send an extra CRLF after a request body).
    """
    i = 0
    while True:
        c = buf[i : i + 1]
        if c == b"\n":
            i += 1
        elif c == b"\r" and buf[i + 1 : i + 2] == b"\n":
            i += 2
        else:
            return i


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line that ends a head, or -1 when it has not arrived yet.

    Empty lines before the request-line are not a head's end; `start` is where to resume a
    search that already failed on a shorter buffer.
    """
    first = buf[:1]
    if first == b"\r" or first == b"\n":
        start = max(start, skip_empty_lines(buf))
    end = buf.find(b"\r\n\r\n", start)
    return -1 if end < 0 else end + 4


def parse_head(raw: bytes) -> RequestHead:
    """Parse one request head (request-line and fields, CRLF CRLF included). RFC 9112 2-3, 5-7."""
    first = raw[:1]
    if first == b"\r" or first == b"\n":
        raw = raw[skip_empty_lines(raw) :]
    text = raw[:-4]
    # RFC 9110 5.5: no CR, LF or NUL inside a line. Checked once for the whole head: every CR
    # and every LF must belong to a CRLF line break (the split counts those).
    lines = text.split(b"\r\n")
    crlf = len(lines) - 1
    if b"\x00" in text or text.count(b"\r") != crlf or text.count(b"\n") != crlf:
        raise BadRequest("invalid character in request head")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method_b, target, version_b = parts
    if not method_b or not _TCHAR.issuperset(method_b):
        raise BadRequest("malformed method")
    if version_b == b"HTTP/1.1":
        version = 11
    elif version_b == b"HTTP/1.0":
        version = 10
    elif not _VERSION_SHAPE.fullmatch(version_b):
        raise BadRequest("malformed HTTP version")
    elif version_b[5:6] == b"1":
        version = 11  # RFC 9110 2.5: a higher minor version is served as the highest we know
    else:
        raise BadRequest("HTTP version not supported", 505)
    if not target or target.translate(None, _TARGET_OK):
        raise BadRequest("malformed request target")
    method = method_b.decode("ascii")

    fields: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    host_count = 0
    for line in lines[1:]:
        name_b, colon, value_b = line.partition(b":")
        if not colon or not name_b or not _TCHAR.issuperset(name_b):
            # Also catches obs-fold (leading SP/HTAB) and "Name :" (RFC 9112 5.1, 5.2).
            raise BadRequest("malformed header field")
        value_b = value_b.strip(b" \t")
        name = name_b.decode("ascii")
        value = value_b.decode("latin-1")
        fields.append((name, value))
        lname = name.lower()
        if lname == "host":
            host_count += 1
        previous = headers.get(lname)
        headers[lname] = value if previous is None else f"{previous}, {value}"

    host = headers.get("host", "")
    if target[:1] != b"/":
        target, host = _from_other_form(method, target, host)
    if version == 11 and host_count != 1:
        # RFC 9112 3.2: exactly one Host in HTTP/1.1.
        raise BadRequest("missing or repeated Host header")
    if host and not _valid_host(host):
        raise BadRequest("malformed Host header")

    chunked = False
    content_length = 0
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if version == 10:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise BadRequest("Transfer-Encoding must end in chunked")
        if len(codings) != 1:
            raise BadRequest("unsupported transfer coding", 501)
        chunked = True
    elif cl is not None:
        values = {v.strip() for v in cl.split(",")}
        if len(values) != 1:
            raise BadRequest("conflicting Content-Length")
        value = values.pop()
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise BadRequest("malformed Content-Length")
        content_length = int(value)

    connection = headers.get("connection")
    if connection is None:
        keep_alive = version == 11
    else:
        tokens = {token.strip() for token in connection.lower().split(",")}
        keep_alive = "close" not in tokens and (version == 11 or "keep-alive" in tokens)
    expect_continue = (
        version == 11 and headers.get("expect", "").lower() == "100-continue"
    )
    return RequestHead(
        method=method,
        target=target,
        version=version,
        fields=fields,
        headers=headers,
        host=host,
        keep_alive=keep_alive,
        content_length=content_length,
        chunked=chunked,
        expect_continue=expect_continue,
        ascii=text.isascii(),
    )


def _from_other_form(method: str, target: bytes, host: str) -> tuple[bytes, str]:
    """absolute-form and asterisk-form targets (RFC 9112 3.2.2, 3.2.4)."""
    if target == b"*" and method == "OPTIONS":
        return target, host
    lower = target.lower()
    for scheme in (b"http://", b"https://"):
        if lower.startswith(scheme):
            rest = target[len(scheme) :]
            authority, slash, path = rest.partition(b"/")
            authority, _, _ = authority.partition(b"?")
            if not authority or b"@" in authority:
                raise BadRequest("malformed absolute request target")
            origin_form = b"/" + path if slash else b"/" + rest[len(authority) :]
            # The target's authority wins over Host (RFC 9112 3.2.2).
            return origin_form, authority.decode("ascii")
    raise BadRequest("malformed request target")


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:[]")


def _valid_host(host: str) -> bool:
    # reg-name / IPv4 / [IPv6] with an optional port, in ASCII (str.isalnum() would let "é"
    # and "²" through); anything else cannot name a domain.
    return _HOST_CHARS.issuperset(host)


_SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)
_HEX = frozenset(b"0123456789abcdefABCDEF")


class ChunkedDecoder:
    """Incremental decoder of a chunked request body (RFC 9112 7.1); trailers are dropped.

    Strict where a lenient reading differs from other parsers' (request smuggling): no
    whitespace before a chunk size, no bare CR or LF anywhere in a chunk or trailer line,
    lines and the trailer section bounded. Data is sliced out of the fed bytes without
    buffering; only an incomplete line (at most MAX_CHUNK_LINE bytes) is kept between feeds.
    """

    __slots__ = ("_partial", "_remaining", "_state", "_trailer_bytes", "done")

    def __init__(self) -> None:
        self._partial = b""
        self._remaining = 0
        self._state = _SIZE
        self._trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Decode `data`; return body pieces and any bytes past the end of the body."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        out: list[bytes] = []
        pos = 0
        n = len(data)
        while not self.done:
            state = self._state
            if state == _DATA:
                if pos >= n:
                    break
                take = min(self._remaining, n - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_CRLF
                continue
            if state == _DATA_CRLF:
                if n - pos < 2:
                    if pos < n and data[pos] != 0x0D:
                        raise BadRequest("malformed chunk: no CRLF after data")
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise BadRequest("malformed chunk: no CRLF after data")
                pos += 2
                self._state = _SIZE
                continue
            end = data.find(b"\r\n", pos)
            if end < 0:
                if n - pos > MAX_CHUNK_LINE:
                    raise BadRequest("chunk line too long")
                break
            if end - pos > MAX_CHUNK_LINE:
                raise BadRequest("chunk line too long")
            line = data[pos:end]
            pos = end + 2
            if b"\n" in line or b"\r" in line:
                raise BadRequest("bare CR or LF in a chunk line")
            if state == _TRAILER:
                if not line:
                    self.done = True
                    break
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > MAX_TRAILERS:
                    raise BadRequest("chunked trailer section too large")
                continue
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not size_text or len(size_text) > 16 or not _HEX.issuperset(size_text):
                raise BadRequest("malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                self._state = _TRAILER
            else:
                self._remaining = size
                self._state = _DATA
        if self.done:
            return out, data[pos:]
        if pos < n:
            self._partial = data[pos:]
        return out, b""
