"""The origin client (the *miss* and *pass* steps' way out), over aiohttp's ClientSession.

Set up against the traps in LIBRARIES.md: no total timeout (large bodies), no redirects followed,
no cookie jar (one user's Set-Cookie must never reach another's request), no automatic
Accept-Encoding or User-Agent, no decompression, and the request-target passed byte for byte
(`yarl.URL(..., encoded=True)`). Origins of a domain are tried in order on connect failure.
Origins at addresses in `[origin] deny` are never connected to (edge.netguard): 502.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from edge.config import DomainConfig, OriginSettings
from edge.netguard import DenyingResolver, deny_reason

# RFC 9110 9.2.2; aiohttp itself retries these once when a connection drops unanswered.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DENY_CACHE_SIZE = 4096


class OriginError(Exception):
    """No usable response from any origin: `status` is what the client gets (502 or 504).

    `reason` is the short, fixed text the client sees; `detail` (origin bytes, OS errors) is
    for the log only.
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = f"{reason}: {detail}" if detail else reason


class OriginAnswer(Protocol):
    """Where `OriginClient.open` notes the origin's answer for the access log (an exchange, or a
    fill that exchanges read it from): its status (None: no answer) and milliseconds to its
    head (or to the failure). Only the first fetch is noted: a sliced response's first slice."""

    origin_status: int | None
    origin_ms: float | None


class OriginClient:
    def __init__(self, settings: OriginSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        # origin -> why it is denied ("" if it is not), for address literals, which aiohttp
        # connects to without asking the resolver. Bounded: domains change, origins pile up.
        self._denied: dict[str, str] = {}

    async def start(self) -> None:
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=s.max_connections,
            limit_per_host=0,
            ttl_dns_cache=60,
            enable_cleanup_closed=True,
            resolver=DenyingResolver(s.deny) if s.deny else None,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=s.connect_timeout, sock_read=s.idle_read_timeout
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            read_bufsize=1 << 20,
            max_line_size=16384,
            max_field_size=16384,
            requote_redirect_url=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open(
        self,
        domain: DomainConfig,
        method: str,
        target: bytes,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None = None,
        answer: OriginAnswer | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response head arrived (body unread).

        Tries the domain's origins in order while the connection itself fails; a body that has
        started to stream cannot be replayed, so a request with a body gets one origin only.
        A connection closed without an answer is retried by aiohttp itself for idempotent
        methods; after that, only an idempotent request moves on to the next origin.
        `answer`, unless it has one already, gets the status and time of the answer.
        """
        if answer is None or answer.origin_ms is not None:
            return await self._open(domain, method, target, headers, body)
        started = time.monotonic()
        try:
            resp = await self._open(domain, method, target, headers, body)
        finally:
            answer.origin_ms = (time.monotonic() - started) * 1000
        answer.origin_status = resp.status
        return resp

    async def _open(
        self,
        domain: DomainConfig,
        method: str,
        target: bytes,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "OriginClient.start() not awaited"
        path = target.decode("ascii")
        last: OriginError | None = None
        # The first-byte clock would also run while a request body uploads, however long it
        # takes; with a body, the idle read timeout (sock_read) bounds the wait instead.
        first_byte = self._settings.first_byte_timeout if body is None else None
        for origin in domain.origins:
            if self._settings.deny and (denied := self._deny_reason(origin)):
                last = OriginError(502, "origin address denied", denied)
                continue
            url = URL(origin + path, encoded=True)
            try:
                async with asyncio.timeout(first_byte):
                    return await self._session.request(
                        method,
                        url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                    )
            except aiohttp.ConnectionTimeoutError:
                last = OriginError(502, "origin connect timeout", origin)
            except TimeoutError:
                # The origin took the request but did not answer in time: another origin might
                # repeat a side effect, so stop here.
                raise OriginError(504, "origin timeout", origin) from None
            except aiohttp.ServerDisconnectedError:
                last = OriginError(502, "origin closed the connection", origin)
                if method not in IDEMPOTENT:
                    break
            except aiohttp.ClientConnectorError as e:
                last = OriginError(
                    502, "origin unreachable", f"{origin}: {e.os_error.strerror or e}"
                )
            except aiohttp.ClientResponseError as e:
                raise OriginError(
                    502, "invalid origin response", f"{origin}: {e.message!r}"
                ) from None
            except aiohttp.ClientError as e:
                detail = f"{origin}: {type(e).__name__}: {e}"
                raise OriginError(502, "origin error", detail) from None
            if body is not None:
                break
        assert last is not None
        raise last

    def _deny_reason(self, origin: str) -> str:
        reason = self._denied.get(origin)
        if reason is None:
            if len(self._denied) >= DENY_CACHE_SIZE:
                self._denied.clear()
            reason = self._denied[origin] = deny_reason(origin, self._settings.deny)
        return reason
