"""edge.access: referer, client IP and user-agent rules, client address resolution (issue 7)."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest

from edge.access import (
    AccessRules,
    IpRule,
    IpSet,
    RefererRule,
    UserAgentRule,
    client_ip,
    parse_address,
    referer_host,
)
from edge.signing import Signed, SignedUrl

# --- referer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("referer", "host"),
    [
        ("http://example.com/", "example.com"),
        ("https://WWW.Example.COM:8443/a?b#c", "www.example.com"),
        ("http://example.com.", "example.com"),
        ("http://example.com?x", "example.com"),
        ("http://user:pw@example.com/", "example.com"),
        ("http://good.com\\@evil.com/", "good.com"),  # a backslash ends the authority
        ("http://evil.com#@good.com/", "evil.com"),
        ("http://[2001:db8::1]:80/", "2001:db8::1"),
        ("HTTPS://example.com", "example.com"),
        ("ftp://example.com/", None),
        ("example.com", None),
        ("//example.com/", None),
        ("http:///path", None),
        ("http://[::1/", None),
        ("android-app://com.example/", None),
    ],
)
def test_referer_host(referer: str, host: str | None) -> None:
    assert referer_host(referer) == host


ALLOW = RefererRule("allow", ("example.com", "*.example.net"), allow_empty=False)


@pytest.mark.parametrize(
    ("referer", "allowed"),
    [
        ("http://example.com/page", True),
        ("http://a.example.net/", True),
        ("http://a.b.example.net/", True),
        ("http://example.net/", False),  # *.example.net is the names under it
        ("http://www.example.com/", False),  # example.com is that host only
        ("http://example.com.evil.test/", False),
        ("http://evilexample.net/", False),
        ("http://example.net.evil.test/", False),
        ("http://evil.test/?http://example.com/", False),
        ("http://evil.test\\@example.com/", False),
        ("not a url", False),
        ("\x00\xff" * 1000, False),
        (None, False),
        ("", False),
    ],
)
def test_referer_allow_list(referer: str | None, allowed: bool) -> None:
    assert ALLOW.allows(referer) is allowed


def test_referer_deny_list_and_empty_switch() -> None:
    deny = RefererRule("deny", ("*.leech.test",), allow_empty=True)
    assert deny.allows("http://a.leech.test/") is False
    assert deny.allows("http://leech.test.ok/") is True
    assert deny.allows("garbage") is True
    assert deny.allows(None) is True
    assert RefererRule("deny", ("*.leech.test",), allow_empty=False).allows("") is False
    assert RefererRule("allow", ("a.test",), allow_empty=True).allows(None) is True


# --- IP ---------------------------------------------------------------------------------------


def test_ip_set_v4_v6_and_mapped() -> None:
    networks = IpSet(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "10.1.0.0/16"])
    contains = lambda text: ipaddress.ip_address(text) in networks  # noqa: E731
    assert contains("10.255.255.255")
    assert contains("192.0.2.7")
    assert not contains("192.0.2.8")
    assert not contains("11.0.0.0")
    assert contains("2001:db8:ffff::1")
    assert not contains("2001:db9::")
    assert contains("::ffff:10.2.3.4")  # an IPv4 peer on a dual-stack socket
    assert not contains("::ffff:11.2.3.4")
    assert not contains("::a00:1")  # not mapped: not 10.0.0.1


def test_ip_set_merges_and_keeps_host_bits_cleared() -> None:
    networks = IpSet(["10.0.0.5/8", "10.0.0.0/9", "10.128.0.0/9"])
    assert networks.networks == ("10.0.0.0/8", "10.0.0.0/9", "10.128.0.0/9")
    assert ipaddress.ip_address("10.200.0.1") in networks
    with pytest.raises(ValueError, match=r"'10\.0\.0\.256'"):
        IpSet(["10.0.0.256"])


def test_ip_set_large_list_is_fast_and_exact() -> None:
    rng = random.Random(7)
    listed = {rng.getrandbits(32) for _ in range(100_000)}
    networks = IpSet(str(ipaddress.IPv4Address(n)) for n in listed)
    probes = [rng.getrandbits(32) for _ in range(20_000)] + list(listed)[:20_000]
    started = time.perf_counter()
    for value in probes:
        assert (ipaddress.IPv4Address(value) in networks) == (value in listed)
    # A binary search each: 40 000 lookups well under a second even on a loaded machine.
    assert time.perf_counter() - started < 2.0


def test_ip_rule_allow_and_deny() -> None:
    allow = IpRule("allow", IpSet(["192.0.2.0/24", "2001:db8::/32"]))
    assert allow.allows("192.0.2.1") and allow.allows("2001:db8::5")
    assert not allow.allows("198.51.100.1")
    assert not allow.allows("")  # a Unix-socket peer is never on an allow list
    deny = IpRule("deny", IpSet(["192.0.2.0/24"]))
    assert not deny.allows("192.0.2.1")
    assert deny.allows("198.51.100.1")
    assert deny.allows("garbage")


# --- client address ---------------------------------------------------------------------------

TRUSTED = IpSet(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # untrusted peer: its XFF is ignored
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", "", "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),  # the left entry is the client's claim
        ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.9.9.9", "1.2.3.4"),  # through two trusted proxies
        ("10.0.0.1", "10.1.1.1, 10.2.2.2", "10.1.1.1"),  # all trusted: the left-most
        ("10.0.0.1", "1.2.3.4:5678", "1.2.3.4"),
        ("10.0.0.1", "[2001:db8::1]:80", "2001:db8::1"),
        ("10.0.0.1", "2001:db8::1", "2001:db8::1"),
        ("fd00::1", "1.2.3.4", "1.2.3.4"),
        ("::ffff:10.0.0.1", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.1", "1.2.3.4, garbage", "10.0.0.1"),  # garbage from the trusted hop's side
        ("10.0.0.1", "garbage, 1.2.3.4", "1.2.3.4"),
        ("10.0.0.1", "1.2.3.4, unknown, 10.3.3.3", "10.3.3.3"),
        ("10.0.0.1", ",,,", "10.0.0.1"),
        ("", "1.2.3.4", ""),
    ],
)
def test_client_ip(peer: str, xff: str | None, client: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == client


def test_client_ip_hostile_header_is_cheap() -> None:
    xff = ", ".join(["10.0.0.1"] * 5000 + ["1.2.3.4"])
    assert client_ip("10.0.0.1", xff, TRUSTED) == "1.2.3.4"
    xff = ", ".join(["1.2.3.4"] + ["10.0.0.1"] * 5000)
    started = time.perf_counter()
    # Only the last hops are looked at: a chain that long is the left-most one looked at.
    assert client_ip("10.0.0.1", xff, TRUSTED) == "10.0.0.1"
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("text", ["1.2.3.4", "[::1]", "[::1]:8", "1.2.3.4:80", " 1.2.3.4 "])
def test_parse_address(text: str) -> None:
    assert parse_address(text) is not None


@pytest.mark.parametrize("text", ["", "x", "1.2.3", "[1.2.3.4", "1.2.3.4:80:90", "::1]"])
def test_parse_address_refuses(text: str) -> None:
    assert parse_address(text) is None


# --- user agent -------------------------------------------------------------------------------


def test_user_agent_rules() -> None:
    deny = UserAgentRule("deny", ("*curl*", "python-requests/*", "Wget?1.*"))
    assert not deny.allows("curl/8.4.0")
    assert not deny.allows("Mozilla CURL thing")  # case-insensitive
    assert not deny.allows("python-requests/2.31")
    assert not deny.allows("wget 1.21")
    assert deny.allows("Mozilla/5.0 (X11)")
    assert deny.allows(None)
    allow = UserAgentRule("allow", ("Mozilla/*", "MyPlayer/[0-9]*"))
    assert allow.allows("Mozilla/5.0")
    assert allow.allows("MyPlayer/3")
    assert not allow.allows("MyPlayer/x")
    assert not allow.allows(None)
    assert not allow.allows("")
    assert not allow.allows("xMozilla/5.0")  # the whole value


def test_user_agent_patterns_are_not_regular_expressions() -> None:
    rule = UserAgentRule("deny", ("a.b", "(x|y)", "[z"))
    assert rule.allows("axb")
    assert not rule.allows("a.b")
    assert not rule.allows("(x|y)")
    assert rule.allows("x")
    assert not rule.allows("[z")


def test_user_agent_hostile_value_is_cheap() -> None:
    rule = UserAgentRule("deny", ("*a*a*a*a*a*b",))
    started = time.perf_counter()
    assert rule.allows("a" * 8000)
    assert time.perf_counter() - started < 1.0


# --- the rules in order -----------------------------------------------------------------------


def test_access_rules_in_order() -> None:
    rules = AccessRules(
        signed_url=SignedUrl("D", ("k",), param="sign", time_param="t"),
        referer=RefererRule("allow", ("ok.test",), allow_empty=False),
        ip=IpRule("deny", IpSet(["192.0.2.0/24"])),
        user_agent=UserAgentRule("deny", ("bot*",)),
    )
    import hashlib

    sign = hashlib.md5(b"k/f5").hexdigest()
    good = {"referer": "http://ok.test/", "user-agent": "player"}
    query = f"sign={sign}&t=5"
    assert rules.check("/f", query, good, "198.51.100.1", 5) == Signed("/f", "", False)
    # The signature is checked first, whatever else is wrong.
    bad = {"referer": "http://no.test/", "user-agent": "bot"}
    assert rules.check("/f", "", bad, "192.0.2.1", 5) == "missing signature"
    assert rules.check("/f", query, bad, "192.0.2.1", 5) == "referer not allowed"
    assert rules.check("/f", query, {**bad, **{"referer": "http://ok.test/"}}, "192.0.2.1", 5) == (
        "client address not allowed"
    )
    assert rules.check("/f", query, {**good, "user-agent": "bot"}, "1.1.1.1", 5) == (
        "user agent not allowed"
    )
    assert AccessRules().check("/f", "", {}, "1.1.1.1", 5) is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("192.0.2.1", (4, 0xC0000201)),
        ("::ffff:192.0.2.1", (4, 0xC0000201)),
        ("[::ffff:192.0.2.1]:80", (4, 0xC0000201)),
        ("192.0.2.1:8080", (4, 0xC0000201)),
        ("2001:db8::1", (6, 0x20010DB8 << 96 | 1)),
        ("[2001:DB8::1]", (6, 0x20010DB8 << 96 | 1)),
        ("192.0.2.1\x00", None),
        ("0x7f.1", None),  # the resolver's forms are not addresses here
        ("", None),
    ],
)
def test_address_value(text: str, value: tuple[int, int] | None) -> None:
    from edge.access import address_value

    assert address_value(text) == value


def test_rate_key_counts_ipv6_per_64() -> None:
    from edge.access import rate_key

    assert rate_key("192.0.2.1") == "192.0.2.1"
    assert rate_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert rate_key("2001:db8:1:2:aaaa::1") == rate_key("2001:db8:1:2:bbbb::9") == (
        "2001:db8:1:2::/64"
    )
    assert rate_key("2001:db8:1:3::1") != rate_key("2001:db8:1:2::1")
    assert rate_key("not an address") == "not an address"


def test_referer_memo_is_bounded_and_consistent() -> None:
    from edge.access import MEMO_ENTRIES

    rule = RefererRule("allow", ("ok.test",), allow_empty=False)
    for n in range(3 * MEMO_ENTRIES):
        assert rule.allows(f"http://x{n}.test/") is False
        assert rule.allows("http://ok.test/") is True
    assert len(rule._memo) <= MEMO_ENTRIES
    long_referer = "http://ok.test/" + "a" * 100_000
    assert rule.allows(long_referer) is True
    assert long_referer not in rule._memo


def test_admit_gives_the_verdict_of_check_also_when_remembered() -> None:
    import hashlib

    from edge.access import MEMO_ENTRIES

    rules = AccessRules(
        signed_url=SignedUrl("A", ("k",), 60, param="auth_key"),
        referer=RefererRule("allow", ("ok.test",), allow_empty=False),
        ip=IpRule("allow", IpSet(["198.51.100.0/24"])),
        user_agent=UserAgentRule("deny", ("bot*",)),
    )
    sign = hashlib.md5(b"/f-1000-0-0-k").hexdigest()
    query = f"v=2&auth_key=1000-0-0-{sign}"
    good = {"referer": "http://ok.test/", "user-agent": "player"}
    requests = [
        ("/f", query, good, "198.51.100.1", 1000),
        ("/f", query, good, "198.51.100.1", 1060),  # the last second of the URL
        ("/f", query, good, "198.51.100.1", 1061),  # expired, though let through before
        ("/f", query, {**good, "referer": "http://no.test/"}, "198.51.100.1", 1000),
        ("/f", query, {"user-agent": "player"}, "198.51.100.1", 1000),
        ("/f", query, good, "192.0.2.1", 1000),
        ("/f", query, {**good, "user-agent": "bot/1"}, "198.51.100.1", 1000),
        ("/g", query, good, "198.51.100.1", 1000),  # the signature is /f's
        ("/f", "v=2", good, "198.51.100.1", 1000),
        ("/f", query.replace(sign, sign.upper()), good, "198.51.100.1", 1000),
    ]
    for _ in range(2):  # the second round from memory where the first let a request through
        for path, q, headers, client, now in requests:
            target = f"{path}?{q}".encode()
            verdict = rules.admit(target, headers, client, now)
            assert verdict == rules.check(path, q, headers, client, now)
    assert rules.admit(f"/f?{query}".encode(), good, "198.51.100.1", 1000) == Signed(
        "/f", "v=2", True
    )
    assert rules.admit(f"/f?{query}".encode(), good, "198.51.100.1", 1061) == "expired signature"
    # Bounded: a flood of referers is remembered up to MEMO_ENTRIES, a long one not at all.
    target = f"/f?{query}".encode()
    for n in range(3 * MEMO_ENTRIES):
        referer = {"referer": f"http://ok.test/{n}"}
        assert isinstance(rules.admit(target, referer, "198.51.100.1", 1000), Signed)
    assert len(rules._admitted) <= MEMO_ENTRIES
    long_agent = {**good, "user-agent": "a" * 100_000}
    assert isinstance(rules.admit(target, long_agent, "198.51.100.1", 1000), Signed)
    assert all(key[3] != long_agent["user-agent"] for key in rules._admitted)


def test_admit_remembers_only_what_the_rules_read() -> None:
    rules = AccessRules(ip=IpRule("deny", IpSet(["192.0.2.0/24"])))
    for n in range(100):  # no signed URLs: the target and the Referer make no difference
        headers = {"referer": f"http://r{n}.test/"}
        assert rules.admit(f"/f{n}?a={n}".encode(), headers, "198.51.100.1", n) is None
        assert rules.admit(f"/f{n}".encode(), headers, "192.0.2.7", n) == (
            "client address not allowed"
        )
    assert len(rules._admitted) == 1
