"""The edge's request path as an explicit state machine, Varnish-style.

    recv -> route -> admit -> lookup -> {hit | miss | pass | stale} -> deliver -> account

- recv: `edge.server` frames and parses the request (`edge.http1`), refusing malformed ones.
- route: Host -> domain config (`handle`); an unknown host is 404 and never reaches an origin.
- admit: the control plane's domain states and URL blocks (`edge.controlstate.Gate`): 403
  for a suspended domain, 451 for a blocked path; then the domain's access rules
  (`edge.access`): signed URL (`edge.signing`), referer, client IP, user agent (403), rate
  limit (429, `edge.ratelimit`), and a speed limit for the response. A domain without access
  rules pays one attribute check for them.
- lookup: cache key (`edge.cachekey`) + Vary (`edge.store`) + freshness (`edge.policy`).
- hit: a fresh stored response, written synchronously from prebuilt bytes (`edge.deliver`).
- miss: one origin fetch per key (`Fill`), streamed to every waiting client (`edge.miss`);
  a large object, or a seek into one, by slices (`edge.sliced`).
- stale: conditional revalidation, stale-while-revalidate, stale-if-error (`edge.miss`).
- pass: forwarded as is, never stored (unsafe methods, bypass rules, `edge.passing`).
- deliver: Age, Cache-Status (RFC 9211), Via, conditional requests (304), Range, HEAD
  (`edge.deliver` from a stored object, `edge.miss` from a fill, `edge.sliced` from slices).
- account: every exchange, refused and cut ones included, is counted once as `edge.server` ends
  it: metered per domain (`edge.meter`, issue 5) and counted in `EdgeStats` (`account`); the
  steps only name what the cache did (`Exchange.set_outcome`) and the domain (`Exchange.domain`).

This module holds the steps up to lookup (`handle`, `lookup`, `use_stored`); each step after
it is a mixin of `EdgeProxy`, one module per concern: `Delivery` (`edge.deliver`), `Fills`
(`edge.miss`), `Slicing` (`edge.sliced`), `Passing` (`edge.passing`).

Cache policy lives in `edge.policy` (pure functions); these modules only sequence it with I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from cachetools import TTLCache

from edge import policy
from edge.access import PREFETCH_HEADER, AccessRules, client_ip, rate_key
from edge.cachekey import cache_key, normalize_path, signed_cache_key
from edge.config import CacheRule, DomainConfig, EdgeConfig
from edge.controlstate import ControlState, Gate
from edge.deliver import Delivery, _closing
from edge.fetch import OriginClient
from edge.fill import Fill
from edge.meter import Meter
from edge.metrics import EdgeStats
from edge.miss import Fills
from edge.passing import Passing
from edge.policy import RequestDirectives
from edge.purge import NEVER, Ban, BanKeeper, BanList
from edge.ratelimit import RateLimiter
from edge.server import Exchange, synth_fields
from edge.signing import Signed
from edge.sliced import Slice, Slicing
from edge.store import CachedObject, MemoryTier
from edge.tiers import Tiers

NO_DIRECTIVES = policy.request_directives({})
HIT_FOR_MISS_SECONDS = 30.0  # how long a key whose response was unshareable skips coalescing
ALLOW_ALL = b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
WHOLE_ONLY_SECONDS = 600.0
_PREFETCH_FIELD = PREFETCH_HEADER.lower()


class EdgeProxy(Slicing, Fills, Passing, Delivery):
    """The request path (`edge.server.Handler`) for one worker.

    Its bases are the steps after lookup, each building on the ones after it: slices fall
    back to whole-object fills, fills forward the request as a pass does, and all of them
    deliver (and synthesize errors) through `Delivery`."""

    def __init__(
        self,
        config: EdgeConfig,
        store: MemoryTier,
        origin: OriginClient,
        stats: EdgeStats,
        meter: Meter | None = None,
    ) -> None:
        self.config = config
        self.tiers = Tiers(store, config.cache, config.edge.state_dir)
        self.origin = origin
        self.stats = stats
        self.meter = meter if meter is not None else Meter()  # origin bytes, per domain
        self.busy: dict[str, Fill] = {}
        self.hit_for_miss: TTLCache[str, bool] = TTLCache(maxsize=65536, ttl=HIT_FOR_MISS_SECONDS)
        # Keys whose origin ignored a Range request: whole-object fills for a while.
        self.whole_only: TTLCache[str, bool] = TTLCache(maxsize=65536, ttl=WHOLE_ONLY_SECONDS)
        self.slice_fetches: dict[str, asyncio.Future[Slice | None]] = {}
        # Set under a supervisor: tells the other worker processes which keys a write
        # invalidated (RFC 9111 4.4 holds for the host, not just this process).
        self.on_invalidate: Callable[[list[str]], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Domains that must pass admission (suspended, or with blocked paths), by name: empty
        # (the hit path's only cost) without a control plane or with nothing to refuse.
        self.gates: Mapping[str, Gate] = {}
        self.bans = BanKeeper(self.tiers, config.edge.state_dir)
        self.trusted_proxies = config.edge.trusted_proxies
        self.limiter = RateLimiter()  # every domain's rate limits, per client (bounded)
        # The supervisor's prefetch requests carry it (edge.access.PREFETCH_HEADER); "": none.
        self.prefetch_secret = ""

    async def start(self) -> None:
        self.bans.load()
        await self.tiers.start()

    def enforce(self, state: ControlState) -> None:
        """Serve the control plane's `state` from now on: one swap of the domain table and
        the gates, so that no request sees half of a change."""
        self.config = replace(self.config, domains=state.serving)
        self.gates = state.gates

    def purge(self, bans: list[Ban], *, lead: bool) -> asyncio.Future[None] | None:
        """Remove what `bans` name, now: every variant and slice in this process's memory
        (and the disk's files of url purges when `lead`), no fetch in flight storing them; and
        keep them banned until the disk holds none (`edge.purge`). Called for every change;
        returns what is done once the lead's ban file holds them (None: nothing to wait for)."""
        urls = [ban.key for ban in bans if ban.kind == "url"]
        if urls:
            self.forget(urls, disk=lead)
        others = BanList(ban for ban in bans if ban.kind != "url")
        if len(others):  # one scan of memory and of the fetches for them all
            self.tiers.memory.remove_where(lambda obj: others.banned(obj.key, obj.tags, NEVER))
            # A fetch's tags are not known before its head: a tag purge stops the domain's.
            prefixes = tuple(ban.key for ban in others)
            self.invalidate_fills(lambda busy_key: busy_key.startswith(prefixes))
        return self.bans.add(bans, lead=lead)

    async def close(self) -> None:
        """Cancel and await every fill and background revalidation this proxy owns."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.bans.close()
        await self.tiers.close()

    # recv (refusals from edge.server) --------------------------------------------------
    def refused(self, exchange: Exchange | None, peer: str, status: int, reason: str) -> None:
        self.stats.account("refused", status, 0, 0)

    # account (every exchange, once, as edge.server ends it) ----------------------------
    def account(self, ex: Exchange) -> None:
        self.stats.account(ex.outcome, ex.status, ex.bytes_sent, ex.body_bytes_sent)

    # route ---------------------------------------------------------------------------
    def handle(self, ex: Exchange) -> Awaitable[None] | None:
        head = ex.head
        trusted = self.trusted_proxies
        if trusted is not None:
            ex.client_ip = client_ip(ex.peer, head.headers.get("x-forwarded-for"), trusted)
        domain = self.config.domain_for_host(head.host) if head.host else None
        if domain is None:
            self.synth(ex, 404, "unknown host", "refused")
            return None
        ex.domain = domain.name
        access = domain.access
        gates = self.gates
        if gates:
            gate = gates.get(domain.name)
            if gate is not None:
                path = head.path
                if access is not None and access.signed_url is not None:
                    # A signed path (B, C) names its object after the signature: blocked too.
                    path = access.signed_url.resource_path(path)
                refusal = gate.refusal(path)
                if refusal is not None:
                    self.synth(ex, refusal[0], refusal[1], "refused")
                    return None
        if head.target == b"*":
            # OPTIONS * asks about the server, not a resource (RFC 9110 9.3.7): answered here.
            ex.send(200, synth_fields(0) + ALLOW_ALL, b"")
            ex.set_outcome("bypass")
            return None
        signed = None  # what a signed URL was let in as (its cache key is remembered with it)
        if access is not None and not (
            _PREFETCH_FIELD in head.headers and self._prefetch(head.headers)  # rare: no call else
        ):
            signed = self.admit(ex, domain.name, access)
            if ex.finished:
                return None  # refused
        if head.method not in ("GET", "HEAD"):
            return self.pass_to_origin(ex, domain, "method")
        return self.lookup(ex, domain, signed)

    # admit (access rules) --------------------------------------------------------------
    def admit(self, ex: Exchange, domain: str, access: AccessRules) -> Signed | None:
        """The domain's access rules in order (`edge.access`); a refusal is answered here (the
        exchange is then finished). A signed request of type A, B or C goes on without its
        signature (`head.target` replaced: the origin never sees it), and its verdict is
        returned, for the lookup step to take the cache key from; the cache key never holds a
        signature (`edge.cachekey`)."""
        head = ex.head
        verdict = access.admit(head.target, head.headers, ex.client_ip, time.time())
        if isinstance(verdict, str):
            self.synth(ex, 403, f"forbidden: {verdict}", "refused")
            return None
        limit = access.rate_limit
        if limit is not None:
            who = rate_key(ex.client_ip)
            wait = self.limiter.retry_after(domain, who, limit, time.monotonic())
            if wait:
                extra = b"Retry-After: %d\r\n" % wait
                self.synth(ex, 429, "too many requests", "refused", extra=extra)
                return None
        # D: the request goes on as sent, signature and all.
        stripped = verdict if verdict is not None and verdict.strip_origin else None
        if stripped is not None:
            head.received_target, head.target = head.target, stripped.target
        if access.speed_limits:
            speed = access.speed_limit(normalize_path(head.path))  # signature already off
            if speed is not None:
                ex.pace = speed.pace()
        return stripped

    def _prefetch(self, headers: Mapping[str, str]) -> bool:
        """Whether the request is the supervisor's prefetch (it proves it with its secret)."""
        sent = headers.get(_PREFETCH_FIELD)
        if not sent or not self.prefetch_secret:
            return False
        return hmac.compare_digest(sent.encode(), self.prefetch_secret.encode())

    # lookup --------------------------------------------------------------------------
    def lookup(
        self, ex: Exchange, domain: DomainConfig, signed: Signed | None = None
    ) -> Awaitable[None] | None:
        """`signed`: what the admit step let the request in as (its target is `signed.target`
        now); its path and cache key are remembered with it (`edge.cachekey.signed_cache_key`)."""
        head = ex.head
        if signed is None:
            path = normalize_path(head.path)
            key = cache_key(domain, path, head.query)
        else:
            path, key = signed_cache_key(domain, signed)
        rule = domain.rule_for(path) if domain.rules else None
        if rule is not None and rule.ttl == 0:
            return self.pass_to_origin(ex, domain, "bypass")
        fields = head.headers
        req = (
            policy.request_directives(fields)
            if "cache-control" in fields or "pragma" in fields
            else NO_DIRECTIVES
        )
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
