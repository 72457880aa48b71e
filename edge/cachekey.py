"""Cache keys: which requests share a stored response (the *lookup* step's first half).

key = domain + normalised path + the query parameters the domain's query policy keeps, never
those of a signed URL's signature (`edge.signing`: every signature of one object shares its
stored copy; a signed path's prefix is taken off by the admit step). The origin still gets the
path and query as the client sent them; only the key is normalised. A request the admit step
let in by a signed URL it remembers takes its key from that URL's memo (`signed_cache_key`).
Vary (RFC 9111 4.1) is the second half of the key and lives with the stored variants
(`edge.store`).
"""

from __future__ import annotations

from string import ascii_letters, digits, hexdigits

from edge.config import DomainConfig, QueryPolicy
from edge.signing import Signed

_UNRESERVED = frozenset(ascii_letters + digits + "-._~")  # RFC 3986 2.3
_HEX = frozenset(hexdigits)


def normalize_path(path: str) -> str:
    """The path as rules and keys see it. RFC 3986 6.2.2.1-6.2.2.2.

    Percent-encoded unreserved characters are decoded and other escapes upper-cased, so that
    `/%61pi/` meets the `/api/` rule and shares `/api/`'s stored response. Dot segments are
    kept: the origin receives the path exactly as sent and may resolve them its own way.
    """
    if "%" not in path:
        return path
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        pair = part[:2]
        if len(pair) == 2 and pair[0] in _HEX and pair[1] in _HEX:
            char = chr(int(pair, 16))
            out.append((char if char in _UNRESERVED else "%" + pair.upper()) + part[2:])
        else:
            out.append("%" + part)
    return "".join(out)


def _param_name(pair: str) -> str:
    return pair.partition("=")[0]


def key_query(policy: QueryPolicy, query: str) -> str:
    """The part of `query` that goes into the cache key, in the client's order."""
    if not query or policy.mode == "keep_all":
        return query
    if policy.mode == "ignore_all":
        return ""
    pairs = [p for p in query.split("&") if p]
    wanted = policy.params
    if policy.mode == "keep":
        pairs = [p for p in pairs if _param_name(p) in wanted]
    else:  # drop
        pairs = [p for p in pairs if _param_name(p) not in wanted]
    return "&".join(pairs)


def cache_key(domain: DomainConfig, path: str, query: str) -> str:
    access = domain.access
    if query and access is not None and access.signed_url is not None:
        signature = access.signed_url.query_params
        if signature:
            query = "&".join(p for p in query.split("&") if _param_name(p) not in signature)
    kept = key_query(domain.query, query)
    return f"{domain.name}{path}?{kept}" if kept else f"{domain.name}{path}"


def signed_cache_key(domain: DomainConfig, signed: Signed) -> tuple[str, str]:
    """The normalised path and the cache key of a request of `domain` whose target is now
    `signed.target` (the admit step took its signature off), as `normalize_path` and
    `cache_key` make them; remembered with `signed`, which the access rules remember, so that
    the same signed URL again costs an identity check."""
    entry = signed.cache_entry
    if entry is None or entry[0] is not domain:
        path = normalize_path(signed.path)
        entry = (domain, path, cache_key(domain, path, signed.query))
        object.__setattr__(signed, "cache_entry", entry)  # a memo; the rest stays frozen
    return entry[1], entry[2]
