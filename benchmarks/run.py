#!/usr/bin/env python3
"""Benchmark our edge against nginx proxy_cache on this machine, over loopback.

`make bench` runs this file. It installs nginx and wrk when they are missing (Debian, root),
starts a sample origin, our edge and nginx on 127.0.0.1 only, warms both caches, runs wrk against
each proxy in turn (edge, nginx, edge, nginx, ...), takes medians, prints a table and writes
benchmarks/RESULTS.md. Every process it starts is stopped on exit, Ctrl-C and errors included.
See benchmarks/README.md for the options and how to read the ratios.

Extension points: add a proxy (Varnish) by subclassing `Proxy`; add a scenario by appending to
`SCENARIOS` (a `WrkScenario`, or a new `Scenario` subclass for cold or memory measurements).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import ctypes
import datetime as dt
import fcntl
import http.client
import importlib.metadata
import ipaddress
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
LOGS = OUT / "logs"
NGINX_TEMPLATE = HERE / "nginx.conf.tmpl"

HOST = "127.0.0.1"  # every listener and every request: loopback only, never another address
DOMAIN = "bench.cdn.test"
CACHE_MEMORY = "512MiB"  # edge memory tier; nginx's max_size below is the same budget
CACHE_MAX_OBJECT = "128MiB"
NGINX_CACHE_MAX_SIZE = "512m"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Above this much CPU used by anything but the proxy under test and wrk (percent of one core,
# averaged over a run), the run is flagged: another program was competing for the CPUs.
OTHER_LOAD_WARN_PCT = 15.0

DEFAULT_ORIGIN_CMD = "{cdn} origin --listen {listen} --dir {dir}"
DEFAULT_EDGE_CMD = "{cdn} edge --config {config}"


class BenchError(Exception):
    """Ends the run: a one-line message, then optionally some detail (a log tail)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Sample content served by the origin


@dataclass(frozen=True)
class OriginFile:
    path: str  # URL path, also the path under the origin's --dir
    size: int


LOGO = OriginFile("/img/logo.png", 4096)
PAGE = OriginFile("/index.html", 20 * 1024)
VIDEO = OriginFile("/video/demo.mp4", 64 * 1024 * 1024)
ORIGIN_FILES = (LOGO, PAGE, VIDEO)


def _content(f: OriginFile) -> bytes:
    rng = random.Random(f.path)  # deterministic: same bytes on every machine and run
    if f.path.endswith(".html"):
        head = b"<!doctype html>\n<html><head><title>bench</title></head><body>\n"
        tail = b"\n</body></html>\n"
        filler = (b"<p>cdn-edge benchmark page.</p>\n" * f.size)[: f.size - len(head) - len(tail)]
        return head + filler + tail
    if f.path.endswith(".png"):
        return b"\x89PNG\r\n\x1a\n" + rng.randbytes(f.size - 8)
    block = rng.randbytes(1024 * 1024)  # incompressible, repeated to the size
    return (block * (f.size // len(block) + 1))[: f.size]


def write_origin_files(root: Path) -> None:
    """Create the sample files unless each is there at its size (`cdn origin` does the same).

    The project's own generator when it can be imported, so that a stand-in origin
    (--origin-cmd) and `cdn origin` serve the same bytes; a generator of our own otherwise.
    """
    try:
        from edge.sample_origin import ensure_sample_files
    except ImportError:
        pass
    else:
        ensure_sample_files(root)
        return
    for f in ORIGIN_FILES:
        target = root / f.path.lstrip("/")
        if target.is_file() and target.stat().st_size == f.size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(_content(f))
        tmp.replace(target)


# --------------------------------------------------------------------------------------------
# Processes: start in their own process group, stop the whole group


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # Runs in the child before exec: if this script dies without cleaning up (SIGKILL), the
    # kernel kills the group leader too. The normal path is ManagedProcess.stop().
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    state: str
    cpu_ticks: int  # utime + stime + cutime + cstime
    rss_pages: int
    start_ticks: int  # start time after boot, in clock ticks


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        state=rest[0],
        cpu_ticks=int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]),
        rss_pages=int(rest[21]),
        start_ticks=int(rest[19]),
    )


def all_stats() -> list[ProcStat]:
    stats = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                stats.append(st)
    return stats


def process_tree(leader: int) -> list[int]:
    """The leader, its process group and all its descendants, zombies left out."""
    stats = [s for s in all_stats() if s.state != "Z"]
    children: dict[int, list[int]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s.pid)
    todo = [leader, *(s.pid for s in stats if s.pgrp == leader)]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    alive = {s.pid for s in stats}
    return sorted(found & alive)


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user + system, reaped children included) of these processes, in seconds."""
    ticks = 0
    for pid in pids:
        st = read_stat(pid)
        if st is not None:
            ticks += st.cpu_ticks
    return ticks / CLK_TCK


def _decode_proc_net_addr(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":  # /proc/net/tcp* prints each 32-bit word in host order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening_addresses(pids: Sequence[int]) -> list[tuple[str, int, bool]]:
    """(address, port, is_loopback) of every TCP listening socket these processes hold."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                addr = _decode_proc_net_addr(hexaddr)
                mapped = getattr(addr, "ipv4_mapped", None)
                loop = addr.is_loopback or (mapped is not None and mapped.is_loopback)
                found.append((str(addr), int(hexport, 16), loop))
    return found


