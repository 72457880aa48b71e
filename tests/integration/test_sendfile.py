"""Exchange.sendfile: zero-copy file bodies over a real socket, on asyncio and uvloop.

Served by the bare data-path server (edge.server) with a small handler, so these tests pin the
transport-level behaviour the disk tier relies on: exact bytes, ranges of a file, aborted
clients, stalled clients cut by the send timeout, HEAD, and the copy fallback.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from edge.server import ClientGone, Exchange, HttpServer
from tests.rawhttp import read_response

SIZE = 24 << 20


class FileHandler:
    """GET /{offset}/{count} answers that slice of one file; /chunked/... without a length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: list[str] = []

    def refused(self, exchange: Exchange | None, peer: str, status: int, reason: str) -> None:
        pass

    def handle(self, ex: Exchange) -> Awaitable[None] | None:
        return self.serve(ex)

    async def serve(self, ex: Exchange) -> None:
        mode, offset, count = ex.head.path.strip("/").split("/")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            length = None if mode == "chunked" else int(count)
            ex.start(200, b"Content-Type: application/octet-stream\r\n" + (
                b"" if length is None else b"Content-Length: %d\r\n" % length
            ), length)
            await ex.sendfile(fd, int(offset), int(count))
            ex.finish()
            self.outcomes.append(f"sent {ex.body_bytes_sent}")
        except ClientGone:
            self.outcomes.append(f"gone after {ex.body_bytes_sent}")
            raise
        finally:
            os.close(fd)


@pytest.fixture
async def file_server(tmp_path: Path) -> AsyncIterator[tuple[int, FileHandler, bytes, HttpServer]]:
    data = os.urandom(SIZE)
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    handler = FileHandler(path)
    server = HttpServer(handler, send_timeout=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    await server.start(sock)
    yield sock.getsockname()[1], handler, data, server
    await server.stop(grace=1.0)


async def fetch(port: int, target: str, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp = await asyncio.wait_for(read_response(reader, method), 20)
        assert resp.status == 200
        return resp.body
    finally:
        writer.close()


async def test_whole_file_and_slices_arrive_intact(file_server, monkeypatch) -> None:
    port, _, data, _ = file_server
    calls: list[int] = []
    real_sendfile = os.sendfile

    def observed(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", observed)
    assert await fetch(port, f"/f/0/{SIZE}") == data
    assert sum(calls) == SIZE  # zero-copy all the way, no fallback
    assert await fetch(port, f"/f/{1 << 20}/{3 << 20}") == data[1 << 20 : 4 << 20]
    assert await fetch(port, "/f/5/1") == data[5:6]


async def test_chunked_responses_fall_back_to_copying(file_server) -> None:
    port, _, data, _ = file_server
    assert await fetch(port, f"/chunked/7/{2 << 20}") == data[7 : 7 + (2 << 20)]


async def test_head_sends_no_body(file_server) -> None:
    port, _, _, _ = file_server
    assert await fetch(port, f"/f/0/{SIZE}", method="HEAD") == b""


async def test_client_gone_mid_transfer_is_counted_and_leaks_nothing(file_server) -> None:
    port, handler, _, _ = file_server
    fds_before = len(os.listdir("/proc/self/fd"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /f/0/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readexactly(1 << 20)
    writer.transport.abort()
    for _ in range(100):
        if handler.outcomes:
            break
        await asyncio.sleep(0.02)
    assert handler.outcomes and handler.outcomes[0].startswith("gone after")
    sent = int(handler.outcomes[0].rsplit(" ", 1)[1])
    assert (1 << 20) <= sent < SIZE
    await asyncio.sleep(0.1)
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_client_that_stops_reading_is_cut_by_the_send_timeout(file_server) -> None:
    port, handler, _, server = file_server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(f"GET /f/0/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        for _ in range(60):  # the sweeper runs each second; send_timeout is 1 s
            if handler.outcomes:
                break
            await asyncio.sleep(0.1)
        assert handler.outcomes and handler.outcomes[0].startswith("gone after")
        assert not server.connections
    finally:
        sock.close()
