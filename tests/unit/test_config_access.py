"""edge.config: a domain's `access` table and `[edge] trusted_proxies` (issue 7)."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path

import pytest

from edge.access import AccessRules, IpRule, IpSet, RefererRule, UserAgentRule
from edge.config import (
    CacheRule,
    ConfigError,
    EdgeConfig,
    InvalidValue,
    access_table,
    parse_config,
    parse_domain,
)
from edge.ratelimit import RateLimit, SpeedLimit
from edge.signing import SignedUrl

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DOMAIN = """
[[domains]]
name = "a.test"
origins = ["http://127.0.0.1:8001"]
"""


def parse(text: str) -> EdgeConfig:
    return parse_config(textwrap.dedent(text), "cfg.toml")


def access_error(body: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(DOMAIN + textwrap.dedent(body))
    message = str(info.value)
    assert "\n" not in message
    return message


FULL = """
[domains.access.signed_url]
type = "A"
key = "primary-key"
secondary_key = "secondary-key"
ttl = "1h"

[domains.access.referer]
allow = ["Example.com", "*.example.net"]
allow_empty = false

[domains.access.ip]
deny = ["192.0.2.0/24", "2001:db8::/32"]

[domains.access.user_agent]
deny = ["*curl*"]

[domains.access.rate_limit]
rate = 10
burst = 20

[[domains.access.speed_limits]]
suffix = [".mp4"]
rate = "512KiB"
after = "2MiB"

