"""HTTP/1.1 request framing (RFC 9112), the *recv* step of the request path.

Pure functions and small state objects, no sockets: `parse_head` turns the bytes of a request
head into a `RequestHead` or raises `BadRequest` with the status to answer, and `ChunkedDecoder`
decodes a chunked request body. The rules are strict where leniency enables request smuggling
(RFC 9112 6.3, 11.2): conflicting or repeated Content-Length, Content-Length together with
Transfer-Encoding, obsolete line folding, whitespace before a colon and bare CR are all refused.

Our own parser rather than llhttp (httptools) because llhttp refuses methods it does not know,
while a proxy must forward any token method (RFC 9110 9.1), and because it is as fast here:
about 1 us for a typical request head either way.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 9110 5.6.2 tchar
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 9110 5.5: field values may hold VCHAR, obs-text, SP and HTAB, never CR, LF or NUL.
_BAD_VALUE_BYTES = (b"\r", b"\n", b"\x00")
# Visible ASCII only in the request-target (RFC 3986 characters; RFC 9112 3.2).
_TARGET_OK = frozenset(range(0x21, 0x7F))

MAX_CHUNK_LINE = 4096


class BadRequest(Exception):
    """A request the edge refuses before routing; `status` is what the client gets."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: str
    target: bytes  # request-target as received (origin-form), never re-quoted
    version: int  # 10 or 11
    fields: list[tuple[str, str]]  # field lines in order, names as sent (latin-1 decoded)
    headers: dict[str, str]  # lowercase name -> combined value (RFC 9110 5.3)
    host: str  # from Host, or from an absolute-form target (RFC 9112 3.2.2)
    keep_alive: bool
    content_length: int  # 0 when there is no body; meaningless when chunked
    chunked: bool
    expect_continue: bool

    @property
    def path(self) -> str:
        return self.target.partition(b"?")[0].decode("ascii")

    @property
    def query(self) -> str:
        return self.target.partition(b"?")[2].decode("ascii")


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line that ends a head, or -1 when it has not arrived yet."""
    end = buf.find(b"\r\n\r\n", start)
    return -1 if end < 0 else end + 4


def parse_head(raw: bytes) -> RequestHead:
    """Parse one request head (request-line and fields, CRLF CRLF included). RFC 9112 2-3, 5-7."""
    # RFC 9112 2.2: ignore at least one empty line before the request-line.
    raw = raw.lstrip(b"\r\n")
    lines = raw[:-4].split(b"\r\n")
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
    elif version_b.startswith(b"HTTP/") and len(version_b) == 8 and version_b[5:6].isdigit():
        raise BadRequest("HTTP version not supported", 505)
    else:
        raise BadRequest("malformed HTTP version")
    if not target or not _TARGET_OK.issuperset(target):
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
        if any(bad in value_b for bad in _BAD_VALUE_BYTES):
            raise BadRequest("invalid character in header value")
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

    connection = headers.get("connection", "").lower()
    if version == 11:
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection and "close" not in connection
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


def _valid_host(host: str) -> bool:
    # reg-name / IPv4 / [IPv6] with an optional port; anything else cannot name a domain.
    return all(c.isalnum() or c in "-._:[]" for c in host)


class ChunkedDecoder:
    """Incremental decoder of a chunked request body (RFC 9112 7.1); trailers are dropped."""

    __slots__ = ("_buf", "_remaining", "_state", "done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._remaining = 0
        self._state = "size"  # size | data | data-crlf | trailer
        self.done = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Decode `data`; return body pieces and any bytes past the end of the body."""
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        while not self.done:
            if self._state == "data":
                if not buf:
                    break
                take = min(self._remaining, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-crlf"
                continue
            if self._state == "data-crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise BadRequest("malformed chunk")
                del buf[:2]
                self._state = "size"
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise BadRequest("chunk line too long")
                break
            line = bytes(buf[:end])
            del buf[: end + 2]
            if self._state == "trailer":
                if not line:
                    self.done = True
                continue
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or not all(
                c in b"0123456789abcdefABCDEF" for c in size_text
            ):
                raise BadRequest("malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                self._state = "trailer"
            else:
                self._remaining = size
                self._state = "data"
        rest = bytes(buf) if self.done else b""
        if self.done:
            buf.clear()
        return out, rest
