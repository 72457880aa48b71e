"""Stored responses and the memory tier (the *lookup* step's storage).

A `CachedObject` is one complete stored response: status, fields, body and the timing an RFC 9111
age computation needs. The memory tier holds them under a byte budget, least recently used
first out (cachetools' LRUCache with a size function, LIBRARIES.md), with the Vary variants of
one URI (RFC 9111 4.1) kept under the same primary key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from cachetools import Cache, LRUCache

from edge import policy
from edge.disk import DiskEntry
from edge.policy import ResponseDirectives

# Per-object bookkeeping on top of the body and fields, so that many tiny objects cannot
# overrun the budget.
OBJECT_OVERHEAD = 512

# Fields we never replay from storage as-is: Age is recomputed per response (RFC 9111 5.1),
# CDN-Cache-Control is for this cache only (RFC 9213 2.1), Content-Length is recomputed from
# the stored body, and the origin's Via is extended. Surrogate-Key and Cache-Tag name the
# object's purge tags (`tags_of`), meant for this cache only (as Fastly and Cloudflare do).
_NOT_REPLAYED = frozenset(
    {"age", "cdn-cache-control", "content-length", "via", "surrogate-key", "cache-tag"}
)

VIA = "1.1 cdn-edge"


def replay_block(
    fields: list[tuple[str, str]], via: str | None, content_length: int | None
) -> bytes:
    """Response field lines for a stored or fetched response, without Age and Cache-Status."""
    lines = [f"{name}: {value}\r\n" for name, value in fields if name.lower() not in _NOT_REPLAYED]
    lines.append(f"Via: {via}, {VIA}\r\n" if via else f"Via: {VIA}\r\n")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    return "".join(lines).encode("latin-1")


def tags_of(fields: list[tuple[str, str]]) -> str:
    """A response's purge tags, one per line: Surrogate-Key's space-separated ones (Fastly)
    and Cache-Tag's comma-separated ones (Cloudflare); "" when it has none."""
    tags: list[str] = []
    for name, value in fields:
        lname = name.lower()
        if lname == "surrogate-key":
            tags.extend(value.split())
        elif lname == "cache-tag":
            tags.extend(t for t in (part.strip() for part in value.split(",")) if t)
    return "\n".join(dict.fromkeys(tags))


@dataclass(slots=True, eq=False)
class CachedObject:
    key: str
    vary_names: tuple[str, ...]
    vary_values: tuple[str, ...]
    status: int
    fields: list[tuple[str, str]]  # hop-by-hop free, as received (after 304 merges)
    headers: dict[str, str]  # combined view of `fields`
    body: bytes
    directives: ResponseDirectives
    lifetime: float  # effective freshness lifetime (origin's or a rule's), seconds
    request_time: float
    response_time: float
    initial_age: float
    forced: bool = False  # a rule overrode the origin's freshness (directives are forced)
    file: DiskEntry | None = None  # the body is in this disk-tier file, not in `body`
    tags: str = ""  # purge tags, one per line (`tags_of`)
    out_block: bytes = b""  # prebuilt response field lines, without Age and Cache-Status
    hit_age: int = -1  # memo of the last hit head, valid for one age second
    hit_tail: bytes = b""
    hit_block: bytes = b""  # out_block + hit_tail
    # Wall time until which the object is fresh for a request without directives (the hit
    # path's shortcut for RFC 9111 4.2: lifetime > current age); -inf when it must always be
    # validated.
    fresh_until: float = 0.0
    # No ban issued up to this wall time matches the object (`edge.purge`): a lookup checks
    # it against newer bans only, once each.
    ban_checked: float = 0.0

    def __post_init__(self) -> None:
        self.build_out_block()
        self.ban_checked = self.response_time
        self.fresh_until = (
            float("-inf")
            if self.directives.no_cache
            else self.response_time + self.lifetime - self.initial_age
        )

    def build_out_block(self) -> None:
        # RFC 9110 8.6: no Content-Length on a 204.
        length = None if self.status == 204 else self.body_length
        self.out_block = replay_block(self.fields, self.headers.get("via"), length)
        self.hit_age = -1

    @property
    def body_length(self) -> int:
        return self.file.body_length if self.file is not None else len(self.body)

    @property
    def size(self) -> int:
        return len(self.body) + len(self.out_block) + OBJECT_OVERHEAD

    def age(self, now: float) -> float:
        return policy.current_age(self.initial_age, self.response_time, now)


