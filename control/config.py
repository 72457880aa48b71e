"""Load and validate the control plane's TOML configuration (`[control]`, see control/README.md).

Problems are `edge.config.ConfigError`s, so `cdn control` reports a bad file exactly as `cdn edge`
does: one line naming the file, the key and what is wrong, exit code 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_network

from control.db import async_url
from control.digits import parse_digits
from edge.config import ConfigError, parse_duration, parse_size
from edge.netguard import INTERNAL_NETWORKS, Network

ADMIN_TOKEN_ENV = "CDN_ADMIN_TOKEN"
SECRET_KEY_ENV = "CDN_SECRET_KEY"

# Origins at these addresses are refused: edges would fetch from their own host or network for
# anyone who adds a domain (loopback, link-local with the cloud metadata service, unspecified,
# multicast, RFC 1918, unique local, carrier-grade NAT).
ORIGIN_DENY: tuple[Network, ...] = INTERNAL_NETWORKS

_KEYS = (
    "listen",
    "database",
    "admin_token",
    "cname_suffix",
    "heartbeat",
    "change_log_keep",
    "origin_deny",
    "secret_key",
    "arrears_grace",
    "settle_every",
    "log_dir",
    "log_max_upload",
    "log_retention_days",
    "log_retention_floor_days",
    "log_retention_every",
)
# Retention settings are whole days, at most 100 years.
MAX_LOG_DAYS = 36500
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z][a-z0-9-]*[a-z0-9]"
)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """A whole, validated `[control]` table. Durations are in seconds."""

    source: str
    admin_token: str
    cname_suffix: str
    listen: tuple[str, int] = ("127.0.0.1", 9000)
    database: str = "sqlite:///var/control.db"
    heartbeat: float = 15.0
    change_log_keep: float = 7 * 86400.0
    # Billing: how long an account may be in arrears before its domains are suspended (4.3,
    # 5.2b), and how often the scheduler looks for days to settle.
    arrears_grace: float = 86400.0
    settle_every: float = 60.0
    origin_deny: tuple[Network, ...] = ORIGIN_DENY
    # Encrypts webhook secrets at rest; empty: accounts cannot set a webhook.
    secret_key: str = ""
    # Access logs (issue 6): where the local log store keeps the edges' pieces, the largest
    # piece accepted, the default retention, the legal floor no retention or delete request
    # goes below, and how often the retention job runs.
    log_dir: str = "var/logs"
    log_max_upload: int = 4 * 2**30
    log_retention_days: int = 180
    log_retention_floor_days: int = 180
    log_retention_every: float = 3600.0

    def __repr__(self) -> str:
        # The admin token must never reach a log or a traceback through a repr.
        return (
            f"ControlConfig(source={self.source!r}, listen={self.listen!r}, "
            f"database={self.database!r}, cname_suffix={self.cname_suffix!r})"
        )


def load_config(path: str | os.PathLike[str], *, serving: bool = True) -> ControlConfig:
    """Read and validate the file at `path`; the admin token may come from `CDN_ADMIN_TOKEN`;
    `serving` as in `parse_config`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, "(file)", exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "(file)", f"not UTF-8 text: {exc}") from exc
    return parse_config(text, source, env=os.environ, serving=serving)


