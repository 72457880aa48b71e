"""Signed URLs (issue 7): the four schemes Chinese CDNs sell against hotlinking, pure, no I/O.

Each domain may require one scheme. A URL carries an MD5 of a shared key, the path and a
time; the edge recomputes it and compares in constant time (`hmac.compare_digest`), against
the primary and the secondary key (both always computed, so which one matched does not show in
the timing), so that keys rotate without failed requests. A URL is valid until its time plus
`ttl` seconds (default 1800).

- Type A (Aliyun A): ``path?auth_key={timestamp}-{rand}-{uid}-{md5hash}``,
  md5hash = md5("{path}-{timestamp}-{rand}-{uid}-{key}"), timestamp in decimal Unix seconds.
- Type B (Aliyun B): ``/{YYYYMMDDHHMM}/{md5hash}{path}``, md5hash = md5(key + time + path),
  the time as wall-clock time in UTC+8.
- Type C (Aliyun C): ``/{md5hash}/{hex time}{path}``, or ``path?{param}={md5hash}&{time_param}=
  {hex time}`` (form "query"); md5hash = md5(key + path + hex time), the hex digits hashed as
  sent (``55CE8100`` and ``55ce8100`` are different signatures of the same time).
- Type D (Tencent D): ``path?{param}={md5hash}&{time_param}={time}``, md5hash = md5(key + path +
  time), the time decimal or hex (`time_format`); parameter names default to ``sign`` and ``t``.

`path` is the request path exactly as the client sent it (percent-escapes and all), without
the signature. Query values are compared as sent (not percent-decoded). The signature (the
path prefix of B and C, the parameters of A, C and D) never reaches the cache key, so every
signature of one object shares one stored copy; the origin does not see it either for A, B and
C (for D it does: Tencent forwards it, and an origin may check it again).

A URL that verified is remembered per rule with its expiry (at most MEMO_ENTRIES of them), so
that a player's many range requests for one signed URL cost a dict lookup, not an MD5 per key;
the expiry is checked on every request. `edge.access.AccessRules.admit` remembers whole
admitted requests on top of this (the signed URL with the referer and client it came with).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

__all__ = ["DEFAULT_TTL", "Signed", "SignedUrl"]

DEFAULT_TTL = 1800
UTC8 = timezone(timedelta(hours=8))

Kind = Literal["A", "B", "C", "D"]
KINDS: tuple[Kind, ...] = ("A", "B", "C", "D")

MISSING = "missing signature"
MALFORMED = "malformed signature"
EXPIRED = "expired signature"
BAD = "bad signature"

_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_DECIMAL = re.compile(r"[0-9]{1,12}")
_HEX = re.compile(r"[0-9a-fA-F]{1,12}")
_MINUTE = re.compile(r"[0-9]{12}")
# A's rand and uid: anything but the separator; bounded so a hostile value costs nothing.
_TOKEN = re.compile(r"[^-&]{1,64}")


@dataclass(frozen=True, slots=True)
class Signed:
    """A request whose signature checked out: the path and query without the signature (for the
    cache key, and for the origin request when `strip_origin`), and the Unix time after which
    its URL is expired (`SignedUrl.check` refuses it from then on)."""

    path: str
    query: str
    strip_origin: bool
    expires: int = field(default=0, compare=False)
    target: bytes = field(init=False, repr=False, compare=False)  # path?query, for the origin
    # The lookup step's memo (`edge.cachekey.signed_cache_key`), not part of the value: the
    # domain config it is for, the normalised path, the cache key.
    cache_entry: tuple[object, str, str] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        target = f"{self.path}?{self.query}" if self.query else self.path
        object.__setattr__(self, "target", target.encode("ascii"))


MEMO_ENTRIES = 1024  # verified URLs remembered per rule, forgotten all at once when full
MEMO_LONGEST = 1024  # longer URLs are not remembered


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """One domain's signed-URL scheme; `check` is the whole rule."""

    kind: Kind
    keys: tuple[str, ...] = field(repr=False)  # primary, then secondary; never logged
    ttl: int = DEFAULT_TTL
    param: str = ""  # A: the auth_key parameter; C (query form), D: the hash parameter
    time_param: str = ""  # C (query form), D: the time parameter
    form: Literal["path", "query"] = "path"  # C only
    time_format: Literal["dec", "hex"] = "dec"  # D only
    _verified: dict[str, Signed] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The query parameters that carry the signature: never part of the cache key.
    query_params: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = (self.param, self.time_param) if self.kind != "A" else (self.param,)
        in_query = self.kind in ("A", "D") or self.form == "query"
        object.__setattr__(self, "query_params", params if in_query else ())

    def check(self, path: str, query: str, now: float) -> Signed | str:
        """Verify `path` and `query` (as sent) at Unix time `now`: the request without its
        signature, or the short reason (`MISSING`, `MALFORMED`, `EXPIRED`, `BAD`) to refuse.

        A URL that verified is remembered with its expiry (`_verified`, bounded): players ask
        for one signed URL many times (ranges), and only its expiry can change its verdict."""
        target = f"{path}?{query}"
        verified = self._verified.get(target)
        if verified is None:
            if self.kind == "A":
                found = self._check_a(path, query)
            elif self.kind == "B":
                found = self._check_b(path, query)
            elif self.kind == "C" and self.form == "path":
                found = self._check_c_path(path, query)
            else:
                found = self._check_query_pair(path, query)
            if isinstance(found, str):
                return found
            verified = found
            if len(target) <= MEMO_LONGEST:
                if len(self._verified) >= MEMO_ENTRIES:
                    self._verified.clear()
                self._verified[target] = verified
        return EXPIRED if now > verified.expires else verified

    def resource_path(self, path: str) -> str:
        """The path a request names once its signature prefix is taken off (B, C path form),
        as far as its shape says, unverified: what URL blocks are checked against, since a
        block (451) is checked before the signature (403)."""
        if self.kind == "B" or (self.kind == "C" and self.form == "path"):
            parts = path.split("/", 3)
            if len(parts) == 4 and _MD5.fullmatch(parts[2 if self.kind == "B" else 1]):
                return "/" + parts[3]
        return path

    # --- the schemes ---------------------------------------------------------------------------

    def _check_a(self, path: str, query: str) -> Signed | str:
        found = _take_params(query, (self.param,))
        if isinstance(found, str):
            return found
        (value,), rest = found
        parts = value.split("-")
        if len(parts) != 4:
            return MALFORMED
        timestamp, rand, uid, sent = parts
        if not (
            _DECIMAL.fullmatch(timestamp)
            and _TOKEN.fullmatch(rand)
            and _TOKEN.fullmatch(uid)
            and _MD5.fullmatch(sent)
        ):
            return MALFORMED
        signed = f"{path}-{timestamp}-{rand}-{uid}-"
        return self._verdict([signed + key for key in self.keys], sent, int(timestamp), path, rest)

    def _check_b(self, path: str, query: str) -> Signed | str:
        parts = path.split("/", 3)
        if len(parts) != 4 or parts[0]:
            return MISSING
        _, minute, sent, rest = parts
        if not _MINUTE.fullmatch(minute) or not _MD5.fullmatch(sent):
            return MALFORMED
        try:
            start = datetime(
                int(minute[0:4]), int(minute[4:6]), int(minute[6:8]), int(minute[8:10]),
                int(minute[10:12]), tzinfo=UTC8,
            )
        except ValueError:  # month 13, hour 25, ...
            return MALFORMED
        resource = "/" + rest
        return self._verdict(
            [key + minute + resource for key in self.keys],
            sent,
            int(start.timestamp()),
            resource,
            query,
        )

    def _check_c_path(self, path: str, query: str) -> Signed | str:
        parts = path.split("/", 3)
        if len(parts) != 4 or parts[0]:
            return MISSING
        _, sent, hex_time, rest = parts
        if not _MD5.fullmatch(sent) or not _HEX.fullmatch(hex_time):
            return MALFORMED
        resource = "/" + rest
        return self._verdict(
            [key + resource + hex_time for key in self.keys],
            sent,
            int(hex_time, 16),
            resource,
            query,
        )

    def _check_query_pair(self, path: str, query: str) -> Signed | str:
        """C in query form and D: a hash parameter and a time parameter."""
        found = _take_params(query, (self.param, self.time_param))
        if isinstance(found, str):
            return found
        (sent, time_text), rest = found
        hex_time = self.kind == "C" or self.time_format == "hex"
        if not _MD5.fullmatch(sent) or not (_HEX if hex_time else _DECIMAL).fullmatch(time_text):
            return MALFORMED
        return self._verdict(
            [key + path + time_text for key in self.keys],
            sent,
            int(time_text, 16 if hex_time else 10),
            path,
            rest,
        )

    def _verdict(
        self, inputs: list[str], sent: str, start: int, path: str, query: str
    ) -> Signed | str:
        """The request as `path` and `query` without its signature, valid from `start` for
        `ttl` seconds, when `sent` is the MD5 of one of `inputs`; else BAD."""
        sent = sent.lower()
        matched = False
        for text in inputs:  # every key, whichever matches: the time taken says nothing
            expected = hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
            matched |= hmac.compare_digest(expected, sent)
        if not matched:
            return BAD
        # A, B and C keep the signature from the origin; D forwards it (as Tencent does).
        return Signed(path, query, self.kind != "D", start + self.ttl)


def _take_params(query: str, names: tuple[str, ...]) -> tuple[tuple[str, ...], str] | str:
    """The values of the parameters `names` (each exactly once) and the query without them;
    or the reason to refuse (`MISSING`, `MALFORMED` when one is repeated or another missing)."""
    values: dict[str, str] = {}
    kept: list[str] = []
    for pair in query.split("&") if query else ():
        name, eq, value = pair.partition("=")
        if name in names:
            if name in values or not eq:
                return MALFORMED
            values[name] = value
        elif pair:
            kept.append(pair)
    if not values:
        return MISSING
    if len(values) != len(names):
        return MALFORMED
    return tuple(values[name] for name in names), "&".join(kept)
