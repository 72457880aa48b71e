"""Cache keys: which requests share a stored response (the *lookup* step's first half).

key = domain + path + the query parameters the domain's query policy keeps. The origin still
gets the query as the client sent it; only the key is normalised. Vary (RFC 9111 4.1) is the
second half of the key and lives with the stored variants (`edge.store`).
"""

from __future__ import annotations

from edge.config import DomainConfig, QueryPolicy


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
    kept = key_query(domain.query, query)
    return f"{domain.name}{path}?{kept}" if kept else f"{domain.name}{path}"
