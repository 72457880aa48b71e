"""The demo and benchmark origin: static files, a clock and generated bodies, over aiohttp.

Routes:
  GET/HEAD /api/time   the current time as JSON, never cacheable
  GET/HEAD /gen/{n}    n bytes (n <= 2**31) of deterministic content, made on the fly
  GET/HEAD /{path}     a file under the directory ("dir/" serves "dir/index.html") with a
                       strong ETag and Last-Modified; If-None-Match / If-Modified-Since give
                       304; a single `Range: bytes=a-b` gives 206 or 416, honouring If-Range
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import NamedTuple

from aiohttp import web
from aiohttp.helpers import ETAG_ANY

__all__ = [
    "CHUNK_SIZE",
    "MAX_GENERATED_SIZE",
    "ensure_sample_files",
    "generated_chunks",
    "make_origin_app",
    "serve_origin",
]

CHUNK_SIZE = 256 * 1024  # bytes per read from a file and per write to the client
MAX_GENERATED_SIZE = 2**31  # largest n for /gen/{n}
# Longer than an HTTP client pool keeps idle connections (aiohttp: 15 s), so the edge rarely
# reuses a connection the origin is just closing.
KEEPALIVE_TIMEOUT = 75.0

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".mp4": "video/mp4",
}
_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})", re.IGNORECASE)
_DIRECTORY = web.AppKey("directory", Path)


# --- sample files ------------------------------------------------------------------------------


class _SampleFile(NamedTuple):
    path: str  # relative to the served directory
    size: int
    content: Callable[[], Iterable[bytes]]


def _logo_png() -> Iterable[bytes]:
    """A 32x32 blue disc on white, padded to exactly 4096 bytes with a tEXt comment chunk."""
    size, radius = 32, 14
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # PNG filter type "None" for this row
        for x in range(size):
            inside = (x - 15.5) ** 2 + (y - 15.5) ** 2 <= radius**2
            rows += b"\x1f\x6f\xeb" if inside else b"\xff\xff\xff"
    header = size.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8-bit RGB, no interlace
    head = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
    )
    tail = _png_chunk(b"IEND", b"")
    keyword = b"Comment\x00"
    text_length = 4096 - len(head) - len(tail) - 12 - len(keyword)  # 12: chunk length+type+CRC
    filler = b"cdn-edge sample origin logo, padded to 4096 bytes. " * 100
    return (head, _png_chunk(b"tEXt", keyword + filler[:text_length]), tail)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")


_PARAGRAPHS = (
    "An edge keeps copies of popular responses close to its clients, so most requests never "
    "travel to the origin. Each copy is kept only as long as the origin's Cache-Control allows, "
    "or as long as the edge's own rules say when the origin is silent.",
    "A stale copy need not be thrown away: the edge can ask the origin whether it changed, with "
    "If-None-Match carrying the stored ETag. A 304 Not Modified answer costs a round trip but no "
    "body, and the copy is fresh again.",
    "Large objects are fetched once and served to many clients at the same time. Range requests "
    "let a video player ask for just the part it is about to play, and the edge can answer them "
    "from the stored copy.",
    "Query strings are part of the cache key unless the domain says otherwise: tracking "
    "parameters that do not change the response can be dropped from the key, so the same object "
    "is not stored once per campaign.",
)


def _index_html() -> Iterable[bytes]:
    """A small but real HTML page, exactly 20 KiB, linking the other sample resources."""
    size = 20 * 1024
    head = (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        "<title>cdn-edge sample origin</title>\n"
        "<style>\n"
        "body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; }\n"
        "header { display: flex; gap: 1rem; align-items: center; }\n"
        "section { border-top: 1px solid #ddd; padding: 0.5rem 0; }\n"
        "</style>\n</head>\n<body>\n"
        '<header><img src="/img/logo.png" width="32" height="32" alt="">'
        "<h1>cdn-edge sample origin</h1></header>\n"
        "<nav><ul>\n"
        '<li><a href="/img/logo.png">logo</a> (4 KiB, cacheable for 5 minutes)</li>\n'
        '<li><a href="/video/demo.mp4">video</a> (64 MiB, supports ranges)</li>\n'
        '<li><a href="/api/time">time</a> (JSON, never cacheable)</li>\n'
        '<li><a href="/gen/1048576">1 MiB generated</a> (any size up to 2 GiB)</li>\n'
        "</ul></nav>\n"
        '<video src="/video/demo.mp4" controls preload="none"></video>\n'
        "<main>\n"
    )
    tail = "</main>\n<footer><p>Served by edge/sample_origin.py.</p></footer>\n</body>\n</html>\n"
    padding_overhead = len("<!---->\n")
    page = head
    number = 1
    while True:
        paragraph = _PARAGRAPHS[number % len(_PARAGRAPHS)]
        section = (
            f'<section id="s{number}">\n<h2>Note {number}</h2>\n<p>{paragraph}</p>\n</section>\n'
        )
        if len(page) + len(section) + len(tail) + padding_overhead > size:
            break
        page += section
        number += 1
    # A comment fills the page to the exact size, so the file size is a cheap validity check.
    padding = size - len(page) - len(tail) - padding_overhead
    page += "<!--" + " " * padding + "-->\n" + tail
    return (page.encode("ascii"),)


def _video_chunks() -> Iterator[bytes]:
    """64 MiB of pseudo-random bytes, the same on every machine (SHAKE-128 is a standard)."""
    for index in range(64):
        yield hashlib.shake_128(b"cdn-edge demo.mp4 %d" % index).digest(2**20)


_SAMPLE_FILES = (
    _SampleFile("img/logo.png", 4096, _logo_png),
    _SampleFile("index.html", 20 * 1024, _index_html),
    _SampleFile("video/demo.mp4", 64 * 2**20, _video_chunks),
)


def ensure_sample_files(directory: Path) -> None:
    """Create the sample files under `directory` unless each is already there at its size.

    Leaving existing files alone keeps their mtime, and so their ETag, stable across restarts.
    """
    for sample in _SAMPLE_FILES:
        target = directory / sample.path
        if target.is_file() and target.stat().st_size == sample.size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, sample.content())


def _write_atomically(target: Path, chunks: Iterable[bytes]) -> None:
    # Several processes may start at once; a reader must never see a half-written file.
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; these are public sample files
        with open(fd, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


# --- generated bodies --------------------------------------------------------------------------

_GENERATED_BLOCK = hashlib.shake_128(b"cdn-edge generated body").digest(CHUNK_SIZE)


def generated_chunks(size: int) -> Iterator[bytes]:
    """The body of /gen/{size}, in CHUNK_SIZE pieces.

    Piece i is i as 8 big-endian bytes followed by a fixed pseudo-random block, so bodies cost
    next to nothing to make and a piece delivered out of place or twice is still detectable.
    """
    for index, start in enumerate(range(0, size, CHUNK_SIZE)):
        piece = index.to_bytes(8, "big") + _GENERATED_BLOCK[8:]
        yield piece if size - start >= CHUNK_SIZE else piece[: size - start]


# --- the application ---------------------------------------------------------------------------


def make_origin_app(directory: Path) -> web.Application:
    """The origin's routes, serving files from `directory` (see the module docstring)."""
    app = web.Application()
    app[_DIRECTORY] = directory
    app.router.add_get("/api/time", _handle_time)
    app.router.add_get("/gen/{size:[0-9]+}", _handle_generated)
    app.router.add_get("/{path:.*}", _handle_file)
    return app