# Process groups started and not yet stopped, so that a run killed with SIGKILL (no cleanup
# possible) has its leftovers stopped by the next run.
GROUPS_FILE = OUT / "process-groups.json"


def _load_groups() -> list[dict[str, Any]]:
    try:
        data = json.loads(GROUPS_FILE.read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def _record_group(pgid: int, start_ticks: int, name: str) -> None:
    groups = [g for g in _load_groups() if g.get("pgid") != pgid]
    groups.append({"pgid": pgid, "start_ticks": start_ticks, "name": name})
    GROUPS_FILE.write_text(json.dumps(groups))


def _forget_group(pgid: int) -> None:
    GROUPS_FILE.write_text(json.dumps([g for g in _load_groups() if g.get("pgid") != pgid]))


def reap_stale_groups() -> None:
    """Kill what an earlier run that could not clean up (SIGKILL) left running."""
    for g in _load_groups():
        # a group id is not reused while any member lives; members start after the leader
        members = [
            s.pid
            for s in all_stats()
            if s.pgrp == g.get("pgid")
            and s.start_ticks >= g.get("start_ticks", 0)
            and s.state != "Z"
        ]
        if members:
            print(f"bench: stopping {g.get('name')} left over by an earlier run: {members}")
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    GROUPS_FILE.unlink(missing_ok=True)


class ManagedProcess:
    """A server process in a process group of its own, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    start_new_session=True,
                    preexec_fn=_child_setup,
                )
            except OSError as e:
                cmd = shlex.join(self.argv)
                raise BenchError(f"{self.name} failed to start: {cmd}: {e}") from e
        st = read_stat(self.popen.pid)
        _record_group(self.popen.pid, st.start_ticks if st else 0, self.name)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.pid) if self.running() else []

    def _group_alive(self) -> bool:
        return self.popen is not None and any(
            s.pgrp == self.popen.pid and s.state != "Z" for s in all_stats()
        )

    def stop(self, grace: float = 10.0) -> None:
        if self.popen is None:
            return
        pgid = self.popen.pid  # a session leader: its pid is its group's id
        stragglers = [p for p in self.pids() if p != pgid] if self.running() else []
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            for pid in stragglers:  # descendants that left the group, if any
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=0.05)
                if self.popen.poll() is not None and not self._group_alive():
                    _forget_group(pgid)
                    return
        print(f"bench: warning: {self.name} (pgid {pgid}) did not exit", file=sys.stderr)

    def tail(self, lines: int = 20, extra: Sequence[Path] = ()) -> str:
        parts = []
        for path in (self.log, *extra):
            try:
                text = path.read_text(errors="replace").rstrip("\n")
            except OSError:
                continue
            if text:
                body = "\n".join("  | " + ln for ln in text.splitlines()[-lines:])
                parts.append(f"  last lines of {_rel(path)}:\n{body}")
        return "\n".join(parts) or f"  ({_rel(self.log)} is empty)"

    def check_loopback_only(self) -> None:
        bad = [f"{a}:{p}" for a, p, loop in listening_addresses(self.pids()) if not loop]
        if bad:
            raise BenchError(
                f"{self.name} listens on {', '.join(bad)}: the benchmark runs on loopback only"
            )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    length: int


def http_get(port: int, path: str, host: str | None = DOMAIN, timeout: float = 30.0) -> Response:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Host": host} if host else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        length = 0
        while chunk := resp.read(1 << 20):
            length += len(chunk)
        return Response(resp.status, resp.headers, length)
    finally:
        conn.close()


def wait_until(
    proc: ManagedProcess,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    extra_logs: Sequence[Path] = (),
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.running():
            code = proc.popen.returncode if proc.popen else None
            raise BenchError(
                f"{proc.name} failed to start: exited with status {code} (log: {_rel(proc.log)})",
                proc.tail(extra=extra_logs),
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            if ready():
                return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} failed to start: {what} not ready after {timeout:.0f} s "
                f"(log: {_rel(proc.log)})",
                proc.tail(extra=extra_logs),
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# The origin and the proxies under test


@dataclass
class Context:
    args: argparse.Namespace
    cdn: str
    nginx: str
    wrk: str
    origin_port: int = 0
    origin_dir: Path = OUT / "origin"


def _fill(template: str, **values: str) -> list[str]:
    return [part.format(**values) for part in shlex.split(template)]


class Origin:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.port = ctx.origin_port
        self.proc = ManagedProcess(
            "origin",
            _fill(
                ctx.args.origin_cmd,
                cdn=ctx.cdn,
                python=sys.executable,
                listen=f"{HOST}:{self.port}",
                host=HOST,
                port=str(self.port),
                dir=str(ctx.origin_dir),
            ),
            LOGS / "origin.log",
        )

    def start(self) -> None:
        write_origin_files(self.ctx.origin_dir)
        self.proc.start()

        def ready() -> bool:
            return http_get(self.port, LOGO.path, host=None, timeout=2).status == 200

        wait_until(self.proc, ready, self.ctx.args.start_timeout, "its port")
        self.proc.check_loopback_only()
        for f in ORIGIN_FILES:
            r = http_get(self.port, f.path, host=None)
            if r.status != 200 or r.length != f.size:
                raise BenchError(
                    f"origin serves {f.path} as status {r.status}, {r.length} bytes "
                    f"(expected 200, {f.size} bytes)",
                    self.proc.tail(),
                )
            if "max-age" not in (r.headers.get("Cache-Control") or ""):
                print(
                    f"bench: warning: origin sends {f.path} without a max-age "
                    f"(Cache-Control: {r.headers.get('Cache-Control')!r})",
                    file=sys.stderr,
                )

    def stop(self) -> None:
        self.proc.stop()


class Proxy(abc.ABC):
    """A caching proxy under test, listening on 127.0.0.1 in front of the sample origin.

    To add one (Varnish is next), implement start (return once it serves), is_hit and version;
    stop, url and pids come from the ManagedProcess that `start` creates.
    """

    name: str
    hit_header: str  # the response header that is_hit reads, shown when warming fails

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.proc: ManagedProcess | None = None

    @abc.abstractmethod
    def start(self) -> None:
        """Start the proxy; return once it serves, or raise BenchError."""

    @abc.abstractmethod
    def is_hit(self, headers: http.client.HTTPMessage) -> bool:
        """Whether a response was served from this proxy's cache."""

    @abc.abstractmethod
    def version(self) -> str:
        """One line: product and version."""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def pids(self) -> list[int]:
        """Every process of this proxy (master/supervisor and workers)."""
        return self.proc.pids() if self.proc is not None else []

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    def tail(self) -> str:
        return self.proc.tail() if self.proc is not None else ""


def cache_status_hit(value: str | None, cache: str) -> bool:
    """RFC 9211: true when the member for `cache` carries the `hit` parameter."""
    for member in (value or "").split(","):
        name, *params = (p.strip() for p in member.split(";"))
        if name.strip('"') == cache and "hit" in params:
            return True
    return False


class EdgeProxy(Proxy):
    name = "edge"
    hit_header = "Cache-Status"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.admin_port = free_port()
        self.config = OUT / "edge.toml"
        self.state_dir = OUT / "edge"

    def write_config(self) -> None:
        _reset_dir(self.state_dir)
        self.config.write_text(
            "# generated by benchmarks/run.py\n"
            "[edge]\n"
            f'listen = "{HOST}:{self.port}"\n'
            f'admin_listen = "{HOST}:{self.admin_port}"\n'
            f"workers = {self.ctx.args.workers}\n"
            f"state_dir = {json.dumps(str(self.state_dir))}\n"
            "\n[cache]\n"
            f'memory = "{CACHE_MEMORY}"\n'
            f'max_object = "{CACHE_MAX_OBJECT}"\n'
            "\n[[domains]]\n"
            f'name = "{DOMAIN}"\n'
            f'origins = ["http://{HOST}:{self.ctx.origin_port}"]\n'
        )

    def start(self) -> None:
        self.write_config()
        argv = _fill(
            self.ctx.args.edge_cmd,
            cdn=self.ctx.cdn,
            python=sys.executable,
            config=str(self.config),
        )
        self.proc = ManagedProcess("edge", argv, LOGS / "edge.log")
        self.proc.start()

        def ready() -> bool:
            admin = http_get(self.admin_port, "/readyz", host=None, timeout=2)
            return admin.status == 200 and port_open(self.port)

        wait_until(self.proc, ready, self.ctx.args.start_timeout, "admin /readyz")
        self.proc.check_loopback_only()

    def is_hit(self, headers: http.client.HTTPMessage) -> bool:
        return cache_status_hit(headers.get("Cache-Status"), "cdn-edge")

    def version(self) -> str:
        try:
            ver = importlib.metadata.version("cdn-edge")
        except importlib.metadata.PackageNotFoundError:
            ver = "?"
        rev = _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True).strip()
        return f"cdn-edge {ver}" + (f" (git {rev})" if rev else "")


