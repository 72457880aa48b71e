"""The edge's request path as an explicit state machine, Varnish-style.

    recv -> route -> admit -> lookup -> {hit | miss | pass | stale} -> deliver -> account

- recv: `edge.server` frames and parses the request (`edge.http1`), refusing malformed ones.
- route: Host -> domain config (`route`); an unknown host is 404 and never reaches an origin.
- admit: domain state and access rules (added by the control-plane and access-control issues).
- lookup: cache key (`edge.cachekey`) + Vary (`edge.store`) + freshness (`edge.policy`).
- hit: a fresh stored response, written synchronously from prebuilt bytes (`deliver_hit`).
- miss: one origin fetch per key (`Fill`), streamed to every waiting client (`deliver_fill`).
- stale: conditional revalidation, stale-while-revalidate, stale-if-error.
- pass: forwarded as is, never stored (unsafe methods, bypass rules, `pass_to_origin`).
- deliver: Age, Cache-Status (RFC 9211), Via, conditional requests (304), Range, HEAD.
- account: every response, refused ones included, is counted (`EdgeStats.account`).

Cache policy lives in `edge.policy` (pure functions); this module only sequences it with I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace

import aiohttp
from cachetools import TTLCache
from multidict import CIMultiDict

from edge import policy
from edge.cachekey import cache_key, normalize_path
from edge.config import CacheRule, DomainConfig, EdgeConfig
from edge.disk import Claim, DiskEntry, DiskError, DiskWriter, FillAborted, ObjectMeta
from edge.fetch import OriginClient, OriginError
from edge.fill import Fill, FillError, FillHead, FillReader
from edge.metrics import EdgeStats
from edge.policy import RequestDirectives, ResponseDirectives
from edge.range import coalesce_ranges, if_range_allows, multipart_parts, parse_range
from edge.server import ClientGone, Exchange, synth_fields
from edge.slices import (
    ContentRange,
    parse_content_range,
    same_version,
    slice_key,
    slice_span,
    slices_covering,
)
from edge.store import VIA, CachedObject, MemoryTier, forced_directives, replay_block
from edge.tiers import Tiers, object_meta

log = logging.getLogger("edge.request")

NO_DIRECTIVES = policy.request_directives({})
HIT_FOR_MISS_SECONDS = 30.0  # how long a key whose response was unshareable skips coalescing
CONDITIONAL_FIELDS = frozenset(
    {"if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)
# Client fields a cache fill does not forward: the fill fetches the whole current object for
# everyone; the client's own conditions and ranges are answered from it (RFC 9111 4.3.2).
FILL_DROPS = frozenset(
    {"range", "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)
# Client fields the edge sets itself (Host, X-Forwarded-For, Via) or re-frames (the body).
NOT_FORWARDED = frozenset({"host", "x-forwarded-for", "via", "content-length", "expect"})
# Fields replayed in a 304 (RFC 9110 15.4.5).
NOT_MODIFIED_FIELDS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)
# Unstorable reasons a rule with respect_origin = false overrides (commercial CDNs' "ignore
# origin cache headers"); Authorization, Set-Cookie, Vary: * and status rules still hold.
ALLOW_ALL = b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
# Stored bodies above this are streamed in STREAM_CHUNK writes, each waiting for the socket.
STREAMED_HIT = 1 << 20
STREAM_CHUNK = 256 << 10
WHOLE_ONLY_SECONDS = 600.0
OTHER_WORKER_POLL = 0.005  # seconds between looks at another worker's fetch
FORCEABLE = frozenset({"no-store", "private", "no-freshness"})


class EdgeProxy:
    """The request path (`edge.server.Handler`) for one worker."""

    def __init__(
        self, config: EdgeConfig, store: MemoryTier, origin: OriginClient, stats: EdgeStats
    ) -> None:
        self.config = config
        self.tiers = Tiers(store, config.cache, config.edge.state_dir)
        self.origin = origin
        self.stats = stats
        self.busy: dict[str, Fill] = {}
        self.hit_for_miss: TTLCache[str, bool] = TTLCache(maxsize=65536, ttl=HIT_FOR_MISS_SECONDS)
        # Keys whose origin ignored a Range request: whole-object fills for a while.
        self.whole_only: TTLCache[str, bool] = TTLCache(maxsize=65536, ttl=WHOLE_ONLY_SECONDS)
        self.slice_fetches: dict[str, asyncio.Future[Slice | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.tiers.start()

    async def close(self) -> None:
        """Cancel and await every fill and background revalidation this proxy owns."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.tiers.close()

    # recv (refusals from edge.server) --------------------------------------------------
    def refused(self, exchange: Exchange | None, peer: str, status: int, reason: str) -> None:
        self.stats.account("refused", status, 0, 0)

    # route ---------------------------------------------------------------------------
    def handle(self, ex: Exchange) -> Awaitable[None] | None:
        head = ex.head
        domain = self.config.domain_for_host(head.host) if head.host else None
        if domain is None:
            self.synth(ex, 404, "unknown host", "refused")
            return None
        # admit: domain state and access rules come here (control-plane and access issues).
        if head.target == b"*":
            # OPTIONS * asks about the server, not a resource (RFC 9110 9.3.7): answered here.
            ex.send(200, synth_fields(0) + ALLOW_ALL, b"")
            self.stats.account("bypass", 200, ex.bytes_sent, 0)
            return None
        if head.method not in ("GET", "HEAD"):
            return self.pass_to_origin(ex, domain, "method")
        return self.lookup(ex, domain)

    # lookup --------------------------------------------------------------------------
    def lookup(self, ex: Exchange, domain: DomainConfig) -> Awaitable[None] | None:
        head = ex.head
        path = normalize_path(head.path)
        rule = domain.rule_for(path) if domain.rules else None
        if rule is not None and rule.ttl == 0:
            return self.pass_to_origin(ex, domain, "bypass")
        fields = head.headers
        req = (
            policy.request_directives(fields)
            if "cache-control" in fields or "pragma" in fields
            else NO_DIRECTIVES
        )
        key = cache_key(domain, path, head.query)
        obj, why = self.tiers.lookup(key, fields)
        if obj is None:
            if req.only_if_cached:
                self.synth(ex, 504, "not cached", "miss", detail="only-if-cached")
                return None
            if key in self.hit_for_miss:
                why = "miss"
            size = self._slice_size(ex, rule)
            if (
                size
                and why != "miss"
                and not req.no_store
                and key not in self.busy
                and key not in self.whole_only
            ):
                return self.deliver_slices(ex, domain, key, rule, req, size)
            return self.miss(ex, domain, key, rule, req, why, stale=None)
        pending = self.use_stored(ex, domain, key, rule, req, obj)
        if obj.file is None:
            return pending
        return _closing(obj.file, pending)  # the disk object's descriptor is this request's

    def use_stored(
        self,
        ex: Exchange,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        req: RequestDirectives,
        obj: CachedObject,
    ) -> Awaitable[None] | None:
        """A stored response was found: hit, stale hit, or validate it with the origin."""
        now = time.time()
        age = obj.age(now)
        if req is NO_DIRECTIVES and now < obj.fresh_until:
            return self.deliver_hit(ex, obj, age, "hit")
        verdict = policy.lookup_freshness(req, obj.directives, age=age, lifetime=obj.lifetime)
        if verdict == "fresh":
            return self.deliver_hit(ex, obj, age, "hit")
        if verdict == "stale-ok":
            return self.deliver_hit(ex, obj, age, "stale")
        if verdict == "stale-while-revalidate":
            self.revalidate_in_background(domain, key, rule, ex, obj)
            return self.deliver_hit(ex, obj, age, "stale", detail="stale-while-revalidate")
        if req.only_if_cached:
            self.synth(ex, 504, "not cached", "miss", detail="only-if-cached")
            return None
        # RFC 9211 2.2: "request" when only the request's directives refused it.
        usable = age < obj.lifetime and not obj.directives.no_cache
        fwd = "request" if req.no_cache or usable else "stale"
        return self.miss(ex, domain, key, rule, req, fwd, stale=obj)

    # hit -----------------------------------------------------------------------------
    def deliver_hit(
        self,
        ex: Exchange,
        obj: CachedObject,
        age: float,
        outcome: str,
        *,
        detail: str | None = None,
        fwd: str | None = None,
        fwd_status: int | None = None,
    ) -> Awaitable[None] | None:
        """Answer from a stored response; synchronous unless the body is large."""
        head = ex.head
        fields = head.headers
        age_s = int(age)
        # Plain hits reuse the head built for this age second (Age and ttl change per second).
        memo = outcome == "hit" and detail is None
        if memo and obj.hit_age == age_s:
            tail = obj.hit_tail
        else:
            status_value = policy.cache_status(
                hit=fwd is None, fwd=fwd, fwd_status=fwd_status, ttl=int(obj.lifetime) - age_s,
                detail=detail,
            )
            tail = f"Age: {age_s}\r\nCache-Status: {status_value}\r\n".encode()
            if memo:
                obj.hit_age, obj.hit_tail, obj.hit_block = age_s, tail, obj.out_block + tail
        if 200 <= obj.status < 300 and not CONDITIONAL_FIELDS.isdisjoint(fields):
            status = policy.evaluate_conditional(head.method, fields, obj.headers)
            if status is not None:
                self.send_without_body(ex, status, obj.fields, tail, outcome)
                return None
        if "range" in fields and obj.status == 200:
            return self.deliver_range(ex, obj, tail, outcome)
        block = obj.hit_block if memo else obj.out_block + tail
        return self.send_stored(ex, obj.status, block, obj, [(0, obj.body_length)], outcome)

    def send_stored(
        self,
        ex: Exchange,
        status: int,
        block: bytes,
        obj: CachedObject,
        pieces: list[Piece],
        outcome: str,
    ) -> Awaitable[None] | None:
        """A stored body, or pieces of it: from memory, one synchronous write when small, else
        streamed with flow control (a 16 MiB write to a slow client would otherwise sit in the
        transport's buffer, and stock asyncio copies it there); from disk with sendfile."""
        if obj.file is not None:
            return self._send_file(ex, status, block, obj.file, pieces, outcome)
        body = _assemble(obj.body, pieces)
        if len(body) <= STREAMED_HIT or ex.no_body:
            ex.send(status, block, body)
            self.stats.account(outcome, status, ex.bytes_sent, ex.body_bytes_sent)
            return None
        return self._stream_stored(ex, status, block, body, outcome)

    async def _stream_stored(
        self, ex: Exchange, status: int, block: bytes, body: bytes | memoryview, outcome: str
    ) -> None:
        ex.start(status, block, len(body))
        view = memoryview(body)
        try:
            for offset in range(0, len(body), STREAM_CHUNK):
                await ex.write(view[offset : offset + STREAM_CHUNK])
            ex.finish()
        finally:
            self.stats.account(outcome, status, ex.bytes_sent, ex.body_bytes_sent)

    async def _send_file(
        self,
        ex: Exchange,
        status: int,
        block: bytes,
        file: DiskEntry,
        pieces: list[Piece],
        outcome: str,
    ) -> None:
        ex.start(status, block, _pieces_length(pieces))
        try:
            for piece in pieces:
                if isinstance(piece, bytes):
                    await ex.write(piece)
                else:
                    start, end = piece
                    await ex.sendfile(file.fd, file.body_offset + start, end - start)
            ex.finish()
        finally:
            self.stats.account(outcome, status, ex.bytes_sent, ex.body_bytes_sent)

    def deliver_range(
        self, ex: Exchange, obj: CachedObject, tail: bytes, outcome: str
    ) -> Awaitable[None] | None:
        """Byte ranges from a stored body (RFC 9110 14): one range as a 206 with Content-Range,
        several as multipart/byteranges (14.6), too many as the whole 200."""
        fields = ex.head.headers
        block = obj.out_block + tail
        length = obj.body_length
        whole: list[Piece] = [(0, length)]
        if_range = fields.get("if-range")
        ranges = parse_range(fields["range"], length)
        if ranges is None or (if_range is not None and not if_range_allows(if_range, obj.headers)):
            return self.send_stored(ex, obj.status, block, obj, whole, outcome)
        if not ranges:
            body = b"range not satisfiable\n"
            extra = f"Content-Range: bytes */{length}\r\n".encode()
            ex.send(416, synth_fields(len(body)) + extra + tail, body)
            self.stats.account(outcome, 416, ex.bytes_sent, ex.body_bytes_sent)
            return None
        coalesced = coalesce_ranges(ranges)
        if coalesced is None:
            return self.send_stored(ex, obj.status, block, obj, whole, outcome)
        if len(coalesced) > 1:
            boundary = secrets.token_hex(12)
            parts, closing = multipart_parts(
                coalesced, length, obj.headers.get("content-type"), boundary
            )
            pieces: list[Piece] = [p for head, s, e in parts for p in (head, (s, e))]
            pieces.append(closing)
            kept = [(n, v) for n, v in obj.fields if n.lower() != "content-type"]
            block = (
                replay_block(kept, obj.headers.get("via"), _pieces_length(pieces))
                + f"Content-Type: multipart/byteranges; boundary={boundary}\r\n".encode()
                + tail
            )
            return self.send_stored(ex, 206, block, obj, pieces, outcome)
        start, end = coalesced[0]
        block = _with_content_range(block, start, end, length)
        return self.send_stored(ex, 206, block, obj, [(start, end)], outcome)

    def send_without_body(
        self, ex: Exchange, status: int, fields: list[tuple[str, str]], tail: bytes, outcome: str
    ) -> None:
        """304 or 412 to a client's conditional request, from stored or fetched fields."""
        if status == 304:
            kept = [(n, v) for n, v in fields if n.lower() in NOT_MODIFIED_FIELDS]
            via = policy.combine_fields(fields).get("via")
            ex.send(304, replay_block(kept, via, None) + tail, b"")
        else:
            body = b"precondition failed\n"
            ex.send(412, synth_fields(len(body)) + tail, body)
        self.stats.account(outcome, status, ex.bytes_sent, 0)

    # miss and stale ------------------------------------------------------------------
    def miss(
        self,
        ex: Exchange,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        req: RequestDirectives,
        fwd: str,
        *,
        stale: CachedObject | None,
        busy_key: str | None = None,
    ) -> Awaitable[None]:
        """Join the fetch in flight for this key, or start one. `busy_key` names the fetch
        when it must be told apart from the URI's (one per Vary variant)."""
        busy_key = busy_key or key
        coalesce = fwd != "miss" and not req.no_store
        fill = self.busy.get(busy_key) if coalesce else None
        collapsed = fill is not None and fill.can_join()
        if collapsed:
            assert fill is not None
            fill.waiters += 1
            self.stats.coalesced_waits += 1
        else:
            fill = self.start_fill(
                domain, key, rule, ex, stale=stale, register=coalesce, store=not req.no_store,
                busy_key=busy_key,
            )
        return self.deliver_fill(ex, domain, key, rule, req, fwd, fill, collapsed, stale)

    def start_fill(
        self,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        ex: Exchange,
        *,
        stale: CachedObject | None,
        register: bool,
        store: bool,
        busy_key: str | None = None,
    ) -> Fill:
        fill = Fill(busy_key or key, ex.head.headers)
        if register:
            self.busy[fill.key] = fill
        headers = self.forward_headers(domain, ex, for_fill=True)
        if stale is not None:
            for name, value in policy.validation_headers(stale.headers).items():
                headers[name] = value
            if stale.file is not None:
                # The fill may outlive the request that found the object: its own descriptor.
                f = stale.file
                own = DiskEntry(f.meta, f.path, os.dup(f.fd), f.body_offset, f.body_length)
                stale = replace(stale, file=own)
        task = asyncio.create_task(
            self.run_fill(fill, domain, key, rule, ex.head.target, headers, ex.head.headers,
                          stale, store, coalesce=register)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    def revalidate_in_background(
        self, domain: DomainConfig, key: str, rule: CacheRule | None, ex: Exchange,
        obj: CachedObject,
    ) -> None:
        """RFC 5861 3: one background revalidation per key while stale responses are served."""
        if key in self.busy:
            return
        self.start_fill(domain, key, rule, ex, stale=obj, register=True, store=True)

    async def run_fill(
        self,
        fill: Fill,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        target: bytes,
        headers: CIMultiDict[str],
        request_fields: policy.Headers,
        stale: CachedObject | None,
        store: bool,
        *,
        coalesce: bool = True,
    ) -> None:
        """Fetch `target` from origin into `fill`, and store it when it may be stored.

        With a disk tier, the fetch is claimed host-wide first: when another worker process
        is already fetching the object, the fill follows that worker's file instead.
        """
        resp: aiohttp.ClientResponse | None = None
        claim: Claim | None = None
        try:
            if coalesce and stale is None and store and self.tiers.disk is not None:
                claim = await self._claim_or_follow(fill, key, request_fields)
                if claim is None and fill.head.done():
                    return  # fed by another worker's fetch
            request_time = time.time()
            self.stats.origin_fetches += 1
            resp = await self.origin.open(domain, "GET", target, headers)
            await self._fill_body(
                fill, domain, key, rule, resp, request_fields, stale, store, request_time, claim
            )
        except OriginError as e:
            self._origin_failed(domain, target, e.detail, "connect")
            fill.fail(e)
        except (aiohttp.ClientError, TimeoutError, FillError) as e:
            self._origin_failed(domain, target, f"body: {type(e).__name__}: {e}", "body")
            fill.fail(FillError(f"origin body failed: {type(e).__name__}"))
        except Exception:
            log.exception("fill failed for %s%s", domain.name, target.decode("ascii"))
            fill.fail(FillError("internal error"))
        finally:
            if claim is not None:
                claim.release()
            if resp is not None:
                resp.close()
            self._release(fill)
            if not fill.done:  # cancelled: waiters must not wait forever
                fill.fail(FillError("fill cancelled"))
            if stale is not None and stale.file is not None:
                stale.file.close()

    async def _fill_body(
        self,
        fill: Fill,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        resp: aiohttp.ClientResponse,
        request_fields: policy.Headers,
        stale: CachedObject | None,
        store: bool,
        request_time: float,
        claim: Claim | None = None,
    ) -> None:
        response_time = time.time()
        fields = _origin_fields(resp, response_time)
        headers = policy.combine_fields(fields)
        status = resp.status
        if stale is not None and status == 304:
            # The stored Age described the old response on arrival; the 304 brings its own.
            kept = [(name, value) for name, value in stale.fields if name.lower() != "age"]
            merged = policy.merge_not_modified(kept, fields)
            obj = self._stored_object(
                key, stale.status, merged, stale.body, rule, request_fields, request_time,
                response_time, file=stale.file,
            )
            # The 304's fields may have made the response unstorable (no-store, private).
            merged_reason = self._unstorable(
                stale.status, request_fields, policy.combine_fields(merged), rule
            )
            if store and not fill.invalidated:
                if obj is not None and merged_reason is None:
                    self.tiers.store_revalidated(obj)
                else:
                    self.tiers.remove(key)
            fill.set_head(
                FillHead(status, fields, headers, 0, True, True, None, 0.0, response_time, (),
                         revalidated=obj or stale)
            )
            fill.finish()
            return
        reason = self._unstorable(status, request_fields, headers, rule) if store else "request"
        content_length = _body_length("GET", resp)
        settings = self.config.cache
        largest = settings.largest_stored
        if reason is None and content_length is not None and content_length > largest:
            reason = "too-big"
        shareable = reason is None or reason == "too-big"
        if not shareable:
            self._release(fill)
            # Not for 5xx: a transient origin error must not disable coalescing for the
            # herd that follows its recovery.
            if reason not in ("request", "authorization") and status < 500:
                self.hit_for_miss[key] = True
        writer: DiskWriter | None = None
        stored = None  # the object as it will be stored, without its body
        if reason is None:
            stored = self._stored_object(
                key, status, fields, b"", rule, request_fields, request_time, response_time
            )
            writer = self.tiers.spool(stored, content_length) if stored is not None else None
            if writer is not None:
                fill.attach_spool(writer)
            if content_length is not None and content_length > settings.memory_max_object:
                fill.stop_retaining()  # disk only: readers read the file back
                if writer is None:
                    reason = "disk-unavailable"  # no disk tier room, or another process has it
        if claim is not None:
            # Other workers now find the object's file to follow (or nothing to wait for).
            claim.release()
        if reason is not None:
            self.stats.not_stored[reason] += 1
            fill.stop_retaining()
        initial_age = policy.initial_age(
            headers, request_time=request_time, response_time=response_time
        )
        lifetime = self._lifetime(status, headers, rule, response_time) if reason is None else 0
        fill.set_head(
            FillHead(
                status=status,
                fields=fields,
                headers=headers,
                content_length=content_length,
                shareable=shareable,
                stored=reason is None,
                ttl=int(lifetime) - int(initial_age) if reason is None else None,
                initial_age=initial_age,
                response_time=response_time,
                vary_names=policy.vary_names(headers),
            )
        )
        try:
            async for chunk in resp.content.iter_any():
                fill.append(chunk)
                self.stats.origin_bytes += len(chunk)
                storing = reason is None
                if reason is None and fill.size > largest:
                    reason = "too-big"
                    if writer is not None:
                        fill.stop_spooling()
                        writer.abort()
                        writer = None
                elif reason is None and writer is not None and fill.spool_error is not None:
                    reason = "disk-error"
                elif fill.retain and fill.size > settings.memory_max_object and writer is None:
                    reason = "disk-unavailable"
                if storing and reason is not None:
                    self.stats.not_stored[reason] += 1
                if fill.retain and (reason is not None or fill.size > settings.memory_max_object):
                    fill.stop_retaining()
                if not fill.retain and (writer is None or fill.spool_error is not None):
                    # Held in memory only: a window behind the slowest reader.
                    if not fill.has_readers:
                        fill.fail(FillError("no client left for an unstored response"))
                        return
                    await fill.wait_for_space()
            if content_length is not None and fill.size != content_length:
                raise FillError(f"origin sent {fill.size} of {content_length} bytes")
            if reason is None and stored is not None and not fill.invalidated:
                saved = False
                if writer is not None and fill.spool_error is None:
                    saved = self.tiers.commit(writer, stored)
                    writer = None
                if fill.retain:
                    stored.body = fill.body()
                    stored.build_out_block()
                    saved = self.tiers.keep_in_memory(stored) or saved
                if saved:
                    self.stats.stored_objects += 1
                    self.hit_for_miss.pop(key, None)
            fill.finish()
        finally:
            if writer is not None:
                writer.abort()

    async def _claim_or_follow(
        self, fill: Fill, key: str, request_fields: policy.Headers
    ) -> Claim | None:
        """Coalescing across worker processes. Either claim the origin fetch of `key` for
        this process, or feed `fill` from another worker's fetch of it: its file as it grows,
        or the stored object once done. None with `fill` untouched: fetch without a claim
        (the other worker neither wrote a file nor gave up in time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.origin.first_byte_timeout
        while True:
            follower = self.tiers.follow(key)
            if follower is not None:
                try:
                    head = _head_from_meta(follower.meta, follower.body_length)
                    await self._feed(fill, head, follower.chunks())
                except FillAborted:
                    fill.fail(FillError("the other worker's origin fetch failed"))
                finally:
                    follower.close()
                return None
            try:
                claim = self.tiers.claim(key)
            except DiskError:
                return None  # no coalescing across workers on a failing disk
            if claim is not None:
                obj, _ = self.tiers.lookup(key, request_fields)
                if obj is None:
                    return claim
                claim.release()  # another worker stored it meanwhile
                try:
                    head = _head_from_meta(object_meta(obj), obj.body_length)
                    await self._feed(fill, head, _stored_chunks(obj))
                finally:
                    if obj.file is not None:
                        obj.file.close()
                return None
            if loop.time() > deadline:
                return None
            await asyncio.sleep(OTHER_WORKER_POLL)

    async def _feed(self, fill: Fill, head: FillHead, chunks: AsyncIterator[bytes]) -> None:
        """Fill `fill` from bytes another worker fetched; it stores them, not us."""
        fill.stop_retaining()
        fill.set_head(head)
        async for chunk in chunks:
            fill.append(chunk)
            if not fill.has_readers:
                fill.fail(FillError("no client left"))
                return
            await fill.wait_for_space()
        fill.finish()

    def _unstorable(
        self, status: int, request_fields: policy.Headers, headers: policy.Headers,
        rule: CacheRule | None,
    ) -> str | None:
        if status >= 500:
            return "status"  # origin errors are never stored as content
        rd = policy.response_directives(headers)
        reason = policy.unstorable_reason("GET", status, request_fields, headers, rd)
        if reason is None or rule is None or rule.ttl is None:
            return reason
        if status not in policy.HEURISTICALLY_CACHEABLE:
            return reason
        if reason == "no-freshness" or (not rule.respect_origin and reason in FORCEABLE):
            return None
        return reason

    def _lifetime(
        self, status: int, headers: policy.Headers, rule: CacheRule | None, response_time: float
    ) -> float:
        rd = policy.response_directives(headers)
        origin = policy.freshness_lifetime(status, headers, rd, response_time=response_time)
        if rule is None or rule.ttl is None:
            return origin
        if not rule.respect_origin or not _has_explicit_freshness(rd, headers):
            return float(rule.ttl)
        return origin

    def _stored_object(
        self,
        key: str,
        status: int,
        fields: list[tuple[str, str]],
        body: bytes,
        rule: CacheRule | None,
        request_fields: policy.Headers,
        request_time: float,
        response_time: float,
        file: DiskEntry | None = None,
    ) -> CachedObject | None:
        headers = policy.combine_fields(fields)
        names = policy.vary_names(headers)
        if names is None:
            return None
        rd = policy.response_directives(headers)
        forced = rule is not None and rule.ttl is not None and not rule.respect_origin
        if forced:
            rd = forced_directives(rd)
        return CachedObject(
            key=key,
            vary_names=names,
            vary_values=policy.vary_values(names, request_fields) if names else (),
            status=status,
            fields=fields,
            headers=headers,
            body=body,
            directives=rd,
            lifetime=self._lifetime(status, headers, rule, response_time),
            request_time=request_time,
            response_time=response_time,
            initial_age=policy.initial_age(
                headers, request_time=request_time, response_time=response_time
            ),
            forced=forced,
            file=file,
        )

    def _release(self, fill: Fill) -> None:
        if self.busy.get(fill.key) is fill:
            del self.busy[fill.key]

    # deliver from a fill --------------------------------------------------------------
    async def deliver_fill(
        self,
        ex: Exchange,
        domain: DomainConfig,
        key: str,
        rule: CacheRule | None,
        req: RequestDirectives,
        fwd: str,
        fill: Fill,
        collapsed: bool,
        stale: CachedObject | None,
    ) -> None:
        if collapsed and not fill.can_join():
            # Joined in `miss`, but in the loop turn since then the fill dropped its first
            # bytes (an unstored body trims behind its readers): start over.
            await self.miss(ex, domain, key, rule, req, fwd, stale=stale)
            return
        reader = fill.reader()
        try:
            try:
                fhead = await fill.head
            except OriginError as e:
                if stale is not None and self._stale_if_error(req, stale):
                    await _completed(self.deliver_hit(
                        ex, stale, stale.age(time.time()), "stale", fwd="stale",
                        detail="stale-if-error",
                    ))
                else:
                    self.synth(ex, e.status, e.reason, "error", fwd=fwd)
                return
            if fhead.revalidated is not None:
                obj = fhead.revalidated
                if obj.file is not None:
                    # The fill's descriptor closes with the fill: read through our own.
                    if stale is None or stale.file is None:
                        await _completed(self.lookup(ex, domain))
                        return
                    obj = replace(obj, file=stale.file)
                # A waiter may have come for another Vary variant than the one revalidated.
                if not collapsed or policy.vary_values(
                    obj.vary_names, ex.head.headers
                ) == obj.vary_values:
                    await _completed(self.deliver_hit(
                        ex, obj, obj.age(time.time()), "revalidated", fwd=fwd, fwd_status=304
                    ))
                    return
                reader.close()
                await self.miss(ex, domain, key, rule, req, "miss", stale=stale)
                return
            if collapsed and not self._may_share(fhead, fill, ex):
                reader.close()
                variant = self._variant_busy_key(fhead, key, ex)
                if variant is not None and variant != fill.key:
                    # Another variant of the URI: coalesce with the clients that want it.
                    await self.miss(
                        ex, domain, key, rule, req, "vary-miss", stale=stale, busy_key=variant
                    )
                else:
                    await self.miss(ex, domain, key, rule, req, "miss", stale=stale)
                return
            if fhead.status >= 500 and stale is not None and self._stale_if_error(req, stale):
                await _completed(self.deliver_hit(
                    ex, stale, stale.age(time.time()), "stale", fwd="stale",
                    fwd_status=fhead.status, detail="stale-if-error",
                ))
                return
            await self._stream_fill(ex, fhead, reader, fwd, collapsed)
        except FillError:
            if ex.headers_sent:
                ex.abort()
                self.stats.account("error", ex.status, ex.bytes_sent, ex.body_bytes_sent)
            else:
                self.synth(ex, 502, "invalid origin response", "error", fwd=fwd)
        except ClientGone:
            ex.abort()
            self.stats.account(fwd, ex.status, ex.bytes_sent, ex.body_bytes_sent)
        finally:
            reader.close()

    def _may_share(self, fhead: FillHead, fill: Fill, ex: Exchange) -> bool:
        if not fhead.shareable:
            return False
        names = fhead.vary_names
        if names is None:
            return False
        if not names:
            return True
        return policy.vary_values(names, ex.head.headers) == policy.vary_values(
            names, fill.request_fields
        )

    @staticmethod
    def _variant_busy_key(fhead: FillHead, key: str, ex: Exchange) -> str | None:
        """The in-flight fetch name for this request's Vary variant; None when unshareable."""
        if not fhead.shareable or not fhead.vary_names:
            return None
        values = policy.vary_values(fhead.vary_names, ex.head.headers)
        return "\n".join((key, *values))  # field values never hold a newline

    def _stale_if_error(self, req: RequestDirectives, stale: CachedObject) -> bool:
        age = stale.age(time.time())
        return policy.may_serve_stale_if_error(
            req, stale.directives, age=age, lifetime=stale.lifetime
        )

    async def _stream_fill(
        self, ex: Exchange, fhead: FillHead, reader: FillReader, fwd: str, collapsed: bool
    ) -> None:
        fields = ex.head.headers
        status = fhead.status
        age = int(policy.current_age(fhead.initial_age, fhead.response_time, time.time()))
        status_value = policy.cache_status(
            fwd=fwd, fwd_status=status, stored=fhead.stored, ttl=fhead.ttl, collapsed=collapsed
        )
        length = fhead.content_length
        tail = f"Cache-Status: {status_value}\r\n"
        if age > 0:
            tail = f"Age: {age}\r\n" + tail
        outcome = fwd
        if status == 200 and not CONDITIONAL_FIELDS.isdisjoint(fields):
            cond = policy.evaluate_conditional(ex.method, fields, fhead.headers)
            if cond is not None:
                self.send_without_body(ex, cond, fhead.fields, tail.encode(), outcome)
                return
        if status == 200 and length is not None and "range" in fields:
            ranges = parse_range(fields["range"], length)
            if_range = fields.get("if-range")
            if ranges is not None and if_range is not None and not if_range_allows(
                if_range, fhead.headers
            ):
                ranges = None
            if ranges == []:
                body = b"range not satisfiable\n"
                extra = f"Content-Range: bytes */{length}\r\n{tail}"
                ex.send(416, synth_fields(len(body)) + extra.encode(), body)
                self.stats.account(outcome, 416, ex.bytes_sent, ex.body_bytes_sent)
                return
            if ranges is not None and len(ranges) == 1:
                start, end = ranges[0]
                block = replay_block(fhead.fields, fhead.headers.get("via"), length)
                block = _with_content_range(block + tail.encode(), start, end, length)
                reader.seek(start, end)
                await self._stream(ex, 206, block, end - start, reader, outcome)
                return
        block = replay_block(fhead.fields, fhead.headers.get("via"), length)
        await self._stream(ex, status, block + tail.encode(), length, reader, outcome)

    async def _stream(
        self, ex: Exchange, status: int, block: bytes, length: int | None, reader: FillReader,
        outcome: str,
    ) -> None:
        ex.start(status, block, length)
        if not ex.no_body and status not in (204, 304):
            async for piece in reader:
                await ex.write(piece)
        ex.finish()
        self.stats.account(outcome, status, ex.bytes_sent, ex.body_bytes_sent)

    # slices --------------------------------------------------------------------------
    def _slice_size(self, ex: Exchange, rule: CacheRule | None) -> int:
        """Slice size for a request whose object is not cached whole: a rule's, or the
        default for a Range request (a seek); 0 for a whole-object fill."""
        if ex.method != "GET":
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
        try:
            first = await self.get_slice(domain, key, first_index, size, ex, rule)
        except OriginError as e:
            self.synth(ex, e.status, e.reason, "error", fwd="uri-miss")
            return
        if first is None:
            # The origin ignores Range (or the object is not sliceable): whole-object fill.
            self.whole_only[key] = True
            await self.miss(ex, domain, key, rule, req, "uri-miss", stale=None)
            return
        total = first.span.total
        ranges = parse_range(range_value, total) if range_value else None
        if_range = fields.get("if-range")
        if ranges is not None and if_range is not None and not if_range_allows(
            if_range, first.obj.headers
        ):
            ranges = None
        age = int(first.obj.age(time.time()))
        status_value = policy.cache_status(
            hit=first.hit, fwd=None if first.hit else "uri-miss",
            fwd_status=None if first.hit else 206, stored=not first.hit and first.stored,
            ttl=int(first.obj.lifetime) - age if first.hit or first.stored else None,
            detail="slice",
        )
        tail = f"Age: {age}\r\nCache-Status: {status_value}\r\n".encode()
        if ranges == []:
            body = b"range not satisfiable\n"
            extra = f"Content-Range: bytes */{total}\r\n".encode()
            ex.send(416, synth_fields(len(body)) + extra + tail, body)
            self.stats.account("hit" if first.hit else "uri-miss", 416, ex.bytes_sent, 0)
            return
        merged = coalesce_ranges(ranges) if ranges else None
        start, end, status = 0, total, 200
        if merged is not None and len(merged) == 1:
            (start, end), status = merged[0], 206
        kept = [(n, v) for n, v in first.obj.fields if n.lower() != "content-range"]
        block = replay_block(kept, first.obj.headers.get("via"), end - start)
        if status == 206:
            block += f"Content-Range: bytes {start}-{end - 1}/{total}\r\n".encode()
        outcome = "hit" if first.hit else "uri-miss"
        ex.start(status, block + tail, end - start)
        try:
            for index in slices_covering(start, end, size):
                piece = first if index == first_index else await self.get_slice(
                    domain, key, index, size, ex, rule
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
        except (OriginError, FillError, OSError):
            ex.abort()
        finally:
            self.stats.account(outcome, status, ex.bytes_sent, ex.body_bytes_sent)

    async def _send_slice(self, ex: Exchange, obj: CachedObject, a: int, b: int) -> None:
        if obj.file is None:
            await ex.write(memoryview(obj.body)[a:b])
            return
        try:
            await ex.sendfile(obj.file.fd, obj.file.body_offset + a, b - a)
        finally:
            obj.file.close()

    def _drop_slices(self, key: str, total: int, size: int) -> None:
        for index in range(-(-total // size)):
            self.tiers.remove(slice_key(key, index))

    async def get_slice(
        self,
        domain: DomainConfig,
        key: str,
        index: int,
        size: int,
        ex: Exchange,
        rule: CacheRule | None,
    ) -> Slice | None:
        """Slice `index` of the object: stored, or fetched (once per slice at a time) and
        stored. None when the origin did not answer the Range request with a 206."""
        skey = slice_key(key, index)
        obj, _ = self.tiers.lookup(skey, {})
        if obj is not None:
            span = parse_content_range(obj.headers.get("content-range"))
            if span is not None and time.time() < obj.fresh_until:
                return Slice(obj, span, hit=True, stored=True)
            if obj.file is not None:
                obj.file.close()
        pending = self.slice_fetches.get(skey)
        if pending is None:
            pending = asyncio.ensure_future(
                self._fetch_slice(domain, skey, index, size, ex, rule)
            )
            self.slice_fetches[skey] = pending
            pending.add_done_callback(lambda _: self.slice_fetches.pop(skey, None))
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
        resp = await self.origin.open(domain, "GET", ex.head.target, headers)
        try:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if resp.status != 206 or span is None or span.start != start:
                return None
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                self._origin_failed(domain, ex.head.target, f"slice body: {e}", "body")
                raise FillError("origin slice body failed") from e
            if len(body) != span.end - span.start:
                raise FillError("origin slice shorter than its Content-Range")
            self.stats.origin_bytes += len(body)
            response_time = time.time()
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
            stored = reason is None and self.tiers.store_complete(obj)
            if reason is not None:
                self.stats.not_stored[reason] += 1
            return Slice(obj, span, hit=False, stored=stored)
        finally:
            resp.close()

    # pass ----------------------------------------------------------------------------
    async def pass_to_origin(self, ex: Exchange, domain: DomainConfig, fwd: str) -> None:
        """Forward the request with its body; stream the answer back; store nothing."""
        head = ex.head
        headers = self.forward_headers(domain, ex, for_fill=False)
        body = ex.body() if ex.has_body else None
        self.stats.origin_fetches += 1
        try:
            resp = await self.origin.open(domain, head.method, head.target, headers, body)
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
            ex.start(resp.status, block + f"Cache-Status: {status_value}\r\n".encode(), length)
            if not ex.no_body:
                received = 0
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
                    await ex.write(chunk)
                self.stats.origin_bytes += received
                if length is not None and received != length:
                    raise FillError(f"origin sent {received} of {length} bytes")
            ex.finish()
            self.stats.account(fwd, resp.status, ex.bytes_sent, ex.body_bytes_sent)
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
        for key in keys:
            self.tiers.remove(key)
            # A fetch already in flight carries the response from before the change: let it
            # finish for its clients, but neither store it nor let new clients join it.
            for busy_key in [k for k in self.busy if k == key or k.startswith(key + "\n")]:
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

    def synth(
        self,
        ex: Exchange,
        status: int,
        reason: str,
        outcome: str,
        *,
        fwd: str | None = None,
        detail: str | None = None,
    ) -> None:
        """A response the edge makes itself: short plain-text body, never stored."""
        body = (reason + "\n").encode()
        status_value = policy.cache_status(fwd=fwd, detail=detail)
        block = synth_fields(len(body)) + f"Cache-Status: {status_value}\r\n".encode()
        ex.send(status, block, body)
        self.stats.account(outcome, status, ex.bytes_sent, ex.body_bytes_sent)

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


Piece = bytes | tuple[int, int]  # literal bytes, or a [start, end) span of the stored body


def _pieces_length(pieces: list[Piece]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in pieces)


def _assemble(body: bytes, pieces: list[Piece]) -> bytes | memoryview:
    """The bytes of `pieces` of an in-memory body, copying only when there are several."""
    if len(pieces) == 1 and not isinstance(pieces[0], bytes):
        start, end = pieces[0]
        return body if (start, end) == (0, len(body)) else memoryview(body)[start:end]
    view = memoryview(body)
    return b"".join(p if isinstance(p, bytes) else view[p[0] : p[1]] for p in pieces)


def _closing(file: DiskEntry, pending: Awaitable[None] | None) -> Awaitable[None] | None:
    """Close a disk object's descriptor once the response that reads it is done."""
    if pending is None:
        file.close()
        return None

    async def then_close() -> None:
        try:
            await pending
        finally:
            file.close()

    return then_close()


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


def _head_from_meta(meta: ObjectMeta, length: int | None) -> FillHead:
    fields = [(name, value) for name, value in meta.fields]
    return FillHead(
        status=meta.status,
        fields=fields,
        headers=policy.combine_fields(fields),
        content_length=length,
        shareable=True,
        stored=True,
        ttl=int(meta.lifetime) - int(meta.initial_age),
        initial_age=meta.initial_age,
        response_time=meta.response_time,
        vary_names=tuple(meta.vary_names),
    )


async def _stored_chunks(obj: CachedObject) -> AsyncIterator[bytes]:
    if obj.file is None:
        yield obj.body
        return
    f = obj.file
    for offset in range(0, f.body_length, STREAM_CHUNK):
        yield os.pread(f.fd, min(STREAM_CHUNK, f.body_length - offset), f.body_offset + offset)


async def _completed(pending: Awaitable[None] | None) -> None:
    if pending is not None:
        await pending


def _with_content_range(block: bytes, start: int, end: int, length: int) -> bytes:
    # replay_block puts our Content-Length after Via, so it always follows a CRLF; this cannot
    # match inside another field such as X-Content-Length.
    block = block.replace(
        f"\r\nContent-Length: {length}\r\n".encode(),
        f"\r\nContent-Length: {end - start}\r\n".encode(),
    )
    return block + f"Content-Range: bytes {start}-{end - 1}/{length}\r\n".encode()


def _has_explicit_freshness(rd: ResponseDirectives, headers: policy.Headers) -> bool:
    return (
        rd.s_maxage is not None
        or rd.max_age is not None
        or "expires" in headers
        or rd.no_cache
        or rd.no_store
        or rd.private
    )


def _same_host_path(url: str, host: str) -> str | None:
    """The path?query of `url` when it is relative or names `host`, else None."""
    if url.startswith("/") and not url.startswith("//"):
        return url
    for scheme in ("http://", "https://"):
        if url.lower().startswith(scheme):
            authority, slash, rest = url[len(scheme):].partition("/")
            if authority.lower().split(":")[0] == host:
                return "/" + rest if slash else "/"
    return None
