"""`[control]` configuration and `cdn control`: bad files are one line naming file, key and
problem, exit code 2; the example config documents every key and loads."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from control.config import ADMIN_TOKEN_ENV, ORIGIN_DENY, ControlConfig, load_config, parse_config
from edge.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GOOD = """
[control]
listen = "0.0.0.0:9100"
database = "postgresql://cdn@db.example/control"
admin_token = "file-token"
cname_suffix = "CDN.Example.NET."
heartbeat = "20s"
change_log_keep = "2d"
origin_deny = ["10.0.0.0/8", "fd00::/8"]
"""


def test_a_full_config_loads() -> None:
    config = parse_config(GOOD, "c.toml", env={})
    assert config == ControlConfig(
        source="c.toml",
        admin_token="file-token",
        cname_suffix="cdn.example.net",
        listen=("0.0.0.0", 9100),
        database="postgresql://cdn@db.example/control",
        heartbeat=20.0,
        change_log_keep=2 * 86400.0,
        origin_deny=(ip_network("10.0.0.0/8"), ip_network("fd00::/8")),
    )
    assert "file-token" not in repr(config)


def test_defaults_and_the_admin_token_from_the_environment() -> None:
    text = '[control]\ncname_suffix = "cdn.test"\n'
    config = parse_config(text, "c.toml", env={ADMIN_TOKEN_ENV: "env-token"})
    assert (config.admin_token, config.listen, config.database) == (
        "env-token",
        ("127.0.0.1", 9000),
        "sqlite:///var/control.db",
    )
    assert (config.heartbeat, config.change_log_keep) == (15.0, 7 * 86400.0)
    # internal addresses: loopback, link-local (cloud metadata), private, CGNAT, ...
    assert config.origin_deny == ORIGIN_DENY == ControlConfig("x", "t", "c").origin_deny
    for address in ("127.0.0.1", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::"):
        assert any(ip_address(address) in net for net in config.origin_deny), address
    for address in ("224.0.0.1", "ff02::1", "10.0.0.1", "172.16.0.1", "192.168.1.1"):
        assert any(ip_address(address) in net for net in config.origin_deny), address
    for address in ("fc00::1", "fdff::1", "100.64.0.1", "100.127.255.255"):
        assert any(ip_address(address) in net for net in config.origin_deny), address
    for address in ("8.8.8.8", "172.32.0.1", "2001:4860::8888", "100.128.0.1"):
        assert not any(ip_address(address) in net for net in config.origin_deny), address
    empty = parse_config(text + "origin_deny = []\n", "c.toml", env={ADMIN_TOKEN_ENV: "t"})
    assert empty.origin_deny == ()


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[control]\ncname_suffix = "cdn.test"\n', "control.admin_token", "CDN_ADMIN_TOKEN"),
        ('[control]\nadmin_token = "t"\n', "control.cname_suffix", "required"),
        ('[control]\nadmin_token = "t"\ncname_suffix = "x y"\n', "control.cname_suffix", "DNS"),
        (GOOD.replace('"20s"', '"soon"'), "control.heartbeat", "not a duration"),
        (GOOD.replace('"20s"', "0"), "control.heartbeat", "more than 0"),
        (GOOD.replace('"2d"', "true"), "control.change_log_keep", "duration"),
        (GOOD.replace('"0.0.0.0:9100"', '"9100"'), "control.listen", "HOST:PORT"),
        (GOOD.replace("9100", "\u00b2"), "control.listen", "HOST:PORT"),
        (GOOD.replace("9100", "\u0669\u0661\u0660\u0660"), "control.listen", "HOST:PORT"),
        (GOOD.replace("9100", "9" * 5000), "control.listen", "HOST:PORT"),
        (GOOD.replace('["10.0.0.0/8", "fd00::/8"]', '"10.0.0.0/8"'), "control.origin_deny", "list"),
        (GOOD.replace('"fd00::/8"', '"fd00::/200"'), "control.origin_deny[1]", "CIDR"),
        (GOOD.replace('"fd00::/8"', "8"), "control.origin_deny[1]", "CIDR"),
        (GOOD.replace("postgresql://", "mysql://"), "control.database", "scheme"),
        (GOOD + "log_retention_days = 90\n", "control.log_retention_days", "below"),
        (GOOD + "log_retention_floor_days = -1\n", "control.log_retention_floor_days", "days"),
        (GOOD + 'log_retention_days = "1y"\n', "control.log_retention_days", "days"),
        (GOOD + 'log_max_upload = "4GB"\n', "control.log_max_upload", "not a size"),
        (GOOD + "log_max_upload = 0\n", "control.log_max_upload", "more than 0"),
        (GOOD + 'log_dir = ""\n', "control.log_dir", "directory"),
        (GOOD.replace('"file-token"', '"a b"'), "control.admin_token", "whitespace"),
        (GOOD + "workers = 3\n", "control.workers", "unknown key"),
        (GOOD + "[edge]\n", "edge", "unknown key"),
        ("listen = 1\n", "listen", "unknown key"),
        ("", "control", "required"),
        ("[control\n", "(toml)", ""),
    ],
)
def test_bad_configs_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text, "c.toml", env={})
    assert excinfo.value.key == key
    assert problem in excinfo.value.problem
    assert "\n" not in str(excinfo.value) and str(excinfo.value).startswith("c.toml: ")


def test_jobs_run_by_hand_need_no_admin_token_or_cname_suffix() -> None:
    """`cdn control settle` and `logs-retention` serve no API: neither key is required, but
    either is still checked when given."""
    job = parse_config('[control]\ndatabase = "sqlite:///x.db"\n', "c.toml", env={}, serving=False)
    assert (job.database, job.admin_token, job.cname_suffix) == ("sqlite:///x.db", "", "")
    for text, key in [
        ('[control]\nadmin_token = "a b"\n', "control.admin_token"),
        ('[control]\ncname_suffix = "x y"\n', "control.cname_suffix"),
    ]:
        with pytest.raises(ConfigError) as excinfo:
            parse_config(text, "c.toml", env={}, serving=False)
        assert excinfo.value.key == key


def test_the_example_documents_every_key_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = ROOT / "configs" / "control.example.toml"
    keys = set(re.findall(r"^(\w+) =", example.read_text(), re.MULTILINE))
    assert keys == {f.name for f in ControlConfig.__dataclass_fields__.values()} - {"source"}
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    assert load_config(example).admin_token == "from-env"


def test_cdn_control_with_a_bad_config_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "control.toml"
    path.write_text('[control]\ncname_suffix = "cdn.test"\nheartbeat = "often"\n')
    env = {k: v for k, v in os.environ.items() if k != ADMIN_TOKEN_ENV}
    env[ADMIN_TOKEN_ENV] = "t"
    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "control", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"cdn: {path}: control.heartbeat: 'often' is not a duration: use whole seconds, or a "
        "whole number with an s, m, h or d suffix such as '30s' or '7d'"
    ]


def test_cdn_control_migrates_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "control.toml"
    path.write_text(
        f'[control]\nlisten = "127.0.0.1:{port}"\ndatabase = "sqlite:///{tmp_path}/db/c.db"\n'
        'cname_suffix = "cdn.test"\n'
    )
    env = {**os.environ, ADMIN_TOKEN_ENV: "operator-secret"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "--loop", "asyncio", "control", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/accounts",
                    headers={"Authorization": "Bearer operator-secret"},
                )
                with urllib.request.urlopen(request, timeout=2) as resp:
                    assert json.load(resp) == {"accounts": []}
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert b"operator-secret" not in stderr
