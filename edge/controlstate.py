"""The control plane's truth as a worker enforces it (control/README.md): pure, no I/O.

A STATE (the feed's snapshot) becomes an immutable `ControlState`; each change makes a new one
(`apply`), so the request path swaps one reference and never sees half a change. Alongside the
raw table it holds what the request path reads: `serving` (Host -> config: active and
suspended domains) and `gates` (only the domains that are suspended or have blocked paths, so
that an open domain costs one failed dict lookup, and no gates at all cost nothing).

What a change asks a worker to remove comes back as `Purge` instructions; anything malformed
comes back as `problems` to log, never as an exception: a bad entry from the control plane must
not take a worker down (a domain `parse_domain` refuses is served as absent, 404).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from edge.cachekey import cache_key, normalize_path
from edge.config import DomainConfig, InvalidValue, parse_domain

STATES = ("active", "suspended", "terminated")
_BAD = (InvalidValue, KeyError, TypeError, ValueError, AttributeError)


@dataclass(frozen=True, slots=True)
class DomainEntry:
    name: str
    config: DomainConfig | None  # None: parse_domain refused it (served as absent)
    state: str  # one of STATES
    reason: str


@dataclass(frozen=True, slots=True)
class Gate:
    """Admission for a served domain that is not plainly open: suspended, or blocks."""

    suspended: str | None  # the reason, when suspended
    exact: Mapping[str, str]  # canonical path -> block reason
    prefixes: tuple[tuple[str, str], ...]  # (canonical path prefix, block reason)

    def refusal(self, path: str) -> tuple[int, str] | None:
        """(status, body text) refusing a request for `path` (no query), or None to serve.
        The path is made canonical first, as an origin would resolve it, so that neither
        %-escapes nor dot segments nor doubled slashes step around a block."""
        if self.suspended is not None:
            return 403, _with_reason("domain suspended", self.suspended)
        path = canonical_path(path)
        reason = self.exact.get(path)
        if reason is None:
            reason = next((r for prefix, r in self.prefixes if path.startswith(prefix)), None)
            if reason is None:
                return None
        return 451, _with_reason("unavailable for legal reasons", reason)


@dataclass(frozen=True, slots=True)
class Purge:
    """Cached objects a change removes, by cache key: `url` the objects of one key (its
    variants and slices), `prefix` every key starting with `key` (a domain purge is the prefix
    "name/"), `tag` the objects of the domain whose keys start with `key` tagged `tag`."""

    kind: Literal["url", "prefix", "tag"]
    key: str
    tag: str = ""


EVERYTHING = Purge("prefix", "")  # every object of every domain


@dataclass(frozen=True, slots=True)
class ControlState:
    version: int
    domains: Mapping[str, DomainEntry]
    blocks: Mapping[str, Mapping[str, str]]  # domain -> pattern -> reason
    serving: Mapping[str, DomainConfig]  # what routes: active and suspended, valid config
    gates: Mapping[str, Gate]  # only domains needing admission checks


@dataclass(frozen=True, slots=True)
class Applied:
    """The state after a change, what the worker must remove, and what to log."""

    state: ControlState
    purges: tuple[Purge, ...] = ()
    problems: tuple[str, ...] = ()


def build(
    version: int, domains: Mapping[str, DomainEntry], blocks: Mapping[str, Mapping[str, str]]
) -> ControlState:
    """A state with its request-path tables derived (rebuilt whole: changes are rare)."""
    serving: dict[str, DomainConfig] = {}
    gates: dict[str, Gate] = {}
    for name, entry in domains.items():
        if entry.config is None or entry.state == "terminated":
            continue
        serving[name] = entry.config
        patterns = blocks.get(name, {})
        if entry.state == "suspended" or patterns:
            exact = {
                canonical_path(p.partition("?")[0]): r
                for p, r in patterns.items()
                if not p.endswith("*")
            }
            prefixes = tuple(
                (_canonical_prefix(p[:-1].partition("?")[0]), r)
                for p, r in patterns.items()
                if p.endswith("*")
            )
            suspended = entry.reason if entry.state == "suspended" else None
            gates[name] = Gate(suspended, MappingProxyType(exact), prefixes)
    return ControlState(
        version,
        MappingProxyType(dict(domains)),
        MappingProxyType({d: MappingProxyType(dict(p)) for d, p in blocks.items() if p}),
        MappingProxyType(serving),
        MappingProxyType(gates),
    )


EMPTY = build(0, {}, {})


def canonical_path(path: str) -> str:
    """The path an origin may resolve `path` to, for legal blocks: every %-escape decoded
    once (%2F and %2E too, one character per byte, invalid ones kept), repeated slashes
    collapsed, then dot segments resolved (RFC 3986 5.2.4; '..' stops at the root)."""
    if (
        path[:1] == "/"
        and path.isascii()
        and "%" not in path
        and "//" not in path
        and "/." not in path
    ):
        return path  # the common case: already canonical
    segments = unquote_to_bytes(path).decode("latin-1").split("/")
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    trailing = bool(out) and segments[-1] in ("", ".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


def _canonical_prefix(prefix: str) -> str:
    """A block prefix made canonical up to its last slash; what follows is the start of a
    segment, not a dot segment ("/files/.*" blocks dot files, not all of /files/)."""
    head, _, tail = prefix.rpartition("/")
    return canonical_path(head + "/") + unquote_to_bytes(tail).decode("latin-1")


def parse_state(raw: Mapping[str, Any]) -> Applied:
    """A STATE (`{"version", "domains": [DOMAIN...], "blocks": [...]}`) as a ControlState;
    entries that cannot be used are left out and named in `problems`."""
    problems: list[str] = []
    domains: dict[str, DomainEntry] = {}
    for item in raw.get("domains", []):
        entry = _domain_entry(item, problems)
        if entry is not None:
            domains[entry.name] = entry
    blocks: dict[str, dict[str, str]] = {}
    for item in raw.get("blocks", []):
        try:
            blocks.setdefault(_name(item["domain"]), {})[str(item["pattern"])] = _reason(item)
        except _BAD as e:
            problems.append(f"block {item!r:.200}: {_explain(e)}")
    return Applied(build(int(raw.get("version", 0)), domains, blocks), (), tuple(problems))


def apply_snapshot(old: ControlState, raw: Mapping[str, Any], *, flush: bool = False) -> Applied:
    """A snapshot replacing `old` wholesale: the domains it deleted or terminated meanwhile
    (changes this worker never saw) are purged, as the changes themselves would have. With
    `flush` purges may have been missed too (the edge was not following): everything stored
    before it goes, whatever domain, one that neither state names any more included."""
    applied = parse_state(raw)
    if flush:
        return Applied(applied.state, (EVERYTHING,), applied.problems)
    new = applied.state.domains
    purges = tuple(
        Purge("prefix", name + "/")
        for name, entry in old.domains.items()
        if entry.state != "terminated" and (name not in new or new[name].state == "terminated")
    )
    return Applied(applied.state, purges, applied.problems)


def apply(state: ControlState, version: int, kind: str, payload: Mapping[str, Any]) -> Applied:
    """One change of the feed. A version not newer than the state's is ignored (a change is
    delivered again after a reconnect); a malformed one moves the version on, with a problem."""
    if version <= state.version:
        return Applied(state)
    problems: list[str] = []
    if version != state.version + 1:
        problems.append(f"change {version} follows version {state.version}: changes were skipped")
    domains = dict(state.domains)
    blocks = {d: dict(p) for d, p in state.blocks.items()}
    purges: list[Purge] = []
    try:
        purges.extend(_change_purges(state.domains, kind, payload, problems))
        if kind == "domain.upsert":
            entry = _domain_entry(payload["domain"], problems)
            if entry is not None:
                domains[entry.name] = entry
        elif kind == "domain.delete":
            domains.pop(_name(payload["name"]), None)
        elif kind == "domain.state":
            name, new_state = _name(payload["name"]), _state(payload["state"])
            if new_state == "terminated":  # known or not: final, and purged
                domains[name] = DomainEntry(name, None, new_state, _reason(payload))
            elif name in domains:
                domains[name] = _replace_state(domains[name], new_state, _reason(payload))
            else:
                problems.append(f"change {version}: state of unknown domain {name!r}")
        elif kind == "block":
            blocks.setdefault(_name(payload["domain"]), {})[str(payload["pattern"])] = _reason(
                payload
            )
        elif kind == "unblock":
            blocks.get(_name(payload["domain"]), {}).pop(str(payload["pattern"]), None)
        elif kind not in ("purge", "prefetch"):  # prefetch is the supervisor's
            problems.append(f"change {version}: unknown kind {kind!r}")
    except _BAD as e:
        problems.append(f"change {version} ({kind}): {_explain(e)}")
    return Applied(build(version, domains, blocks), tuple(purges), tuple(problems))


@dataclass(frozen=True, slots=True)
class Replay:
    """The purges of replayed changes, each with its change's version."""

    purges: tuple[tuple[int, Purge], ...]
    version: int  # the newest replayed change's, or the state's when none
    problems: tuple[str, ...] = ()