class NginxProxy(Proxy):
    name = "nginx"
    hit_header = "X-Cache"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.prefix = OUT / "nginx"
        self.conf = self.prefix / "nginx.conf"
        self.error_log = self.prefix / "error.log"

    def render(self) -> str:
        user = "user root root;" if os.geteuid() == 0 else "# not root: workers keep this user"
        values = {
            "USER_DIRECTIVE": user,
            "WORKERS": str(self.ctx.args.workers),
            "PREFIX": str(self.prefix),
            "PORT": str(self.port),
            "ORIGIN_PORT": str(self.ctx.origin_port),
            "DOMAIN": DOMAIN,
            "CACHE_MAX_SIZE": NGINX_CACHE_MAX_SIZE,
        }
        text = NGINX_TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
        if left:
            raise BenchError(f"{_rel(NGINX_TEMPLATE)}: unknown placeholders {', '.join(left)}")
        return text

    def start(self) -> None:
        _reset_dir(self.prefix)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        base = [self.ctx.nginx, "-p", f"{self.prefix}/", "-c", str(self.conf)]
        base += ["-e", str(self.error_log)]
        test = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            lines = (test.stdout + test.stderr).strip().splitlines()[-10:]
            raise BenchError(
                f"nginx failed to start: `nginx -t` rejects {_rel(self.conf)}",
                "\n".join("  | " + ln for ln in lines),
            )
        self.proc = ManagedProcess("nginx", base, LOGS / "nginx.log")
        self.proc.start()

        def ready() -> bool:
            # workers accept once the master has forked them; ask for a real response
            return http_get(self.port, "/nginx-bench-ready", timeout=2).status > 0

        wait_until(self.proc, ready, self.ctx.args.start_timeout, "its port", [self.error_log])
        self.proc.check_loopback_only()

    def tail(self) -> str:
        return self.proc.tail(extra=[self.error_log]) if self.proc is not None else ""

    def is_hit(self, headers: http.client.HTTPMessage) -> bool:
        return headers.get("X-Cache") == "HIT"

    def version(self) -> str:
        out = _output([self.ctx.nginx, "-v"]).strip()
        ver = out.removeprefix("nginx version: ")
        pkg = _output(["dpkg-query", "-W", "-f", "${Version}", "nginx"], check=True).strip()
        return ver + (f" (Debian {pkg})" if pkg else "")


