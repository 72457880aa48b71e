"""edge.cachekey: which requests share a stored response."""

from __future__ import annotations

import pytest

from edge.access import AccessRules
from edge.cachekey import cache_key, key_query, normalize_path, signed_cache_key
from edge.config import DomainConfig, QueryPolicy
from edge.signing import Signed, SignedUrl

KEEP_ALL = QueryPolicy()
IGNORE = QueryPolicy("ignore_all")
KEEP_A = QueryPolicy("keep", ("a",))
DROP_UTM = QueryPolicy("drop", ("utm", "fbclid"))


@pytest.mark.parametrize(
    ("policy", "query", "kept"),
    [
        (KEEP_ALL, "", ""),
        (KEEP_ALL, "b=2&a=1", "b=2&a=1"),  # order matters: no sorting
        (KEEP_ALL, "x=%41", "x=%41"),  # no decoding
        (IGNORE, "a=1&b=2", ""),
        (KEEP_A, "a=1&utm=x&a=2", "a=1&a=2"),
        (KEEP_A, "utm=x", ""),
        (KEEP_A, "a", "a"),
        (KEEP_A, "ab=1", ""),  # names compare whole
        (DROP_UTM, "utm=x&a=1&fbclid=9", "a=1"),
        (DROP_UTM, "a=1&&b=2&", "a=1&b=2"),
        (DROP_UTM, "utm", ""),
    ],
)
def test_key_query(policy: QueryPolicy, query: str, kept: str) -> None:
    assert key_query(policy, query) == kept


def test_cache_key_separates_domains_paths_and_queries() -> None:
    a = DomainConfig(name="a.test", origins=("http://o",))
    b = DomainConfig(name="b.test", origins=("http://o",))
    assert cache_key(a, "/x", "") == "a.test/x"
    assert cache_key(a, "/x", "q=1") == "a.test/x?q=1"
    assert cache_key(a, "/x", "") != cache_key(b, "/x", "")
    ignoring = DomainConfig(name="a.test", origins=("http://o",), query=IGNORE)
    assert cache_key(ignoring, "/x", "q=1") == "a.test/x"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/api/x", "/api/x"),
        ("/%61pi/x", "/api/x"),  # unreserved escapes decoded
        ("/a%2fb", "/a%2Fb"),  # reserved escapes kept, hex upper-cased
        ("/%7E%2D%2e_", "/~-._"),
        ("/100%", "/100%"),  # broken escapes left alone
        ("/%zz%4", "/%zz%4"),
        ("/a/../b", "/a/../b"),  # dot segments are the origin's business
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize(
    ("signed", "query", "kept"),
    [
        (SignedUrl("A", ("k",), param="auth_key"), "a=1&auth_key=1-0-0-x&b=2", "a=1&b=2"),
        (SignedUrl("D", ("k",), param="sign", time_param="t"), "sign=x&t=5&v=2", "v=2"),
        (SignedUrl("D", ("k",), param="s", time_param="e"), "sign=x&t=5", "sign=x&t=5"),
        (SignedUrl("C", ("k",), form="query", param="sign", time_param="t"), "t=5&sign=x", ""),
        (SignedUrl("C", ("k",)), "sign=x&t=5", "sign=x&t=5"),  # path form: no parameters
        (SignedUrl("B", ("k",)), "auth_key=x", "auth_key=x"),
    ],
)
def test_cache_key_never_holds_a_signature(signed: SignedUrl, query: str, kept: str) -> None:
    """Issue 7: every signature of one object shares its stored copy (edge.signing)."""
    domain = DomainConfig("a.test", ("http://o",), access=AccessRules(signed_url=signed))
    assert cache_key(domain, "/x", query) == ("a.test/x?" + kept if kept else "a.test/x")


@pytest.mark.parametrize("policy", [KEEP_ALL, IGNORE, KEEP_A, DROP_UTM])
@pytest.mark.parametrize(
    ("path", "query"), [("/x", ""), ("/%61pi/x", "a=1&utm=2&b"), ("/x", "auth_key=1")]
)
def test_signed_cache_key_is_the_key_of_the_stripped_target(
    policy: QueryPolicy, path: str, query: str
) -> None:
    """What the lookup step gets from a signed URL's memo is what it would compute from the
    target the admit step left (`Signed.target`), for each domain config it is asked for."""
    signed = Signed(path, query, True, 1000)
    rules = AccessRules(signed_url=SignedUrl("A", ("k",), param="auth_key"))
    for domain in (
        DomainConfig("a.test", ("http://o",), query=policy, access=rules),
        DomainConfig("b.test", ("http://o",), query=policy, access=rules),  # another config
    ):
        head_path, _, head_query = signed.target.decode().partition("?")
        expected = normalize_path(head_path)
        expected_key = cache_key(domain, expected, head_query)
        assert signed_cache_key(domain, signed) == (expected, expected_key)
        assert signed_cache_key(domain, signed) == (expected, expected_key)  # remembered
        assert expected_key.startswith(domain.name)
