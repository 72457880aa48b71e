"""`cdn` command line: `cdn edge`, `cdn control`, `cdn origin`, `cdn up` (the demo)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from edge.config import ConfigError, EdgeConfig, load_config

T = TypeVar("T")


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _run(main: Coroutine[Any, Any, T], loop_name: str) -> T:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _load(path: str) -> EdgeConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"cdn: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _edge(path: str, loop_name: str, log_level: str, drain_timeout: float) -> int:
    from edge.supervisor import read_config, supervise

    try:
        config, text = read_config(path)
    except ConfigError as e:
        print(f"cdn: {e}", file=sys.stderr)
        return 2
    return _run(
        supervise(
            config, text, loop_name=loop_name, log_level=log_level, drain_timeout=drain_timeout
        ),
        loop_name,
    )


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _origin_main(host: str, port: int, directory: Path) -> None:
    from edge.sample_origin import ensure_sample_files, serve_origin

    ensure_sample_files(directory)
    runner = await serve_origin(host, port, directory)
    print(f"sample origin on http://{host}:{port}/ serving {directory}", flush=True)
    try:
        await _wait_for_signal()
    finally:
        await runner.cleanup()


def _demo(config: EdgeConfig, control_listen: tuple[str, int], loop_name: str) -> int:
    from edge.demo import DemoError, run_demo

    try:
        _run(run_demo(config, control_listen), loop_name)
    except DemoError as e:
        print(f"cdn: demo: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdn", description="cdn-edge: edge CDN and control plane")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (default uvloop)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_edge = sub.add_parser(
        "edge",
        help="run an edge from a config file",
        description="Run a supervisor and `workers` worker processes. SIGTERM/SIGINT: drain "
        "and exit; SIGHUP: reload the config file.",
    )
    p_edge.add_argument("--config", required=True, help="edge TOML config")
    p_edge.add_argument(
        "--drain-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long stopping workers may finish in-flight responses (default 10)",
    )
    p_control = sub.add_parser(
        "control",
        help="run the control plane (API and change feed) from a config file",
        description="Migrate the database and serve the /v1 API. SIGTERM/SIGINT: stop.",
    )
    p_control.add_argument("--config", help="control TOML config (required)")
    control_sub = p_control.add_subparsers(dest="control_command")
    p_settle = control_sub.add_parser(
        "settle",
        help="settle a billing day for every account by hand",
        description="Settle every account's billing days up to DATE (in each account's time "
        "zone); prints one line per account with that day's charge. Running it twice changes "
        "nothing.",
    )
    p_settle.add_argument("--config", required=True, help="control TOML config")
    p_settle.add_argument("--date", required=True, help="the billing day, YYYY-MM-DD")
    p_retention = control_sub.add_parser(
        "logs-retention",
        help="run the access-log retention job by hand",
        description="Delete the access logs older than their account's retention and what "
        "customers' delete requests may delete by now (never a domain under a legal hold), as "
        "the control plane does every log_retention_every; prints what it deleted. Running it "
        "twice deletes nothing more.",
    )
    p_retention.add_argument("--config", required=True, help="control TOML config")
    p_origin = sub.add_parser("origin", help="run the sample origin (demo and benchmarks)")
    p_origin.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 8001))
    p_origin.add_argument("--dir", type=Path, default=Path("var/demo/origin"))
    p_up = sub.add_parser(
        "up", help="the demo: a sample origin, a control plane and an edge attached to it"
    )
    p_up.add_argument("--config", default="configs/demo.toml", help="a standalone edge config")
    p_up.add_argument(
        "--control-listen",
        type=_parse_listen,
        default=("127.0.0.1", 9000),
        help="where the demo's control plane listens (default 127.0.0.1:9000)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "edge":
        sys.exit(_edge(args.config, args.loop, args.log_level, args.drain_timeout))
    elif args.command == "control":
        # Alembic announces its plugins at INFO when imported: noise around a bad config's line.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        if args.control_command == "settle":
            from control.billing import settle_main

            sys.exit(settle_main(args.config, args.date))
        if args.control_command == "logs-retention":
            from control.logs import retention_main

            sys.exit(retention_main(args.config))
        if args.config is None:
            p_control.error("the following arguments are required: --config")
        from control.server import main as control_main

        sys.exit(control_main(args.config, args.loop))
    elif args.command == "origin":
        host, port = args.listen
        _run(_origin_main(host, port, args.dir), args.loop)
    else:
        sys.exit(_demo(_load(args.config), args.control_listen, args.loop))


if __name__ == "__main__":
    main()
