"""`cdn up` (`make run`): a sample origin, a control plane and one edge attached to it.

The demo config (configs/demo.toml) is an ordinary standalone edge config; the demo turns it into
the attached form a real deployment uses: its `[[domains]]` go to the control plane through the
API (as a customer would create them), and the edge runs as `cdn edge` with a `[control]`
section and a token of its own. Billing is set up the same way, as an operator would: a price
list, the demo account's terms and a small package, through the API. The control plane runs from
a config file the demo writes (`control.toml` next to the state dir, without secrets: they come
from the environment), so that `cdn control settle` can be pointed at it. Every run starts from
a fresh control database, so the tokens it prints are the ones that work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from control.app import make_app
from control.config import ADMIN_TOKEN_ENV, SECRET_KEY_ENV, ControlConfig, parse_config
from control.rating import billing_date, day_bounds
from edge.config import EdgeConfig
from edge.sample_origin import ensure_sample_files, serve_origin

READY_TIMEOUT = 60.0

# The demo's billing, set up through the operator's API (control/README.md, "Usage, billing and
# notices"): monthly cumulative traffic tiers in fen per GB, the demo account postpaid and
# charged by traffic on them, and a free 100 MB package the first traffic comes out of. The
# list is also the default one, which bills accounts created without terms of their own.
PRICE_LIST = "demo"
PRICES: dict[str, Any] = {
    "traffic_tiers": [
        {"up_to_gb": 10, "fen_per_gb": "80"},
        {"up_to_gb": 100, "fen_per_gb": "60"},
        {"up_to_gb": None, "fen_per_gb": "40"},
    ],
    "fen_per_mbps_day": "100",
    "default": True,
}
TERMS = {"charge_by": "traffic", "price_list": PRICE_LIST}
PACKAGE = {"quota_bytes": 100_000_000, "valid_days": 30, "price_fen": 0}


class DemoError(Exception):
    """The demo could not start; the message is one line for the terminal."""


@dataclass
class DemoTokens:
    admin: str
    account: str


@dataclass(frozen=True)
class DemoAccount:
    id: int
    timezone: str


async def run_demo(config: EdgeConfig, control_listen: tuple[str, int]) -> None:
    """Start everything, print how to use it, run until SIGINT/SIGTERM, stop everything."""
    state_root = Path(config.edge.state_dir).parent
    origin_dir = state_root / "origin"
    print(f"preparing sample files in {origin_dir} ...", flush=True)
    ensure_sample_files(origin_dir)
    domains = _domain_tables(config.source)
    first_origin = urlsplit(config.domains[domains[0]["name"]].origins[0])

    origin = await serve_origin(
        first_origin.hostname or "127.0.0.1", first_origin.port or 80, origin_dir
    )
    database = state_root / "control.db"
    for leftover in state_root.glob("control.db*"):  # -wal and -shm too
        leftover.unlink()
    tokens = DemoTokens(admin=secrets.token_urlsafe(24), account="")
    control_config = _control_config(state_root, database, control_listen, tokens.admin)
    control = web.AppRunner(make_app(control_config), access_log=None)
    edge: asyncio.subprocess.Process | None = None
    try:
        await control.setup()
        await web.TCPSite(control, *control_listen).start()
        control_url = f"http://{control_listen[0]}:{control_listen[1]}"
        async with aiohttp.ClientSession(base_url=control_url) as api:
            account = await _call(
                api, tokens.admin, "POST", "/v1/accounts", {"name": "demo", "billing": "postpaid"}
            )
            tokens.account = account["token"]
            demo_account = await _set_up_billing(api, tokens.admin, account["account"])
            for table in domains:
                await _call(api, tokens.account, "POST", "/v1/domains", table)
            edge_token = (
                await _call(api, tokens.admin, "POST", "/v1/edges", {"name": "demo-edge"})
            )["token"]
        edge_config = _attached_config(config, control_url)
        edge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edge.cli",
            "edge",
            "--config",
            str(edge_config),
            env={**os.environ, "CDN_EDGE_TOKEN": edge_token},
        )
        await _wait_ready(config, edge)
        _print_welcome(config, control_url, domains[0]["name"], tokens)
        _print_billing(control_url, control_config.source, tokens, demo_account)
        await _wait_for_signal(edge)
    finally:
        if edge is not None and edge.returncode is None:
            edge.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(edge.wait(), 15)
            if edge.returncode is None:
                edge.kill()
                await edge.wait()
        await control.cleanup()
        await origin.cleanup()


def _control_config(
    state_root: Path, database: Path, listen: tuple[str, int], admin_token: str
) -> ControlConfig:
    """The demo's control plane, from a config file written next to the state dir: the file
    `cdn control settle --config` reads. The admin token and the secret key (which encrypts
    signing keys and webhook secrets; the database is new on every run too) stay out of it."""
    host, port = listen
    table = {
        "listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "database": f"sqlite:///{database}",
        "cname_suffix": "cdn.demo.test",
        # The demo's origin is on loopback, which the control plane refuses by default.
        "origin_deny": [],
        "log_dir": str(state_root / "control-logs"),
    }
    lines = [
        "# Written by `cdn up`: the demo's control plane. The operator's token is not here:",
        f"# {ADMIN_TOKEN_ENV}=<the operator token it printed>.",
        "[control]",
        *(f"{key} = {json.dumps(value)}" for key, value in table.items()),
    ]
    path = state_root / "control.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    secret_env = {ADMIN_TOKEN_ENV: admin_token, SECRET_KEY_ENV: secrets.token_urlsafe(32)}
    return parse_config(path.read_text(), str(path), env=secret_env)


async def _set_up_billing(
    api: aiohttp.ClientSession, admin: str, account: dict[str, Any]
) -> DemoAccount:
    """The price list, the account's billing terms and its package, as the operator sets them."""
    await _call(api, admin, "PUT", f"/v1/price-lists/{PRICE_LIST}", PRICES)
    await _call(api, admin, "PUT", f"/v1/accounts/{account['id']}/billing", TERMS)
    await _call(api, admin, "POST", f"/v1/accounts/{account['id']}/packages", PACKAGE)
    return DemoAccount(int(account["id"]), str(account["timezone"]))


