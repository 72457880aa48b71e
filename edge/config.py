"""Load and validate the edge's TOML configuration.

Every problem is reported as a `ConfigError` naming the file, the offending key and what is wrong
with it, on one line. Unknown keys are errors everywhere, so a typo never silently becomes a
default.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from edge.access import AccessRules, IpRule, IpSet, RefererRule, UserAgentRule
from edge.access import referer_pattern_problem as _referer_pattern_problem
from edge.netguard import INTERNAL_NETWORKS, Network
from edge.ratelimit import RateLimit, SpeedLimit
from edge.signing import DEFAULT_TTL, KINDS, SignedUrl

__all__ = [
    "CacheRule",
    "CacheSettings",
    "ConfigError",
    "ControlSettings",
    "DomainConfig",
    "EdgeConfig",
    "EdgeSettings",
    "LogSettings",
    "OriginSettings",
    "QueryPolicy",
    "access_table",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """A config that cannot be used. `str()` is one line: ``"{source}: {key}: {problem}"``."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(source, key, problem)
        self.source = source
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        # The CLI prints this as its single line of output, so no part may break the line.
        return " ".join(f"{self.source}: {self.key}: {self.problem}".splitlines())


@dataclass(frozen=True, slots=True)
class CacheRule:
    """One `[[domains.rules]]` entry: which paths it covers and how long they are cached."""

    kind: Literal["suffix", "prefix", "path"]
    # suffix: lowercase, starting with "."; prefix and path: starting with "/".
    values: tuple[str, ...]
    # Seconds; 0 means "do not cache". None: the rule sets no lifetime of its own.
    ttl: int | None
    # True: the origin's Cache-Control wins whenever it says anything, `ttl` only fills in when the
    # origin gives no freshness. False: `ttl` overrides the origin's freshness.
    respect_origin: bool = True
    # Fetch and cache matching objects in slices of this many bytes (Range requests to the
    # origin), so a seek fetches only the slices it covers. None: whole objects.
    slice: int | None = None

    def matches(self, path: str) -> bool:
        """Whether `path` (a request path, already normalised by the caller) falls under this rule.

        A query string, if present, is ignored. Suffixes compare case-insensitively; prefixes and
        whole paths compare exactly, as URL paths are case-sensitive.
        """
        path = path.partition("?")[0]
        if self.kind == "suffix":
            return path.lower().endswith(self.values)
        if self.kind == "prefix":
            return path.startswith(self.values)
        return path in self.values


@dataclass(frozen=True, slots=True)
class QueryPolicy:
    """Which query parameters take part in the cache key."""

    mode: Literal["keep_all", "ignore_all", "keep", "drop"] = "keep_all"
    # The parameters `keep` keeps or `drop` drops; empty for the other modes.
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """One `[[domains]]` entry: a hostname the edge serves and where it fetches from."""

    name: str  # lowercase DNS name, no trailing dot
    origins: tuple[str, ...]  # "scheme://host[:port]", no trailing "/"
    origin_host: str | None = None  # Host header sent to the origin; None: the client's Host
    rules: tuple[CacheRule, ...] = ()  # first match wins
    query: QueryPolicy = QueryPolicy()
    access: AccessRules | None = None  # None: no access rules (the hit path's only check)

    def rule_for(self, path: str) -> CacheRule | None:
        """The first rule matching `path`, or None."""
        for rule in self.rules:
            if rule.matches(path):
                return rule
        return None