PROXIES: dict[str, type[Proxy]] = {"edge": EdgeProxy, "nginx": NginxProxy}
# "varnish": VarnishProxy  -- next issue


# --------------------------------------------------------------------------------------------
# wrk


_UNITS_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # to milliseconds
_UNITS_BIN = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unreadable wrk time {text!r}")
    return float(m[1]) * _UNITS_TIME[m[2]]


def _bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([KMGTP]?)B", text)
    if not m:
        raise ValueError(f"unreadable wrk size {text!r}")
    return float(m[1]) * _UNITS_BIN[m[2]]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    bytes_read: float
    rps: float
    transfer_per_s: float
    latency_ms: dict[str, float]  # percentile ("50", "75", "90", "99") -> milliseconds
    errors: dict[str, int]  # socket errors by kind, and "non-2xx/3xx"


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk 4's output with --latency."""
    summary = re.search(r"^\s*(\d+) requests in ([\d.]+\w+), ([\d.]+\w*B) read", text, re.M)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    tps = re.search(r"^Transfer/sec:\s*([\d.]+\w*B)", text, re.M)
    if not (summary and rps and tps):
        raise ValueError("no summary in wrk output")
    latency = {m[1]: _ms(m[2]) for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", text, re.M)}
    if "99" not in latency:
        raise ValueError("no latency distribution in wrk output (--latency missing?)")
    errors: dict[str, int] = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        for kind, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                errors[kind] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors["non-2xx/3xx"] = int(non2xx[1])
    return WrkResult(
        requests=int(summary[1]),
        seconds=_ms(summary[2]) / 1e3,
        bytes_read=_bytes(summary[3]),
        rps=float(rps[1]),
        transfer_per_s=_bytes(tps[1]),
        latency_ms=latency,
        errors=errors,
    )


def run_wrk(
    ctx: Context,
    proxy: Proxy,
    path: str,
    threads: int,
    connections: int,
    seconds: int,
    headers: Sequence[str] = (),
    timeout: str | None = None,
) -> tuple[WrkResult, str]:
    argv = [ctx.wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if timeout:
        argv.append(f"--timeout={timeout}")
    for h in (f"Host: {DOMAIN}", *headers):
        argv += ["-H", h]
    argv.append(proxy.url(path))
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, preexec_fn=_child_setup
    )
    try:
        return parse_wrk(done.stdout), shlex.join(argv)
    except ValueError as e:
        raise BenchError(
            f"wrk against {proxy.name} failed ({e}; exit {done.returncode})",
            "\n".join("  | " + ln for ln in (done.stdout + done.stderr).splitlines()[-15:]),
        ) from e


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int

    @property
    def title(self) -> str:
        return f"{self.label} ({'higher' if self.higher_is_better else 'lower'} is better)"


RPS = Metric("rps", "requests/s", True, 0)
P99 = Metric("p99_ms", "p99 latency ms", False, 2)
CPU_PER_REQ = Metric("cpu_us_per_req", "CPU µs/request", False, 1)
GBPS = Metric("gbps", "GB/s", True, 2)  # for the large-hit scenario


@dataclass
class Sample:
    """One measured run of one scenario against one proxy."""

    values: dict[str, float]
    cpu: CpuUse
    wrk: WrkResult
    command: str
    warnings: list[str] = field(default_factory=list)


def machine_busy_seconds() -> float:
    """CPU time of the whole machine, all CPUs, not idle (hypervisor steal included)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v + [0] * (8 - len(v))
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU time of this script's reaped children (wrk, once it has exited)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used during one run, split by who used them."""

    proxy_s: float  # the proxy's processes
    wrk_s: float
    other_s: float  # everything else on the machine: origin, other programs, steal
    wall_s: float

    def pct(self, seconds: float) -> float:
        """Seconds of CPU as percent of one core over the run."""
        return seconds / max(self.wall_s, 1e-9) * 100


class CpuMeter:
    """Snapshots around a run; `stop` must come after the load generator has been reaped."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.start = self._take()

    def _take(self) -> tuple[float, float, float, float]:
        return (
            time.monotonic(),
            cpu_seconds(self.proxy.pids()),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )

    def stop(self) -> CpuUse:
        end = self._take()
        wall, proxy, wrk, busy = (b - a for a, b in zip(self.start, end, strict=True))
        return CpuUse(proxy, wrk, max(busy - proxy - wrk, 0.0), wall)


class ScenarioError(Exception):
    pass


class Scenario(abc.ABC):
    name: str
    description: str
    metrics: tuple[Metric, ...]

    @abc.abstractmethod
    def prepare(self, ctx: Context, proxy: Proxy) -> None:
        """Bring the proxy into the scenario's starting state (for example: warm its cache)."""

    @abc.abstractmethod
    def measure(self, ctx: Context, proxy: Proxy, seconds: int) -> Sample:
        """One measured run."""

    def setup(self) -> str:
        """How the load is generated, for RESULTS.md."""
        return self.description


def warm_until_hit(proxy: Proxy, path: str, size: int, attempts: int = 10) -> None:
    last = "no response"
    for _ in range(attempts):
        try:
            r = http_get(proxy.port, path)
        except (OSError, http.client.HTTPException) as e:
            ensure_running(proxy)
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
            continue
        if r.status == 200 and r.length != size:
            raise ScenarioError(
                f"{proxy.name} answered {path} with {r.length} bytes, expected {size}"
            )
        if r.status == 200 and proxy.is_hit(r.headers):
            return
        last = f"status {r.status}, {proxy.hit_header}: {r.headers.get(proxy.hit_header)!r}"
        time.sleep(0.1)
    raise ScenarioError(f"{proxy.name} never answered a hit for {path} ({last})")


def ensure_running(proxy: Proxy) -> None:
    if not proxy.running():
        code = proxy.proc.popen.returncode if proxy.proc and proxy.proc.popen else None
        raise BenchError(f"{proxy.name} exited (status {code})", proxy.tail())


@dataclass(frozen=True)
class WrkScenario(Scenario):
    """Repeated GETs of one cached object by wrk: throughput, latency, CPU per request."""

    name: str
    description: str
    path: str
    size: int
    threads: int
    connections: int
    metrics: tuple[Metric, ...]
    headers: tuple[str, ...] = ()
    timeout: str | None = None

    def prepare(self, ctx: Context, proxy: Proxy) -> None:
        warm_until_hit(proxy, self.path, self.size)
        if ctx.args.warmup > 0:  # unmeasured: connections, page cache, allocator
            run_wrk(
                ctx,
                proxy,
                self.path,
                self.threads,
                self.connections,
                ctx.args.warmup,
                self.headers,
                self.timeout,
            )

    def measure(self, ctx: Context, proxy: Proxy, seconds: int) -> Sample:
        warm_until_hit(proxy, self.path, self.size)  # still cached (max-age can lapse)
        meter = CpuMeter(proxy)
        wrk, command = run_wrk(
            ctx,
            proxy,
            self.path,
            self.threads,
            self.connections,
            seconds,
            self.headers,
            self.timeout,
        )
        cpu = meter.stop()
        requests = max(wrk.requests, 1)
        values = {
            "rps": wrk.rps,
            "p50_ms": wrk.latency_ms.get("50", float("nan")),
            "p99_ms": wrk.latency_ms["99"],
            "gbps": wrk.transfer_per_s / 1e9,
            "cpu_us_per_req": cpu.proxy_s / requests * 1e6,
            "cpu_pct": cpu.pct(cpu.proxy_s),
            "wrk_cpu_pct": cpu.pct(cpu.wrk_s),
            "other_cpu_pct": cpu.pct(cpu.other_s),
        }
        warnings = []
        if values["other_cpu_pct"] > OTHER_LOAD_WARN_PCT:
            warnings.append(
                f"machine not idle: other processes used {values['other_cpu_pct']:.0f}% of a core"
            )
        if wrk.errors:
            warnings.append(", ".join(f"{k} errors: {v}" for k, v in wrk.errors.items()))
        if wrk.bytes_read / requests < self.size * 0.99:
            warnings.append(
                f"{wrk.bytes_read / requests:.0f} bytes per response, object is {self.size}"
            )
        return Sample(values, cpu, wrk, command, warnings)

    def setup(self) -> str:
        return (
            f"{self.description}: `wrk -t{self.threads} -c{self.connections} -d<N>s "
            f"--latency -H 'Host: {DOMAIN}' {self.path}`"
        )


SCENARIOS: list[Scenario] = [
    WrkScenario(
        name="small-hit",
        description=f"cache hit on a {LOGO.size}-byte image",
        path=LOGO.path,
        size=LOGO.size,
        threads=2,
        connections=64,
        metrics=(RPS, P99, CPU_PER_REQ),
    ),
    # Next issue: page-hit (PAGE, 20 KiB), large-hit (VIDEO, GB/s via GBPS), range-hit
    # (headers=("Range: bytes=...",)), cold-herd and cold-seek (new Scenario subclasses that
    # reset the caches in prepare), memory (RSS of proxy.pids()).
]


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class ScenarioResult:
    scenario: Scenario
    samples: dict[str, list[Sample]]
    error: str | None = None

    def median(self, proxy: str, key: str) -> float | None:
        values = [s.values[key] for s in self.samples.get(proxy, [])]
        return statistics.median(values) if values else None


def _val(values: dict[str, float], key: str, digits: int) -> str:
    return f"{values[key]:,.{digits}f}" if key in values else "-"


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def summary_rows(results: Sequence[ScenarioResult], proxies: Sequence[str]) -> list[list[str]]:
    rows = []
    for res in results:
        if res.error:
            rows.append([res.scenario.name, "FAILED", *("-" for _ in proxies), res.error])
            continue
        for m in res.scenario.metrics:
            vals = [res.median(p, m.key) for p in proxies]
            ratio = _ratio(vals[0], vals[1]) if len(vals) == 2 else "-"
            rows.append([res.scenario.name, m.title, *(_fmt(v, m.digits) for v in vals), ratio])
    return rows


def summary_header(proxies: Sequence[str]) -> list[str]:
    ratio = f"{proxies[0]}/{proxies[1]}" if len(proxies) == 2 else "ratio"
    return ["scenario", "metric", *proxies, ratio]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(column: list[str]) -> bool:
    cells = [c for c in column if c != "-"]
    return bool(cells) and all(re.fullmatch(r"[-+\d.,x%]+", c) for c in cells)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    columns = [[r[i] for r in rows] for i in range(len(header))]
    align = ["---:" if col and _numeric(col) else "---" for col in columns]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])


