"""pass: requests forwarded to the origin as they are and never stored (unsafe methods, bypass
rules), and the invalidation a successful unsafe method causes (RFC 9111 4.4).

The request fields every origin fetch sends, fills and slices included (`forward_headers`),
the origin's response fields as the edge replays them (`_origin_fields`), and the accounting
of origin failures (`_origin_failed`) are here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp
from multidict import CIMultiDict

from edge import policy
from edge.access import PREFETCH_HEADER
from edge.cachekey import cache_key, normalize_path
from edge.config import DomainConfig
from edge.deliver import Delivery
from edge.fetch import OriginClient, OriginError
from edge.fill import Fill, FillError
from edge.metrics import EdgeStats
from edge.server import Exchange
from edge.slices import SLICE_MARK
from edge.store import VIA, replay_block
from edge.tiers import Tiers

log = logging.getLogger("edge.request")  # the request path's logger, whichever module logs

# Client fields a cache fill does not forward: the fill fetches the whole current object for
# everyone; the client's own conditions and ranges are answered from it (RFC 9111 4.3.2).
FILL_DROPS = frozenset(
    {"range", "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)
# Client fields the edge sets itself (Host, X-Forwarded-For, Via) or re-frames (the body), and
# the supervisor's prefetch secret (edge.access.PREFETCH_HEADER).
NOT_FORWARDED = frozenset(
    {"host", "x-forwarded-for", "via", "content-length", "expect", PREFETCH_HEADER.lower()}
)


class Passing(Delivery):
    """Forwarding to the origin: a mixin of `edge.request.EdgeProxy`."""

    origin: OriginClient
    stats: EdgeStats
    tiers: Tiers
    busy: dict[str, Fill]
    on_invalidate: Callable[[list[str]], None] | None

    # pass ----------------------------------------------------------------------------
    async def pass_to_origin(self, ex: Exchange, domain: DomainConfig, fwd: str) -> None:
        """Forward the request with its body; stream the answer back; store nothing."""
        head = ex.head
        headers = self.forward_headers(domain, ex, for_fill=False)
        body = ex.body() if ex.has_body else None
        self.stats.origin_fetches += 1
        try:
            resp = await self.origin.open(
                domain, head.method, head.target, headers, body, answer=ex
            )
        except OriginError as e:
            self._origin_failed(domain, head.target, e.detail, "connect")
            self.synth(ex, e.status, e.reason, "error", fwd=fwd)
            return
        try:
            fields = _origin_fields(resp, time.time())
            if policy.invalidates(head.method, resp.status):
                self.invalidate(domain, head.target, fields)
            status_value = policy.cache_status(fwd=fwd, fwd_status=resp.status)
            via = policy.combine_fields(fields).get("via")
            length = _body_length(head.method, resp)
            block = replay_block(fields, via, length)
            if head.method == "HEAD" or resp.status == 304:
                # No body follows; the origin's Content-Length describes the selected
                # representation (RFC 9110 8.6): pass it on unchanged.
                block += "".join(
                    f"Content-Length: {v}\r\n" for n, v in fields if n.lower() == "content-length"
                ).encode("latin-1")
            ex.set_outcome(fwd, forwarded=True)
            ex.start(resp.status, block + f"Cache-Status: {status_value}\r\n".encode(), length)
            if not ex.no_body:
                received = 0
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
                    self.origin_read(domain.name, len(chunk))
                    await ex.write(chunk)
                if length is not None and received != length:
                    raise FillError(f"origin sent {received} of {length} bytes")
            ex.finish()
        except (aiohttp.ClientError, TimeoutError, FillError) as e:
            self._origin_failed(domain, head.target, f"body: {type(e).__name__}: {e}", "body")
            if ex.headers_sent:
                ex.abort()
            else:
                self.synth(ex, 502, "invalid origin response", "error", fwd=fwd)
        finally:
            resp.close()

    def invalidate(
        self, domain: DomainConfig, target: bytes, fields: list[tuple[str, str]]
    ) -> None:
        """RFC 9111 4.4: the target URI, and same-host Location / Content-Location."""
        path, _, query = target.decode("ascii").partition("?")
        keys = [cache_key(domain, normalize_path(path), query)]
        for name, value in fields:
            if name.lower() in ("location", "content-location"):
                same_host = _same_host_path(value, domain.name)
                if same_host is not None:
                    p, _, q = same_host.partition("#")[0].partition("?")
                    keys.append(cache_key(domain, normalize_path(p), q))
        self.forget(keys, disk=True)
        if self.on_invalidate is not None:
            self.on_invalidate(keys)  # other worker processes drop their copies too

    def forget(self, keys: list[str], *, disk: bool) -> None:
        """Drop `keys` (their variants and slices) from this process, and from the disk when
        `disk`; a fetch of them in flight may finish for its clients but stores nothing."""
        doomed = set(keys)
        self.tiers.forget(doomed, disk=disk)
        # A Vary variant's fetch is "key\nvalues" (`Fills.miss`), a slice's "key#slice=...".
        self.invalidate_fills(
            lambda busy_key: busy_key.partition("\n")[0].partition(SLICE_MARK)[0] in doomed
        )

    def invalidate_fills(self, doomed: Callable[[str], bool]) -> None:
        """Fetches in flight of the keys `doomed` accepts finish for their clients but store
        nothing, and the next request for them fetches anew."""
        for busy_key in [k for k in self.busy if doomed(k)]:
            self.busy.pop(busy_key).invalidated = True

    # helpers -------------------------------------------------------------------------
    def forward_headers(
        self, domain: DomainConfig, ex: Exchange, *, for_fill: bool
    ) -> CIMultiDict[str]:
        head = ex.head
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in policy.strip_hop_by_hop(head.fields):
            lname = name.lower()
            if lname in NOT_FORWARDED or (for_fill and lname in FILL_DROPS):
                continue
            out.add(name, value)
        if ex.has_body and not for_fill and not head.chunked:
            # The framing the edge parsed, not the client's field: a fill sends no body at
            # all, and a body-less request must not announce one (request smuggling).
            out["Content-Length"] = str(head.content_length)
        # The domain's canonical name, not the client's spelling (port, case, trailing dot):
        # the cache key ignores those, so an origin that echoes Host must not see them.
        out["Host"] = domain.origin_host or domain.name
        xff = head.headers.get("x-forwarded-for")
        out["X-Forwarded-For"] = f"{xff}, {ex.peer}" if xff else ex.peer
        via = head.headers.get("via")
        out["Via"] = f"{via}, {VIA}" if via else VIA
        return out

    def _origin_failed(self, domain: DomainConfig, target: bytes, reason: str, kind: str) -> None:
        self.stats.origin_errors[kind] += 1
        log.warning("origin failure for %s%s: %s", domain.name, target.decode("ascii"), reason)


def _origin_fields(resp: aiohttp.ClientResponse, now: float) -> list[tuple[str, str]]:
    """The origin's response field lines, hop-by-hop free, with a Date (RFC 9110 6.6.1: a
    recipient with a clock adds the one an origin left out)."""
    fields = policy.strip_hop_by_hop(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in resp.raw_headers
    )
    if not any(name.lower() == "date" for name, _ in fields):
        fields.append(("Date", policy.format_http_date(now)))
    return fields


def _body_length(method: str, resp: aiohttp.ClientResponse) -> int | None:
    """Body bytes that follow a response head, when known (RFC 9112 6.3)."""
    if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
        return None
    return resp.content_length


def _same_host_path(url: str, host: str) -> str | None:
    """The path?query of `url` when it is relative or names `host`, else None."""
    if url.startswith("/") and not url.startswith("//"):
        return url
    for scheme in ("http://", "https://"):
        if url.lower().startswith(scheme):
            authority, slash, rest = url[len(scheme) :].partition("/")
            if authority.lower().split(":")[0] == host:
                return "/" + rest if slash else "/"
    return None
