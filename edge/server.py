"""The data path's HTTP/1.1 server: an `asyncio.Protocol` per connection.

Why not aiohttp's web server: a cache hit must cost a parse, a lookup and a write, and aiohttp
builds a request and a response object per request (LIBRARIES.md: ~2x the CPU per hit). Here a
handler answers a hit synchronously with prebuilt bytes (`Exchange.send`), and only misses and
passes become tasks.

Handles keep-alive, pipelining (requests are answered strictly in order, one at a time),
chunked and Content-Length request bodies, `Expect: 100-continue`, HTTP/1.0 and flow control
in both directions. Timeouts are enforced by one sweeper task per server, not a timer per
request: keep-alive idle (from the end of the last response), request head, stalled request
body, and send (a client that stops reading). The sweeper ticks once a second, so a timeout
fires between its limit and two seconds later (CLOCK_TICK), never early.

Bounded buffering: reading pauses while a request body is buffered past BODY_HIGH_WATER, and
while more than `max_header_bytes` of pipelined requests wait behind the one in progress.
A half-closed client (EOF after its requests) still gets every response it asked for.

Metering (issue 5): every exchange, however it ends (finished, aborted, cut by a timeout or
by the client, refused), is recorded once, in `HttpConnection._ended`, into the server's
`edge.meter.Meter` under `Exchange.domain` (UNKNOWN_DOMAIN until the handler routed it), and
handed to `HttpServer.account` (the Prometheus counters). Refusals before an exchange exists
(malformed head, head timeout) are recorded under UNKNOWN_DOMAIN. A response still running is
recorded as it goes (`HttpServer.meter_progress`, every second), so a long transfer's bytes fall
into the 5-minute window in which they were sent; the request itself counts where it ends.

Access log (issue 6): at the same place, every exchange (and every refusal before one) is
handed to `HttpServer.access_log` with its end times (the exchange itself: the line is read off
it, an `edge.accesslog.Exchanged`); `edge.logwriter` makes it a line there (one C call) and
writes the lines in the background: no I/O here.

Bytes sent: the status line, header block, framing and body bytes handed to the kernel for
the client's socket. A response cut short because the client went away (it closed or reset the
connection, or stopped reading until the send timeout cut it) counts only what the client's TCP
acknowledged (TCP_INFO tcpi_bytes_acked of the connection, less what earlier responses on it
sent): bytes still in the edge's buffers or the kernel's send queue when the connection was lost
are not billed. A response the edge itself cuts while the client is still connected (an origin
died mid-body, a handler failed after the head, shutdown) counts what was handed to the kernel:
the bytes written to the transport less what the transport still buffered at the moment of the
abort (`HttpConnection.abort`), because closing the socket drops only the transport's buffer,
and the kernel goes on delivering its send queue, then a FIN. Unless the kernel cannot deliver
it: the client reset the connection meanwhile (TCP state CLOSE at `connection_lost`), or unread
request bytes make the close a reset; then it is the acknowledged bytes again. A response the
edge finished handing over is counted whole, even if the connection dies before the client read
its tail. Where TCP_INFO is unavailable (not a TCP socket) a cut response counts what was handed
to the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Protocol, cast

from edge.accesslog import RAW_URL_MAX, Ended, Exchanged
from edge.http1 import (
    BadRequest,
    ChunkedDecoder,
    RequestHead,
    find_head_end,
    parse_head,
    skip_empty_lines,
)
from edge.meter import OUTCOME_KINDS, PASS, REFUSED, Meter
from edge.ratelimit import Pace

log = logging.getLogger("edge.server")

REASONS = {
    100: "Continue", 200: "OK", 203: "Non-Authoritative Information", 204: "No Content",
    206: "Partial Content", 300: "Multiple Choices", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 410: "Gone", 411: "Length Required",
    412: "Precondition Failed", 413: "Content Too Large", 414: "URI Too Long",
    416: "Range Not Satisfiable", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

BODY_HIGH_WATER = 1 << 20  # pause reading a request body past this much unread data
SENDFILE_FALLBACK_CHUNK = 256 << 10
# sendfile(2) refusals that mean "not for this pair of descriptors": copy instead.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK})
SMALL_BODY = 1 << 16  # `Exchange.send` joins head and body into one write up to this size
# Requests that name no configured domain (and refusals before a head was parsed) are metered
# under this name: never a domain name (those have no "-" alone), never shipped (edge.worker).
UNKNOWN_DOMAIN = "-"
# struct tcp_info (linux/tcp.h): tcpi_state, a u8 at byte 0; tcpi_bytes_acked, a u64 at byte
# 120 (Linux >= 4.1).
_TCP_INFO_LEN = 232
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120
# TCP states (include/net/tcp_states.h) in which the kernel still delivers its send queue.
_TCP_DELIVERING = frozenset({1, 8})  # TCP_ESTABLISHED, TCP_CLOSE_WAIT
_INT = struct.Struct("=i")


class ClientGone(Exception):
    """The client connection closed while we were still answering."""


class Handler(Protocol):
    def handle(self, exchange: Exchange) -> Awaitable[None] | None:
        """Answer one request: synchronously (return None, response finished) or as a coroutine."""

    def refused(self, exchange: Exchange | None, peer: str, status: int, reason: str) -> None:
        """Account for a request refused before routing (malformed, too large)."""


class _Clock:
    """Wall time and the Date header, refreshed once a second by the sweeper."""

    def __init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.now = time.time()
        self.date = formatdate(self.now, usegmt=True)


CLOCK = _Clock()
# How often the sweeper refreshes CLOCK. Connection timestamps are CLOCK.now, so one may be a
# whole tick older than the event it records: a timeout fires only once the time since a
# stamp exceeds the limit plus a tick, never before the limit really passed.
CLOCK_TICK = 1.0


_STATUS_LINES = {code: f"HTTP/1.1 {code} {text}\r\n".encode() for code, text in REASONS.items()}


def status_line(status: int) -> bytes:
    """The status line; always HTTP/1.1, also to 1.0 clients (RFC 9110 2.5)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode("latin-1")
    return line


