"""Access rules of a domain (issue 7), pure, no I/O: who may fetch its content.

The admit step (`edge.request.EdgeProxy.handle`) applies them in this order, after the domain's
state and URL blocks (`edge.controlstate.Gate`): signed URL (`edge.signing`), referer, client
IP, user agent (each 403 with a short reason), then the rate limit (429, `edge.ratelimit`).
A speed limit (`edge.ratelimit.SpeedLimit`) refuses nothing; it paces the response.

Everything here is compiled once, when the config is parsed (`edge.config`), so a check costs
a few dict or bisect lookups: the referer's host against a set of names and a set of wildcard
suffixes, the client address against sorted, merged ranges (`IpSet`, so a list of 100 000
networks costs one binary search), the user agent against one regular expression made of all
the glob patterns.

- Referer (RFC 9110 10.1.3): the host of the Referer URL, lowercase, port and one trailing dot
  dropped. ``example.com`` matches that host only; ``*.example.com`` matches any name under it
  (``a.example.com``, ``a.b.example.com``), not ``example.com`` itself. A missing or empty
  Referer is allowed or refused by `allow_empty`, whichever list is given; a Referer that is
  not an http(s) URL with a host counts as a host no pattern matches.
- Client IP: the socket peer, or, when the peer is in the edge's `trusted_proxies`, the
  right-most X-Forwarded-For entry that is not itself a trusted proxy (`client_ip`): the entries
  to its left were written by the client and prove nothing.
- User agent: glob patterns (`fnmatch`: ``*``, ``?``, ``[...]``), case-insensitive, matched
  against the whole User-Agent value; a missing one is the empty string.

The admit step asks `AccessRules.admit`, which remembers the requests it let through by what the
rules read of them (the target when URLs are signed, the Referer, the client address, the
User-Agent), so that the same request again (a player's ranges, a page's reloads) costs one dict
lookup and the signed URL's expiry check; each rule also remembers its own decisions for the
requests that differ in another respect.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import re
import socket
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from edge.ratelimit import RateLimit, SpeedLimit
from edge.signing import EXPIRED, Signed, SignedUrl

__all__ = [
    "AccessRules",
    "IpRule",
    "IpSet",
    "RefererRule",
    "UserAgentRule",
    "client_ip",
    "referer_host",
]

Mode = Literal["allow", "deny"]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# The supervisor's prefetch requests carry its secret in this field: access rules do not apply
# to them (edge.request.EdgeProxy.handle), and it is never forwarded (edge.passing).
PREFETCH_HEADER = "X-Cdn-Edge-Prefetch"
# How many X-Forwarded-For entries, from the right, are looked at: a chain of trusted proxies
# is short, and a hostile header must not cost a parse per comma.
MAX_FORWARDED_HOPS = 16
# Decisions remembered per rule (the same clients, referers and signed URLs come again and
# again): at most this many, forgotten all at once when full, and only for values this short.
MEMO_ENTRIES = 1024
MEMO_LONGEST = 512
# Admitted requests (`AccessRules.admit`) are remembered when what the rules read of their
# target, Referer and User-Agent is at most this long in all.
ADMITTED_LONGEST = 1024
# What the rules read of a request: target (signed URLs), Referer, client address, User-Agent;
# b"", None or "" for what no rule of the domain reads.
RequestKey = tuple[bytes, str | None, str, str | None]


class IpSet:
    """A set of IPv4 and IPv6 networks, merged into sorted integer ranges: membership is one
    binary search, however long the list. IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, as
    a dual-stack socket reports IPv4 peers) are looked up as the IPv4 address."""

    __slots__ = ("_ends", "_starts", "networks")

    def __init__(self, networks: Iterable[str]) -> None:
        """`networks`: CIDR strings or bare addresses; ValueError names the first bad one."""
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        normalised: list[str] = []
        for text in networks:
            try:
                network = ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an IP address or CIDR network") from None
            ranges[network.version].append(
                (int(network.network_address), int(network.broadcast_address))
            )
            normalised.append(str(network))
        self.networks = tuple(normalised)  # as parsed, host bits cleared; for the config's table
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, spans in ranges.items():
            starts: list[int] = []
            ends: list[int] = []
            for start, end in sorted(spans):  # merge overlapping and adjacent ranges
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    starts.append(start)
                    ends.append(end)
            self._starts[version], self._ends[version] = starts, ends

    def __contains__(self, address: str | Address) -> bool:
        found = address_value(str(address))
        return found is not None and self.has(*found)

    def has(self, version: int, value: int) -> bool:
        """Whether the address `value` (an integer, IPv4 when `version` is 4) is in the set."""
        starts = self._starts[version]
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= self._ends[version][index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IpSet) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"IpSet({len(self.networks)} networks)"


def parse_address(text: str) -> Address | None:
    """An address as written in X-Forwarded-For or by a socket: bare, ``[v6]``, ``[v6]:port``
    or ``v4:port``; None when it is none of those."""
    text = text.strip()
    port = ""
    if text.startswith("["):
        text, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else ""
        if ":" not in text:
            return None  # brackets are for IPv6 only
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port:
            return None
    if port and not (port.isdigit() and port.isascii() and len(port) <= 5):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6 addresses


def address_value(text: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer) of an address in any form `parse_address` reads,
    IPv4-mapped IPv6 as IPv4; None when it is no address. inet_pton first: the forms a socket
    reports cost a fraction of a microsecond (ipaddress.ip_address: several)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        address = parse_address(text)
        if address is None:
            return None
        packed = address.packed
    if packed[:12] == _MAPPED_PREFIX:
        return 4, int.from_bytes(packed[12:], "big")
    return (4 if len(packed) == 4 else 6), int.from_bytes(packed, "big")


def client_ip(peer: str, forwarded_for: str | None, trusted: IpSet) -> str:
    """The client's address: `peer`, unless `peer` is a trusted proxy; then the right-most
    X-Forwarded-For entry not in `trusted` (all trusted: the left-most one), without brackets
    or port. An entry that is not an address stops the walk: the last trusted hop is then the
    client, as nothing it forwarded can be believed."""
    if not forwarded_for or peer not in trusted:
        return peer
    client = peer
    for entry in reversed(forwarded_for.rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]):
        entry = entry.strip()
        found = address_value(entry)
        if found is None:
            return client
        client = entry if ":" not in entry else _plain(entry)
        if not trusted.has(*found):
            return client
    return client


def _plain(entry: str) -> str:
    """An address entry without brackets or port, IPv6 in its canonical form."""
    address = parse_address(entry)
    assert address is not None  # address_value read it
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


def rate_key(client: str) -> str:
    """Whom a rate limit counts: the client's address; for IPv6 its /64, which is what one
    subscriber gets (counting single IPv6 addresses, a client would take a fresh one per
    request)."""
    if ":" not in client:
        return client
    found = address_value(client)
    if found is None or found[0] == 4:
        return client if found is None else str(ipaddress.IPv4Address(found[1]))
    return f"{ipaddress.IPv6Address(found[1] >> 64 << 64)}/64"


@dataclass(frozen=True, slots=True)
class IpRule:
    """Client addresses allowed (all others refused) or denied."""

    mode: Mode
    networks: IpSet
    _memo: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    def allows(self, client: str) -> bool:
        memo = self._memo
        allowed = memo.get(client)
        if allowed is None:
            found = address_value(client)
            if found is None:  # not an address at all (a Unix socket peer): never listed
                allowed = self.mode == "deny"
            else:
                allowed = self.networks.has(*found) == (self.mode == "allow")
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[client] = allowed  # client addresses are short
        return allowed


def referer_host(referer: str) -> str | None:
    """The lowercase host of an http(s) Referer URL, port and one trailing dot dropped; None
    when it is not such a URL. Userinfo is skipped and a backslash ends the authority, as
    browsers read URLs (WHATWG URL), so ``http://a.com\\@b.com/`` is ``a.com``, not ``b.com``."""
    scheme, sep, rest = referer.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    end = len(rest)
    for delimiter in "/?#\\":
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority = rest[:end].rpartition("@")[2]
    if authority.startswith("["):
        host, bracket, _ = authority[1:].partition("]")
        return host.lower() if bracket and host else None
    host = authority.partition(":")[0].lower()
    host = host[:-1] if host.endswith(".") else host
    return host or None