def _output(argv: Sequence[str], check: bool = False) -> str:
    """stdout and stderr of a short command; "" if it cannot run (or fails, with check)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return "" if check and done.returncode != 0 else done.stdout + done.stderr


def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
    osrel = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            osrel[k] = v.strip('"')
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model[1].strip() if model else platform.processor() or "?",
        "memory": f"{int(mem[1]) / 1024 / 1024:.1f} GiB" if mem else "?",
        "os": osrel.get("PRETTY_NAME", "?"),
        "kernel": platform.release(),
    }


def write_results(
    path: Path,
    ctx: Context,
    results: Sequence[ScenarioResult],
    proxies: Sequence[Proxy],
    command: str,
    started: dt.datetime,
) -> None:
    names = [p.name for p in proxies]
    machine = machine_info()
    args = ctx.args
    wrk_version = _output([ctx.wrk, "-v"]).splitlines()[0].split(" Copyright")[0]
    runs_header = [
        "scenario",
        "proxy",
        "run",
        "req/s",
        "p50 ms",
        "p99 ms",
        "proxy CPU s",
        "CPU µs/req",
        "proxy / wrk / other CPU, % of a core",
        "warnings",
    ]
    runs = []
    for res in results:
        for name in names:
            for i, s in enumerate(res.samples.get(name, []), 1):
                v = s.values
                runs.append(
                    [
                        res.scenario.name,
                        name,
                        str(i),
                        _val(v, "rps", 0),
                        _val(v, "p50_ms", 2),
                        _val(v, "p99_ms", 2),
                        f"{s.cpu.proxy_s:.2f}",
                        _val(v, "cpu_us_per_req", 1),
                        " / ".join(
                            f"{s.cpu.pct(x):.0f}"
                            for x in (s.cpu.proxy_s, s.cpu.wrk_s, s.cpu.other_s)
                        ),
                        "; ".join(s.warnings) or "-",
                    ]
                )
    warnings = [
        f"{r.scenario.name} / {n} run {i}: {w}"
        for r in results
        for n in names
        for i, s in enumerate(r.samples.get(n, []), 1)
        for w in s.warnings
    ]
    failures = [f"{r.scenario.name}: {r.error}" for r in results if r.error]
    flagged = sum(1 for r in results for n in names for s in r.samples.get(n, []) if s.warnings)
    total = sum(len(r.samples.get(n, [])) for r in results for n in names)
    caution = (
        f"\n**Caution: {flagged} of {total} runs were flagged (see Notes); the medians include "
        "them.**\n"
        if flagged
        else ""
    )
    only = (
        ""
        if names == ["edge", "nginx"]
        else (f"\n**Only {', '.join(names)} ran in this run: no comparison.**\n")
    )
    lines = [
        "# Benchmark results: cdn-edge vs nginx proxy_cache",
        "",
        f"Written by `benchmarks/run.py` on {started:%Y-%m-%d %H:%M %Z}. Do not edit by hand:",
        "rerun the benchmark (`make bench`). How to read it: benchmarks/README.md.",
        only + caution,
        f"Medians of {args.reps} run(s) of {args.duration} s per proxy and scenario.",
        "Ratio = edge / nginx: above 1 is better for the edge on a 'higher is better' metric,",
        "below 1 is better for the edge on a 'lower is better' one.",
        "",
        md_table(summary_header(names), summary_rows(results, names)),
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, nproc {machine['nproc']}",
        f"- memory: {machine['memory']}; OS: {machine['os']}; kernel {machine['kernel']}",
        "",
        "## Versions",
        "",
        *(f"- {p.name}: {p.version()}" for p in proxies),
        f"- Python: {platform.python_version()} ({_rel(sys.executable)})",
        f"- wrk: {wrk_version}",
        "",
        "## Command",
        "",
        f"    {command}",
        "",
        f"Workers: {args.workers} (edge `workers`, nginx `worker_processes`). Runs interleaved "
        f"({', '.join(names)}, {', '.join(names)}, ...), {args.warmup} s unmeasured wrk warm-up "
        "per proxy and scenario after the cache answered a hit.",
        "",
        "Scenarios:",
        "",
        *(f"- `{r.scenario.name}`: {r.scenario.setup()}" for r in results),
        "",
        "## All runs",
        "",
        md_table(runs_header, runs) if runs else "(none)",
        "",
        "## Notes",
        "",
        "- Everything runs on this one machine over 127.0.0.1: wrk, the origin and the proxy",
        f"  share its {machine['nproc']} CPU(s). wrk's own CPU use caps what either proxy can",
        "  reach, so requests/s are comparative, not absolute; CPU µs/request (the proxy's",
        "  processes only, from /proc/PID/stat utime+stime, reaped children included) is the",
        "  efficiency figure least disturbed by that.",
        "- nginx: Debian's package, `proxy_cache` on disk (served from the page cache),",
        "  `proxy_cache_lock on`, freshness from the origin's Cache-Control, access log off,",
        "  upstream keep-alive. The config is benchmarks/nginx.conf.tmpl.",
        "- Both caches start empty; each scenario warms them until they answer a hit.",
        *(f"- warning: {w}" for w in warnings),
        *(f"- FAILED: {f}" for f in failures),
        "",
    ]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Setup and main


def _rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(REPO)) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def _reset_dir(path: Path) -> None:
    path = path.resolve()
    if OUT.resolve() not in path.parents:  # only ever delete inside benchmarks/out
        raise BenchError(f"refusing to delete {path}: not under {OUT}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def ensure_tools(install: bool) -> tuple[str, str]:
    """Paths of nginx and wrk, installing nginx-light and wrk with apt-get when missing."""
    nginx, wrk = _which("nginx"), _which("wrk")
    if nginx and wrk:
        return nginx, wrk
    missing = " and ".join(n for n, p in (("nginx", nginx), ("wrk", wrk)) if not p)
    if not install:
        raise BenchError(f"{missing} not found (apt-get install -y nginx-light wrk)")
    if os.geteuid() != 0 or not _which("apt-get"):
        raise BenchError(f"{missing} not found: install nginx-light and wrk (Debian, as root)")
    print(f"bench: {missing} not found: installing nginx-light and wrk with apt-get", flush=True)
    # Keep the package's own nginx service from starting (it would listen on 0.0.0.0:80):
    # the standard Debian policy-rc.d switch, only while installing and only if none exists.
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if created:
            policy.write_text("#!/bin/sh\n# temporary, benchmarks/run.py\nexit 101\n")
            policy.chmod(0o755)
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx-light", "wrk"]):
            if subprocess.run(argv, env=env, check=False).returncode != 0:
                raise BenchError(f"`{shlex.join(argv)}` failed")
    finally:
        if created:
            policy.unlink(missing_ok=True)
    nginx, wrk = _which("nginx"), _which("wrk")
    if not (nginx and wrk):
        raise BenchError("nginx or wrk still missing after apt-get install")
    return nginx, wrk


def raise_fd_limit() -> None:
    """Soft open-files limit up to the hard one; the servers started later inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))


