"""edge.sample_origin over real sockets: files, ranges, validators, traversal, /api/time, /gen."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from edge.sample_origin import (
    CHUNK_SIZE,
    MAX_GENERATED_SIZE,
    ensure_sample_files,
    generated_chunks,
    make_origin_app,
    serve_origin,
)

Client = TestClient[aiohttp.web.Request, aiohttp.web.Application]

SAMPLES = {"img/logo.png": 4096, "index.html": 20 * 1024, "video/demo.mp4": 64 * 2**20}


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample files, made once; a secret file sits next to (outside) the served directory."""
    root = tmp_path_factory.mktemp("origin")
    (root / "secret.txt").write_text("must not be served\n")
    directory = root / "site"
    ensure_sample_files(directory)
    return directory


@pytest.fixture
async def client(site: Path, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(make_origin_app(site))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# --- sample files ---------------------------------------------------------------------------


def test_sample_file_sizes(site: Path) -> None:
    for relative, size in SAMPLES.items():
        assert (site / relative).stat().st_size == size, relative


def test_logo_is_a_valid_png(site: Path) -> None:
    data = (site / "img/logo.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: list[tuple[bytes, bytes]] = []
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        offset += 12 + length
    assert offset == len(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, color_type) == (32, 32, 8, 2)
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * 3)


def test_index_is_html(site: Path) -> None:
    page = (site / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>\n")
    assert page.endswith("</html>\n")
    for link in ('href="/img/logo.png"', 'src="/video/demo.mp4"', 'href="/api/time"'):
        assert link in page


def test_ensure_sample_files_is_idempotent_and_deterministic(site: Path, tmp_path: Path) -> None:
    ensure_sample_files(tmp_path)
    for relative in SAMPLES:
        assert file_sha256(tmp_path / relative) == file_sha256(site / relative), relative
    mtimes = {relative: (tmp_path / relative).stat().st_mtime_ns for relative in SAMPLES}

    video = tmp_path / "video/demo.mp4"
    with video.open("r+b") as file:
        file.truncate(1000)
    ensure_sample_files(tmp_path)

    assert video.stat().st_size == SAMPLES["video/demo.mp4"]
    assert file_sha256(video) == file_sha256(site / "video/demo.mp4")
    for relative in ("img/logo.png", "index.html"):
        assert (tmp_path / relative).stat().st_mtime_ns == mtimes[relative]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "demo.mp4",
        "index.html",
        "logo.png",
    ]


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "relative", "content_type", "cache_control"),
    [
        ("/img/logo.png", "img/logo.png", "image/png", "public, max-age=300"),
        ("/index.html", "index.html", "text/html; charset=utf-8", "public, max-age=60"),
        ("/", "index.html", "text/html; charset=utf-8", "public, max-age=60"),
        ("/video/demo.mp4", "video/demo.mp4", "video/mp4", "public, max-age=300"),
    ],
)
async def test_get_file(
    client: Client, site: Path, url: str, relative: str, content_type: str, cache_control: str
) -> None:
    path = site / relative
    info = path.stat()
    async with client.get(url) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == content_type
        assert response.headers["Cache-Control"] == cache_control
        assert response.headers["Content-Length"] == str(info.st_size)
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.headers["ETag"] == f'"{info.st_size:x}-{info.st_mtime_ns:x}"'
        assert response.headers["Last-Modified"] == formatdate(info.st_mtime, usegmt=True)
        assert "Transfer-Encoding" not in response.headers
    assert sha256(body) == file_sha256(path)


async def test_unknown_suffix_is_octet_stream(client: Client, site: Path) -> None:
    (site / "notes.bin").write_bytes(b"\x00\x01")
    try:
        async with client.get("/notes.bin") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert await response.read() == b"\x00\x01"
    finally:
        (site / "notes.bin").unlink()


@pytest.mark.parametrize("url", ["/missing.png", "/img", "/img/", "/video/demo.mp4/x", "/gen/x"])
async def test_not_found(client: Client, url: str) -> None:
    async with client.get(url) as response:
        assert response.status == 404


async def test_other_methods_not_allowed(client: Client) -> None:
    async with client.post("/index.html", data=b"x") as response:
        assert response.status == 405


async def test_head_file(client: Client, site: Path) -> None:
    async with client.head("/video/demo.mp4") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(SAMPLES["video/demo.mp4"])
        assert response.headers["Content-Type"] == "video/mp4"
        assert "ETag" in response.headers
        assert await response.read() == b""


async def test_head_ignores_range(client: Client) -> None:
    async with client.head("/img/logo.png", headers={"Range": "bytes=0-9"}) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "4096"
        assert "Content-Range" not in response.headers


