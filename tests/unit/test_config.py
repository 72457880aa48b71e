"""edge.config: parsing, every validation path, host and rule matching, the shipped configs."""

from __future__ import annotations

import dataclasses
import re
import socket
import textwrap
from pathlib import Path

import pytest

from edge.config import (
    CacheRule,
    CacheSettings,
    ConfigError,
    ControlSettings,
    DomainConfig,
    EdgeConfig,
    EdgeSettings,
    LogSettings,
    OriginSettings,
    QueryPolicy,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from edge.netguard import INTERNAL_NETWORKS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

MINIMAL_DOMAIN = """
[[domains]]
name = "a.test"
origins = ["http://127.0.0.1:8001"]
"""


def parse(text: str) -> EdgeConfig:
    return parse_config(textwrap.dedent(text), "cfg.toml")


def config_error(text: str) -> str:
    """The one-line message parsing `text` fails with."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cfg.toml: ")
    return message


def domain_error(domain_body: str) -> str:
    """The message for a config whose only domain is `domain_body` (TOML lines)."""
    return config_error("[[domains]]\n" + textwrap.dedent(domain_body))


def rule_error(rule_body: str) -> str:
    """The message for a valid domain whose only rule is `rule_body`."""
    return config_error(MINIMAL_DOMAIN + "[[domains.rules]]\n" + textwrap.dedent(rule_body))


# --- a full config --------------------------------------------------------------------------


FULL = """
[edge]
listen = "0.0.0.0:8443"
admin_listen = "[::1]:0"
workers = 4
state_dir = "/srv/edge"
max_header_bytes = "32KiB"
keepalive_timeout = 10
request_head_timeout = 5
send_timeout = 20.5
edge_id = "fra-1.edge"

[cache]
memory = "1GiB"
max_object = "64MiB"

[origin]
connect_timeout = 1.5
first_byte_timeout = 10
idle_read_timeout = 20.0
max_connections = 100

[[domains]]
name = "Static.Example.COM."
origins = ["HTTPS://Origin.Example.com/", "http://10.0.0.2:8080", "http://[2001:db8::1]:81"]
origin_host = "Origin.Example.com:8443"
query = { mode = "keep", params = ["id", "v"] }

[[domains.rules]]
suffix = [".JPG", ".png"]
ttl = "7d"

[[domains.rules]]
prefix = ["/api/"]
ttl = 0
respect_origin = false

[[domains.rules]]
path = ["/robots.txt"]

[[domains]]
name = "b.test"
origins = ["http://b-origin.test"]
"""


def test_full_config_round_trip() -> None:
    config = parse(FULL)
    assert config == EdgeConfig(
        source="cfg.toml",
        edge=EdgeSettings(
            listen=("0.0.0.0", 8443),
            admin_listen=("::1", 0),
            workers=4,
            state_dir="/srv/edge",
            max_header_bytes=32768,
            keepalive_timeout=10.0,
            request_head_timeout=5.0,
            send_timeout=20.5,
            edge_id="fra-1.edge",
        ),
        cache=CacheSettings(memory=2**30, max_object=64 * 2**20),
        origin=OriginSettings(
            connect_timeout=1.5,
            first_byte_timeout=10.0,
            idle_read_timeout=20.0,
            max_connections=100,
        ),
        domains={
            "static.example.com": DomainConfig(
                name="static.example.com",
                origins=(
                    "https://origin.example.com",
                    "http://10.0.0.2:8080",
                    "http://[2001:db8::1]:81",
                ),
                origin_host="origin.example.com:8443",
                rules=(
                    CacheRule("suffix", (".jpg", ".png"), 7 * 86400, True),
                    CacheRule("prefix", ("/api/",), 0, False),
                    CacheRule("path", ("/robots.txt",), None, True),
                ),
                query=QueryPolicy("keep", ("id", "v")),
            ),
            "b.test": DomainConfig(name="b.test", origins=("http://b-origin.test",)),
        },
    )
    assert list(config.domains) == ["static.example.com", "b.test"]
    assert isinstance(config.edge.keepalive_timeout, float)


def test_defaults() -> None:
    config = parse(MINIMAL_DOMAIN)
    assert config.edge == EdgeSettings()
    assert config.edge.listen == ("127.0.0.1", 8080)
    assert config.edge.edge_id == socket.gethostname()
    assert config.cache == CacheSettings(
        memory=256 * 2**20, memory_max_object=2**20, disk=10 * 2**30, max_object=4 * 2**30,
        slice=2**20,
    )
    assert config.cache.largest_stored == 4 * 2**30
    assert config.origin == OriginSettings(5.0, 30.0, 30.0, 512)
    domain = config.domains["a.test"]
    assert domain == DomainConfig("a.test", ("http://127.0.0.1:8001",), None, (), QueryPolicy())
    assert domain.query == QueryPolicy("keep_all", ())


def test_logs_section() -> None:
    assert parse(MINIMAL_DOMAIN).logs == LogSettings(True, "serve", 7, 180)
    text = (
        "[logs]\nenabled = false\non_log_failure = 'refuse'\nkeep_days = 0\n"
        "retention_days = 365\n" + MINIMAL_DOMAIN
    )
    assert parse(text).logs == LogSettings(False, "refuse", 0, 365)


def test_config_is_immutable() -> None:
    config = parse(MINIMAL_DOMAIN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.edge.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.domains["x"] = config.domains["a.test"]  # type: ignore[index]


# --- the shipped configs --------------------------------------------------------------------


def test_example_config_loads_and_documents_defaults() -> None:
    config = load_config(CONFIGS / "edge.example.toml")
    # The example claims its [edge], [cache] and [origin] values are the defaults.
    assert config.edge == EdgeSettings()
    assert config.cache == CacheSettings()
    assert config.origin == OriginSettings()
    assert config.logs == LogSettings()
    (domain,) = config.domains.values()
    assert [rule.kind for rule in domain.rules] == ["suffix", "suffix", "prefix", "path"]
    assert domain.rules[0].slice == 2**20
    assert domain.query.mode == "drop"


def test_example_config_mentions_every_key() -> None:
    text = (CONFIGS / "edge.example.toml").read_text()
    documented = set(re.findall(r"^#?\s*([a-z_]+) = ", text, re.MULTILINE))
    documented |= set(re.findall(r"\b(mode|params) = ", text))
    documented |= {table for table in ("edge", "cache", "origin", "logs") if f"[{table}]" in text}
    documented |= {"domains", "rules"} if "[[domains.rules]]" in text else set()
    documented |= {"access"} if "[domains.access." in text else set()
    settings = (EdgeSettings, CacheSettings, OriginSettings, LogSettings, DomainConfig, QueryPolicy)
    keys = {f.name for cls in settings for f in dataclasses.fields(cls)}
    keys |= {"suffix", "prefix", "path", "ttl", "respect_origin", "slice"}
    keys |= {"edge", "cache", "origin", "logs"}
    keys |= {"domains"}
    assert keys - documented == set()


def test_demo_config() -> None:
    config = load_config(CONFIGS / "demo.toml")
    assert config.edge.listen == ("127.0.0.1", 8080)
    assert config.edge.admin_listen == ("127.0.0.1", 9080)
    assert config.edge.state_dir == "var/demo/edge"
    assert config.cache.memory == 256 * 2**20
    assert list(config.domains) == ["demo.cdn.test"]
    domain = config.domains["demo.cdn.test"]
    assert domain.origins == ("http://127.0.0.1:8001",)
    assert config.cache.disk == 2 * 2**30
    assert domain.rules == (
        CacheRule("suffix", (".mp4",), 86400, True, slice=2**20),
        CacheRule("suffix", (".jpg", ".png"), 86400, True),
        CacheRule("prefix", ("/api/",), 0, True),
    )
    assert config.domain_for_host("demo.cdn.test:8080") is domain


# --- files and TOML syntax ------------------------------------------------------------------


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(MINIMAL_DOMAIN)
    config = load_config(path)
    assert config.source == str(path)
    assert list(config.domains) == ["a.test"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: (file): No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": \(file\): Is a directory$"):
        load_config(tmp_path)


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n" + MINIMAL_DOMAIN.encode())
    with pytest.raises(ConfigError, match=r": \(file\): not UTF-8 text"):
        load_config(path)


def test_bad_toml_syntax() -> None:
    message = config_error("[edge\nlisten = 1\n")
    assert message.startswith("cfg.toml: (toml): ")
    assert "line 1" in message


def test_config_error_parts_and_single_line() -> None:
    error = ConfigError("f.toml", "edge.x", "bad\nthing")
    assert (error.source, error.key, error.problem) == ("f.toml", "edge.x", "bad\nthing")
    assert str(error) == "f.toml: edge.x: bad thing"


# --- unknown keys and types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "colour = 1\n" + MINIMAL_DOMAIN,
            "cfg.toml: colour: unknown key (expected one of edge, cache, origin, domains, control, "
            "logs)",
        ),
        ("[edges]\n" + MINIMAL_DOMAIN, "cfg.toml: edges: unknown key (did you mean 'edge'?)"),
        (
            "[edge]\nlisen = '127.0.0.1:1'\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.lisen: unknown key (did you mean 'listen'?)",
        ),
        (
            "[cache]\nmemmory = 1\n" + MINIMAL_DOMAIN,
            "cfg.toml: cache.memmory: unknown key (did you mean 'memory'?)",
        ),
        (
            "[origin]\nretries = 1\n" + MINIMAL_DOMAIN,
            "cfg.toml: origin.retries: unknown key (expected one of connect_timeout, "
            "first_byte_timeout, idle_read_timeout, max_connections, deny)",
        ),
        (
            MINIMAL_DOMAIN + "origin = 'x'\n",
            "cfg.toml: domains[0].origin: unknown key (did you mean 'origins'?)",
        ),
        (
            MINIMAL_DOMAIN + "[[domains.rules]]\nsuffix = ['.js']\ntll = 5\n",
            "cfg.toml: domains[0].rules[0].tll: unknown key (did you mean 'ttl'?)",
        ),
        (
            MINIMAL_DOMAIN + "query = { mode = 'keep_all', param = ['a'] }\n",
            "cfg.toml: domains[0].query.param: unknown key (did you mean 'params'?)",
        ),
        (
            '"odd key\\n" = 1\n' + MINIMAL_DOMAIN,
            'cfg.toml: "odd key\\n": unknown key '
            "(expected one of edge, cache, origin, domains, control, logs)",
        ),
    ],
)
def test_unknown_keys(text: str, expected: str) -> None:
    assert config_error(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("edge = 1\n" + MINIMAL_DOMAIN, "cfg.toml: edge: expected a table, got integer 1"),
        (
            "[edge]\nworkers = '2'\n" + MINIMAL_DOMAIN,
            'cfg.toml: edge.workers: expected an integer, got string "2"',
        ),
        (
            "[edge]\nworkers = true\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.workers: expected an integer, got boolean True",
        ),
        (
            "[edge]\nworkers = 0\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.workers: 0 is less than 1",
        ),
        (
            "[edge]\nstate_dir = ''\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.state_dir: must not be empty",
        ),
        (
            "[edge]\nedge_id = 'has space'\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.edge_id: 'has space' must be 1-64 characters of letters, digits, "
            "'.', '_', '-'",
        ),
        (
            "[edge]\nkeepalive_timeout = 0\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.keepalive_timeout: 0 is not a positive number of seconds",
        ),
        (
            "[edge]\nsend_timeout = -1\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.send_timeout: -1 is not a positive number of seconds",
        ),
        (
            "[edge]\nrequest_head_timeout = \"5s\"\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.request_head_timeout: expected seconds as a number, got string \"5s\"",
        ),
        (
            "[origin]\nconnect_timeout = nan\n" + MINIMAL_DOMAIN,
            "cfg.toml: origin.connect_timeout: nan is not a positive number of seconds",
        ),
        (
            "[origin]\nfirst_byte_timeout = '30s'\n" + MINIMAL_DOMAIN,
            'cfg.toml: origin.first_byte_timeout: expected seconds as a number, got string "30s"',
        ),
        (
            "[origin]\nmax_connections = 0\n" + MINIMAL_DOMAIN,
            "cfg.toml: origin.max_connections: 0 is less than 1",
        ),
        (
            "[logs]\non_log_failure = 'drop'\n" + MINIMAL_DOMAIN,
            "cfg.toml: logs.on_log_failure: 'drop' is not one of serve, refuse",
        ),
        (
            "[logs]\nenabled = 'yes'\n" + MINIMAL_DOMAIN,
            'cfg.toml: logs.enabled: expected true or false, got string "yes"',
        ),
        (
            "[logs]\nkeep_days = -1\n" + MINIMAL_DOMAIN,
            "cfg.toml: logs.keep_days: -1 is less than 0",
        ),
        (
            "[logs]\nretention_days = 0\n" + MINIMAL_DOMAIN,
            "cfg.toml: logs.retention_days: 0 is less than 1",
        ),
        (
            "[logs]\nretention = 5\n" + MINIMAL_DOMAIN,
            "cfg.toml: logs.retention: unknown key (did you mean 'retention_days'?)",
        ),
        (
            "[edge]\nstate_dir = 1979-05-27\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.state_dir: expected a string, got date/time datetime.date(1979, 5, 27)",
        ),
    ],
)
def test_bad_settings(text: str, expected: str) -> None:
    assert config_error(text) == expected


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1234, 1234),
        ("512B", 512),
        ("64KiB", 65536),
        ("256MiB", 256 * 2**20),
        ("256 MiB", 256 * 2**20),
        ("2GiB", 2 * 2**30),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("256MB", "'256MB' is not a size: use a whole number of bytes, or one with a B, KiB"),
        ("1.5GiB", "'1.5GiB' is not a size"),
        ("1024", "'1024' is not a size"),
        ("256mib", "'256mib' is not a size"),
        ("MiB", "'MiB' is not a size"),
        (-1, "-1 is not a size: it is negative"),
        (True, "True is not a size: expected an integer or a string such as '256MiB', got boolean"),
        (1.5, "1.5 is not a size: expected an integer"),
        (None, "None is not a size"),
    ],
)
def test_parse_size_rejects(value: object, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value).startswith(problem)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[cache]\nmemory = '1TB'\n" + MINIMAL_DOMAIN,
            "cfg.toml: cache.memory: '1TB' is not a size: use a whole number of bytes, or one "
            "with a B, KiB, MiB or GiB suffix such as '256MiB' (decimal KB/MB/GB are not accepted)",
        ),
        (
            "[cache]\nmemory = 0\n" + MINIMAL_DOMAIN,
            "cfg.toml: cache.memory: must be more than 0 bytes",
        ),
        (
            "[cache]\nmemory = '1MiB'\nmemory_max_object = '2MiB'\n" + MINIMAL_DOMAIN,
            "cfg.toml: cache.memory_max_object: 2097152 bytes is more than cache.memory "
            "(1048576 bytes)",
        ),
        (
            "[cache]\ndisk = '1GiB'\nmax_object = '2GiB'\n" + MINIMAL_DOMAIN,
            "cfg.toml: cache.max_object: 2147483648 bytes is more than cache.disk "
            "(1073741824 bytes)",
        ),
        (
            "[cache]\ndisk = -1\n" + MINIMAL_DOMAIN,
            "cfg.toml: cache.disk: -1 is not a size: it is negative",
        ),
        (
            "[edge]\nmax_header_bytes = -5\n" + MINIMAL_DOMAIN,
            "cfg.toml: edge.max_header_bytes: -5 is not a size: it is negative",
        ),
    ],
)
def test_bad_size_in_config(text: str, expected: str) -> None:
    assert config_error(text) == expected


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0), (90, 90), ("30s", 30), ("5m", 300), ("2h", 7200), ("7d", 604800), ("1 d", 86400)],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5x", "'5x' is not a duration: use whole seconds, or a whole number with an s, m, h or d"),
        ("30", "'30' is not a duration"),
        ("1h30m", "'1h30m' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
        (-5, "-5 is not a duration: it is negative"),
        (1.5, "1.5 is not a duration: expected an integer or a string such as '5m', got float"),
        (False, "False is not a duration"),
    ],
)
def test_parse_duration_rejects(value: object, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value).startswith(problem)


def test_bad_duration_in_rule() -> None:
    assert rule_error("suffix = ['.js']\nttl = '1w'\n") == (
        "cfg.toml: domains[0].rules[0].ttl: '1w' is not a duration: use whole seconds, or a whole "
        "number with an s, m, h or d suffix such as '30s' or '7d'"
    )


# --- listen addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("Edge.Local:1", ("edge.local", 1)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:443", ("::", 443)),
    ],
)
def test_listen(value: str, address: tuple[str, int]) -> None:
    config = parse(f"[edge]\nlisten = '{value}'\n{MINIMAL_DOMAIN}")
    assert config.edge.listen == address


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("127.0.0.1", "'127.0.0.1' is not host:port (use [addr]:port for IPv6)"),
        ("::1:8080", "'::1:8080' is not host:port (use [addr]:port for IPv6)"),
        ("[::1]", "'[::1]' is not host:port (use [addr]:port for IPv6)"),
        ("[::1]8080", "'[::1]8080' is not host:port (use [addr]:port for IPv6)"),
        ("127.0.0.1:65536", "'127.0.0.1:65536' has an invalid port: it must be 0-65535"),
        ("127.0.0.1:http", "'127.0.0.1:http' has an invalid port: it must be 0-65535"),
        ("127.0.0.1:-1", "'127.0.0.1:-1' has an invalid port: it must be 0-65535"),
        (":8080", "':8080' has an invalid host: it is empty"),
        ("300.1.1.1:80", "'300.1.1.1:80' has an invalid host: '300.1.1.1' is not an IPv4 address"),
        ("[1.2.3.4]:80", "'[1.2.3.4]:80' has an invalid host: '1.2.3.4' is not an IPv6 address"),
        ("bad_host:80", "'bad_host:80' has an invalid host: label 'bad_host' must be 1-63"),
    ],
)
def test_bad_listen(value: str, problem: str) -> None:
    message = config_error(f"[edge]\nlisten = '{value}'\n{MINIMAL_DOMAIN}")
    assert message.startswith(f"cfg.toml: edge.listen: {problem}")


def test_bad_admin_listen() -> None:
    assert config_error(f"[edge]\nadmin_listen = 9080\n{MINIMAL_DOMAIN}") == (
        "cfg.toml: edge.admin_listen: expected a string, got integer 9080"
    )


def test_listen_and_admin_listen_must_differ() -> None:
    text = "[edge]\nlisten = '127.0.0.1:9000'\nadmin_listen = '127.0.0.1:9000'\n"
    assert config_error(text + MINIMAL_DOMAIN) == (
        "cfg.toml: edge.admin_listen: must differ from edge.listen"
    )
    both_any_port = "[edge]\nlisten = '127.0.0.1:0'\nadmin_listen = '127.0.0.1:0'\n"
    assert parse(both_any_port + MINIMAL_DOMAIN).edge.admin_listen == ("127.0.0.1", 0)


# --- domains --------------------------------------------------------------------------------


def test_at_least_one_domain() -> None:
    assert config_error("[edge]\nworkers = 1\n") == (
        "cfg.toml: domains: at least one [[domains]] entry is required"
    )
    assert config_error("domains = []\n") == (
        "cfg.toml: domains: at least one [[domains]] entry is required"
    )
    assert config_error("[domains]\nname = 'a.test'\n") == (
        "cfg.toml: domains: expected an array of tables ([[domains]]), got table"
    )


def test_duplicate_domain() -> None:
    text = MINIMAL_DOMAIN + MINIMAL_DOMAIN.replace("a.test", "b.test") + MINIMAL_DOMAIN
    assert (
        config_error(text) == "cfg.toml: domains[2].name: 'a.test' is already defined by domains[0]"
    )
    # Names are compared after normalisation.
    text = MINIMAL_DOMAIN + MINIMAL_DOMAIN.replace("a.test", "A.Test.")
    assert (
        config_error(text) == "cfg.toml: domains[1].name: 'a.test' is already defined by domains[0]"
    )


def test_domain_name_normalised() -> None:
    config = parse(MINIMAL_DOMAIN.replace("a.test", "WWW.Example.ORG."))
    assert list(config.domains) == ["www.example.org"]
    assert config.domains["www.example.org"].name == "www.example.org"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "'' is not a valid domain name: it is empty"),
        ("a..test", "'a..test' is not a valid domain name: label '' must be 1-63 characters"),
        ("-a.test", "'-a.test' is not a valid domain name: label '-a' must be 1-63"),
        ("a-.test", "'a-.test' is not a valid domain name: label 'a-' must be 1-63"),
        ("a_b.test", "'a_b.test' is not a valid domain name: label 'a_b'"),
        ("a.test:8080", "'a.test:8080' is not a valid domain name: label 'test:8080'"),
        ("*.a.test", "'*.a.test' is not a valid domain name: label '*'"),
        ("a" * 64 + ".test", "is not a valid domain name: label 'aaaa"),
        (
            ".".join(["a" * 63] * 4),
            "is not a valid domain name: it is longer than 253 characters",
        ),
    ],
)
def test_bad_domain_name(name: str, problem: str) -> None:
    message = domain_error(f"name = '{name}'\norigins = ['http://o.test']\n")
    assert message.startswith("cfg.toml: domains[0].name: ")
    assert problem in message


def test_longest_domain_name_accepted() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    assert name in parse(MINIMAL_DOMAIN.replace("a.test", name)).domains


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("origins = ['http://o.test']", "cfg.toml: domains[0].name: is required"),
        ("name = 'a.test'", "cfg.toml: domains[0].origins: is required"),
        (
            "name = 5\norigins = ['http://o.test']",
            "cfg.toml: domains[0].name: expected a string, got integer 5",
        ),
        (
            "name = 'a.test'\norigins = []",
            "cfg.toml: domains[0].origins: at least one origin is required",
        ),
        (
            "name = 'a.test'\norigins = 'http://o.test'",
            'cfg.toml: domains[0].origins: expected an array of strings, got string "http://o.test"',
        ),
        (
            "name = 'a.test'\norigins = ['http://o.test', 5]",
            "cfg.toml: domains[0].origins[1]: expected a string, got integer 5",
        ),
        (
            "name = 'a.test'\norigins = ['http://o.test']\nrules = 5",
            "cfg.toml: domains[0].rules: expected an array of tables ([[domains.rules]]), "
            "got integer 5",
        ),
        (
            "name = 'a.test'\norigins = ['http://o.test']\nquery = 'keep'",
            'cfg.toml: domains[0].query: expected a table, got string "keep"',
        ),
    ],
)
def test_bad_domain_fields(body: str, expected: str) -> None:
    assert domain_error(body) == expected


# --- origins --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001"),
        ("http://127.0.0.1:8001/", "http://127.0.0.1:8001"),
        ("https://Origin.Example.com", "https://origin.example.com"),
        ("HTTPS://origin.example.com:443/", "https://origin.example.com:443"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://[2001:DB8::1]", "http://[2001:db8::1]"),
        ("http://localhost", "http://localhost"),
    ],
)
def test_origin_urls(url: str, stored: str) -> None:
    config = parse(MINIMAL_DOMAIN.replace("http://127.0.0.1:8001", url))
    assert config.domains["a.test"].origins == (stored,)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://a", "'ftp://a' is not an http:// or https:// URL"),
        ("127.0.0.1:8001", "'127.0.0.1:8001' is not an http:// or https:// URL"),
        ("http:o.test", "'http:o.test' is not an http:// or https:// URL"),
        ("http://", "'http://' has an invalid host: it is empty"),
        ("http://o.test/api", "'http://o.test/api' must not have a path"),
        ("http://o.test//", "'http://o.test//' must not have a path"),
        ("http://o.test/?", "'http://o.test/?' must not contain whitespace, a query or a fragment"),
        ("http://o.test?a=1", "'http://o.test?a=1' must not contain whitespace, a query"),
        ("http://o.test#top", "'http://o.test#top' must not contain whitespace, a query"),
        ("http://o .test", "'http://o .test' must not contain whitespace"),
        ("http://user:pw@o.test", "'http://user:pw@o.test' must not contain credentials"),
        ("http://o.test:0", "'http://o.test:0' has an invalid port"),
        ("http://o.test:99999", "'http://o.test:99999' has an invalid port"),
        ("http://o.test:http", "'http://o.test:http' has an invalid port"),
        ("http://[::1", "'http://[::1' is not a valid URL"),
        ("http://[not-v6]", "'http://[not-v6]' is not a valid URL"),
        ("http://o_1.test", "'http://o_1.test' has an invalid host: label 'o_1' must be"),
        ("http://999.0.0.1", "'http://999.0.0.1' has an invalid host: '999.0.0.1' is not an IPv4"),
    ],
)
def test_bad_origin_url(url: str, problem: str) -> None:
    message = domain_error(f"name = 'a.test'\norigins = ['http://ok.test', '{url}']")
    assert message.startswith(f"cfg.toml: domains[0].origins[1]: {problem}")


def test_bad_origin_url_in_second_domain() -> None:
    text = MINIMAL_DOMAIN + "[[domains]]\nname = 'b.test'\norigins = ['ftp://a']\n"
    assert config_error(text) == (
        "cfg.toml: domains[1].origins[0]: 'ftp://a' is not an http:// or https:// URL"
    )


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("Origin.Test", "origin.test"),
        ("origin.test:8443", "origin.test:8443"),
        ("[::1]:81", "[::1]:81"),
    ],
)
def test_origin_host(value: str, stored: str) -> None:
    config = parse(MINIMAL_DOMAIN + f"origin_host = '{value}'\n")
    assert config.domains["a.test"].origin_host == stored


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "'' has an invalid host: it is empty"),
        ("o.test:0", "'o.test:0' has an invalid port"),
        ("o.test:x", "'o.test:x' has an invalid port: it must be 0-65535"),
        ("http://o.test", "'http://o.test' must be a host with an optional port, not a URL"),
        ("[1.2.3.4]", "'[1.2.3.4]' has an invalid host: '1.2.3.4' is not an IPv6 address"),
    ],
)
def test_bad_origin_host(value: str, problem: str) -> None:
    message = config_error(MINIMAL_DOMAIN + f"origin_host = '{value}'\n")
    assert message.startswith(f"cfg.toml: domains[0].origin_host: {problem}")


# --- query policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "policy"),
    [
        ("{}", QueryPolicy()),
        ("{ mode = 'keep_all' }", QueryPolicy("keep_all")),
        ("{ mode = 'ignore_all' }", QueryPolicy("ignore_all")),
        ("{ mode = 'keep', params = ['id'] }", QueryPolicy("keep", ("id",))),
        ("{ mode = 'drop', params = ['utm', 'fbclid'] }", QueryPolicy("drop", ("utm", "fbclid"))),
    ],
)
def test_query_policy(value: str, policy: QueryPolicy) -> None:
    assert parse(MINIMAL_DOMAIN + f"query = {value}\n").domains["a.test"].query == policy


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{ mode = 'keep' }", "domains[0].query.params: mode 'keep' needs a non-empty params list"),
        (
            "{ mode = 'drop', params = [] }",
            "domains[0].query.params: mode 'drop' needs a non-empty params list",
        ),
        (
            "{ mode = 'ignore_all', params = ['id'] }",
            "domains[0].query.params: not allowed with mode 'ignore_all'",
        ),
        ("{ params = [] }", "domains[0].query.params: not allowed with mode 'keep_all'"),
        (
            "{ mode = 'sorted' }",
            "domains[0].query.mode: 'sorted' is not one of keep_all, ignore_all, keep, drop",
        ),
        (
            "{ mode = 'keep', params = ['id=1'] }",
            "domains[0].query.params[0]: 'id=1' is not a query parameter name",
        ),
        (
            "{ mode = 'keep', params = ['a', ''] }",
            "domains[0].query.params[1]: '' is not a query parameter name",
        ),
    ],
)
def test_bad_query_policy(value: str, expected: str) -> None:
    assert config_error(MINIMAL_DOMAIN + f"query = {value}\n") == f"cfg.toml: {expected}"


# --- rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("ttl = 5", "domains[0].rules[0]: needs exactly one of suffix, prefix, path (got none)"),
        (
            "suffix = ['.js']\nprefix = ['/js/']",
            "domains[0].rules[0]: needs exactly one of suffix, prefix, path (got suffix, prefix)",
        ),
        ("suffix = []", "domains[0].rules[0].suffix: must list at least one value"),
        (
            "suffix = '.js'",
            'domains[0].rules[0].suffix: expected an array of strings, got string ".js"',
        ),
        (
            "suffix = ['js']",
            "domains[0].rules[0].suffix[0]: 'js' is not a suffix: it must look like '.jpg'",
        ),
        (
            "suffix = ['.js', '.']",
            "domains[0].rules[0].suffix[1]: '.' is not a suffix: it must look like '.jpg'",
        ),
        (
            "suffix = ['.a/b']",
            "domains[0].rules[0].suffix[0]: '.a/b' is not a suffix: it must look like '.jpg'",
        ),
        ("prefix = ['api/']", "domains[0].rules[0].prefix[0]: 'api/' must start with '/'"),
        ("path = ['/a?b=1']", "domains[0].rules[0].path[0]: '/a?b=1' must not contain '?' or '#'"),
        ("path = ['/a#b']", "domains[0].rules[0].path[0]: '/a#b' must not contain '?' or '#'"),
        (
            "prefix = ['/x/']\nrespect_origin = 'no'",
            'domains[0].rules[0].respect_origin: expected true or false, got string "no"',
        ),
        (
            "prefix = ['/x/']\nrespect_origin = false",
            "domains[0].rules[0].respect_origin: false needs a ttl to override the origin's "
            "freshness with",
        ),
        (
            "prefix = ['/x/']\nttl = -1",
            "domains[0].rules[0].ttl: -1 is not a duration: it is negative",
        ),
    ],
)
def test_bad_rule(body: str, expected: str) -> None:
    assert rule_error(body) == f"cfg.toml: {expected}"


def test_bad_rule_reports_its_index() -> None:
    rules = "[[domains.rules]]\nsuffix = ['.js']\n[[domains.rules]]\nprefix = ['x']\n"
    assert config_error(MINIMAL_DOMAIN + rules) == (
        "cfg.toml: domains[0].rules[1].prefix[0]: 'x' must start with '/'"
    )


def test_rule_values_and_defaults() -> None:
    rules = """
        [[domains.rules]]
        suffix = [".JPG", ".tar.gz"]
        [[domains.rules]]
        prefix = ["/API/"]
        ttl = 120
        respect_origin = false
    """
    domain = parse(MINIMAL_DOMAIN + textwrap.dedent(rules)).domains["a.test"]
    assert domain.rules == (
        CacheRule("suffix", (".jpg", ".tar.gz"), None, True),
        CacheRule("prefix", ("/API/",), 120, False),
    )


@pytest.mark.parametrize(
    ("rule", "path", "expected"),
    [
        (CacheRule("suffix", (".jpg", ".png"), 60, True), "/a/b.jpg", True),
        (CacheRule("suffix", (".jpg", ".png"), 60, True), "/a/B.JPG", True),
        (CacheRule("suffix", (".jpg",), 60, True), "/a.jpg?size=large", True),
        (CacheRule("suffix", (".jpg",), 60, True), "/a.jpg.html", False),
        (CacheRule("suffix", (".jpg",), 60, True), "/a?x=.jpg", False),
        (CacheRule("prefix", ("/api/",), 0, True), "/api/time", True),
        (CacheRule("prefix", ("/api/",), 0, True), "/api/", True),
        (CacheRule("prefix", ("/api/",), 0, True), "/api", False),
        (CacheRule("prefix", ("/api/",), 0, True), "/API/time", False),
        (CacheRule("prefix", ("/a/", "/b/"), 0, True), "/b/x", True),
        (CacheRule("path", ("/robots.txt",), 60, True), "/robots.txt", True),
        (CacheRule("path", ("/robots.txt",), 60, True), "/robots.txt?v=2", True),
        (CacheRule("path", ("/robots.txt",), 60, True), "/robots.txt/", False),
        (CacheRule("path", ("/robots.txt",), 60, True), "/Robots.txt", False),
    ],
)
def test_rule_matches(rule: CacheRule, path: str, expected: bool) -> None:
    assert rule.matches(path) is expected


def test_rule_for_first_match_wins() -> None:
    rules = """
        [[domains.rules]]
        path = ["/static/live.jpg"]
        ttl = 0
        [[domains.rules]]
        prefix = ["/static/"]
        ttl = "1h"
        [[domains.rules]]
        suffix = [".jpg"]
        ttl = "1d"
    """
    domain = parse(MINIMAL_DOMAIN + textwrap.dedent(rules)).domains["a.test"]
    live, static, images = domain.rules
    assert domain.rule_for("/static/live.jpg") is live
    assert domain.rule_for("/static/other.jpg") is static
    assert domain.rule_for("/static/app.js") is static
    assert domain.rule_for("/img/a.JPG") is images
    assert domain.rule_for("/index.html") is None
    assert DomainConfig("x.test", ("http://o.test",)).rule_for("/a.jpg") is None


# --- host matching --------------------------------------------------------------------------


@pytest.fixture
def two_domains() -> EdgeConfig:
    return parse(MINIMAL_DOMAIN + MINIMAL_DOMAIN.replace("a.test", "www.b.test"))


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("a.test", "a.test"),
        ("A.TEST", "a.test"),
        ("a.test:8080", "a.test"),
        ("a.test.", "a.test"),
        ("A.Test.:443", "a.test"),
        ("a.test:", "a.test"),
        ("www.b.test", "www.b.test"),
        ("b.test", None),
        ("a.test..", None),
        ("x.a.test", None),
        ("", None),
        ("[::1]:8080", None),
        ("[::1]", None),
        ("::1", None),
        ("[::1", None),
    ],
)
def test_domain_for_host(two_domains: EdgeConfig, host: str, name: str | None) -> None:
    domain = two_domains.domain_for_host(host)
    assert (domain.name if domain else None) == name


def test_domain_for_host_ip_literal() -> None:
    # An IPv4 address passes as a domain name (handy for local tests); an IPv6 literal cannot.
    config = parse(MINIMAL_DOMAIN.replace("a.test", "127.0.0.1"))
    assert config.domain_for_host("127.0.0.1:8080") is config.domains["127.0.0.1"]
    assert config.domain_for_host("[::1]:8080") is None


# --- [control] ------------------------------------------------------------------------------

CONTROL = """
[control]
url = "HTTPS://Control.Example.NET:9000/cdn/"
token = "cdn_edge_abc"
"""


def test_control_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDN_EDGE_TOKEN", raising=False)
    config = parse(CONTROL)
    assert config.domains == {}
    assert config.control == ControlSettings(
        url="https://control.example.net:9000/cdn", token="cdn_edge_abc"
    )
    assert (config.control.read_timeout, config.control.start_timeout) == (45.0, 2.0)
    timed = parse(CONTROL + "read_timeout = 5\nstart_timeout = 0.5\n").control
    assert timed is not None and (timed.read_timeout, timed.start_timeout) == (5.0, 0.5)
    assert parse(MINIMAL_DOMAIN).control is None


def test_control_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDN_EDGE_TOKEN", "cdn_edge_env")
    config = parse("[control]\nurl = 'http://127.0.0.1:9000'\n")
    assert config.control is not None and config.control.token == "cdn_edge_env"
    # The file's token wins over the environment.
    config = parse(CONTROL)
    assert config.control is not None and config.control.token == "cdn_edge_abc"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            CONTROL + MINIMAL_DOMAIN,
            "domains: must be empty with [control]: the domains come from the control plane",
        ),
        ("[control]\ntoken = 'cdn_edge_abc'\n", "control.url: is required"),
        (
            "[control]\nurl = 'http://c.test'\n",
            "control.token: is required with control.url (or set CDN_EDGE_TOKEN)",
        ),
        (
            "[control]\nurl = 'http://c.test'\ntoken = ''\n",
            "control.token: is required with control.url (or set CDN_EDGE_TOKEN)",
        ),
        ("[control]\nurl = 'http://c.test'\ntoken = 12345\n", "control.token: expected a string"),
        (
            "[control]\nurl = 'http://c.test'\ntoken = 'abc def'\n",
            "control.token: must be printable ASCII without spaces",
        ),
        (CONTROL + "tokn = 'x'\n", "control.tokn: unknown key (did you mean 'token'?)"),
        (
            CONTROL + "read_timeout = 0\n",
            "control.read_timeout: 0 is not a positive number of seconds",
        ),
        (
            "[control]\nurl = 'ftp://c.test'\ntoken = 'cdn_edge_abc'\n",
            "control.url: 'ftp://c.test' is not an http:// or https:// URL",
        ),
        (
            "[control]\nurl = 'http://c.test/?x'\ntoken = 'cdn_edge_abc'\n",
            "control.url: 'http://c.test/?x' must not contain whitespace, a query or a fragment",
        ),
        ("control = 1\n", "control: expected a table, got integer 1"),
    ],
)
def test_bad_control(text: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDN_EDGE_TOKEN", raising=False)
    assert config_error(text) == f"cfg.toml: {expected}"


def test_control_errors_never_show_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDN_EDGE_TOKEN", raising=False)
    for text in (
        "[control]\nurl = 'http://cdn_edge_s3cret@c.test'\ntoken = 'x'\n",
        "[control]\nurl = 'http://user:cdn_edge_s3cret@c.test'\n",
        '[control]\nurl = "http://c.test"\ntoken = "cdn_edge_s3cret\\n"\n',
        "[control]\nurl = 'http://c.test'\ntoken = ['cdn_edge_s3cret']\n",
    ):
        assert "s3cret" not in config_error(text)


def test_example_config_documents_control() -> None:
    text = (CONFIGS / "edge.example.toml").read_text()
    assert "# [control]" in text
    documented = set(re.findall(r"^#?\s*([a-z_]+) = ", text, re.MULTILINE))
    assert {f.name for f in dataclasses.fields(ControlSettings)} <= documented
    assert "CDN_EDGE_TOKEN" in text


def test_origin_deny_defaults_to_none_standalone_and_to_internal_networks_attached() -> None:
    assert parse_config(MINIMAL_DOMAIN, "cfg.toml").origin.deny == ()
    attached = '[control]\nurl = "http://127.0.0.1:9000"\ntoken = "t"\n'
    assert parse_config(attached, "cfg.toml").origin.deny == INTERNAL_NETWORKS
    chosen = parse_config('[origin]\ndeny = ["10.1.0.0/16", "fd00::1"]\n' + attached, "cfg.toml")
    assert [str(n) for n in chosen.origin.deny] == ["10.1.0.0/16", "fd00::1/128"]
    assert parse_config("[origin]\ndeny = []\n" + attached, "cfg.toml").origin.deny == ()


def test_origin_deny_names_the_bad_entry() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config('[origin]\ndeny = ["10.0.0.0/8", "ten"]\n' + MINIMAL_DOMAIN, "cfg.toml")
    assert str(e.value) == "cfg.toml: origin.deny[1]: 'ten' is not an address or network (CIDR)"