@dataclass(frozen=True, slots=True)
class OriginSettings:
    """`[origin]`: how the edge talks to origins. Timeouts are in seconds."""

    connect_timeout: float = 5.0
    first_byte_timeout: float = 30.0
    idle_read_timeout: float = 30.0
    max_connections: int = 512  # for the whole pool; per host it is unlimited
    # Addresses never connected to, whatever a domain's origin names (edge.netguard). Default:
    # none for a standalone edge (its operator wrote the origins), the internal networks for
    # an edge attached to a control plane (its customers did).
    deny: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """`[cache]`: sizes in bytes."""

    memory: int = 256 * 2**20
    # Largest object also kept in memory; bigger ones live on disk only. <= memory.
    memory_max_object: int = 2**20
    disk: int = 10 * 2**30  # byte budget of the disk tier under state_dir/cache; 0 = no disk
    # Largest object stored at all; bigger responses pass through unstored. <= disk. Without a
    # disk tier, memory_max_object is the limit.
    max_object: int = 4 * 2**30
    # A Range request for an object not yet cached fetches only the slices of this size that
    # cover it (a seek into a cold 4 GiB video fetches a few MiB, not 4 GiB). 0: whole objects.
    slice: int = 2**20

    @property
    def largest_stored(self) -> int:
        return self.max_object if self.disk else self.memory_max_object


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """`[edge]`: the edge process itself."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)  # host without brackets; port 0 = any free port
    admin_listen: tuple[str, int] = ("127.0.0.1", 9080)
    # Worker processes; all cores by default (each worker is one event loop on one core).
    workers: int = os.cpu_count() or 1
    # As written in the file; a relative path is relative to the current directory at startup,
    # not to the config file.
    state_dir: str = "var/edge"
    max_header_bytes: int = 16384  # a request head larger than this is answered with 431
    keepalive_timeout: float = 75.0
    request_head_timeout: float = 30.0  # a request head not complete by then: 408
    send_timeout: float = 60.0  # a client that reads nothing of a response for this long is cut
    edge_id: str = socket.gethostname()
    # Without [control], usage batches stay in state_dir/usage; past this many the oldest are
    # deleted (counted: cdn_edge_usage_dropped_batches_total). One batch per 5-minute window
    # at least: the default keeps about 31 days. With [control] nothing is deleted unshipped.
    usage_keep_batches: int = 8928
    # Proxies (CIDR) whose X-Forwarded-For is believed: the client address is then the
    # right-most untrusted entry (edge.access.client_ip). None: always the socket peer.
    trusted_proxies: IpSet | None = None


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """`[control]`: the control plane this edge follows; its domains come from there."""

    url: str  # "http(s)://host[:port][/path]", without a trailing "/"
    token: str = field(repr=False)  # the edge's bearer token: never logged, never in an error
    # Silence (not even a heartbeat) after which the feed is reconnected: 3 heartbeats.
    read_timeout: float = 45.0
    # At start, how long the edge waits for the control plane before it serves its saved state.
    start_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class LogSettings:
    """`[logs]`: access logs (edge.accesslog, edge.logwriter, edge.logship)."""

    enabled: bool = True
    # While log files cannot be written: "serve" keeps serving (lost lines are counted),
    # "refuse" answers 503 and /readyz fails, until writing works again.
    on_log_failure: Literal["serve", "refuse"] = "serve"
    keep_days: int = 7  # shipped files are deleted this long after their hour ended
    retention_days: int = 180  # without [control]: closed files are deleted after this long


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """A whole, validated config file."""

    source: str  # the file it came from
    edge: EdgeSettings
    cache: CacheSettings
    origin: OriginSettings
    # By lowercase name; read-only. Empty with `control`: the control plane's state decides.
    domains: Mapping[str, DomainConfig]
    control: ControlSettings | None = None
    logs: LogSettings = LogSettings()

    def domain_for_host(self, host: str) -> DomainConfig | None:
        """The domain a `Host` header value names, or None.

        Drops the port (including after a bracketed IPv6 literal), lowercases and strips one
        trailing dot, so "Demo.CDN.test.:8080" finds "demo.cdn.test".
        """
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            name = host.partition(":")[0]
        else:  # no port, or a bare IPv6 literal, which no domain can be named anyway
            name = host
        return self.domains.get(_strip_one_dot(name.lower()))


def load_config(path: str | os.PathLike[str]) -> EdgeConfig:
    """Read and validate the config at `path`; a missing or unreadable file is a ConfigError."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError(source, "(file)", exc.strerror or str(exc)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "(file)", f"not UTF-8 text: {exc}") from exc
    return parse_config(text, source)


def parse_config(text: str, source: str) -> EdgeConfig:
    """Validate TOML `text`; `source` names it in errors and in `EdgeConfig.source`."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(toml)", str(exc)) from exc
    try:
        return _parse_document(document, source)
    except InvalidValue as exc:
        raise ConfigError(source, exc.key, exc.problem) from None


_BINARY_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_SIZE = re.compile(r"([0-9]+) ?(B|KiB|MiB|GiB)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+) ?([smhd])")


def parse_size(value: object) -> int:
    """Bytes from an int, or from a string such as "512KiB" or "256 MiB" (binary units only).

    Raises ValueError with a readable message.
    """
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a size: use a whole number of bytes, or one with a B, KiB, MiB "
                "or GiB suffix such as '256MiB' (decimal KB/MB/GB are not accepted)"
            )
        return int(match[1]) * _BINARY_UNITS[match[2]]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is not a size: it is negative")
        return value
    raise ValueError(
        f"{value!r} is not a size: expected an integer or a string such as '256MiB', "
        f"got {_type_name(value)}"
    )


def parse_duration(value: object) -> int:
    """Seconds from an int, or from a string such as "30s", "5m", "2h" or "7d".

    Raises ValueError with a readable message.
    """
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration: use whole seconds, or a whole number with an s, m, "
                "h or d suffix such as '30s' or '7d'"
            )
        return int(match[1]) * _DURATION_UNITS[match[2]]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is not a duration: it is negative")
        return value
    raise ValueError(
        f"{value!r} is not a duration: expected an integer or a string such as '5m', "
        f"got {_type_name(value)}"
    )


# --- validation internals ---------------------------------------------------------------------

_TOP_KEYS = ("edge", "cache", "origin", "domains", "control", "logs")
_LOGS_KEYS = ("enabled", "on_log_failure", "keep_days", "retention_days")
_LOG_FAILURE_MODES: tuple[Literal["serve", "refuse"], ...] = ("serve", "refuse")
_EDGE_KEYS = (
    "listen",
    "admin_listen",
    "workers",
    "state_dir",
    "max_header_bytes",
    "keepalive_timeout",
    "request_head_timeout",
    "send_timeout",
    "edge_id",
    "usage_keep_batches",
    "trusted_proxies",
)
_CACHE_KEYS = ("memory", "memory_max_object", "disk", "max_object", "slice")
_ORIGIN_KEYS = (
    "connect_timeout",
    "first_byte_timeout",
    "idle_read_timeout",
    "max_connections",
    "deny",
)
_CONTROL_KEYS = ("url", "token", "read_timeout", "start_timeout")
TOKEN_ENV = "CDN_EDGE_TOKEN"
_DOMAIN_KEYS = ("name", "origins", "origin_host", "rules", "query", "access")
_RULE_KINDS: tuple[Literal["suffix", "prefix", "path"], ...] = ("suffix", "prefix", "path")
_RULE_KEYS = (*_RULE_KINDS, "ttl", "respect_origin", "slice")
_QUERY_KEYS = ("mode", "params")
_QUERY_MODES: tuple[Literal["keep_all", "ignore_all", "keep", "drop"], ...] = (
    "keep_all",
    "ignore_all",
    "keep",
    "drop",
)

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")
_PORT = re.compile(r"[0-9]{1,5}")
_EDGE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class InvalidValue(Exception):
    """A value that fails validation: `key` names it (`domains[0].origins[1]`), `problem` says
    why. `parse_config` adds the file name to make a ConfigError; the control plane turns it into
    a 422 naming the field."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem


def _parse_document(document: dict[str, object], source: str) -> EdgeConfig:
    _check_keys(document, "", _TOP_KEYS)
    edge = _parse_edge(_table(document, "edge", ""))
    cache = _parse_cache(_table(document, "cache", ""))
    control = _parse_control(_table(document, "control", "")) if "control" in document else None
    origin = _parse_origin(_table(document, "origin", ""), attached=control is not None)
    logs = _parse_logs(_table(document, "logs", ""))

    entries = document.get("domains", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidValue(
            "domains", f"expected an array of tables ([[domains]]), got {_type_name(entries)}"
        )
    if control is not None and entries:
        raise InvalidValue(
            "domains", "must be empty with [control]: the domains come from the control plane"
        )
    if control is None and not entries:
        raise InvalidValue("domains", "at least one [[domains]] entry is required")
    domains: dict[str, DomainConfig] = {}
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        domain = parse_domain(entry, f"domains[{index}]")
        if domain.name in domains:
            raise InvalidValue(
                f"domains[{index}].name",
                f"{domain.name!r} is already defined by domains[{first_index[domain.name]}]",
            )
        domains[domain.name] = domain
        first_index[domain.name] = index
    return EdgeConfig(
        source=source,
        edge=edge,
        cache=cache,
        origin=origin,
        domains=MappingProxyType(domains),
        control=control,
        logs=logs,
    )


def _parse_edge(table: dict[str, object]) -> EdgeSettings:
    _check_keys(table, "edge", _EDGE_KEYS)
    defaults = EdgeSettings()
    listen = _listen_address(table, "listen", "edge", defaults.listen)
    admin_listen = _listen_address(table, "admin_listen", "edge", defaults.admin_listen)
    # Port 0 picks a free port, so only a fixed port can collide.
    if admin_listen == listen and listen[1] != 0:
        raise InvalidValue("edge.admin_listen", "must differ from edge.listen")
    edge_id = _string(table, "edge_id", "edge", defaults.edge_id)
    if "edge_id" in table and not _EDGE_ID.fullmatch(edge_id):
        raise InvalidValue(
            "edge.edge_id", f"{edge_id!r} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    state_dir = _string(table, "state_dir", "edge", defaults.state_dir)
    if not state_dir:
        raise InvalidValue("edge.state_dir", "must not be empty")
    return EdgeSettings(
        listen=listen,
        admin_listen=admin_listen,
        workers=_integer(table, "workers", "edge", defaults.workers, minimum=1),
        state_dir=state_dir,
        max_header_bytes=_size(table, "max_header_bytes", "edge", defaults.max_header_bytes),
        keepalive_timeout=_seconds(table, "keepalive_timeout", "edge", defaults.keepalive_timeout),
        request_head_timeout=_seconds(
            table, "request_head_timeout", "edge", defaults.request_head_timeout
        ),
        send_timeout=_seconds(table, "send_timeout", "edge", defaults.send_timeout),
        edge_id=edge_id,
        usage_keep_batches=_integer(
            table, "usage_keep_batches", "edge", defaults.usage_keep_batches, minimum=1
        ),
        trusted_proxies=(
            _ip_set(table, "trusted_proxies", "edge") if "trusted_proxies" in table else None
        ),
    )


def _parse_cache(table: dict[str, object]) -> CacheSettings:
    _check_keys(table, "cache", _CACHE_KEYS)
    defaults = CacheSettings()
    memory = _size(table, "memory", "cache", defaults.memory)
    memory_max = _size(table, "memory_max_object", "cache", min(defaults.memory_max_object, memory))
    if memory_max > memory:
        raise InvalidValue(
            "cache.memory_max_object",
            f"{memory_max} bytes is more than cache.memory ({memory} bytes)",
        )
    disk = _size(table, "disk", "cache", defaults.disk, allow_zero=True)
    max_object = _size(table, "max_object", "cache", min(defaults.max_object, disk or 1))
    if disk and max_object > disk:
        raise InvalidValue(
            "cache.max_object", f"{max_object} bytes is more than cache.disk ({disk} bytes)"
        )
    slice_size = _size(table, "slice", "cache", defaults.slice, allow_zero=True)
    if slice_size and slice_size < 64 * 1024:
        raise InvalidValue("cache.slice", f"{slice_size} bytes is less than 64KiB")
    return CacheSettings(
        memory=memory,
        memory_max_object=memory_max,
        disk=disk,
        max_object=max_object,
        slice=slice_size,
    )


def _parse_origin(table: dict[str, object], *, attached: bool) -> OriginSettings:
    _check_keys(table, "origin", _ORIGIN_KEYS)
    defaults = OriginSettings()
    deny = INTERNAL_NETWORKS if attached else defaults.deny
    if "deny" in table:
        deny = tuple(
            _network(cidr, f"origin.deny[{index}]")
            for index, cidr in enumerate(_string_list(table, "deny", "origin"))
        )
    return OriginSettings(
        connect_timeout=_seconds(table, "connect_timeout", "origin", defaults.connect_timeout),
        first_byte_timeout=_seconds(
            table, "first_byte_timeout", "origin", defaults.first_byte_timeout
        ),
        idle_read_timeout=_seconds(
            table, "idle_read_timeout", "origin", defaults.idle_read_timeout
        ),
        max_connections=_integer(
            table, "max_connections", "origin", defaults.max_connections, minimum=1
        ),
        deny=deny,
    )


def _network(cidr: str, key: str) -> Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise InvalidValue(key, f"{cidr!r} is not an address or network (CIDR)") from None


def _parse_logs(table: dict[str, object]) -> LogSettings:
    _check_keys(table, "logs", _LOGS_KEYS)
    defaults = LogSettings()
    raw_mode = _string(table, "on_log_failure", "logs", defaults.on_log_failure)
    mode = next((m for m in _LOG_FAILURE_MODES if m == raw_mode), None)
    if mode is None:
        raise InvalidValue(
            "logs.on_log_failure", f"{raw_mode!r} is not one of {', '.join(_LOG_FAILURE_MODES)}"
        )
    return LogSettings(
        enabled=_boolean(table, "enabled", "logs", defaults.enabled),
        on_log_failure=mode,
        keep_days=_integer(table, "keep_days", "logs", defaults.keep_days, minimum=0),
        retention_days=_integer(
            table, "retention_days", "logs", defaults.retention_days, minimum=1
        ),
    )


def _parse_control(table: dict[str, object]) -> ControlSettings:
    _check_keys(table, "control", _CONTROL_KEYS)
    if "url" not in table:
        raise InvalidValue("control.url", "is required")
    url = _string(table, "url", "control", "")
    # The token may be in the URL's user part: never echo such a URL.
    if "@" in url:
        raise InvalidValue("control.url", "must not contain credentials (use control.token)")
    # Nothing of a token may appear in an error, not even its type and value.
    token = table.get("token", os.environ.get(TOKEN_ENV, ""))
    if not isinstance(token, str):
        raise InvalidValue("control.token", "expected a string")
    if not token:
        raise InvalidValue("control.token", f"is required with control.url (or set {TOKEN_ENV})")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidValue("control.token", "must be printable ASCII without spaces")
    defaults = ControlSettings(url="", token="")
    return ControlSettings(
        url=_origin_url(url, "control.url", allow_path=True),
        token=token,
        read_timeout=_seconds(table, "read_timeout", "control", defaults.read_timeout),
        start_timeout=_seconds(table, "start_timeout", "control", defaults.start_timeout),
    )


def parse_domain(table: dict[str, object], prefix: str) -> DomainConfig:
    """One `[[domains]]` table (from TOML, or JSON from the control plane); InvalidValue names
    the first bad key under `prefix`."""
    _check_keys(table, prefix, _DOMAIN_KEYS)
    if "name" not in table:
        raise InvalidValue(f"{prefix}.name", "is required")
    raw_name = _string(table, "name", prefix, "")
    name = _strip_one_dot(raw_name.lower())
    problem = _dns_name_problem(name)
    if problem:
        raise InvalidValue(f"{prefix}.name", f"{raw_name!r} is not a valid domain name: {problem}")

    if "origins" not in table:
        raise InvalidValue(f"{prefix}.origins", "is required")
    raw_origins = _string_list(table, "origins", prefix)
    if not raw_origins:
        raise InvalidValue(f"{prefix}.origins", "at least one origin is required")
    origins = tuple(
        _origin_url(url, f"{prefix}.origins[{index}]") for index, url in enumerate(raw_origins)
    )

    origin_host = None
    if "origin_host" in table:
        origin_host = _origin_host(_string(table, "origin_host", prefix, ""), prefix)

    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise InvalidValue(
            f"{prefix}.rules",
            f"expected an array of tables ([[domains.rules]]), got {_type_name(raw_rules)}",
        )
    rules = tuple(
        _parse_rule(rule, f"{prefix}.rules[{index}]") for index, rule in enumerate(raw_rules)
    )

    query = QueryPolicy()
    if "query" in table:
        query = _parse_query(_table(table, "query", prefix), f"{prefix}.query")

    access = None
    if "access" in table:
        access = _parse_access(_table(table, "access", prefix), f"{prefix}.access")

    return DomainConfig(
        name=name, origins=origins, origin_host=origin_host, rules=rules, query=query,
        access=access,
    )


def _parse_rule(table: dict[str, object], prefix: str) -> CacheRule:
    _check_keys(table, prefix, _RULE_KEYS)
    kinds = [kind for kind in _RULE_KINDS if kind in table]
    if len(kinds) != 1:
        found = f"got {', '.join(kinds)}" if kinds else "got none"
        raise InvalidValue(prefix, f"needs exactly one of suffix, prefix, path ({found})")
    kind = kinds[0]
    raw_values = _string_list(table, kind, prefix)
    if not raw_values:
        raise InvalidValue(f"{prefix}.{kind}", "must list at least one value")
    values = tuple(
        _rule_value(kind, value, f"{prefix}.{kind}[{index}]")
        for index, value in enumerate(raw_values)
    )

    ttl = None
    if "ttl" in table:
        try:
            ttl = parse_duration(table["ttl"])
        except ValueError as exc:
            raise InvalidValue(f"{prefix}.ttl", str(exc)) from None
    respect_origin = _boolean(table, "respect_origin", prefix, True)
    if not respect_origin and ttl is None:
        raise InvalidValue(
            f"{prefix}.respect_origin", "false needs a ttl to override the origin's freshness with"
        )
    slice_size = _size(table, "slice", prefix, 0) or None
    if slice_size is not None and slice_size < 64 * 1024:
        raise InvalidValue(f"{prefix}.slice", f"{slice_size} bytes is less than 64KiB")
    return CacheRule(
        kind=kind, values=values, ttl=ttl, respect_origin=respect_origin, slice=slice_size
    )


def _rule_value(kind: str, value: str, key: str) -> str:
    if kind == "suffix":
        if len(value) < 2 or not value.startswith(".") or "/" in value:
            raise InvalidValue(key, f"{value!r} is not a suffix: it must look like '.jpg'")
        return value.lower()
    if not value.startswith("/"):
        raise InvalidValue(key, f"{value!r} must start with '/'")
    # Rules see the path without its query, so such a value could never match.
    if "?" in value or "#" in value:
        raise InvalidValue(key, f"{value!r} must not contain '?' or '#'")
    return value


def _parse_query(table: dict[str, object], prefix: str) -> QueryPolicy:
    _check_keys(table, prefix, _QUERY_KEYS)
    raw_mode = _string(table, "mode", prefix, "keep_all")
    mode = next((m for m in _QUERY_MODES if m == raw_mode), None)
    if mode is None:
        raise InvalidValue(
            f"{prefix}.mode", f"{raw_mode!r} is not one of {', '.join(_QUERY_MODES)}"
        )
    params = tuple(_string_list(table, "params", prefix)) if "params" in table else ()
    if mode in ("keep", "drop"):
        if not params:
            raise InvalidValue(f"{prefix}.params", f"mode {mode!r} needs a non-empty params list")
    elif "params" in table:
        raise InvalidValue(f"{prefix}.params", f"not allowed with mode {mode!r}")
    for index, param in enumerate(params):
        if not param or "&" in param or "=" in param:
            raise InvalidValue(
                f"{prefix}.params[{index}]", f"{param!r} is not a query parameter name"
            )
    return QueryPolicy(mode=mode, params=params)


# --- access rules (issue 7; the rules themselves are edge.access, edge.signing, edge.ratelimit) --

_ACCESS_KEYS = ("signed_url", "referer", "ip", "user_agent", "rate_limit", "speed_limits")
_SIGNED_KEYS = (
    "type", "key", "secondary_key", "ttl", "param", "time_param", "form", "time_format"
)
# Per type: the parameter names it uses, with their defaults.
_SIGNED_PARAMS = {"A": {"param": "auth_key"}, "C": {"param": "sign", "time_param": "t"},
                  "D": {"param": "sign", "time_param": "t"}}
_LIST_KEYS = ("allow", "deny")
_SPEED_KEYS = (*_RULE_KINDS, "rate", "after")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.~-]{1,64}")
_Rule = TypeVar("_Rule")


def _parse_access(table: dict[str, object], prefix: str) -> AccessRules | None:
    """The `access` table of a domain; None when it sets no rule at all."""
    _check_keys(table, prefix, _ACCESS_KEYS)

    def sub(name: str, parse: Callable[[dict[str, object], str], _Rule]) -> _Rule | None:
        if name not in table:
            return None
        return parse(_table(table, name, prefix), f"{prefix}.{name}")

    raw_speed = table.get("speed_limits", [])
    if not isinstance(raw_speed, list) or not all(isinstance(r, dict) for r in raw_speed):
        raise InvalidValue(
            f"{prefix}.speed_limits",
            f"expected an array of tables ([[...speed_limits]]), got {_type_name(raw_speed)}",
        )
    rules = AccessRules(
        signed_url=sub("signed_url", _parse_signed),
        referer=sub("referer", _parse_referer),
        ip=sub("ip", _parse_ip_rule),
        user_agent=sub("user_agent", _parse_user_agent),
        rate_limit=sub("rate_limit", _parse_rate_limit),
        speed_limits=tuple(
            _parse_speed_limit(item, f"{prefix}.speed_limits[{index}]")
            for index, item in enumerate(raw_speed)
        ),
    )
    return None if rules == AccessRules() else rules


def _parse_referer(table: dict[str, object], prefix: str) -> RefererRule:
    _check_keys(table, prefix, (*_LIST_KEYS, "allow_empty"))
    mode, patterns = _allow_or_deny(table, prefix)
    for index, pattern in enumerate(patterns):
        problem = _referer_pattern_problem(pattern)
        if problem:
            raise InvalidValue(f"{prefix}.{mode}[{index}]", f"{pattern!r} {problem}")
    allow_empty = _boolean(table, "allow_empty", prefix, True)
    return RefererRule(mode, tuple(p.lower() for p in patterns), allow_empty)


def _parse_ip_rule(table: dict[str, object], prefix: str) -> IpRule:
    _check_keys(table, prefix, _LIST_KEYS)
    mode, _ = _allow_or_deny(table, prefix)
    return IpRule(mode, _ip_set(table, mode, prefix))


def _parse_user_agent(table: dict[str, object], prefix: str) -> UserAgentRule:
    _check_keys(table, prefix, _LIST_KEYS)
    mode, patterns = _allow_or_deny(table, prefix)
    for index, pattern in enumerate(patterns):
        if not pattern or not pattern.isprintable():
            raise InvalidValue(f"{prefix}.{mode}[{index}]", "must be a non-empty printable pattern")
    return UserAgentRule(mode, tuple(patterns))


def _parse_rate_limit(table: dict[str, object], prefix: str) -> RateLimit:
    _check_keys(table, prefix, ("rate", "burst"))
    if "rate" not in table:
        raise InvalidValue(f"{prefix}.rate", "is required (requests per second)")
    rate = table["rate"]
    if (
        not isinstance(rate, int | float)
        or isinstance(rate, bool)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise InvalidValue(
            f"{prefix}.rate", f"{_type_name(rate)} is not a positive number of requests per second"
        )
    burst = _integer(table, "burst", prefix, max(1, math.ceil(rate)), minimum=1)
    return RateLimit(float(rate), burst)


def _parse_signed(table: dict[str, object], prefix: str) -> SignedUrl:
    _check_keys(table, prefix, _SIGNED_KEYS)
    if "type" not in table:
        raise InvalidValue(f"{prefix}.type", f"is required: one of {', '.join(KINDS)}")
    kind = next((k for k in KINDS if k == table["type"]), None)
    if kind is None:
        raise InvalidValue(
            f"{prefix}.type",
            f"{_type_name(table['type'])} is not a signing type: one of {', '.join(KINDS)}",
        )
    keys = []
    for name in ("key", "secondary_key"):
        if name not in table:
            if name == "key":
                raise InvalidValue(f"{prefix}.key", "is required")
            continue
        # Never echo a key, not even a wrong one.
        value = table[name]
        if not isinstance(value, str):
            raise InvalidValue(f"{prefix}.{name}", "expected a string")
        if not value:
            raise InvalidValue(f"{prefix}.{name}", "must not be empty")
        if not value.isascii() or not value.isprintable() or len(value) > 128:
            raise InvalidValue(f"{prefix}.{name}", "must be 1-128 printable ASCII characters")
        keys.append(value)
    ttl = DEFAULT_TTL
    if "ttl" in table:
        try:
            ttl = parse_duration(table["ttl"])
        except ValueError as exc:
            raise InvalidValue(f"{prefix}.ttl", str(exc)) from None
    form = _string(table, "form", prefix, "path")
    if form not in ("path", "query"):
        raise InvalidValue(f"{prefix}.form", f"{form!r} is not one of path, query")
    time_format = _string(table, "time_format", prefix, "dec")
    if time_format not in ("dec", "hex"):
        raise InvalidValue(f"{prefix}.time_format", f"{time_format!r} is not one of dec, hex")
    if "form" in table and kind != "C":
        raise InvalidValue(f"{prefix}.form", f"only for type C, not {kind}")
    if "time_format" in table and kind != "D":
        raise InvalidValue(f"{prefix}.time_format", f"only for type D, not {kind}")
    used = _SIGNED_PARAMS.get(kind, {}) if kind != "C" or form == "query" else {}
    names = {}
    for name in ("param", "time_param"):
        if name in table and name not in used:
            raise InvalidValue(f"{prefix}.{name}", f"not used by type {kind} in this form")
        if name in used:
            value = _string(table, name, prefix, used[name])
            if not _PARAM_NAME.fullmatch(value):
                raise InvalidValue(
                    f"{prefix}.{name}",
                    f"{value!r} is not a query parameter name (A-Z a-z 0-9 _.~-)",
                )
            names[name] = value
    if names.get("param") is not None and names.get("param") == names.get("time_param"):
        raise InvalidValue(f"{prefix}.time_param", "must differ from param")
    return SignedUrl(
        kind,
        tuple(keys),
        ttl,
        param=names.get("param", ""),
        time_param=names.get("time_param", ""),
        form="query" if form == "query" else "path",
        time_format="hex" if time_format == "hex" else "dec",
    )


def _allow_or_deny(
    table: dict[str, object], prefix: str
) -> tuple[Literal["allow", "deny"], list[str]]:
    given = [name for name in _LIST_KEYS if name in table]
    if len(given) != 1:
        problem = "both given" if given else "neither given"
        raise InvalidValue(prefix, f"needs exactly one of allow, deny ({problem})")
    mode: Literal["allow", "deny"] = "allow" if given[0] == "allow" else "deny"
    values = _string_list(table, mode, prefix)
    if not values:
        raise InvalidValue(f"{prefix}.{mode}", "must list at least one value")
    return mode, values


def _ip_set(table: dict[str, object], name: str, prefix: str) -> IpSet:
    values = _string_list(table, name, prefix)
    for index, value in enumerate(values):
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise InvalidValue(
                f"{_join(prefix, name)}[{index}]", f"{value!r} is not an IP address or CIDR network"
            ) from None
    return IpSet(values)


def _parse_speed_limit(table: dict[str, object], prefix: str) -> SpeedLimit:
    _check_keys(table, prefix, _SPEED_KEYS)
    kinds = [kind for kind in _RULE_KINDS if kind in table]
    if len(kinds) > 1:
        raise InvalidValue(prefix, f"at most one of suffix, prefix, path (got {', '.join(kinds)})")
    match = None
    if kinds:
        kind = kinds[0]
        raw_values = _string_list(table, kind, prefix)
        if not raw_values:
            raise InvalidValue(f"{prefix}.{kind}", "must list at least one value")
        values = tuple(
            _rule_value(kind, value, f"{prefix}.{kind}[{index}]")
            for index, value in enumerate(raw_values)
        )
        match = CacheRule(kind=kind, values=values, ttl=None)
    if "rate" not in table:
        raise InvalidValue(f"{prefix}.rate", "is required (bytes per second, e.g. '512KiB')")
    rate = _size(table, "rate", prefix, 0)
    if rate < 1024:
        raise InvalidValue(f"{prefix}.rate", f"{rate} bytes per second is less than 1KiB")
    return SpeedLimit(rate, _size(table, "after", prefix, 0, allow_zero=True), match)


def access_table(rules: AccessRules) -> dict[str, object]:
    """`rules` as the `access` table `parse_domain` reads back to the same rules (for the
    control plane: what it stores and sends to edges). Holds the signing keys."""
    table: dict[str, object] = {}
    signed = rules.signed_url
    if signed is not None:
        entry: dict[str, object] = {"type": signed.kind, "key": signed.keys[0]}
        if len(signed.keys) > 1:
            entry["secondary_key"] = signed.keys[1]
        if signed.ttl != DEFAULT_TTL:
            entry["ttl"] = signed.ttl
        for name in ("param", "time_param"):
            if getattr(signed, name):
                entry[name] = getattr(signed, name)
        if signed.kind == "C":
            entry["form"] = signed.form
        if signed.kind == "D":
            entry["time_format"] = signed.time_format
        table["signed_url"] = entry
    if rules.referer is not None:
        table["referer"] = {
            rules.referer.mode: list(rules.referer.patterns),
            "allow_empty": rules.referer.allow_empty,
        }
    if rules.ip is not None:
        table["ip"] = {rules.ip.mode: list(rules.ip.networks.networks)}
    if rules.user_agent is not None:
        table["user_agent"] = {rules.user_agent.mode: list(rules.user_agent.patterns)}
    if rules.rate_limit is not None:
        rate = rules.rate_limit.rate
        table["rate_limit"] = {
            "rate": int(rate) if rate.is_integer() else rate,
            "burst": rules.rate_limit.burst,
        }
    if rules.speed_limits:
        limits = []
        for limit in rules.speed_limits:
            item: dict[str, object] = {"rate": limit.rate}
            if limit.after:
                item["after"] = limit.after
            if limit.match is not None:
                item[limit.match.kind] = list(limit.match.values)
            limits.append(item)
        table["speed_limits"] = limits
    return table


def _origin_url(url: str, key: str, *, allow_path: bool = False) -> str:
    """`url` normalised to "scheme://host[:port]" (plus the path without a trailing "/" if
    `allow_path`), or InvalidValue saying what is wrong."""
    # urlsplit silently drops some whitespace and treats "?" / "#" as empty parts: check first.
    if any(c.isspace() for c in url) or "?" in url or "#" in url:
        raise InvalidValue(key, f"{url!r} must not contain whitespace, a query or a fragment")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" around an IPv6 address
        raise InvalidValue(key, f"{url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not url.lower().startswith(parts.scheme + "://"):
        raise InvalidValue(key, f"{url!r} is not an http:// or https:// URL")
    if parts.path not in ("", "/") and not allow_path:
        raise InvalidValue(key, f"{url!r} must not have a path")
    if "@" in parts.netloc:
        raise InvalidValue(key, f"{url!r} must not contain credentials")
    try:
        port = parts.port
    except ValueError:
        raise InvalidValue(key, f"{url!r} has an invalid port") from None
    if port == 0:
        raise InvalidValue(key, f"{url!r} has an invalid port")
    host = parts.hostname or ""
    problem = _host_problem(host, bracketed=parts.netloc.startswith("["))
    if problem:
        raise InvalidValue(key, f"{url!r} has an invalid host: {problem}")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = parts.path.rstrip("/") if allow_path else ""
    return f"{parts.scheme}://{netloc}{path}"


def _origin_host(value: str, prefix: str) -> str:
    """A Host header value: a host name or IP literal, with an optional port, lowercased."""
    if "/" in value:
        raise InvalidValue(
            f"{prefix}.origin_host", f"{value!r} must be a host with an optional port, not a URL"
        )
    try:
        _, port = _split_host_port(value, port_required=False)
    except ValueError as exc:
        raise InvalidValue(f"{prefix}.origin_host", f"{value!r} {exc}") from None
    if port == 0:
        raise InvalidValue(f"{prefix}.origin_host", f"{value!r} has an invalid port")
    return value.lower()


def _listen_address(
    table: dict[str, object], name: str, prefix: str, default: tuple[str, int]
) -> tuple[str, int]:
    if name not in table:
        return default
    value = _string(table, name, prefix, "")
    try:
        host, port = _split_host_port(value, port_required=True)
    except ValueError as exc:
        raise InvalidValue(f"{prefix}.{name}", f"{value!r} {exc}") from None
    assert port is not None  # port_required
    return host, port


def _split_host_port(value: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split "host:port" / "[v6]:port" (the port optional unless `port_required`).

    Raises ValueError with a message meant to follow the quoted value.
    """
    hint = "is not host:port (use [addr]:port for IPv6)"
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(hint)
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:
        raise ValueError(hint)
    elif ":" in value:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, None
    if port_text is None and port_required:
        raise ValueError(hint)
    problem = _host_problem(host.lower(), bracketed=value.startswith("["))
    if problem:
        raise ValueError(f"has an invalid host: {problem}")
    if port_text is None:
        return host.lower(), None
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError("has an invalid port: it must be 0-65535")
    return host.lower(), int(port_text)


def _host_problem(host: str, *, bracketed: bool) -> str:
    """Why `host` (lowercase, brackets removed) is not a host name or IP literal; "" if it is."""
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
        return ""
    if _DOTTED_NUMBERS.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not an IPv4 address"
        return ""
    return _dns_name_problem(host)


def _dns_name_problem(name: str) -> str:
    """Why lowercase `name` is not a DNS name; "" if it is."""
    if not name:
        return "it is empty"
    if len(name) > 253:
        return "it is longer than 253 characters"
    for label in name.split("."):
        if not _DNS_LABEL.fullmatch(label):
            return (
                f"label {label!r} must be 1-63 characters of a-z, 0-9 and '-', "
                "not starting or ending with '-'"
            )
    return ""


def _strip_one_dot(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


# --- typed access to TOML tables ---------------------------------------------------------------


def _check_keys(table: Mapping[str, object], prefix: str, allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(allowed)}"
            )
            raise InvalidValue(_join(prefix, key), f"unknown key ({hint})")


def _join(prefix: str, key: str) -> str:
    # Quote keys the way TOML would need them, so odd characters cannot break the one-line error.
    shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{prefix}.{shown}" if prefix else shown


def _table(table: Mapping[str, object], name: str, prefix: str) -> dict[str, object]:
    value = table.get(name, {})
    if not isinstance(value, dict):
        raise InvalidValue(_join(prefix, name), f"expected a table, got {_type_name(value)}")
    return value


def _string(table: Mapping[str, object], name: str, prefix: str, default: str) -> str:
    value = table.get(name, default)
    if not isinstance(value, str):
        raise InvalidValue(_join(prefix, name), f"expected a string, got {_type_name(value)}")
    return value


def _string_list(table: Mapping[str, object], name: str, prefix: str) -> list[str]:
    value = table.get(name)
    if not isinstance(value, list):
        raise InvalidValue(
            _join(prefix, name), f"expected an array of strings, got {_type_name(value)}"
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidValue(
                f"{_join(prefix, name)}[{index}]", f"expected a string, got {_type_name(item)}"
            )
    return value


def _boolean(table: Mapping[str, object], name: str, prefix: str, default: bool) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise InvalidValue(_join(prefix, name), f"expected true or false, got {_type_name(value)}")
    return value


def _integer(
    table: Mapping[str, object], name: str, prefix: str, default: int, *, minimum: int
) -> int:
    value = table.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidValue(_join(prefix, name), f"expected an integer, got {_type_name(value)}")
    if value < minimum:
        raise InvalidValue(_join(prefix, name), f"{value} is less than {minimum}")
    return value


def _seconds(table: Mapping[str, object], name: str, prefix: str, default: float) -> float:
    """A positive, finite number of seconds (int or float)."""
    value = table.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidValue(
            _join(prefix, name), f"expected seconds as a number, got {_type_name(value)}"
        )
    if not math.isfinite(value) or value <= 0:
        raise InvalidValue(_join(prefix, name), f"{value} is not a positive number of seconds")
    return float(value)


def _size(
    table: Mapping[str, object], name: str, prefix: str, default: int, *, allow_zero: bool = False
) -> int:
    """A size in bytes, positive unless `allow_zero`."""
    if name not in table:
        return default
    try:
        size = parse_size(table[name])
    except ValueError as exc:
        raise InvalidValue(_join(prefix, name), str(exc)) from None
    if size == 0 and not allow_zero:
        raise InvalidValue(_join(prefix, name), "must be more than 0 bytes")
    return size


def _type_name(value: object) -> str:
    """The TOML name of `value`'s type, with the value when short, for error messages."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    name = names.get(type(value), "table" if isinstance(value, dict) else "date/time")
    if isinstance(value, dict | list):
        return name
    shown = json.dumps(value) if isinstance(value, str) else repr(value)
    return f"{name} {shown}" if len(shown) <= 40 else name