async def test_keep_alive(client: Client) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        for _ in range(2):
            writer.write(b"GET /img/logo.png HTTP/1.1\r\nHost: o.test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" not in head.lower()
            assert len(await reader.readexactly(4096)) == 4096
    finally:
        writer.close()
        await writer.wait_closed()


# --- ranges ---------------------------------------------------------------------------------

VIDEO = 64 * 2**20


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, VIDEO - 1),
        ("bytes=-100", VIDEO - 100, VIDEO - 1),
        ("bytes=-999999999", 0, VIDEO - 1),
        ("bytes=5-5", 5, 5),
        ("bytes=262000-600000", 262000, 600000),  # across read-chunk boundaries
        ("bytes=67108000-999999999", 67108000, VIDEO - 1),  # clamped to the end
        ("Bytes=0-0", 0, 0),
    ],
)
async def test_range(client: Client, site: Path, header: str, first: int, last: int) -> None:
    with (site / "video/demo.mp4").open("rb") as file:
        file.seek(first)
        expected = file.read(last - first + 1)
    async with client.get("/video/demo.mp4", headers={"Range": header}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {first}-{last}/{VIDEO}"
        assert response.headers["Content-Length"] == str(last - first + 1)
        assert response.headers["Content-Type"] == "video/mp4"
        assert "ETag" in response.headers
        assert await response.read() == expected


@pytest.mark.parametrize(
    "header", [f"bytes={VIDEO}-", f"bytes={VIDEO + 5}-{VIDEO + 9}", "bytes=-0"]
)
async def test_range_not_satisfiable(client: Client, header: str) -> None:
    async with client.get("/video/demo.mp4", headers={"Range": header}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{VIDEO}"


async def test_range_of_empty_file_not_satisfiable(client: Client, site: Path) -> None:
    (site / "empty.txt").write_bytes(b"")
    try:
        async with client.get("/empty.txt", headers={"Range": "bytes=0-"}) as response:
            assert response.status == 416
            assert response.headers["Content-Range"] == "bytes */0"
        async with client.get("/empty.txt") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "0"
    finally:
        (site / "empty.txt").unlink()


@pytest.mark.parametrize(
    "header",
    ["bytes=0-1,5-6", "bytes=9-1", "items=0-1", "bytes=-", "bytes=a-b", "bytes 0-1", "bytes=0-1x"],
)
async def test_unsupported_or_invalid_range_sends_everything(client: Client, header: str) -> None:
    async with client.get("/img/logo.png", headers={"Range": header}) as response:
        assert response.status == 200
        assert "Content-Range" not in response.headers
        assert len(await response.read()) == 4096


async def test_if_range(client: Client) -> None:
    async with client.head("/img/logo.png") as response:
        etag = response.headers["ETag"]
        last_modified = response.headers["Last-Modified"]
    for validator, status in [
        (etag, 206),
        (last_modified, 206),
        ('"stale"', 200),
        (f"W/{etag}", 200),  # If-Range needs a strong match
        ("Thu, 01 Jan 1970 00:00:00 GMT", 200),
    ]:
        headers = {"Range": "bytes=0-9", "If-Range": validator}
        async with client.get("/img/logo.png", headers=headers) as response:
            assert response.status == status, validator
            assert len(await response.read()) == (10 if status == 206 else 4096)


# --- conditional requests -------------------------------------------------------------------


async def test_if_none_match(client: Client) -> None:
    async with client.get("/img/logo.png") as response:
        etag = response.headers["ETag"]
        last_modified = response.headers["Last-Modified"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        async with client.get("/img/logo.png", headers={"If-None-Match": header}) as response:
            assert response.status == 304, header
            assert response.headers["ETag"] == etag
            assert response.headers["Last-Modified"] == last_modified
            assert response.headers["Cache-Control"] == "public, max-age=300"
            assert await response.read() == b""
    async with client.get("/img/logo.png", headers={"If-None-Match": '"other"'}) as response:
        assert response.status == 200
        assert len(await response.read()) == 4096


async def test_if_none_match_wins_over_range_and_if_modified_since(client: Client) -> None:
    async with client.get("/img/logo.png") as response:
        etag = response.headers["ETag"]
        last_modified = response.headers["Last-Modified"]
    headers = {"If-None-Match": etag, "Range": "bytes=0-9"}
    async with client.get("/img/logo.png", headers=headers) as response:
        assert response.status == 304
    # A non-matching If-None-Match decides alone: If-Modified-Since is not consulted.
    headers = {"If-None-Match": '"other"', "If-Modified-Since": last_modified}
    async with client.get("/img/logo.png", headers=headers) as response:
        assert response.status == 200


async def test_if_modified_since(client: Client, site: Path) -> None:
    mtime = (site / "index.html").stat().st_mtime
    for since, status in [
        (formatdate(mtime, usegmt=True), 304),
        (formatdate(mtime + 3600, usegmt=True), 304),
        (formatdate(mtime - 3600, usegmt=True), 200),
        ("not a date", 200),
    ]:
        async with client.get("/index.html", headers={"If-Modified-Since": since}) as response:
            assert response.status == status, since


async def test_head_conditional(client: Client) -> None:
    async with client.head("/index.html") as response:
        etag = response.headers["ETag"]
    async with client.head("/index.html", headers={"If-None-Match": etag}) as response:
        assert response.status == 304


async def test_etag_changes_with_the_file(client: Client, site: Path) -> None:
    path = site / "changing.txt"
    path.write_text("one")
    try:
        async with client.get("/changing.txt") as response:
            first = response.headers["ETag"]
        path.write_text("two")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        async with client.get("/changing.txt", headers={"If-None-Match": first}) as response:
            assert response.status == 200
            assert response.headers["ETag"] != first
            assert await response.text() == "two"
    finally:
        path.unlink()


# --- path traversal -------------------------------------------------------------------------


async def raw_status(client: Client, target: str) -> int:
    """The status for a request line sent byte for byte, bypassing the client's URL cleanup."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: o.test\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.txt",
        "/img/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/img/%2E%2E/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/img/..%2f..%2fsecret.txt",
        "/..",
        "//etc/passwd",
        "/img//logo.png",
        "/./index.html/.",
        "/index.html%00",
    ],
)
async def test_path_traversal_is_not_found(client: Client, target: str) -> None:
    assert await raw_status(client, target) == 404


async def test_raw_request_for_a_file_works(client: Client) -> None:
    # The traversal test's helper does see a 200 for a plain path.
    assert await raw_status(client, "/img/logo.png") == 200


# --- /api/time ------------------------------------------------------------------------------


async def test_api_time(client: Client) -> None:
    async with client.get("/api/time") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Content-Type"].startswith("application/json")
        data = json.loads(await response.read())
    reported = datetime.fromisoformat(data["time"])
    assert reported.tzinfo is not None
    assert abs((datetime.now(UTC) - reported).total_seconds()) < 60
    assert abs(data["unix"] - reported.timestamp()) < 1e-3


async def test_api_time_head(client: Client) -> None:
    async with client.head("/api/time") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert await response.read() == b""


# --- /gen/{n} -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 8, CHUNK_SIZE, 5 * 2**20 + 12345])
async def test_generated(client: Client, size: int) -> None:
    async with client.get(f"/gen/{size}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        assert response.headers["Cache-Control"] == "public, max-age=60"
        assert response.headers["Content-Type"] == "application/octet-stream"
        body = await response.read()
    assert len(body) == size
    assert body == b"".join(generated_chunks(size))


def test_generated_chunks_differ_and_are_deterministic() -> None:
    chunks = list(generated_chunks(3 * CHUNK_SIZE + 1))
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE, 1]
    assert len(set(chunks)) == 4
    assert chunks == list(generated_chunks(3 * CHUNK_SIZE + 1))
    # A shorter body is a prefix of a longer one.
    assert b"".join(generated_chunks(1000)) == b"".join(chunks)[:1000]


async def test_generated_largest_size_head(client: Client) -> None:
    async with client.head(f"/gen/{MAX_GENERATED_SIZE}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(MAX_GENERATED_SIZE)
        assert await response.read() == b""


@pytest.mark.parametrize("size", [str(MAX_GENERATED_SIZE + 1), "9" * 5000])
async def test_generated_too_large(client: Client, size: str) -> None:
    async with client.get(f"/gen/{size}") as response:
        assert response.status == 400


async def test_generated_streams_without_buffering(client: Client) -> None:
    # 1 GiB: only works if the body is streamed; read part of it, then hang up.
    async with client.get(f"/gen/{2**30}") as response:
        assert response.status == 200
        start = await response.content.readexactly(2 * CHUNK_SIZE)
        assert start == b"".join(generated_chunks(2 * CHUNK_SIZE))
        response.close()
    async with client.get("/img/logo.png") as response:
        assert response.status == 200


async def test_client_hanging_up_mid_file_leaves_server_healthy(client: Client) -> None:
    for _ in range(3):
        async with client.get("/video/demo.mp4") as response:
            await response.content.readexactly(1000)
            response.close()
    async with client.get("/index.html") as response:
        assert response.status == 200
        assert len(await response.read()) == 20 * 1024


# --- serve_origin ---------------------------------------------------------------------------


@pytest.fixture
async def served(site: Path) -> AsyncIterator[str]:
    runner = await serve_origin("127.0.0.1", 0, site)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_serve_origin(served: str, site: Path) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{served}/img/logo.png") as response:
            assert response.status == 200
            assert await response.read() == (site / "img/logo.png").read_bytes()
        async with session.get(f"{served}/video/demo.mp4", headers={"Range": "bytes=-4"}) as resp:
            assert resp.status == 206
            assert len(await resp.read()) == 4


async def test_serve_origin_creates_files(tmp_path: Path, site: Path) -> None:
    runner = await serve_origin("127.0.0.1", 0, tmp_path / "new")
    await runner.cleanup()
    for relative in SAMPLES:
        assert file_sha256(tmp_path / "new" / relative) == file_sha256(site / relative)


async def test_serve_origin_port_in_use(served: str, site: Path) -> None:
    port = int(served.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        await serve_origin("127.0.0.1", port, site)
