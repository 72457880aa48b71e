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

from control.db import async_url
from edge.config import ConfigError, parse_duration

ADMIN_TOKEN_ENV = "CDN_ADMIN_TOKEN"

_KEYS = ("listen", "database", "admin_token", "cname_suffix", "heartbeat", "change_log_keep")
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

    def __repr__(self) -> str:
        # The admin token must never reach a log or a traceback through a repr.
        return (
            f"ControlConfig(source={self.source!r}, listen={self.listen!r}, "
            f"database={self.database!r}, cname_suffix={self.cname_suffix!r})"
        )


def load_config(path: str | os.PathLike[str]) -> ControlConfig:
    """Read and validate the file at `path`; the admin token may come from `CDN_ADMIN_TOKEN`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, "(file)", exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "(file)", f"not UTF-8 text: {exc}") from exc
    return parse_config(text, source, env=os.environ)


def parse_config(text: str, source: str, *, env: Mapping[str, str]) -> ControlConfig:
    """Validate TOML `text`; `env` supplies `CDN_ADMIN_TOKEN` when the file has no token."""
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
    if not admin_token:
        raise fail(
            "control.admin_token",
            f"is empty: set it here or in the environment variable {ADMIN_TOKEN_ENV} "
            "(the operator's token; the control plane has no other way in)",
        )
    if any(c.isspace() for c in admin_token):
        raise fail("control.admin_token", "must not contain whitespace (it is a bearer token)")

    if "cname_suffix" not in table:
        raise fail("control.cname_suffix", "is required (domains get CNAME <name>.<cname_suffix>)")
    cname_suffix = string("cname_suffix", "").lower().removesuffix(".")
    if not _DNS_NAME.fullmatch(cname_suffix):
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

    return ControlConfig(
        source=source,
        admin_token=admin_token,
        cname_suffix=cname_suffix,
        listen=listen,
        database=database,
        heartbeat=seconds("heartbeat", defaults.heartbeat),
        change_log_keep=seconds("change_log_keep", defaults.change_log_keep),
    )


def _listen(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)
