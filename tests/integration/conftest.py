"""Fixtures for end-to-end tests: real origin servers, a real edge, real sockets.

Every async test here runs twice: on the default asyncio loop and on uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from edge.config import parse_config
from edge.worker import EdgeWorker

HOST = "www.example.test"


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Edge:
    def __init__(self, worker: EdgeWorker) -> None:
        self.worker = worker
        self.port = worker.port
        self.url = f"http://127.0.0.1:{worker.port}"
        self.admin_url = f"http://127.0.0.1:{worker.admin_port}"

    @property
    def stats(self) -> Any:
        return self.worker.stats


EdgeFactory = Callable[..., Awaitable[Edge]]
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def make_edge(tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    """Start an edge in front of the given origin URLs; extra TOML is appended per domain."""
    workers: list[EdgeWorker] = []

    async def start(
        origins: list[str], *, domain: str = HOST, domain_extra: str = "", top_extra: str = ""
    ) -> Edge:
        origin_list = ", ".join(f'"{o}"' for o in origins)
        text = f"""
[edge]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "{tmp_path / 'edge'}"
{top_extra}

[[domains]]
name = "{domain}"
origins = [{origin_list}]
{domain_extra}
"""
        worker = EdgeWorker(parse_config(text, "test.toml"))
        await worker.start()
        workers.append(worker)
        return Edge(worker)

    yield start
    for worker in workers:
        await worker.stop(grace=1.0)


class Origin:
    """An aiohttp origin whose routes a test sets; counts requests per path."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"
        self.hits: dict[str, int] = {}
        self.requests: list[web.Request] = []


@pytest.fixture
async def make_origin() -> AsyncIterator[Callable[..., Awaitable[Origin]]]:
    servers: list[TestServer] = []

    async def start(routes: dict[str, Route]) -> Origin:
        holder: dict[str, Origin] = {}

        async def dispatch(request: web.Request) -> web.StreamResponse:
            origin = holder["origin"]
            origin.hits[request.path] = origin.hits.get(request.path, 0) + 1
            origin.requests.append(request)
            handler = routes.get(request.path)
            if handler is None:
                return web.Response(status=404, text="no such route\n")
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", dispatch)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        origin = Origin(server)
        holder["origin"] = origin
        return origin

    yield start
    for server in servers:
        await server.close()
