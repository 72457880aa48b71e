"""Slices: a large object cached as fixed-size ranges, each fetched from the origin once with a
Range request and stored on its own, so that a seek into a cold object fetches only the slices
it covers. `edge.slices` holds the slice arithmetic and Content-Range parsing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from cachetools import TTLCache

from edge import policy
from edge.config import CacheRule, DomainConfig, EdgeConfig
from edge.fetch import OriginClient, OriginError
from edge.fill import FillError
from edge.metrics import EdgeStats
from edge.miss import Fills
from edge.passing import _origin_fields
from edge.policy import RequestDirectives
from edge.range import coalesce_ranges, if_range_allows, parse_range
from edge.server import Exchange, synth_fields
from edge.slices import (
    ContentRange,
    expected_span,
    parse_content_range,
    same_version,
    slice_key,
    slice_span,
    slices_covering,
)
from edge.store import CachedObject, replay_block
from edge.tiers import Tiers


class Slicing(Fills):
    """Objects cached and delivered by slices: a mixin of `edge.request.EdgeProxy`."""

    config: EdgeConfig
    tiers: Tiers
    origin: OriginClient
    stats: EdgeStats
    whole_only: TTLCache[str, bool]
    slice_fetches: dict[str, asyncio.Future[Slice | None]]

    # slices --------------------------------------------------------------------------
    def _slice_size(self, ex: Exchange, rule: CacheRule | None) -> int:
        """Slice size for a request whose object is not cached whole: a rule's, or the
        default for a Range request (a seek); 0 for a whole-object fill."""
        if ex.method not in ("GET", "HEAD"):
            return 0
        if rule is not None and rule.slice:
            return rule.slice
        return self.config.cache.slice if "range" in ex.head.headers else 0

    async def deliver_slices(
        self,
        ex: Exchange,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        req: RequestDirectives,
        size: int,
    ) -> None:
        """Answer from slices of the object, fetching from the origin only those missing."""
        fields = ex.head.headers
        range_value = fields.get("range")
        first_index = _range_start(range_value) // size
        opened: list[Slice] = []  # stored slices hold a descriptor each: ours to close
        try:
            try:
                first = await self.get_slice(domain, key, first_index, size, ex, rule, opened)
            except OriginError as e:
                self.synth(ex, e.status, e.reason, "error", fwd="uri-miss")
                return
            except FillError:
                self.synth(ex, 502, "invalid origin response", "error", fwd="uri-miss")
                return
            except NotSatisfiable as e:
                body = b"range not satisfiable\n"
                extra = f"Content-Range: bytes */{e.total}\r\n".encode()
                ex.send(416, synth_fields(len(body)) + extra, body)
                ex.set_outcome("uri-miss")
                return
            if first is None:
                # The origin ignores Range (or the object is not sliceable): whole-object fill.
                self.whole_only[key] = True
                await self.miss(ex, domain, key, rule, req, "uri-miss", stale=None)
                return
            await self._deliver_from(ex, domain, key, rule, size, first, first_index, opened)
        finally:
            for piece in opened:
                if piece.obj.file is not None:
                    piece.obj.file.close()

    async def _deliver_from(
        self,
        ex: Exchange,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        size: int,
        first: Slice,
        first_index: int,
        opened: list[Slice],
    ) -> None:
        fields = ex.head.headers
        range_value = fields.get("range")
        total = first.span.total
        ranges = parse_range(range_value, total) if range_value else None
        if_range = fields.get("if-range")
        if (
            ranges is not None
            and if_range is not None
            and not if_range_allows(if_range, first.obj.headers)
        ):
            ranges = None
        age = int(first.obj.age(time.time()))
        status_value = policy.cache_status(
            hit=first.hit,
            fwd=None if first.hit else "uri-miss",
            fwd_status=None if first.hit else 206,
            stored=not first.hit and first.stored,
            ttl=int(first.obj.lifetime) - age if first.hit or first.stored else None,
            detail="slice",
        )
        tail = f"Age: {age}\r\nCache-Status: {status_value}\r\n".encode()
        outcome = "hit" if first.hit else "uri-miss"
        if ranges == []:
            body = b"range not satisfiable\n"
            extra = f"Content-Range: bytes */{total}\r\n".encode()
            ex.send(416, synth_fields(len(body)) + extra + tail, body)
            ex.set_outcome(outcome)
            return
        merged = coalesce_ranges(ranges) if ranges else None
        start, end, status = 0, total, 200
        if merged is not None and len(merged) == 1:
            (start, end), status = merged[0], 206
        kept = [(n, v) for n, v in first.obj.fields if n.lower() != "content-range"]
        block = replay_block(kept, first.obj.headers.get("via"), end - start)
        if status == 206:
            block += f"Content-Range: bytes {start}-{end - 1}/{total}\r\n".encode()
        ex.start(status, block + tail, end - start)
        try:
            for index in slices_covering(start, end, size) if not ex.no_body else ():
                piece = (
                    first
                    if index == first_index
                    else await self.get_slice(domain, key, index, size, ex, rule, opened)
                )
                if piece is None or not same_version(
                    first.obj.headers, piece.obj.headers, total, piece.span.total
                ):
                    # The object changed at the origin between slices: never mix versions.
                    self._drop_slices(key, total, size)
                    ex.abort()
                    return
                a = max(start, piece.span.start) - piece.span.start
                b = min(end, piece.span.end) - piece.span.start
                await self._send_slice(ex, piece.obj, a, b)
            ex.finish()
        except (OriginError, FillError, NotSatisfiable, OSError):
            ex.abort()
        finally:
            ex.set_outcome(outcome)

    async def _send_slice(self, ex: Exchange, obj: CachedObject, a: int, b: int) -> None:
        if obj.file is None:
            await ex.write(memoryview(obj.body)[a:b])
        else:
            await ex.sendfile(obj.file.fd, obj.file.body_offset + a, b - a)

    def invalidate_fills(self, doomed: Callable[[str], bool]) -> None:
        """Slice fetches too (keys `key#slice=...`): one no longer registered in
        `slice_fetches` finishes for its waiters but stores nothing."""
        super().invalidate_fills(doomed)
        for skey in [k for k in self.slice_fetches if doomed(k)]:
            del self.slice_fetches[skey]

    def _drop_slices(self, key: str, total: int, size: int) -> None:
        for index in range(-(-total // size)):
            self.tiers.remove(slice_key(key, size, index))

    async def get_slice(
        self,
        domain: DomainConfig,
        key: str,
        index: int,
        size: int,
        ex: Exchange,
        rule: CacheRule | None,
        opened: list[Slice],
    ) -> Slice | None:
        """Slice `index` of the object: stored, or fetched (once per slice at a time) and
        stored. None when the origin did not answer the Range request with the exact 206.
        A stored slice is appended to `opened` (its descriptor is the caller's to close)."""
        skey = slice_key(key, size, index)
        obj, _ = self.tiers.lookup(skey, {})
        if obj is not None:
            span = parse_content_range(obj.headers.get("content-range"))
            if (
                span is not None
                and (span.start, span.end) == expected_span(index, size, span.total)
                and time.time() < obj.fresh_until
            ):
                stored = Slice(obj, span, hit=True, stored=True)
                opened.append(stored)
                return stored
            if obj.file is not None:
                obj.file.close()
        pending = self.slice_fetches.get(skey)
        if pending is None:
            fetch = asyncio.ensure_future(self._fetch_slice(domain, skey, index, size, ex, rule))
            self.slice_fetches[skey] = pending = fetch

            def done(_: object) -> None:
                if self.slice_fetches.get(skey) is fetch:  # not a later fetch of the slice
                    del self.slice_fetches[skey]

            fetch.add_done_callback(done)
        else:
            self.stats.coalesced_waits += 1
        return await asyncio.shield(pending)

    async def _fetch_slice(
        self,
        domain: DomainConfig,
        skey: str,
        index: int,
        size: int,
        ex: Exchange,
        rule: CacheRule | None,
    ) -> Slice | None:
        start, end = slice_span(index, size)
        headers = self.forward_headers(domain, ex, for_fill=True)
        headers["Range"] = f"bytes={start}-{end - 1}"
        request_time = time.time()
        self.stats.origin_fetches += 1
        resp = await self.origin.open(domain, "GET", ex.head.target, headers, answer=ex)
        # At the head, as a whole-object fill: a ban issued while the body arrives is newer.
        response_time = time.time()
        try:
            if resp.status == 416:
                unsatisfied = resp.headers.get("Content-Range", "")
                length = unsatisfied.rpartition("/")[2]
                if length.isdigit():
                    raise NotSatisfiable(int(length))  # a probe past the end, not "no Range"
                return None
            span = parse_content_range(resp.headers.get("Content-Range"))
            if (
                resp.status != 206
                or span is None
                or (span.start, span.end) != expected_span(index, size, span.total)
            ):
                return None  # ignores Range, or cuts its own spans: whole objects instead
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                self._origin_failed(domain, ex.head.target, f"slice body: {e}", "body")
                raise FillError("origin slice body failed") from e
            if len(body) != span.end - span.start:
                raise FillError("origin slice shorter than its Content-Range")
            self.origin_read(domain.name, len(body))
            fields = _origin_fields(resp, response_time)
            headers_seen = policy.combine_fields(fields)
            # Stored by the rules of the whole response it is a part of (a 200).
            reason = self._unstorable(200, ex.head.headers, headers_seen, rule)
            if reason is None and policy.vary_names(headers_seen):
                return None  # slices of varying objects: whole objects instead
            obj = self._stored_object(
                skey, 206, fields, body, rule, ex.head.headers, request_time, response_time
            )
            if obj is None:
                return None
            # A purge or a write meanwhile unregistered this fetch (`invalidate_fills`).
            wanted = self.slice_fetches.get(skey) is asyncio.current_task()
            stored = reason is None and wanted and self.tiers.store_complete(obj)
            if reason is not None:
                self.stats.not_stored[reason] += 1
            return Slice(obj, span, hit=False, stored=stored)
        finally:
            resp.close()


class NotSatisfiable(Exception):
    """The origin answered 416: the object has `total` bytes, the request starts past them."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


@dataclass(slots=True)
class Slice:
    obj: CachedObject  # status 206, its Content-Range in `span`
    span: ContentRange
    hit: bool
    stored: bool


def _range_start(value: str | None) -> int:
    """The first byte a Range asks for, 0 when it starts from the end or is not a range."""
    if value is None:
        return 0
    first = value.partition("=")[2].split(",")[0].strip().partition("-")[0].strip()
    return int(first) if first.isdigit() else 0