def replay(state: ControlState, changes: Iterable[Any]) -> Replay:
    """The purge part of changes a worker may have missed while it was not running, whatever
    their versions (its state is newer: the rest of them is already in it)."""
    purges: list[tuple[int, Purge]] = []
    problems: list[str] = []
    version = None
    for change in changes:
        try:
            number = int(change["version"])
            found = _change_purges(state.domains, change["kind"], change["payload"], problems)
        except _BAD as e:
            problems.append(f"replayed change {change!r:.200}: {_explain(e)}")
            continue
        purges.extend((number, purge) for purge in found)
        version = number if version is None else max(version, number)
    return Replay(tuple(purges), state.version if version is None else version, tuple(problems))


def _change_purges(
    domains: Mapping[str, DomainEntry], kind: str, payload: Mapping[str, Any], problems: list[str]
) -> list[Purge]:
    """What a change removes from the cache: purges, and every object of a domain deleted or
    terminated (agreement 6.3)."""
    if kind == "purge":
        return _purges(domains, payload, problems)
    if kind == "domain.delete":
        return [Purge("prefix", _name(payload["name"]) + "/")]
    item = payload["domain"] if kind == "domain.upsert" else payload
    if kind in ("domain.upsert", "domain.state") and _state(item["state"]) == "terminated":
        return [Purge("prefix", _name(item["name"]) + "/")]
    return []


