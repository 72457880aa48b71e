"""`cdn up` (what `make run` starts), run as a user runs it: a subprocess, driven with the
commands it prints. Only the ports and the state directory differ from configs/demo.toml.
`cdn up` runs its own event loops, so the test's loop (one of them) only drives the clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.test_supervisor import on_one_loop
from tests.rawhttp import request

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Distinct free ports: every socket stays bound until all are chosen (one released
    before the next bind could be handed out twice)."""
    socks = []
    try:
        for _ in names:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return {name: int(sock.getsockname()[1]) for name, sock in zip(names, socks, strict=True)}
    finally:
        for sock in socks:
            sock.close()


def _demo_config(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    ports = _free_ports(("edge", "admin", "origin", "control"))
    text = (CONFIGS / "demo.toml").read_text()
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{ports['edge']}")
    text = text.replace("127.0.0.1:9080", f"127.0.0.1:{ports['admin']}")
    text = text.replace("127.0.0.1:8001", f"127.0.0.1:{ports['origin']}")
    text = text.replace('"var/demo/edge"', f'"{tmp_path}/demo/edge"')
    text = text.replace('disk = "2GiB"', 'disk = "256MiB"')
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path, ports


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> str:
    seen: list[str] = []

    async def read() -> None:
        while line := await stream.readline():
            seen.append(line.decode(errors="replace"))
            if marker in seen[-1]:
                return
        raise AssertionError("cdn up ended before printing " + repr(marker) + ":\n" + "".join(seen))

    await asyncio.wait_for(read(), timeout)
    return "".join(seen)


def _printed(printed: str, marker: str) -> list[str]:
    """The words of the one printed command line containing `marker`, as a shell splits them
    (a `&` or `#` left unquoted would show up as a word of its own)."""
    [line] = [line for line in printed.splitlines() if marker in line]
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # words end only at blanks and punctuation, as in a shell
    words = list(lexer)
    assert not {"&", "&&", ";", "|"} & set(words), line
    return words


async def _curl(api: aiohttp.ClientSession, printed: str, marker: str) -> tuple[int, Any]:
    """Run the printed `curl -s -H 'Authorization: ...' URL` whose URL contains `marker`."""
    words = _printed(printed, marker)
    assert words[:3] == ["curl", "-s", "-H"] and len(words) == 5, words
    name, _, value = words[3].partition(": ")
    async with api.get(words[4], headers={name: value}) as resp:
        return resp.status, json.loads(await resp.read())


@on_one_loop
async def test_cdn_up_serves_through_an_edge_attached_to_its_control_plane(
    tmp_path: Path,
) -> None:
    config, ports = _demo_config(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge.cli",
        "up",
        "--config",
        str(config),
        "--control-listen",
        f"127.0.0.1:{ports['control']}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        printed = await _read_until(proc.stdout, "Ctrl-C stops it.", 90)
        account = re.search(r"demo account\s+(\S+)", printed)
        operator = re.search(r"operator\s+(\S+)", printed)
        assert account and operator, printed
        control = f"http://127.0.0.1:{ports['control']}"
        assert f"{control}/v1" in printed

        edge, host = ports["edge"], "demo.cdn.test"
        first = await request(edge, "/img/logo.png", host)
        assert first.status == 200 and len(first.body) == 4096
        again = await request(edge, "/img/logo.png", host)
        assert "hit" in (again.header("cache-status") or "")

        async with aiohttp.ClientSession(base_url=control) as api:
            as_operator = {"Authorization": f"Bearer {operator.group(1)}"}
            as_account = {"Authorization": f"Bearer {account.group(1)}"}
            async with api.get("/v1/domains", headers=as_account) as resp:
                assert [d["name"] for d in (await resp.json())["domains"]] == ["demo.cdn.test"]
            async with api.post(
                "/v1/domains/demo.cdn.test/suspend", json={"reason": "demo"}, headers=as_operator
            ) as resp:
                assert resp.status == 200
            for _ in range(100):
                refused = await request(edge, "/img/logo.png", host)
                if refused.status == 403:
                    break
                await asyncio.sleep(0.02)
            assert refused.status == 403 and refused.body == b"domain suspended: demo\n"

            # Billing is set up, and the usage and billing commands it prints answer.
            status, hourly = await _curl(api, printed, "granularity=1h")
            assert status == 200, hourly
            assert (hourly["granularity"], hourly["timezone"]) == ("1h", "Asia/Shanghai")
            assert len(hourly["points"]) == 24 and len(hourly["daily_peak_mbps"]) == 1
            assert {"requests", "bytes_sent", "hit_ratio"} <= set(hourly["points"][0])
            status, daily = await _curl(api, printed, "granularity=1d")
            assert status == 200, daily
            [month] = daily["p95_mbps"]
            assert len(daily["points"]) == len(daily["daily_peak_mbps"]) >= 28
            status, bill = await _curl(api, printed, "/v1/bills?month=")
            assert status == 200, bill
            assert bill["month"] == month["month"]
            assert {"days", "totals", "balance_fen"} <= set(bill)
            assert (bill["billing"], bill["charge_by"], bill["price_list"]) == (
                "postpaid",
                "traffic",
                "demo",
            )
            assert [(p["quota_bytes"], p["state"]) for p in bill["packages"]] == [
                (100_000_000, "live")
            ]
            status, balance = await _curl(api, printed, "/balance")
            assert status == 200 and balance["balance_fen"] == 0, balance
            status, notices = await _curl(api, printed, "/v1/notices")
            assert (status, notices) == (200, {"notices": []})

        settle = _printed(printed, "control settle")
        assert settle[:3] == [".venv/bin/cdn", "control", "settle"]
        settled = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edge.cli",
            *settle[1:],
            env={k: v for k, v in os.environ.items() if k != "CDN_ADMIN_TOKEN"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(settled.communicate(), 60)
        day = settle[-1]
        # Today has not ended (unless midnight in Shanghai passed since it was printed).
        assert settled.returncode == 0
        assert re.fullmatch(rf"account 1: {day} (not settled .*|charge 0 fen, .*)\n", out.decode())
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
