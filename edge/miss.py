"""miss and stale: one origin fetch per key (`Fill`), stored when it may be and streamed to
every client waiting for it (`deliver_fill`); conditional revalidation of a stale object,
stale-while-revalidate in the background (RFC 5861 3), stale-if-error (RFC 5861 4).

With a disk tier, a fetch is coalesced across worker processes too (`_claim_or_follow`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING

import aiohttp
from cachetools import TTLCache
from multidict import CIMultiDict

from edge import policy
from edge.config import CacheRule, DomainConfig, EdgeConfig
from edge.deliver import CONDITIONAL_FIELDS, STREAM_CHUNK, _with_content_range
from edge.disk import Claim, DiskEntry, DiskError, DiskWriter, FillAborted, ObjectMeta
from edge.fetch import OriginClient, OriginError
from edge.fill import Fill, FillError, FillHead, FillReader
from edge.metrics import EdgeStats
from edge.passing import Passing, _body_length, _origin_fields
from edge.policy import RequestDirectives, ResponseDirectives
from edge.range import if_range_allows, parse_range
from edge.server import ClientGone, Exchange, synth_fields
from edge.store import CachedObject, forced_directives, replay_block, tags_of
from edge.tiers import Tiers, object_meta

log = logging.getLogger("edge.request")  # the request path's logger, whichever module logs

OTHER_WORKER_POLL = 0.005  # seconds between looks at another worker's fetch
# Unstorable reasons a rule with respect_origin = false overrides (commercial CDNs' "ignore
# origin cache headers"); Authorization, Set-Cookie, Vary: * and status rules still hold.
FORCEABLE = frozenset({"no-store", "private", "no-freshness"})


class Fills(Passing):
    """Origin fetches that fill the cache: a mixin of `edge.request.EdgeProxy`."""

    config: EdgeConfig
    tiers: Tiers
    origin: OriginClient
    stats: EdgeStats
    busy: dict[str, Fill]
    hit_for_miss: TTLCache[str, bool]
    _tasks: set[asyncio.Task[None]]

    if TYPE_CHECKING:
        # The state machine's step (`edge.request`): a revalidated object whose file the fill
        # owns is looked up again (`deliver_fill`).
        def lookup(self, ex: Exchange, domain: DomainConfig) -> Awaitable[None] | None: ...

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
        # Registered now, not when the coroutine first runs: a fill that runs ahead (a body
        # already on disk, fed in one go) must neither drop its first bytes nor find no reader.
        reader = fill.reader()
        return self.deliver_fill(ex, domain, key, rule, req, fwd, fill, reader, collapsed, stale)

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
            resp = await self.origin.open(domain, "GET", target, headers, answer=fill)
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
                self.origin_read(domain.name, len(chunk))
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
            follower = self.tiers.follow(key, request_fields)
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
            tags=tags_of(fields),
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
        reader: FillReader,
        collapsed: bool,
        stale: CachedObject | None,
    ) -> None:
        try:
            try:
                fhead = await fill.head
            except OriginError as e:
                ex.origin_status, ex.origin_ms = fill.origin_status, fill.origin_ms
                if stale is not None and self._stale_if_error(req, stale):
                    await _completed(self.deliver_hit(
                        ex, stale, stale.age(time.time()), "stale", fwd="stale",
                        detail="stale-if-error",
                    ))
                else:
                    self.synth(ex, e.status, e.reason, "error", fwd=fwd)
                return
            ex.origin_status, ex.origin_ms = fill.origin_status, fill.origin_ms
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
                ex.set_outcome("error")
            else:
                self.synth(ex, 502, "invalid origin response", "error", fwd=fwd)
        except ClientGone:
            ex.abort()
            ex.set_outcome(fwd, forwarded=True)
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
                ex.set_outcome(outcome, forwarded=True)
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
                ex.set_outcome(outcome, forwarded=True)
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
        ex.set_outcome(outcome, forwarded=True)


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


def _has_explicit_freshness(rd: ResponseDirectives, headers: policy.Headers) -> bool:
    return (
        rd.s_maxage is not None
        or rd.max_age is not None
        or "expires" in headers
        or rd.no_cache
        or rd.no_store
        or rd.private
    )