async def serve_origin(host: str, port: int, directory: Path) -> web.AppRunner:
    """Fill `directory` with the sample files and serve it on host:port (0: any free port).

    Returns the started runner: the bound address is in `runner.addresses`, and the caller
    stops the server with `await runner.cleanup()`.
    """
    await asyncio.to_thread(ensure_sample_files, directory)
    runner = web.AppRunner(
        make_origin_app(directory), access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT
    )
    await runner.setup()
    try:
        # A benchmark opens hundreds of connections at once; the default backlog of 128 drops some.
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _handle_time(request: web.Request) -> web.Response:
    now = datetime.now(UTC)
    return web.json_response(
        {"time": now.isoformat(), "unix": now.timestamp()},
        headers={"Cache-Control": "no-store"},
    )


async def _handle_generated(request: web.Request) -> web.StreamResponse:
    digits = request.match_info["size"]
    # Checking the length first keeps int() away from absurdly long digit strings.
    if len(digits) > len(str(MAX_GENERATED_SIZE)) or int(digits) > MAX_GENERATED_SIZE:
        raise web.HTTPBadRequest(text=f"size must be at most {MAX_GENERATED_SIZE}\n")
    size = int(digits)
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Cache-Control": "public, max-age=60",
        }
    )
    response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD":
        for chunk in generated_chunks(size):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _handle_file(request: web.Request) -> web.StreamResponse:
    path = _file_path(request.app[_DIRECTORY], request.match_info["path"])
    if path is None:
        raise web.HTTPNotFound()
    opened = _open_regular_file(path)
    if opened is None:
        raise web.HTTPNotFound()
    file, info = opened
    with file:
        size = info.st_size
        etag = f'"{size:x}-{info.st_mtime_ns:x}"'
        last_modified = formatdate(info.st_mtime, usegmt=True)
        suffix = path.suffix.lower()
        headers = {
            "ETag": etag,
            "Last-Modified": last_modified,
            "Cache-Control": "public, max-age=60" if suffix == ".html" else "public, max-age=300",
        }
        if _not_modified(request, etag, info.st_mtime):
            return web.Response(status=304, headers=headers)

        headers["Accept-Ranges"] = "bytes"
        headers["Content-Type"] = _CONTENT_TYPES.get(suffix, "application/octet-stream")
        start, length, status = 0, size, 200
        range_header = request.headers.get("Range")
        # Range applies to GET only; If-Range: serve the whole file unless the validator matches.
        if (
            range_header is not None
            and request.method == "GET"
            and request.headers.get("If-Range", etag) in (etag, last_modified)
        ):
            byte_range = _byte_range(range_header, size)
            if byte_range is not None:
                start, end = byte_range
                length, status = end - start + 1, 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"

        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        if request.method != "HEAD":
            # Plain reads on the loop: the sample files sit in the page cache, where a 256 KiB
            # read is far cheaper than a hop to a thread.
            file.seek(start)
            remaining = length
            while remaining:
                chunk = file.read(min(CHUNK_SIZE, remaining))
                if not chunk:  # the file shrank under us: the body is short, so drop the connection
                    response.force_close()
                    break
                await response.write(chunk)
                remaining -= len(chunk)
        await response.write_eof()
        return response