def encode_fields(fields: list[tuple[str, str]]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode("latin-1")


class _BodyReader:
    """Request body bytes handed from the protocol to the handler, with flow control."""

    __slots__ = (
        "_chunks", "_conn", "_decoder", "_remaining", "_waiter", "buffered", "done", "error",
    )

    def __init__(self, conn: HttpConnection, head: RequestHead) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._decoder = ChunkedDecoder() if head.chunked else None
        self._remaining = head.content_length
        self._waiter: asyncio.Future[None] | None = None
        self.buffered = 0
        self.done = not head.chunked and head.content_length == 0
        self.error: BadRequest | None = None  # a malformed chunked body

    def feed(self, data: bytes) -> bytes:
        """Take body bytes from `data`; return what belongs to the next request.

        A malformed chunked body sets `error` (and `done`): the caller must refuse it.
        """
        if self._decoder is not None:
            try:
                pieces, rest = self._decoder.feed(data)
            except BadRequest as e:
                self.error = e
                self.done = True
                self._wake()
                return b""
            self.done = self._decoder.done
        else:
            take = min(self._remaining, len(data))
            pieces, rest = [data[:take]], data[take:]
            self._remaining -= take
            self.done = self._remaining == 0
        for piece in pieces:
            if piece:
                self._chunks.append(piece)
                self.buffered += len(piece)
        self._wake()
        return rest

    def fail(self) -> None:
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.pop(0)
                self.buffered -= len(chunk)
                self._conn.body_consumed(self)
                yield chunk
                continue
            if self.error is not None:
                raise ClientGone(f"malformed request body: {self.error.reason}")
            if self.done:
                return
            if self._conn.closed or self._conn.eof:
                raise ClientGone("client closed during request body")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None


class Exchange:
    """One request and its response on a connection."""

    __slots__ = (
        "_body",
        "_chunked",
        "_conn",
        "_continue_sent",
        "aborted",
        "body_bytes_sent",
        "bytes_sent",
        "client_ip",
        "domain",
        "finished",
        "head",
        "head_at",
        "headers_sent",
        "keep_alive",
        "kind",
        "metered_body",
        "metered_sent",
        "method",
        "no_body",
        "origin_ms",
        "origin_status",
        "outcome",
        "pace",
        "response_head",
        "started",
        "status",
    )

    def __init__(self, conn: HttpConnection, head: RequestHead) -> None:
        self._conn = conn
        self.head = head
        self.method = head.method
        self.keep_alive = head.keep_alive
        self.no_body = head.method == "HEAD"
        self.status = 0
        self.headers_sent = False
        self.finished = False
        self.bytes_sent = 0
        self.body_bytes_sent = 0
        self.aborted = False
        # The client's address: the socket peer, or what the admit step believes of a trusted
        # proxy's X-Forwarded-For (edge.access.client_ip).
        self.client_ip = conn.peer
        # A speed limit's allowance (edge.ratelimit.Pace), set by the admit step; None (nearly
        # always) costs `write` one attribute check and nothing else.
        self.pace: Pace | None = None
        # Metering: set by the handler (`set_outcome`, and `domain` once routed).
        self.domain = UNKNOWN_DOMAIN
        self.outcome = "error"
        self.kind = PASS
        self.metered_sent = 0  # bytes already recorded by `HttpServer.meter_progress`
        self.metered_body = 0
        # Access log (edge.accesslog): when the head was complete and when the response head
        # went out (monotonic s; 0.0: not yet), the response's header block (for its
        # Content-Type), the origin's answer (edge.fetch).
        self.started = time.monotonic()
        self.head_at = 0.0
        self.response_head = b""
        self.origin_status: int | None = None
        self.origin_ms: float | None = None
        self._chunked = False
        self._continue_sent = False
        self._body = _BodyReader(conn, head) if (head.chunked or head.content_length) else None

    @property
    def peer(self) -> str:
        return self._conn.peer

    def set_outcome(self, outcome: str, *, forwarded: bool = False) -> None:
        """What the cache did (a Cache-Status outcome of edge.metrics.OUTCOMES), recorded when
        the exchange ends. `forwarded`: the origin was asked for the response, so a "stale"
        outcome (a stale object being replaced) is a miss, not a hit."""
        self.outcome = outcome
        kind = OUTCOME_KINDS[outcome]
        self.kind = kind if not forwarded or outcome != "stale" else OUTCOME_KINDS["miss"]

    @property
    def has_body(self) -> bool:
        return self._body is not None

    async def body(self) -> AsyncIterator[bytes]:
        """The request body as it arrives; sends 100 Continue first when the client asked."""
        if self._body is None:
            return
        if self.head.expect_continue and not self._continue_sent and not self.headers_sent:
            self._continue_sent = True
            interim = b"HTTP/1.1 100 Continue\r\n\r\n"
            self._conn.write(interim)
            self.bytes_sent += len(interim)
        async for chunk in self._body:
            yield chunk

    def _connection_field(self) -> bytes:
        body = self._body
        if not self.keep_alive or self._conn.closing or (body is not None and not body.done):
            # Unread request body: the connection cannot be reused, so say it.
            self.keep_alive = False
            return b"Connection: close\r\n"
        if self.head.version == 10:
            return b"Connection: keep-alive\r\n"
        return b""

    def send(self, status: int, head_block: bytes, body: bytes | memoryview) -> None:
        """Send a whole response: status line + `head_block` (field lines) + body, then finish.

        `head_block` must carry Content-Length; for HEAD the body is not sent.
        """
        self.status = status
        self.headers_sent = True
        self.head_at = time.monotonic()
        self.response_head = head_block
        parts = (status_line(status), head_block, self._connection_field(), b"\r\n")
        if self.no_body or not body:
            data = b"".join(parts)
            self._conn.write(data)
            self.bytes_sent = len(data)
        elif len(body) <= SMALL_BODY:
            data = b"".join((*parts, body))  # one buffer, one send()
            self._conn.write(data)
            self.body_bytes_sent = len(body)
            self.bytes_sent = len(data)
        else:
            head = b"".join(parts)
            self._conn.write(head)  # no copy of a large body
            self._conn.write(body)
            self.body_bytes_sent = len(body)
            self.bytes_sent = len(head) + len(body)
        self.finish()

    def start(self, status: int, head_block: bytes, content_length: int | None) -> None:
        """Send the response head; the body follows with `write` and ends with `finish`."""
        self.status = status
        self.headers_sent = True
        self.head_at = time.monotonic()
        self.response_head = head_block
        extra = b""
        if content_length is None and not self.no_body and status not in (204, 304):
            if self.head.version == 11:
                self._chunked = True
                extra = b"Transfer-Encoding: chunked\r\n"
            else:
                self.keep_alive = False  # close-delimited body for HTTP/1.0
        head = status_line(status) + head_block + extra + self._connection_field() + b"\r\n"
        self.bytes_sent += len(head)
        self._conn.write(head)

    async def write(self, data: bytes | memoryview) -> None:
        if self.no_body or not data:
            return
        if self.pace is not None:
            await self._paced_write(data)
            return
        if self._conn.closed:
            raise ClientGone("client closed")
        n = len(data)
        if self._chunked:
            frame = b"%x\r\n" % n
            if n <= SMALL_BODY:
                self._conn.write(b"".join((frame, data, b"\r\n")))  # one packet, not three
            else:
                self._conn.write(frame)
                self._conn.write(data)
                self._conn.write(b"\r\n")
            self.bytes_sent += len(frame) + 2
        else:
            self._conn.write(data)
        self.bytes_sent += n
        self.body_bytes_sent += n
        await self._conn.drain()

    async def _paced_write(self, data: bytes | memoryview) -> None:
        """`write` within the speed limit: piece by piece, each when the allowance has it."""
        pace = self.pace
        assert pace is not None
        view = memoryview(data)
        self.pace = None  # the pieces themselves go out as unlimited writes
        try:
            for start, end in pace.pieces(len(view)):
                delay = pace.delay(end - start, time.monotonic())
                if delay:
                    await asyncio.sleep(delay)
                await self.write(view[start:end])
        finally:
            self.pace = pace

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send `count` body bytes of file `fd` from `offset`, zero-copy with sendfile(2).

        Also under uvloop, which has no loop.sendfile (LIBRARIES.md): the transport is drained
        first, then os.sendfile writes to (a duplicate of) the socket's descriptor, waiting for
        writability between calls. Falls back to pread and write where sendfile cannot be used
        (a chunked response, an fd type the kernel refuses), and for a speed-limited response,
        which `write` paces (the copy costs little at a limited rate). Counts bytes as they go,
        so an aborted transfer is accounted for what it really sent.
        """
        if self.no_body or count <= 0:
            return
        conn = self._conn
        if not self._chunked and self.pace is None:
            sock_fd = await conn.drained_socket_fd()
            if sock_fd is not None:
                try:
                    while count:
                        try:
                            sent = os.sendfile(sock_fd, fd, offset, count)
                        except BlockingIOError:
                            await conn.wait_writable(sock_fd)
                            continue
                        except (BrokenPipeError, ConnectionResetError):
                            conn.abort(deliver=False)
                            raise ClientGone("client closed") from None
                        except OSError as e:
                            if e.errno not in _NO_SENDFILE:
                                raise
                            break  # not for this fd: fall back below for the rest
                        if sent == 0:
                            raise OSError(errno.EIO, "file shorter than its stored length")
                        offset += sent
                        count -= sent
                        self.bytes_sent += sent
                        self.body_bytes_sent += sent
                        conn.last_activity = CLOCK.now
                finally:
                    os.close(sock_fd)
        while count:
            piece = os.pread(fd, min(count, SENDFILE_FALLBACK_CHUNK), offset)
            if not piece:
                raise OSError(errno.EIO, "file shorter than its stored length")
            await self.write(piece)
            offset += len(piece)
            count -= len(piece)

    def finish(self) -> None:
        if self.finished:
            return
        if self._chunked and not self._conn.closed:
            self._conn.write(b"0\r\n\r\n")
            self.bytes_sent += 5
        self.finished = True
        if self._body is not None and not self._body.done:
            # Unread request body: the connection cannot be reused safely.
            self.keep_alive = False

    def abort(self) -> None:
        """Close the connection: the response cannot be completed (an origin died mid-body)."""
        self.aborted = True
        self.finished = True
        self.keep_alive = False
        self._conn.abort()


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_aborted",
        "_acked",
        "_body",
        "_buf",
        "_closed_at",
        "_drain",
        "_exchange",
        "_handed",
        "_info",
        "_lost",
        "_paused",
        "_paused_at",
        "_reading_paused",
        "_sent",
        "_server",
        "_task",
        "_transport",
        "_unmetered",
        "closed",
        "closing",
        "eof",
        "head_started",
        "last_activity",
        "peer",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._exchange: Exchange | None = None
        self._body: _BodyReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._paused = False  # the transport asked us to stop writing
        self._paused_at = 0.0
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closed_at = 0.0
        self.closed = False  # close requested (or the connection is lost)
        self.closing = False  # the server is shutting down: close after this response
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.peer = ""
        self.last_activity = CLOCK.now
        self.head_started = 0.0
        # Metering (module docstring): bytes every earlier exchange wrote, a duplicate of the
        # socket's descriptor for TCP_INFO (the transport may close its own before
        # `connection_lost`), the acknowledged total once lost, a cut exchange waiting for it;
        # when the edge aborted the connection with the client still there, the bytes the
        # kernel had taken by then (it delivers them: module docstring).
        self._sent = 0
        self._info: socket.socket | None = None
        self._acked: int | None = None
        self._aborted = False
        self._handed: int | None = None
        self._lost = False
        self._unmetered: Exchange | None = None

    # asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._info = socket.socket(fileno=os.dup(sock.fileno()))
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost = True
        if self._info is not None:
            self._acked = self._delivered()
            self._info.close()
            self._info = None
        if self._unmetered is not None:
            self._ended(self._unmetered)
            self._unmetered = None
        self._server.connections.discard(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ClientGone("client closed"))
            self._drain.exception()  # mark retrieved: nobody may be waiting any more
        if self._body is not None:
            self._body.fail()

    def pause_writing(self) -> None:
        self._paused = True
        self._paused_at = CLOCK.now

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._exchange is None and not self.closed:
            # Pipelined requests waited for the client to read what it was sent.
            self._process()
            if self._exchange is None and self._reading_paused and not self._paused:
                self._reading_paused = False
                self._transport.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.last_activity = CLOCK.now
        body = self._body
        if body is not None and not body.done:
            data = self._feed_body(body, data)
            if not data:
                return
        if self._buf:
            self._buf += data
        else:
            self._buf = data
            self.head_started = CLOCK.now
        if self._exchange is None:
            self._process()
        if (self._exchange is not None or self._paused) and len(
            self._buf
        ) > self._server.max_header_bytes:
            # Pipelined requests wait behind the one in progress, or for the client to read
            # its answers: buffer a bounded amount.
            self._pause_reading()

    def eof_received(self) -> bool | None:
        # A half-closed client still gets the answers to every request it already sent.
        self.eof = True
        if self._exchange is None:
            # Every complete head has been answered; the rest can never complete.
            self.close()
        elif self._body is not None and not self._body.done:
            self._body.fail()  # the body will never complete: wake its reader
        return True

    # request loop ----------------------------------------------------------------------
    def _process(self) -> None:
        server = self._server
        # Answers wait while the client does not read them (`_paused`): pipelined hits must not
        # pile up in the transport's buffer.
        while self._exchange is None and self._buf and not self.closed and not self._paused:
            buf = self._buf
            end = find_head_end(buf)
            if end < 0:
                if len(buf) > server.max_header_bytes:
                    self._refuse(431, "request header fields too large")
                elif self.eof:
                    self.close()
                elif skip_empty_lines(buf) == len(buf):
                    self._buf = b""  # a stray CRLF after a body: still idle, not a slow head
                return
            if end > server.max_header_bytes:
                self._refuse(431, "request header fields too large")
                return
            try:
                head = parse_head(buf[:end])
            except BadRequest as e:
                self._refuse(e.status, e.reason)
                return
            self._buf = buf[end:]
            exchange = Exchange(self, head)
            body = exchange._body
            if body is not None and self._buf:
                rest = body.feed(self._buf)
                if body.error is not None:
                    self._refuse(body.error.status, body.error.reason, request=head)
                    return
                self._buf = rest
            if self._buf:
                self.head_started = CLOCK.now
            self._exchange = exchange
            self._body = body
            try:
                pending = server.handler.handle(exchange)
            except Exception:
                log.exception("handler failed for %s %r", head.method, head.target)
                self._internal_error(exchange)
                pending = None
            if pending is not None:
                self._task = asyncio.ensure_future(self._run(exchange, pending))
                if len(self._buf) > server.max_header_bytes:
                    self._pause_reading()  # enough pipelined requests wait already
                return
            self._exchange_done(exchange)

    async def _run(self, exchange: Exchange, pending: Awaitable[None]) -> None:
        try:
            await pending
        except ClientGone:
            exchange.abort()
        except asyncio.CancelledError:
            exchange.abort()
            self._ended(exchange)
            raise
        except Exception:
            log.exception("handler failed for %s %r", exchange.method, exchange.head.target)
            self._internal_error(exchange)
        finally:
            self._task = None
        if not exchange.finished:
            exchange.abort()
        self._exchange_done(exchange)
        if self._exchange is None and self._buf and not self.closed:
            self._process()

    def _internal_error(self, exchange: Exchange) -> None:
        if exchange.headers_sent:
            exchange.abort()
            return
        exchange.keep_alive = False
        body = b"internal error\n"
        exchange.send(500, synth_fields(len(body)), body)

    def _exchange_done(self, exchange: Exchange) -> None:
        if exchange.aborted and not self._lost:
            self._unmetered = exchange  # metered once the connection is gone (acked bytes)
        else:
            self._ended(exchange)
        self._exchange = None
        self._body = None
        now = CLOCK.now
        self.last_activity = now  # keep-alive idle time counts from the end of the response
        if self._buf:
            self.head_started = now  # a pipelined head's time starts now
        if not exchange.keep_alive or self.closing:
            self.close()
            return
        if self._reading_paused and not self.closed and not self._paused:
            self._reading_paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]
        if self.eof and find_head_end(self._buf) < 0:
            self.close()  # half-closed and nothing complete left to answer

    def _feed_body(self, body: _BodyReader, data: bytes) -> bytes:
        rest = body.feed(data)
        if body.error is not None:
            self._body_refused(body.error)
            return b""
        if body.buffered > BODY_HIGH_WATER:
            self._pause_reading()
        return rest

    def _body_refused(self, error: BadRequest) -> None:
        """A malformed chunked body while the handler runs: refuse it if still possible."""
        exchange = self._exchange
        if exchange is None or exchange.headers_sent:
            self.abort()
            return
        # The handler accounts for the exchange and sees ClientGone when it reads on.
        exchange.keep_alive = False
        self._refuse(error.status, error.reason, account=False)

    def _refuse(
        self,
        status: int,
        reason: str,
        *,
        account: bool = True,
        request: RequestHead | None = None,
    ) -> None:
        """Answer `status` and close. `account`: no exchange will record it, so record it here
        (`request`: its head when parsed, else the raw bytes received are logged)."""
        body = (reason + "\n").encode()
        fields = synth_fields(len(body))
        data = status_line(status) + fields + b"Connection: close\r\n\r\n" + body
        server = self._server
        if account:
            server.handler.refused(None, self.peer, status, reason)
            now = server.clock()
            server.meter.record(UNKNOWN_DOMAIN, now, REFUSED, status, len(data), len(body))
            if server.access_log is not None:
                mono = time.monotonic()
                started = mono - max(CLOCK.now - self.head_started, 0.0) if self._buf else mono
                seen = request if request is not None else bytes(self._buf[: RAW_URL_MAX + 64])
                server.access_log(now, mono, Ended(
                    started, mono, self.peer, UNKNOWN_DOMAIN, seen, status, len(data),
                    len(body), "refused", fields, None, None,
                ))  # fmt: skip
        elif self._exchange is not None:
            exchange = self._exchange
            exchange.bytes_sent += len(data)  # metered with the exchange it ends
            exchange.status = status
            exchange.head_at = time.monotonic()
            exchange.response_head = fields
        self.write(data)
        self._sent += len(data)
        self.close()

    # metering ----------------------------------------------------------------------------
    def _ended(self, ex: Exchange) -> None:
        """Record `ex` once, as it ended: in the meter (what `meter_progress` has not recorded
        yet) and in the server's counters; a cut response counts what was acknowledged."""
        if self._lost or ex.aborted:
            self._cut(ex, self._acked)
        self._sent += ex.bytes_sent
        server = self._server
        now = server.clock()
        server.meter.record(
            ex.domain,
            now,
            ex.kind,
            ex.status,
            ex.bytes_sent - ex.metered_sent,
            ex.body_bytes_sent - ex.metered_body,
        )
        if server.account is not None:
            server.account(ex)
        if server.access_log is not None:
            server.access_log(now, time.monotonic(), ex)

    def _cut(self, ex: Exchange, acked: int | None) -> None:
        """Reduce `ex`'s counts to what the client acknowledged (all of it when unknown), never
        below what was metered already; lost bytes are taken off the body first."""
        if acked is None:
            return
        sent = max(min(ex.bytes_sent, acked - self._sent), ex.metered_sent)
        lost = ex.bytes_sent - sent
        ex.bytes_sent = sent
        ex.body_bytes_sent = max(ex.body_bytes_sent - lost, ex.metered_body, 0)

    def progress(self, now: float) -> None:
        """Record what the response in progress has delivered since the last call."""
        ex = self._exchange
        if ex is None or self._lost:
            return
        acked = self._bytes_acked()
        if acked is None:  # no TCP_INFO: what left the transport's buffer
            transport = self._transport
            buffered = transport.get_write_buffer_size() if transport is not None else 0
            acked = self._sent + ex.bytes_sent - buffered
        sent = max(min(ex.bytes_sent, acked - self._sent), ex.metered_sent)
        body = max(ex.body_bytes_sent - (ex.bytes_sent - sent), ex.metered_body)
        if sent > ex.metered_sent or body > ex.metered_body:
            self._server.meter.add_sent(
                ex.domain, now, sent - ex.metered_sent, body - ex.metered_body
            )
            ex.metered_sent, ex.metered_body = sent, body

    def _bytes_acked(self) -> int | None:
        """Bytes of this connection the client's TCP acknowledged; None when unknown."""
        info = self._tcp_info()
        return None if info is None else info[1]

    def _tcp_info(self) -> tuple[int, int] | None:
        """(tcpi_state, tcpi_bytes_acked) of the connection; None when unknown."""
        if self._info is None:
            return None
        try:
            raw = self._info.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return None
        if len(raw) < _BYTES_ACKED_AT + _BYTES_ACKED.size:
            return None
        return raw[0], int(_BYTES_ACKED.unpack_from(raw, _BYTES_ACKED_AT)[0])

    def _delivered(self) -> int | None:
        """At `connection_lost`, before the last descriptor closes: the bytes of the connection
        the client gets. What its TCP acknowledged, or, when the edge aborted the connection
        with the client still there, what the kernel had taken (`abort`): closing the socket
        lets the kernel deliver its send queue, unless the client reset the connection
        meanwhile or unread request bytes make the close a reset (module docstring)."""
        info = self._tcp_info()
        if info is None:
            return None
        state, acked = info
        handed = self._handed
        if handed is None or state not in _TCP_DELIVERING or self._info is None:
            return acked
        try:
            raw = fcntl.ioctl(self._info.fileno(), termios.FIONREAD, bytes(_INT.size))
        except OSError:
            return acked
        if _INT.unpack(raw)[0]:
            return acked  # unread input: the close sends a reset and drops the send queue
        return max(acked, handed)

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]

    def body_consumed(self, body: _BodyReader) -> None:
        if (
            self._reading_paused
            and body.buffered < BODY_HIGH_WATER // 2
            and len(self._buf) <= self._server.max_header_bytes
            and not self.closed
        ):
            self._reading_paused = False
            self.last_activity = CLOCK.now  # a stalled body counts from when we read again
            self._transport.resume_reading()  # type: ignore[union-attr]

    # output ----------------------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        if not self.closed:
            self._transport.write(data)  # type: ignore[union-attr]

    async def drained_socket_fd(self) -> int | None:
        """A duplicate of the socket's descriptor once everything written before went out.

        A duplicate, because the transport owns the original: the event loop refuses a second
        watcher on it, and the transport closes it on its own schedule.
        """
        transport = self._transport
        if transport is None or self.closed:
            raise ClientGone("client closed")
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        if transport.get_write_buffer_size():
            # Pause until the buffer is empty, not just below the high-water mark; the send
            # timeout applies meanwhile (a client that stops reading is cut).
            transport.set_write_buffer_limits(high=0, low=0)
            try:
                while transport.get_write_buffer_size():
                    if self._paused:
                        await self.drain()
                    else:  # a loop that did not pause us at once: look again shortly
                        await asyncio.sleep(0.001)
                    if self.closed:
                        raise ClientGone("client closed")
            finally:
                if not self.closed:
                    transport.set_write_buffer_limits()
        return os.dup(sock.fileno())

    async def wait_writable(self, fd: int) -> None:
        """Wait until the socket accepts more bytes; the send timeout applies meanwhile."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._paused = True  # for the sweeper's send timeout
        self._paused_at = CLOCK.now
        self._drain = waiter

        def writable() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(fd, writable)
        try:
            await waiter
        finally:
            loop.remove_writer(fd)
            self._paused = False

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone("client closed")
        if not self._paused:
            return
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def close(self) -> None:
        """Close once what was written is flushed (bounded by the send timeout)."""
        if not self.closed and self._transport is not None:
            self.closed = True
            self._closed_at = CLOCK.now
            self._transport.close()

    def abort(self, *, deliver: bool = True) -> None:
        """Close now, dropping what the transport still buffers (also when a close is already in
        progress). `deliver`: the client may still read what the kernel holds, so a cut
        response counts what was handed to the kernel (module docstring); False when the client
        is gone or stopped reading (what it acknowledged counts)."""
        transport = self._transport
        if transport is not None and not self._aborted:
            self._aborted = True
            if deliver and not self._lost:
                ex = self._exchange
                written = self._sent + (ex.bytes_sent if ex is not None else 0)
                self._handed = written - transport.get_write_buffer_size()
            transport.abort()
        self.closed = True

    # sweeper hooks ---------------------------------------------------------------------
    def idle_check(
        self, now: float, keepalive: float, head_timeout: float, send_timeout: float
    ) -> None:
        # Stamps may be a tick old (CLOCK_TICK): compare against `now` a tick earlier.
        now -= CLOCK_TICK
        if self.closed:
            # close() waits for the transport to flush: a client that never reads must not
            # keep the connection forever.
            if now - self._closed_at > send_timeout:
                self.abort(deliver=False)
            return
        if self._paused:
            if now - self._paused_at > send_timeout:
                self.abort(deliver=False)  # the client stopped reading
            return
        if self._exchange is None:
            if self._buf and now - self.head_started > head_timeout:
                self._refuse(408, "request head timeout")
            elif not self._buf and now - self.last_activity > keepalive:
                self.close()
        elif (
            self._body is not None
            and not self._body.done
            and not self._reading_paused  # we stopped reading: not the client's fault
            and now - self.last_activity > head_timeout
        ):
            self.abort()  # a stalled upload

    def shutdown(self) -> None:
        """Close after the response in progress; close now when idle."""
        self.closing = True
        if self._exchange is None:
            self.close()


def synth_fields(content_length: int, content_type: str = "text/plain; charset=utf-8") -> bytes:
    """Field lines of a response the edge makes itself (errors, refusals)."""
    return (
        f"Date: {CLOCK.date}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {content_length}\r\nCache-Control: no-store\r\n"
    ).encode("latin-1")


class HttpServer:
    """Owns the listening socket, the connections and the sweeper task."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int = 16384,
        keepalive_timeout: float = 75.0,
        head_timeout: float = 30.0,
        send_timeout: float = 60.0,
        meter: Meter | None = None,
        account: Callable[[Exchange], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`meter`: where exchanges are metered (a new one when None); `account`: called once
        per exchange as it ends, with its final counts; `clock`: wall time (tests move it)."""
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.keepalive_timeout = keepalive_timeout
        # Whole request head, and longest pause in a request body.
        self.head_timeout = head_timeout
        # Longest time a client may leave a response unread (or a closing connection unflushed).
        self.send_timeout = send_timeout
        self.connections: set[HttpConnection] = set()
        self.meter = meter if meter is not None else Meter()
        self.account = account
        self.clock = clock
        # Where every exchange's access-log entry goes (edge.logwriter); None: not logged.
        self.access_log: Callable[[float, float, Exchanged], None] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        factory: Callable[[], HttpConnection] = lambda: HttpConnection(self)  # noqa: E731
        self._server = await loop.create_server(factory, sock=sock, backlog=4096)
        self._sweeper = asyncio.create_task(self._sweep(), name="edge-sweeper")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_TICK)
            CLOCK.refresh()
            now = CLOCK.now
            for conn in list(self.connections):
                conn.idle_check(now, self.keepalive_timeout, self.head_timeout, self.send_timeout)

    def meter_progress(self) -> None:
        """Meter what responses still in progress delivered so far (module docstring)."""
        now = self.clock()
        for conn in self.connections:
            conn.progress(now)

    def stop_accepting(self) -> None:
        """Accept no new connections; those already accepted go on."""
        if self._server is not None:
            self._server.close()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight responses finish for up to `grace` s, then cut."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            await self._server.wait_closed()
