"""`cdn control --config FILE`: migrate the database and serve the API until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from control.app import make_app
from control.config import ControlConfig, load_config
from edge.config import ConfigError

log = logging.getLogger("control")


def main(path: str, loop_name: str = "asyncio") -> int:
    """Exit code: 2 for a bad config (one line on stderr, as `cdn edge`), 1 when the database or
    the listen address cannot be used, 0 after a clean stop."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"cdn: {exc}", file=sys.stderr)
        return 2
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(serve(config))
    return asyncio.run(serve(config))


async def serve(config: ControlConfig) -> int:
    runner = web.AppRunner(make_app(config))
    try:
        await runner.setup()  # migrates the database
        host, port = config.listen
        site = web.TCPSite(runner, host, port)
        await site.start()
    except (OSError, SQLAlchemyError) as exc:
        print(f"cdn: control: cannot start: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        await runner.cleanup()
        return 1
    log.info("control plane listening on %s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