[[domains.access.speed_limits]]
rate = "1MiB"
"""


def test_full_access_table() -> None:
    domain = parse(DOMAIN + FULL).domains["a.test"]
    assert domain.access == AccessRules(
        signed_url=SignedUrl("A", ("primary-key", "secondary-key"), 3600, param="auth_key"),
        referer=RefererRule("allow", ("example.com", "*.example.net"), allow_empty=False),
        ip=IpRule("deny", IpSet(["192.0.2.0/24", "2001:db8::/32"])),
        user_agent=UserAgentRule("deny", ("*curl*",)),
        rate_limit=RateLimit(10.0, 20),
        speed_limits=(
            SpeedLimit(512 * 1024, 2 * 2**20, CacheRule("suffix", (".mp4",), None)),
            SpeedLimit(2**20),
        ),
    )
    access = domain.access
    assert access is not None
    assert access.speed_limit("/v/a.MP4") == access.speed_limits[0]
    assert access.speed_limit("/v/a.jpg") == access.speed_limits[1]


def test_no_access_table_and_empty_one() -> None:
    assert parse(DOMAIN).domains["a.test"].access is None
    assert parse(DOMAIN + "[domains.access]\n").domains["a.test"].access is None


@pytest.mark.parametrize(
    ("table", "params"),
    [
        ('type = "A"', {"param": "auth_key"}),
        ('type = "A"\nparam = "sig"', {"param": "sig"}),
        ('type = "B"', {}),
        ('type = "C"', {"form": "path"}),
        ('type = "C"\nform = "query"', {"form": "query", "param": "sign", "time_param": "t"}),
        ('type = "D"', {"param": "sign", "time_param": "t", "time_format": "dec"}),
        ('type = "D"\ntime_format = "hex"\nparam = "s"\ntime_param = "e"',
         {"param": "s", "time_param": "e", "time_format": "hex"}),
    ],
)
def test_signed_url_types_and_round_trip(table: str, params: dict[str, str]) -> None:
    text = DOMAIN + f'[domains.access.signed_url]\nkey = "k"\n{table}\n'
    domain = parse(text).domains["a.test"]
    assert domain.access is not None and domain.access.signed_url is not None
    signed = domain.access.signed_url
    assert signed.ttl == 1800
    for name, value in params.items():
        assert getattr(signed, name) == value
    # What the control plane stores reads back to the same rules.
    table_back = access_table(domain.access)
    again = parse_domain({"name": "a.test", "origins": ["http://a"], "access": table_back}, "d")
    assert again.access == domain.access


def test_full_table_round_trip() -> None:
    domain = parse(DOMAIN + FULL).domains["a.test"]
    assert domain.access is not None
    table = access_table(domain.access)
    again = parse_domain({"name": "a.test", "origins": ["http://a"], "access": table}, "d")
    assert again.access == domain.access
    assert table["ip"] == {"deny": ["192.0.2.0/24", "2001:db8::/32"]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[domains.access]\nsigned = 1", "domains[0].access.signed: unknown key (did you mean"),
        ('[domains.access.signed_url]\ntype = "E"\nkey = "k"',
         'domains[0].access.signed_url.type: string "E" is not a signing type: one of A, B, C, D'),
        ('[domains.access.signed_url]\nkey = "k"',
         "domains[0].access.signed_url.type: is required"),
        ('[domains.access.signed_url]\ntype = "A"',
         "domains[0].access.signed_url.key: is required"),
        ('[domains.access.signed_url]\ntype = "A"\nkey = ""',
         "domains[0].access.signed_url.key: must not be empty"),
        ('[domains.access.signed_url]\ntype = "A"\nkey = "k"\nsecondary_key = ""',
         "domains[0].access.signed_url.secondary_key: must not be empty"),
        ('[domains.access.signed_url]\ntype = "A"\nkey = "k"\nttl = "soon"',
         "domains[0].access.signed_url.ttl: 'soon' is not a duration"),
        ('[domains.access.signed_url]\ntype = "B"\nkey = "k"\nparam = "x"',
         "domains[0].access.signed_url.param: not used by type B"),
        ('[domains.access.signed_url]\ntype = "C"\nkey = "k"\ntime_param = "x"',
         "domains[0].access.signed_url.time_param: not used by type C in this form"),
        ('[domains.access.signed_url]\ntype = "A"\nkey = "k"\nform = "query"',
         "domains[0].access.signed_url.form: only for type C, not A"),
        ('[domains.access.signed_url]\ntype = "D"\nkey = "k"\ntime_format = "oct"',
         "domains[0].access.signed_url.time_format: 'oct' is not one of dec, hex"),
        ('[domains.access.signed_url]\ntype = "D"\nkey = "k"\nparam = "a&b"',
         "domains[0].access.signed_url.param: 'a&b' is not a query parameter name"),
        ('[domains.access.signed_url]\ntype = "D"\nkey = "k"\nparam = "t"',
         "domains[0].access.signed_url.time_param: must differ from param"),
        ('[domains.access.referer]\nallow = ["a.test"]\ndeny = ["b.test"]',
         "domains[0].access.referer: needs exactly one of allow, deny (both given)"),
        ("[domains.access.referer]\nallow_empty = true",
         "domains[0].access.referer: needs exactly one of allow, deny (neither given)"),
        ("[domains.access.referer]\nallow = []",
         "domains[0].access.referer.allow: must list at least one value"),
        ('[domains.access.referer]\ndeny = ["a.test", "http://b.test/"]',
         "domains[0].access.referer.deny[1]: 'http://b.test/' must be a host name without"),
        ('[domains.access.referer]\ndeny = ["*"]',
         "domains[0].access.referer.deny[0]: '*' must be a host name, optionally starting"),
        ('[domains.access.referer]\ndeny = ["a.*.test"]',
         "domains[0].access.referer.deny[0]: 'a.*.test' must be a host name, optionally"),
        ('[domains.access.ip]\nallow = ["10.0.0.0/33"]',
         "domains[0].access.ip.allow[0]: '10.0.0.0/33' is not an IP address or CIDR network"),
        ('[domains.access.ip]\ndeny = ["::1", "banana"]',
         "domains[0].access.ip.deny[1]: 'banana' is not an IP address or CIDR network"),
        ('[domains.access.ip]\nallow = ["10.0.0.0/8"]\ndeny = ["10.0.0.0/8"]',
         "domains[0].access.ip: needs exactly one of allow, deny (both given)"),
        ('[domains.access.user_agent]\ndeny = [""]',
         "domains[0].access.user_agent.deny[0]: must be a non-empty printable pattern"),
        ("[domains.access.rate_limit]\nburst = 3",
         "domains[0].access.rate_limit.rate: is required"),
        ("[domains.access.rate_limit]\nrate = 0",
         "domains[0].access.rate_limit.rate: integer 0 is not a positive number of requests"),
        ("[domains.access.rate_limit]\nrate = 5\nburst = 0",
         "domains[0].access.rate_limit.burst: 0 is less than 1"),
        ("[[domains.access.speed_limits]]\nafter = 5",
         "domains[0].access.speed_limits[0].rate: is required"),
        ('[[domains.access.speed_limits]]\nrate = "10B"',
         "domains[0].access.speed_limits[0].rate: 10 bytes per second is less than 1KiB"),
        ('[[domains.access.speed_limits]]\nrate = "1MiB"\nsuffix = ["mp4"]',
         "domains[0].access.speed_limits[0].suffix[0]: 'mp4' is not a suffix"),
        ('[[domains.access.speed_limits]]\nrate = "1MiB"\nsuffix = [".a"]\nprefix = ["/b"]',
         "domains[0].access.speed_limits[0]: at most one of suffix, prefix, path"),
        ('[[domains.access.speed_limits]]\nrate = "1MiB"\nttl = 5',
         "domains[0].access.speed_limits[0].ttl: unknown key"),
    ],
)
def test_bad_access(body: str, expected: str) -> None:
    message = access_error(body)
    assert expected in message, message


def test_signing_keys_never_in_errors() -> None:
    message = access_error('[domains.access.signed_url]\ntype = "A"\nkey = "sekrit\\u0001"')
    assert "sekrit" not in message
    message = access_error('[domains.access.signed_url]\ntype = "A"\nkey = ["sekrit"]')
    assert "sekrit" not in message


def test_parse_domain_names_the_access_field_for_the_control_plane() -> None:
    with pytest.raises(InvalidValue) as info:
        parse_domain(
            {"name": "a.test", "origins": ["http://a"], "access": {"ip": {"allow": ["x"]}}},
            "domain",
        )
    assert info.value.key == "domain.access.ip.allow[0]"


def test_trusted_proxies() -> None:
    config = parse('[edge]\ntrusted_proxies = ["10.0.0.0/8", "fd00::/8"]\n' + DOMAIN)
    trusted = config.edge.trusted_proxies
    assert trusted is not None
    assert ipaddress.ip_address("10.1.2.3") in trusted
    assert parse(DOMAIN).edge.trusted_proxies is None
    with pytest.raises(ConfigError, match=r"edge\.trusted_proxies\[1\]: 'x' is not an IP"):
        parse('[edge]\ntrusted_proxies = ["10.0.0.0/8", "x"]\n' + DOMAIN)


def test_example_config_access_block_is_valid() -> None:
    """The commented-out access example in configs/edge.example.toml, uncommented, parses."""
    text = (CONFIGS / "edge.example.toml").read_text()
    block = text.split("# BEGIN access example\n")[1].split("# END access example")[0]
    lines = [line.removeprefix("# ") for line in block.splitlines() if line != "#"]
    uncommented = "\n".join(
        line for line in lines if line.startswith("[") or re.match(r"[a-z_]+ = ", line)
    )
    domain = parse(DOMAIN + uncommented).domains["a.test"]
    access = domain.access
    assert access is not None
    assert access.signed_url is not None and access.signed_url.kind == "A"
    assert access.referer is not None and access.ip is not None
    assert access.user_agent is not None and access.rate_limit == RateLimit(20.0, 40)
    assert access.speed_limits[0].rate == 512 * 1024