def _domain_tables(source: str) -> list[dict[str, Any]]:
    """The `[[domains]]` tables of the demo config as written (the API takes the same form)."""
    with open(source, "rb") as file:
        document = tomllib.load(file)
    tables: list[dict[str, Any]] = document["domains"]
    return tables


def _attached_config(config: EdgeConfig, control_url: str) -> Path:
    """The demo config without `[[domains]]`, with `[control]`: written next to the state dir.
    The token stays out of the file (CDN_EDGE_TOKEN)."""
    with open(config.source, "rb") as file:
        document = tomllib.load(file)
    lines = [
        "# Written by `cdn up` from " + config.source + "; domains come from the control plane."
    ]
    # The demo's origin is on loopback, which an attached edge refuses by default.
    document.setdefault("origin", {}).setdefault("deny", [])
    for section in ("edge", "cache", "origin"):
        if section in document:
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in document[section].items()]
    lines += ["[control]", f"url = {json.dumps(control_url)}"]
    path = Path(config.edge.state_dir).parent / "edge.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


async def _call(
    api: aiohttp.ClientSession, token: str, method: str, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with api.request(method, path, json=body, headers=headers) as resp:
        answer: dict[str, Any] = await resp.json(content_type=None)
        if resp.status >= 300:
            raise DemoError(f"{method} {path}: {resp.status} {answer.get('detail', answer)}")
        return answer


async def _wait_ready(config: EdgeConfig, edge: asyncio.subprocess.Process) -> None:
    host, port = config.edge.admin_listen
    url = f"http://{host}:{port}/readyz"
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while True:
            if edge.returncode is not None:
                raise DemoError(f"the edge exited with status {edge.returncode} (see above)")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise DemoError(f"the edge was not ready after {READY_TIMEOUT:.0f} s ({url})")
            await asyncio.sleep(0.2)


async def _wait_for_signal(edge: asyncio.subprocess.Process) -> None:
    """Until Ctrl-C or SIGTERM, or the edge dies on its own."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    exited = asyncio.create_task(edge.wait())
    try:
        await asyncio.wait({stopped, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopped, exited):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if edge.returncode is not None:
        raise DemoError(f"the edge exited with status {edge.returncode} (see above)")


def _print_welcome(config: EdgeConfig, control_url: str, name: str, tokens: DemoTokens) -> None:
    host, port = config.edge.listen
    edge = f"http://{host}:{port}"
    admin = f"http://{config.edge.admin_listen[0]}:{config.edge.admin_listen[1]}"
    origin = config.domains[name].origins[0]
    api = f"curl -s -H 'Authorization: Bearer {tokens.account}'"
    op = f"curl -s -H 'Authorization: Bearer {tokens.admin}'"
    state = config.edge.state_dir
    print(
        f"""
cdn-edge demo is up.
  sample origin  {origin}
  control plane  {control_url}/v1   (OpenAPI: {control_url}/v1/openapi.json)
  edge           {edge}   (serves Host: {name}, from the control plane)
  edge admin     {admin}/metrics  /healthz  /readyz

Tokens (new on every run; shown once, stored hashed):
  operator       {tokens.admin}
  demo account   {tokens.account}

Try the edge:
  curl -sI -H 'Host: {name}' {edge}/img/logo.png          # twice: Cache-Status turns to hit
  curl -s  -H 'Host: {name}' -H 'Range: bytes=0-99' {edge}/video/demo.mp4 | wc -c
  curl -sI -H 'Host: {name}' {edge}/api/time              # no-store: never cached

Try the control plane (the edge obeys within milliseconds):
  {api} {control_url}/v1/domains
  {api} -X POST {control_url}/v1/purge -d '{{"type": "url", "urls": ["http://{name}/img/logo.png"]}}'
  {op} -X POST {control_url}/v1/domains/{name}/suspend -d '{{"reason": "demo"}}'
  curl -si -H 'Host: {name}' {edge}/img/logo.png | head -1   # 403 while suspended
  {op} -X POST {control_url}/v1/domains/{name}/resume
  curl -s  {admin}/metrics | grep cdn_edge_config_version

Access logs (a line per request; an hour is downloadable a few seconds after it ends):
  .venv/bin/python -m edge.accesslog {state}/logs/{name}/*.jsonl   # this hour, at the edge
  {api} '{control_url}/v1/logs?domain={name}'                      # closed hours
  {api} {control_url}/v1/logs/{name}/YYYY-MM-DDTHH | zcat""",
        flush=True,
    )


def _utc(instant: datetime) -> str:
    """An instant for a query string: `Z`, since a `+` there would read as a space."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_billing(
    control_url: str, control_file: str, tokens: DemoTokens, account: DemoAccount
) -> None:
    """Usage, bill, balance, notices and settlement of the demo account, for its billing day
    and month as they are now (days and months are the account's timezone's)."""
    today = billing_date(datetime.now(UTC), account.timezone)
    day_start, day_end = day_bounds(today, account.timezone)
    first = today.replace(day=1)
    month_start = day_bounds(first, account.timezone)[0]
    month_end = day_bounds((first + timedelta(days=31)).replace(day=1), account.timezone)[0]
    api = f"curl -s -H 'Authorization: Bearer {tokens.account}'"
    op = f"curl -s -H 'Authorization: Bearer {tokens.admin}'"
    usage = f"{control_url}/v1/usage"
    settle = ".venv/bin/cdn control settle"  # it needs no token (it serves no API)
    package_mb = PACKAGE["quota_bytes"] // 10**6
    print(
        f"""
Usage and billing (account {account.id}: postpaid, charged by traffic on the price list
"{PRICE_LIST}", a {package_mb} MB package first; edges ship each 5-minute window once it ends).
Today ({today}, {account.timezone}) by the hour, then {first:%Y-%m} by day with its 95th percentile:
  {api} '{usage}?granularity=1h&from={_utc(day_start)}&to={_utc(day_end)}'
  {api} '{usage}?granularity=1d&from={_utc(month_start)}&to={_utc(month_end)}'
The bill of the month, packages and notices; the balance as the operator sees it:
  {api} '{control_url}/v1/bills?month={first:%Y-%m}'
  {api} {control_url}/v1/packages
  {api} {control_url}/v1/notices
  {op} {control_url}/v1/accounts/{account.id}/balance
Settle by hand ("not settled" until the day ends; the control plane settles ended days itself):
  {settle} --config {control_file} --date {today}

Ctrl-C stops it.""",
        flush=True,
    )
