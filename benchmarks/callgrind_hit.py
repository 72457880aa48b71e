"""Instructions per small cache hit in one edge worker, access log on and off (callgrind).

A diagnostic beside `run.py`, not a benchmark against nginx: valgrind's callgrind counts the
instructions the worker runs, which other load on the machine does not change, so two runs of
the same code give the same figure (to about 0.2 %) where requests/s swing by several percent.
It starts a small origin, then for each mode an edge (`python -m edge.cli edge`, 1 worker) under
`valgrind --tool=callgrind --trace-children=yes`; sends WARMUP keep-alive GETs for one 4 KiB
object, zeroes the worker's counters, sends --requests more, dumps them, and prints
instructions per request (user space of the worker only: no kernel time).

    .venv/bin/python benchmarks/callgrind_hit.py [--requests 5000] [--modes on,off]

Under valgrind the edge runs ~50 times slower: every request starts a new millisecond and each
0.5 s log flush holds a few hundred lines, which makes per-line costs look larger than at full
speed. `callgrind_annotate --inclusive=yes benchmarks/out/callgrind/<mode>/cg.<pid>.1` shows
where (C functions by name; Python frames as _PyEval_EvalFrameDefault). PYTHONPATH=<tree> runs
another tree's edge with this venv.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "callgrind"
HOST = "127.0.0.1"
DOMAIN = "bench.cdn.test"
WARMUP = 500
BODY = b"x" * 4096


class Origin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Cache-Control", "max-age=3600")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_ready(admin: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"callgrind_hit: the edge exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(HOST, admin, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"callgrind_hit: the edge was not ready within {timeout:.0f} s")


def worker_pids(supervisor: int) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-P", str(supervisor)], capture_output=True, text=True, check=False
    )
    return found.stdout.split()


def measure(mode: str, origin_port: int, requests: int) -> float:
    out = OUT / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port, admin = free_port(), free_port()
    config = out / "edge.toml"
    config.write_text(
        "[edge]\n"
        f'listen = "{HOST}:{port}"\nadmin_listen = "{HOST}:{admin}"\nworkers = 1\n'
        f'state_dir = "{out / "state"}"\n'
        f'[[domains]]\nname = "{DOMAIN}"\norigins = ["http://{HOST}:{origin_port}"]\n'
        + ("\n[logs]\nenabled = false\n" if mode == "off" else "")
    )
    argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
            f"--callgrind-out-file={out}/cg.%p",
            sys.executable, "-m", "edge.cli", "edge", "--config", str(config)]  # fmt: skip
    with open(out / "edge.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(admin, proc, 300)
        conn = http.client.HTTPConnection(HOST, port, timeout=60)

        def get(count: int) -> None:
            for _ in range(count):
                conn.request("GET", "/img/logo.png", headers={"Host": DOMAIN, "User-Agent": "cg"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    sys.exit(f"callgrind_hit: the edge answered {response.status}")

        get(WARMUP)
        workers = worker_pids(proc.pid)
        if len(workers) != 1:
            sys.exit(f"callgrind_hit: expected one worker process, found {workers}")
        subprocess.run(["callgrind_control", "-z", workers[0]], capture_output=True, check=True)
        get(requests)
        time.sleep(1.5)  # the log's flushes of these requests
        subprocess.run(["callgrind_control", "-d", workers[0]], capture_output=True, check=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    dump = out / f"cg.{workers[0]}.1"
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1]) / requests
    sys.exit(f"callgrind_hit: no summary in {dump}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="measured requests")
    parser.add_argument("--modes", default="on,off", help="access log on, off, or both")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not shutil.which("valgrind") or any(m not in ("on", "off") for m in modes):
        sys.exit("callgrind_hit: needs valgrind on PATH and --modes from on,off")
    origin = ThreadingHTTPServer((HOST, 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    results: dict[str, float] = {}
    try:
        for mode in modes:
            results[mode] = measure(mode, origin.server_address[1], args.requests)
            print(f"access log {mode}: {results[mode]:,.0f} instructions per small hit", flush=True)
    finally:
        origin.shutdown()
    if len(results) == 2:
        extra = results["on"] / results["off"] - 1
        print(f"the access log adds {results['on'] - results['off']:,.0f} ({extra:+.1%})")


if __name__ == "__main__":
    main()