def parse_config(
    text: str, source: str, *, env: Mapping[str, str], serving: bool = True
) -> ControlConfig:
    """Validate TOML `text`; `env` supplies `CDN_ADMIN_TOKEN` when the file has no token.

    `serving=False` is for the jobs run by hand (`cdn control settle`, `logs-retention`): they
    serve no API, so the admin token and `cname_suffix`, which only the API uses, may be absent
    (either is still checked when given). The server always requires both."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(toml)", str(exc)) from exc

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(source, key, problem)

    unknown = sorted(set(document) - {"control"})
    if unknown:
        raise fail(unknown[0], "unknown key (the control plane reads only [control])")
    table = document.get("control")
    if not isinstance(table, dict):
        raise fail("control", "a [control] table is required")
    for key in table:
        if key not in _KEYS:
            raise fail(f"control.{key}", f"unknown key; known keys: {', '.join(_KEYS)}")

    def string(key: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            raise fail(f"control.{key}", f"expected a string, got {type(value).__name__}")
        return value

    defaults = ControlConfig(source=source, admin_token="", cname_suffix="")
    listen = _listen(string("listen", "127.0.0.1:9000"))
    if listen is None:
        raise fail("control.listen", f"{table['listen']!r} is not HOST:PORT (port 0-65535)")

    database = string("database", defaults.database)
    try:
        async_url(database)
    except ValueError as exc:
        raise fail("control.database", str(exc)) from None

    admin_token = string("admin_token", "") or env.get(ADMIN_TOKEN_ENV, "")
    if not admin_token and serving:
        raise fail(
            "control.admin_token",
            f"is empty: set it here or in the environment variable {ADMIN_TOKEN_ENV} "
            "(the operator's token; the control plane has no other way in)",
        )
    if any(c.isspace() for c in admin_token):
        raise fail("control.admin_token", "must not contain whitespace (it is a bearer token)")

    secret_key = string("secret_key", "") or env.get(SECRET_KEY_ENV, "")
    if secret_key and len(secret_key) < 32:
        raise fail("control.secret_key", "is too short: use at least 32 random characters")

    if "cname_suffix" not in table and serving:
        raise fail("control.cname_suffix", "is required (domains get CNAME <name>.<cname_suffix>)")
    cname_suffix = string("cname_suffix", "").lower().removesuffix(".")
    if "cname_suffix" in table and not _DNS_NAME.fullmatch(cname_suffix):
        raise fail("control.cname_suffix", f"{table['cname_suffix']!r} is not a DNS name")

    def seconds(key: str, default: float) -> float:
        if key not in table:
            return default
        try:
            value = parse_duration(table[key])
        except ValueError as exc:
            raise fail(f"control.{key}", str(exc)) from None
        if value <= 0:
            raise fail(f"control.{key}", "must be more than 0 seconds")
        return float(value)

    def networks(key: str) -> tuple[Network, ...]:
        raw = table[key]
        if not isinstance(raw, list):
            raise fail(f"control.{key}", f"expected a list of CIDRs, got {type(raw).__name__}")
        found = []
        for index, cidr in enumerate(raw):
            network = _network(cidr)
            if network is None:
                raise fail(
                    f"control.{key}[{index}]", f"{cidr!r} is not a CIDR such as '10.0.0.0/8'"
                )
            found.append(network)
        return tuple(found)

    def days(key: str, default: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOG_DAYS:
            raise fail(
                f"control.{key}", f"expected whole days from 0 to {MAX_LOG_DAYS}, got {value!r}"
            )
        return value

    log_dir = string("log_dir", defaults.log_dir)
    if not log_dir:
        raise fail("control.log_dir", "must name a directory")
    log_max_upload = defaults.log_max_upload
    if "log_max_upload" in table:
        try:
            log_max_upload = parse_size(table["log_max_upload"])
        except ValueError as exc:
            raise fail("control.log_max_upload", str(exc)) from None
        if log_max_upload <= 0:
            raise fail("control.log_max_upload", "must be more than 0 bytes")
    floor_days = days("log_retention_floor_days", defaults.log_retention_floor_days)
    retention_days = days("log_retention_days", defaults.log_retention_days)
    if retention_days < floor_days:
        raise fail(
            "control.log_retention_days",
            f"{retention_days} is below log_retention_floor_days ({floor_days}), the legal minimum",
        )

    return ControlConfig(
        source=source,
        admin_token=admin_token,
        cname_suffix=cname_suffix,
        listen=listen,
        database=database,
        heartbeat=seconds("heartbeat", defaults.heartbeat),
        change_log_keep=seconds("change_log_keep", defaults.change_log_keep),
        arrears_grace=seconds("arrears_grace", defaults.arrears_grace),
        settle_every=seconds("settle_every", defaults.settle_every),
        origin_deny=networks("origin_deny") if "origin_deny" in table else ORIGIN_DENY,
        secret_key=secret_key,
        log_dir=log_dir,
        log_max_upload=log_max_upload,
        log_retention_days=retention_days,
        log_retention_floor_days=floor_days,
        log_retention_every=seconds("log_retention_every", defaults.log_retention_every),
    )


def _listen(value: str) -> tuple[str, int] | None:
    host, sep, raw_port = value.rpartition(":")
    port = parse_digits(raw_port, 5)
    if not sep or port is None or port > 65535:
        return None
    return host.strip("[]") or "127.0.0.1", port


def _network(value: object) -> Network | None:
    """A CIDR string as a network (host bits ignored), or None; ip_network alone would also
    take an integer as an address."""
    if not isinstance(value, str):
        return None
    try:
        return ip_network(value, strict=False)
    except ValueError:
        return None