def forced_directives(rd: ResponseDirectives) -> ResponseDirectives:
    """Directives as a respect_origin = false rule sees them: the rule's TTL decides."""
    return replace(
        rd, no_cache=False, no_store=False, private=False, must_revalidate=False,
        proxy_revalidate=False, s_maxage=None, max_age=None,
    )


VariantKey = tuple[str, tuple[str, ...]]


class _LRU(LRUCache[VariantKey, CachedObject]):
    def __init__(self, budget: int, on_evict: Callable[[CachedObject], None]) -> None:
        super().__init__(maxsize=budget, getsizeof=lambda obj: obj.size)
        self._on_evict = on_evict

    def popitem(self) -> tuple[VariantKey, CachedObject]:
        item = super().popitem()
        self._on_evict(item[1])
        return item


class MemoryTier:
    """Byte-budgeted LRU of stored responses, variants grouped by primary key."""

    def __init__(self, budget: int) -> None:
        self._lru = _LRU(budget, self._evicted)
        # primary key -> (Vary names of the latest stored response, stored variant values)
        self._variants: dict[str, tuple[tuple[str, ...], set[tuple[str, ...]]]] = {}
        self.evictions = 0

    @property
    def bytes_used(self) -> int:
        return int(self._lru.currsize)

    @property
    def budget(self) -> int:
        return int(self._lru.maxsize)

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, key: str, request: policy.Headers) -> tuple[CachedObject | None, str]:
        """The stored response for this request, or None and why: "uri-miss" or "vary-miss"."""
        entry = self._variants.get(key)
        if entry is None:
            return None, "uri-miss"
        names = entry[0]
        values = policy.vary_values(names, request) if names else ()
        obj = self._lru.get((key, values))
        if obj is None:
            return None, "vary-miss"
        return obj, ""

    def put(self, obj: CachedObject) -> bool:
        """Store `obj`; False when it can never fit the budget."""
        if obj.size > self._lru.maxsize:
            return False
        entry = self._variants.get(obj.key)
        if entry is not None and entry[0] != obj.vary_names:
            # The origin changed its Vary: variants stored under the old names cannot match.
            self.remove(obj.key)
        self._lru[(obj.key, obj.vary_values)] = obj
        # Look again: making room may have evicted this key's last variant and its entry.
        entry = self._variants.get(obj.key)
        if entry is None:
            entry = (obj.vary_names, set())
            self._variants[obj.key] = entry
        entry[1].add(obj.vary_values)
        return True

    def remove(self, key: str) -> int:
        """Drop every variant stored under `key`; returns how many."""
        entry = self._variants.pop(key, None)
        if entry is None:
            return 0
        for values in entry[1]:
            self._lru.pop((key, values), None)
        return len(entry[1])

    def remove_prefixed(self, prefix: str) -> int:
        """Drop every key starting with `prefix` (an object's slices); rare: a full scan."""
        return self.remove_where(lambda obj: obj.key.startswith(prefix))

    def remove_where(self, doomed: Callable[[CachedObject], bool]) -> int:
        """Drop every stored object `doomed` accepts (a purge by prefix or tag): a full scan
        that leaves the LRU order as it was; returns how many."""
        lru = self._lru
        gone = [vk for vk in list(lru) if doomed(Cache.__getitem__(lru, vk))]
        for key, values in gone:
            del lru[(key, values)]
            entry = self._variants.get(key)
            if entry is not None:
                entry[1].discard(values)
                if not entry[1]:
                    del self._variants[key]
        return len(gone)

    def _evicted(self, obj: CachedObject) -> None:
        self.evictions += 1
        entry = self._variants.get(obj.key)
        if entry is not None:
            entry[1].discard(obj.vary_values)
            if not entry[1]:
                del self._variants[obj.key]
