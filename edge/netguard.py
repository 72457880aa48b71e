"""Which network addresses an origin (or a webhook) may be at: the guard against SSRF.

A customer names a domain's origins; without a guard it could make every edge fetch from the
edge's own host or network (its admin listener, the control plane, a metadata service) and
serve the answer back through the cache. The control plane refuses address literals and
loopback names in the deny list when a domain is saved (`deny_reason`); what a name resolves
to can change after that check, so the edge checks again where it connects (`DenyingResolver`
for names, `origin_denied` for literals, which aiohttp never resolves). The control plane's
webhook deliveries use the same resolver.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

# Loopback, link-local, unspecified, multicast, RFC 1918, unique local (ULA), CGNAT.
INTERNAL_NETWORKS: tuple[Network, ...] = tuple(
    ip_network(cidr)
    for cidr in (
        "127.0.0.0/8",
        "::1/128",
        "169.254.0.0/16",
        "fe80::/10",
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",
        "ff00::/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        "100.64.0.0/10",
    )
)
_LOOPBACK = (IPv4Address("127.0.0.1"), IPv6Address("::1"))


def address_denied(address: Address, deny: tuple[Network, ...]) -> bool:
    """Whether `address`, or the IPv4 address an IPv4-mapped IPv6 one stands for, is in `deny`."""
    seen: tuple[Address, ...] = (address,)
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        seen += (address.ipv4_mapped,)
    return _in(seen, deny)


def deny_reason(origin: str, deny: tuple[Network, ...]) -> str:
    """Why `origin` (a URL) must not be fetched; "" if it may, as far as its host alone says:
    address literals and loopback names are checked, other names only when they resolve."""
    host = urlsplit(origin).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is a loopback name (origin_deny)" if _in(_LOOPBACK, deny) else ""
    address = host_address(host)
    if address is None:
        return ""
    return f"{host} is in a denied range (origin_deny)" if address_denied(address, deny) else ""


def host_address(host: str) -> Address | None:
    """The address `host` spells, also in the forms the resolver reads as IPv4 ('0x7f.1')."""
    try:
        return ip_address(host)
    except ValueError:
        pass
    try:
        return IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _in(addresses: tuple[Address, ...], deny: tuple[Network, ...]) -> bool:
    return any(address in network for address in addresses for network in deny)


class DenyingResolver(AbstractResolver):
    """Resolves names, dropping addresses in `deny`: the connection uses what is checked, so a
    name cannot be re-pointed at an internal network after the check."""

    def __init__(self, deny: tuple[Network, ...]) -> None:
        self._inner = DefaultResolver()
        self._deny = deny

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        allowed = [
            r
            for r in await self._inner.resolve(host, port, family)
            if not address_denied(ip_address(r["host"].partition("%")[0]), self._deny)
        ]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses in origin_deny")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
