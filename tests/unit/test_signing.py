"""edge.signing: signed URL types A-D (issue 7), with the published vectors."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from edge.signing import BAD, EXPIRED, MALFORMED, MISSING, Signed, SignedUrl

KEY = "aliyuncdnexp1234"
OTHER = "anotherkey5678"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def type_a(*keys: str, ttl: int = 1800) -> SignedUrl:
    return SignedUrl("A", keys, ttl, param="auth_key")


def a_url(path: str, ts: int, key: str = KEY, rand: str = "0", uid: str = "0") -> str:
    return f"auth_key={ts}-{rand}-{uid}-{md5(f'{path}-{ts}-{rand}-{uid}-{key}')}"


# --- the published vectors ---------------------------------------------------------------------


def test_type_a_published_vector() -> None:
    digest = md5("/video/standard/test.mp4-1444435200-0-0-aliyuncdnexp1234")
    assert digest == "23bf85053008f5c0e791667a313e28ce"
    rule = type_a(KEY)
    query = f"auth_key=1444435200-0-0-{digest}"
    assert rule.check("/video/standard/test.mp4", query, 1444435200 + 60) == Signed(
        "/video/standard/test.mp4", "", True
    )


def test_type_b_published_vector() -> None:
    path = "/4/44/44c0909bcfc20a01afaf256ca99a8b8b.mp3"
    digest = md5(KEY + "201508150800" + path)
    assert digest == "9044548ef1527deadafa49a890a377f0"
    # 2015-08-15 08:00 in UTC+8 is 00:00 UTC.
    start = datetime(2015, 8, 15, tzinfo=UTC).timestamp()
    rule = SignedUrl("B", (KEY,))
    assert rule.check(f"/201508150800/{digest}{path}", "", start + 1799) == Signed(path, "", True)
    assert rule.check(f"/201508150800/{digest}{path}", "", start + 1801) == EXPIRED
    # Read as UTC, the minute would be eight hours later: the URL would still be valid here.
    assert rule.check(f"/201508150800/{digest}{path}", "", start + 3 * 3600) == EXPIRED


def test_type_c_hex_case_is_hashed_as_sent() -> None:
    upper = md5(KEY + "/test.flv" + "55CE8100")
    lower = md5(KEY + "/test.flv" + "55ce8100")
    assert upper == "a37fa50a5fb8f71214b1e7c95ec7a1bd"
    assert upper != lower
    rule = SignedUrl("C", (KEY,))
    now = 0x55CE8100 + 10
    assert rule.check(f"/{upper}/55CE8100/test.flv", "", now) == Signed("/test.flv", "", True)
    assert rule.check(f"/{lower}/55ce8100/test.flv", "", now) == Signed("/test.flv", "", True)
    assert rule.check(f"/{upper}/55ce8100/test.flv", "", now) == BAD
    assert rule.check(f"/{lower}/55CE8100/test.flv", "", now) == BAD


def test_type_c_query_form() -> None:
    rule = SignedUrl("C", (KEY,), form="query", param="KEY1", time_param="KEY2")
    digest = md5(KEY + "/test.flv" + "55CE8100")
    got = rule.check("/test.flv", f"a=1&KEY1={digest}&KEY2=55CE8100&b=2", 0x55CE8100)
    assert got == Signed("/test.flv", "a=1&b=2", True)


@pytest.mark.parametrize("time_format", ["dec", "hex"])
def test_type_d_keeps_the_signature_for_the_origin(time_format: str) -> None:
    ts = 1700000000
    text = str(ts) if time_format == "dec" else f"{ts:x}"
    rule = SignedUrl("D", (KEY,), param="sign", time_param="t", time_format=time_format)  # type: ignore[arg-type]
    digest = md5(KEY + "/a/b.mp4" + text)
    got = rule.check("/a/b.mp4", f"sign={digest}&t={text}&v=3", ts + 5)
    assert got == Signed("/a/b.mp4", "v=3", False)  # the key loses it, the origin does not
    assert rule.check("/a/b.mp4", f"t={text}&sign={digest}", ts + 1801) == EXPIRED


def test_type_d_decimal_time_is_not_read_as_hex() -> None:
    rule = SignedUrl("D", (KEY,), param="sign", time_param="t", time_format="dec")
    assert rule.check("/x", f"sign={md5(KEY + '/x' + 'ff')}&t=ff", 0) == MALFORMED


# --- expiry, keys, replay ----------------------------------------------------------------------


def test_type_a_expires_after_ttl() -> None:
    rule = type_a(KEY, ttl=60)
    query = a_url("/f", 1000)
    assert isinstance(rule.check("/f", query, 1060), Signed)
    assert rule.check("/f", query, 1061) == EXPIRED


def test_default_ttl_is_1800() -> None:
    rule = type_a(KEY)
    query = a_url("/f", 1000)
    assert isinstance(rule.check("/f", query, 2800), Signed)
    assert rule.check("/f", query, 2801) == EXPIRED


def test_secondary_key_is_accepted_and_others_are_not() -> None:
    rule = type_a(KEY, OTHER)
    assert isinstance(rule.check("/f", a_url("/f", 1000, KEY), 1000), Signed)
    assert isinstance(rule.check("/f", a_url("/f", 1000, OTHER), 1000), Signed)
    assert rule.check("/f", a_url("/f", 1000, "wrong"), 1000) == BAD
    assert type_a(KEY).check("/f", a_url("/f", 1000, OTHER), 1000) == BAD


def test_replayed_with_another_path_is_refused() -> None:
    a = type_a(KEY)
    assert a.check("/other", a_url("/f", 1000), 1000) == BAD
    assert a.check("/F", a_url("/f", 1000), 1000) == BAD
    b = SignedUrl("B", (KEY,))
    digest = md5(KEY + "202001010000" + "/f")
    now = datetime(2020, 1, 1, tzinfo=timezone(timedelta(hours=8))).timestamp()
    assert isinstance(b.check(f"/202001010000/{digest}/f", "", now), Signed)
    assert b.check(f"/202001010000/{digest}/g", "", now) == BAD
    d = SignedUrl("D", (KEY,), param="sign", time_param="t")
    assert d.check("/g", f"sign={md5(KEY + '/f' + '5')}&t=5", 5) == BAD


def test_a_bad_signature_says_bad_even_when_expired() -> None:
    # "expired" is only said of URLs the key really signed.
    assert type_a(KEY).check("/f", a_url("/f", 1000, "wrong"), 10**9) == BAD


def test_signature_case_is_not_significant() -> None:
    digest = md5("/f-1000-0-0-" + KEY).upper()
    assert isinstance(type_a(KEY).check("/f", f"auth_key=1000-0-0-{digest}", 1000), Signed)


def test_other_parameters_are_kept_in_order() -> None:
    query = f"z=1&{a_url('/f', 1000)}&a=2&&b"
    assert type_a(KEY).check("/f", query, 1000) == Signed("/f", "z=1&a=2&b", True)


# --- malformed and missing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", MISSING),
        ("x=1", MISSING),
        ("auth_key", MALFORMED),
        ("auth_key=", MALFORMED),
        ("auth_key=1000-0-0", MALFORMED),
        ("auth_key=1000-0-0-0-" + "0" * 32, MALFORMED),
        ("auth_key=x1000-0-0-" + "0" * 32, MALFORMED),
        ("auth_key=1000-0-0-" + "g" * 32, MALFORMED),
        ("auth_key=1000-0-0-" + "0" * 31, MALFORMED),
        ("auth_key=1000--0-" + "0" * 32, MALFORMED),
        ("auth_key=1" * 2000, MALFORMED),
        ("auth_key=99999999999999999999-0-0-" + "0" * 32, MALFORMED),
        (a_url("/f", 1000) + "&" + a_url("/f", 1000), MALFORMED),  # which one counts?
    ],
)
def test_type_a_malformed(query: str, reason: str) -> None:
    assert type_a(KEY).check("/f", query, 1000) == reason


@pytest.mark.parametrize(
    "path",
    ["/", "/f", "/201508150800/abc/f", "/20150815080/" + "0" * 32 + "/f",
     "/201513150800/" + "0" * 32 + "/f", "/201508152500/" + "0" * 32 + "/f",
     "/2015081508000/" + "0" * 32 + "/f", "/201508150800/" + "0" * 32],
)
def test_type_b_malformed(path: str) -> None:
    assert SignedUrl("B", (KEY,)).check(path, "", 0) in (MISSING, MALFORMED)


@pytest.mark.parametrize(
    "path", ["/f", "/" + "0" * 32 + "/xyz/f", "/" + "0" * 32 + "/" + "1" * 13 + "/f", "/a/b/c"]
)
def test_type_c_malformed(path: str) -> None:
    assert SignedUrl("C", (KEY,)).check(path, "", 0) in (MISSING, MALFORMED)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", MISSING),
        ("sign=" + "0" * 32, MALFORMED),  # no time
        ("t=5", MALFORMED),  # no hash
        ("sign=zz&t=5", MALFORMED),
        ("sign=" + "0" * 32 + "&t=-5", MALFORMED),
        ("sign=" + "0" * 32 + "&t=5&t=6", MALFORMED),
    ],
)
def test_type_d_malformed(query: str, reason: str) -> None:
    rule = SignedUrl("D", (KEY,), param="sign", time_param="t")
    assert rule.check("/f", query, 0) == reason


def test_resource_path_for_blocks() -> None:
    digest = "0" * 32
    assert SignedUrl("B", (KEY,)).resource_path(f"/201508150800/{digest}/a/b") == "/a/b"
    assert SignedUrl("C", (KEY,)).resource_path(f"/{digest}/55CE8100/a/b") == "/a/b"
    assert SignedUrl("C", (KEY,), form="query").resource_path("/a/b") == "/a/b"
    assert SignedUrl("B", (KEY,)).resource_path("/a/b/c") == "/a/b/c"
    assert type_a(KEY).resource_path("/a/b") == "/a/b"


def test_keys_are_not_in_the_repr() -> None:
    assert KEY not in repr(type_a(KEY, OTHER))


def test_a_remembered_url_still_expires_and_memory_is_bounded() -> None:
    from edge.signing import MEMO_ENTRIES

    rule = type_a(KEY, ttl=60)
    query = a_url("/f", 1000)
    signed = rule.check("/f", query, 1000)
    assert isinstance(signed, Signed) and signed.expires == 1060
    assert isinstance(rule.check("/f", query, 1060), Signed)  # remembered
    assert rule.check("/f", query, 1061) == EXPIRED
    assert rule.check("/g", query, 1000) == BAD  # remembered for /f only
    for n in range(2 * MEMO_ENTRIES):
        assert isinstance(rule.check(f"/f{n}", a_url(f"/f{n}", 1000), 1000), Signed)
    assert len(rule._verified) <= MEMO_ENTRIES
    # Another rule (another key) remembers nothing of this one's.
    assert type_a(OTHER).check("/f", query, 1000) == BAD