@dataclass(frozen=True, slots=True)
class RefererRule:
    """Referers allowed (all others refused) or denied, by host pattern."""

    mode: Mode
    patterns: tuple[str, ...]  # lowercase, as configured: "example.com", "*.example.com"
    allow_empty: bool = True
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _suffixes: frozenset[str] = field(init=False, repr=False, compare=False)  # ".example.com"
    _memo: dict[str, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_exact", frozenset(p for p in self.patterns if not p.startswith("*."))
        )
        object.__setattr__(
            self, "_suffixes", frozenset(p[1:] for p in self.patterns if p.startswith("*."))
        )
        object.__setattr__(self, "_memo", {})

    def allows(self, referer: str | None) -> bool:
        if not referer:
            return self.allow_empty
        memo = self._memo
        allowed = memo.get(referer)
        if allowed is None:
            allowed = self._listed(referer_host(referer)) == (self.mode == "allow")
            if len(referer) <= MEMO_LONGEST:
                if len(memo) >= MEMO_ENTRIES:
                    memo.clear()
                memo[referer] = allowed
        return allowed

    def _listed(self, host: str | None) -> bool:
        if host is None:
            return False
        if host in self._exact:
            return True
        suffixes = self._suffixes
        dot = host.find(".")
        while dot >= 0:  # ".b.example.com", ".example.com", ".com"
            if host[dot:] in suffixes:
                return True
            dot = host.find(".", dot + 1)
        return False