def find_cdn() -> str:
    for candidate in (Path(sys.executable).parent / "cdn", REPO / ".venv" / "bin" / "cdn"):
        if candidate.exists():
            return str(candidate)
    return _which("cdn") or "cdn"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark cdn-edge against nginx proxy_cache on loopback.",
        epilog="Extra arguments can also come from the BENCH_ARGS environment variable, "
        "e.g. `make bench BENCH_ARGS=--quick`.",
    )
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10)")
    p.add_argument("--reps", type=int, help="runs per proxy and scenario (default 3)")
    p.add_argument("--quick", action="store_true", help="3 s x 1 run (explicit options win)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of unmeasured wrk load per proxy and scenario (default 1)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="edge workers and nginx worker_processes (default 1)"
    )
    p.add_argument(
        "--proxies",
        default="edge,nginx",
        help=f"comma-separated, from {','.join(PROXIES)} (default edge,nginx)",
    )
    p.add_argument(
        "--scenario",
        action="append",
        dest="scenarios",
        metavar="NAME",
        choices=[s.name for s in SCENARIOS],
        help="run only this scenario (repeatable; default all)",
    )
    p.add_argument(
        "--origin-cmd",
        default=DEFAULT_ORIGIN_CMD,
        help="origin command; {cdn} {python} {listen} {host} {port} {dir} are "
        f"filled in (default: {DEFAULT_ORIGIN_CMD!r})",
    )
    p.add_argument(
        "--edge-cmd",
        default=DEFAULT_EDGE_CMD,
        help="edge command; {cdn} {python} {config} are filled in "
        f"(default: {DEFAULT_EDGE_CMD!r})",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=HERE / "RESULTS.md",
        help="where to write the results (default benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each server to become ready (default 30)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="never run apt-get; fail if nginx or wrk is missing",
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 10)
    args.reps = args.reps or (1 if args.quick else 3)
    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROXIES]
    if unknown or not names or len(set(names)) != len(names):
        p.error(f"--proxies: expected names from {', '.join(PROXIES)}, got {args.proxies!r}")
    args.proxy_names = names
    if min(args.duration, args.reps, args.workers) < 1 or args.warmup < 0:
        p.error("--duration, --reps and --workers must be at least 1, --warmup at least 0")
    return args


class Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_signalled(signum: int, _frame: FrameType | None) -> None:
    raise Signalled(signum)


@contextlib.contextmanager
def exclusive_out_dir() -> Iterator[None]:
    """One benchmark at a time: they would share benchmarks/out and the CPUs."""
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise BenchError("another benchmark is running (benchmarks/out/.lock)") from e
        yield


def run(args: argparse.Namespace, command: str, stack: list[Origin | Proxy]) -> int:
    started = dt.datetime.now().astimezone()
    reap_stale_groups()
    raise_fd_limit()
    nginx, wrk = ensure_tools(not args.no_install)
    ctx = Context(args=args, cdn=find_cdn(), nginx=nginx, wrk=wrk, origin_port=free_port())
    LOGS.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios]

    origin = Origin(ctx)
    stack.append(origin)
    print(f"bench: origin on {HOST}:{origin.port} ({shlex.join(origin.proc.argv)})", flush=True)
    origin.start()
    proxies: list[Proxy] = []
    for name in args.proxy_names:
        proxy = PROXIES[name](ctx)
        stack.append(proxy)
        proxies.append(proxy)
        print(f"bench: starting {name} on {HOST}:{proxy.port}", flush=True)
        proxy.start()

    results: list[ScenarioResult] = []
    for sc in scenarios:
        res = ScenarioResult(sc, {p.name: [] for p in proxies})
        results.append(res)
        print(f"bench: {sc.name}: {sc.description}", flush=True)
        try:
            for proxy in proxies:
                sc.prepare(ctx, proxy)
            for rep in range(1, args.reps + 1):
                for proxy in proxies:
                    s = sc.measure(ctx, proxy, args.duration)
                    ensure_running(proxy)
                    res.samples[proxy.name].append(s)
                    shown = "  ".join(
                        f"{m.label} {_val(s.values, m.key, m.digits)}" for m in sc.metrics
                    )
                    cpu = " / ".join(
                        f"{s.cpu.pct(x):.0f}" for x in (s.cpu.proxy_s, s.cpu.wrk_s, s.cpu.other_s)
                    )
                    print(
                        f"  {proxy.name:<6} run {rep}/{args.reps}: {shown}"
                        f"  (CPU % of a core, proxy / wrk / other: {cpu})"
                        + "".join(f"\n         WARNING: {w}" for w in s.warnings),
                        flush=True,
                    )
        except ScenarioError as e:
            res.error = str(e)
            print(f"  FAILED: {e}", flush=True)
        for proxy in proxies:
            ensure_running(proxy)

    names = [p.name for p in proxies]
    print()
    print(text_table(summary_header(names), summary_rows(results, names)))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.results, ctx, results, proxies, command, started)
    (OUT / "results.json").write_text(
        json.dumps(
            {
                r.scenario.name: {
                    "error": r.error,
                    "runs": {
                        n: [
                            {
                                **s.values,
                                "cpu_seconds": {
                                    "proxy": s.cpu.proxy_s,
                                    "wrk": s.cpu.wrk_s,
                                    "other": s.cpu.other_s,
                                    "wall": s.cpu.wall_s,
                                },
                                "command": s.command,
                                "warnings": s.warnings,
                                "wrk_errors": s.wrk.errors,
                            }
                            for s in r.samples[n]
                        ]
                        for n in names
                    },
                }
                for r in results
            },
            indent=2,
        )
    )
    print(f"\nbench: wrote {_rel(args.results)} and {_rel(OUT / 'results.json')}")
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = [*sys.argv[1:], *shlex.split(os.environ.get("BENCH_ARGS", ""))]
    args = parse_args(argv)
    command = shlex.join([_rel(sys.executable), _rel(Path(__file__)), *argv])
    signal.signal(signal.SIGTERM, _raise_signalled)
    signal.signal(signal.SIGHUP, _raise_signalled)
    stack: list[Origin | Proxy] = []
    try:
        with exclusive_out_dir():
            try:
                return run(args, command, stack)
            finally:
                stop_all(stack)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        if e.detail:
            print(e.detail, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    except Signalled as e:
        print(f"\nbench: stopped by {e}", file=sys.stderr)
        return 128 + e.signum


def stop_all(stack: Sequence[Origin | Proxy]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    for item in reversed(stack):
        try:
            item.stop()
        except Exception as e:  # keep stopping the others
            print(f"bench: warning: stopping failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
