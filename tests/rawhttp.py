"""A tiny raw HTTP/1.1 client for tests that must see exact bytes on the wire."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    fields: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.fields.get(name.lower())


def _parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    return int(status), reason, headers


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> RawResponse:
    """Read one response (Content-Length, chunked, or close-delimited body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, reason, headers = _parse_head(head[:-4])
    fields: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in fields.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif "content-length" in fields:
        body = await reader.readexactly(int(fields["content-length"]))
    else:
        body = await reader.read()
    return RawResponse(status, reason, headers, body, head, fields)


async def exchange(
    port: int, data: bytes, count: int = 1, methods: list[str] | None = None, timeout: float = 10
) -> list[RawResponse]:
    """Send `data` on a new connection and read `count` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = []
        for i in range(count):
            method = methods[i] if methods else "GET"
            out.append(await asyncio.wait_for(read_response(reader, method), timeout))
        return out
    finally:
        writer.close()


async def request(
    port: int, target: str, host: str, method: str = "GET", headers: dict[str, str] | None = None
) -> RawResponse:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return (await exchange(port, data, methods=[method]))[0]