def referer_pattern_problem(pattern: str) -> str:
    """Why `pattern` is not a referer host pattern; "" when it is."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name or "*" in name:
        return "must be a host name, optionally starting with '*.'"
    if any(c in name for c in "/:@?#\\ ") or not name.isascii() or not name.isprintable():
        return "must be a host name without scheme, port or path"
    return ""


@dataclass(frozen=True, slots=True)
class UserAgentRule:
    """User agents allowed (all others refused) or denied, by glob pattern."""

    mode: Mode
    patterns: tuple[str, ...]
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        union = "|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns)
        object.__setattr__(self, "_regex", re.compile(union, re.IGNORECASE))

    def allows(self, user_agent: str | None) -> bool:
        listed = self._regex.match(user_agent or "") is not None
        return listed == (self.mode == "allow")


@dataclass(frozen=True, slots=True)
class AccessRules:
    """A domain's `access` table, compiled (`edge.config` parses it)."""

    signed_url: SignedUrl | None = None
    referer: RefererRule | None = None
    ip: IpRule | None = None
    user_agent: UserAgentRule | None = None
    rate_limit: RateLimit | None = None
    speed_limits: tuple[SpeedLimit, ...] = ()  # first match wins
    # Requests let through, with when that verdict expires (a signed URL's expiry, else inf).
    _admitted: dict[RequestKey, tuple[Signed | None, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def admit(
        self, target: bytes, headers: Mapping[str, str], client: str, now: float
    ) -> str | Signed | None:
        """`check` of a request-target as received (``path?query``, ASCII), with the same
        verdict. A request let through is remembered (at most MEMO_ENTRIES, forgotten all at
        once when full) by what the rules read of it, with its signed URL's expiry, which is
        checked every time: the same request again costs a dict lookup."""
        key = (
            target if self.signed_url is not None else b"",
            headers.get("referer") if self.referer is not None else None,
            client if self.ip is not None else "",
            headers.get("user-agent") if self.user_agent is not None else None,
        )
        memo = self._admitted
        admitted = memo.get(key)
        if admitted is None:
            path, _, query = target.decode("ascii").partition("?")
            verdict = self.check(path, query, headers, client, now)
            if isinstance(verdict, str):
                return verdict
            admitted = verdict, math.inf if verdict is None else verdict.expires
            if len(key[0]) + len(key[1] or "") + len(key[3] or "") <= ADMITTED_LONGEST:
                if len(memo) >= MEMO_ENTRIES:
                    memo.clear()
                memo[key] = admitted
        verdict, expires = admitted
        return EXPIRED if now > expires else verdict

    def check(
        self, path: str, query: str, headers: Mapping[str, str], client: str, now: float
    ) -> str | Signed | None:
        """The 403 checks in order, for a request (`path` and `query` as sent, `headers` by
        lowercase name) from `client` at Unix time `now`: the reason to refuse it; or, to serve
        it, the request without its signature (`Signed`) when the domain signs URLs, else None.
        """
        signed = None
        if self.signed_url is not None:
            verdict = self.signed_url.check(path, query, now)
            if isinstance(verdict, str):
                return verdict
            signed = verdict
        if self.referer is not None and not self.referer.allows(headers.get("referer")):
            return "referer not allowed"
        if self.ip is not None and not self.ip.allows(client):
            return "client address not allowed"
        if self.user_agent is not None and not self.user_agent.allows(headers.get("user-agent")):
            return "user agent not allowed"
        return signed

    def speed_limit(self, path: str) -> SpeedLimit | None:
        for limit in self.speed_limits:
            if limit.match is None or limit.match.matches(path):
                return limit
        return None