def _file_path(directory: Path, url_path: str) -> Path | None:
    """The file `url_path` (the decoded path after the leading "/") names, or None.

    None for anything that could leave `directory`: "..", "." and empty segments (an empty first
    segment would make the path absolute), and NUL bytes. A trailing "/" means "index.html".
    """
    segments = url_path.split("/")
    if not segments[-1]:
        segments[-1] = "index.html"
    if any(segment in ("", ".", "..") or "\0" in segment for segment in segments):
        return None
    return directory.joinpath(*segments)


def _open_regular_file(path: Path) -> tuple[io.FileIO, os.stat_result] | None:
    """`path` opened for reading, and its status; None if it is missing or not a regular file."""
    try:
        # O_NONBLOCK so that a FIFO cannot stall the event loop in open(); no effect on files.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return open(fd, "rb", buffering=0), info


def _not_modified(request: web.Request, etag: str, mtime: float) -> bool:
    """Whether the request's validators match, so a 304 answers it (RFC 9110 13.1.2, 13.1.3)."""
    if_none_match = request.if_none_match
    if if_none_match is not None:
        # Weak comparison, and If-Modified-Since is ignored when If-None-Match is present.
        return any(tag.value in (etag.strip('"'), ETAG_ANY) for tag in if_none_match)
    if_modified_since = request.if_modified_since
    return if_modified_since is not None and int(mtime) <= if_modified_since.timestamp()


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte a `Range` header asks for, or None to send everything.

    Only a single range is supported; other forms are ignored, as RFC 9110 14.2 allows. A range
    that starts past the end raises 416 Range Not Satisfiable.
    """
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix_length = int(last_text)
        if suffix_length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - suffix_length), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid, so ignored rather than refused (RFC 9110 14.1.1)
    if first >= size:
        raise _unsatisfiable(size)
    last = min(int(last_text), size - 1) if last_text else size - 1
    return first, last


def _unsatisfiable(size: int) -> web.HTTPRequestRangeNotSatisfiable:
    return web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