def _purges(
    domains: Mapping[str, DomainEntry], payload: Mapping[str, Any], problems: list[str]
) -> list[Purge]:
    kind = payload["type"]
    if kind not in ("url", "prefix", "domain", "tag"):
        raise ValueError(f"unknown purge type {kind!r}")
    out: list[Purge] = []
    for item in payload["items"]:
        name, value = _name(item["domain"]), str(item["value"])
        if kind == "domain":
            out.append(Purge("prefix", name + "/"))
        elif kind == "prefix":
            out.append(Purge("prefix", name + normalize_path(_rooted(value))))
        elif kind == "tag":
            out.append(Purge("tag", name + "/", value))
        else:
            entry = domains.get(name)
            if entry is None or entry.config is None:
                problems.append(f"url purge for unknown domain {name!r}: nothing cached")
                continue
            path, _, query = _rooted(value).partition("?")
            out.append(Purge("url", cache_key(entry.config, normalize_path(path), query)))
    return out


def _domain_entry(item: Any, problems: list[str]) -> DomainEntry | None:
    """A DOMAIN; a config parse_domain refuses is kept with config None (absent, 404). A
    terminated domain is never served again: its config (the control plane omits it) is
    not read."""
    try:
        name = _name(item["name"])
        state = _state(item["state"])
        reason = _reason(item)
        if state == "terminated":
            return DomainEntry(name, None, state, reason)
        config_table = dict(item["config"])
    except _BAD as e:
        problems.append(f"domain {item!r:.200}: {_explain(e)}")
        return None
    config: DomainConfig | None
    try:
        config = parse_domain({"name": name, **config_table}, f"domains[{name}]")
    except _BAD as e:
        problems.append(f"domain {name!r} refused, served as unknown: {_explain(e)}")
        config = None
    return DomainEntry(name, config, state, reason)


def _replace_state(entry: DomainEntry, state: str, reason: str) -> DomainEntry:
    return DomainEntry(entry.name, entry.config, state, reason)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"domain name {value!r}")
    return value.lower().removesuffix(".")


def _state(value: Any) -> str:
    if value not in STATES:
        raise ValueError(f"state {value!r}")
    return str(value)


def _reason(item: Mapping[str, Any]) -> str:
    return str(item.get("reason") or "")


def _rooted(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def _with_reason(text: str, reason: str) -> str:
    return f"{text}: {reason}" if reason else text


def _explain(e: Exception) -> str:
    if isinstance(e, InvalidValue):
        return f"{e.key}: {e.problem}"
    return f"{type(e).__name__}: {e}"
