"""edge.follow without a network: SSE parsing, STATE application in order, atomic saving."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edge.config import ControlSettings
from edge.files import write_atomically
from edge.follow import (
    BadEvent,
    Change,
    ControlFollower,
    ProtocolError,
    Saved,
    SseEvent,
    SseParser,
    State,
    apply_change,
    empty_state,
    load_saved,
)

# --- SSE --------------------------------------------------------------------------------------

STREAM = (
    b": heartbeat\n\n"
    b'event: snapshot\nid: 3\ndata: {"version": 3}\n\n'
    b"event: change\r\nid: 4\r\ndata:line one\r\ndata: line two\r\n\r\n"
    b"retry: 100\nunknown: x\n\n"  # no data: nothing dispatched
    b"data: plain\n\n"
)
EXPECTED = [
    SseEvent("snapshot", "3", '{"version": 3}'),
    SseEvent("change", "4", "line one\nline two"),
    SseEvent("message", "4", "plain"),  # the id carries over, as the standard says
]


def test_sse_events_comments_and_crlf() -> None:
    assert SseParser().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_sse_events_split_anywhere(size: int) -> None:
    parser = SseParser()
    events: list[SseEvent] = []
    for start in range(0, len(STREAM), size):
        events += parser.feed(STREAM[start : start + size])
    assert events == EXPECTED


def test_sse_event_too_large() -> None:
    parser = SseParser(limit=100)
    parser.feed(b"data: " + b"x" * 60 + b"\n")
    with pytest.raises(BadEvent, match="larger than 100 bytes"):
        parser.feed(b"data: " + b"x" * 60)


def test_sse_not_utf8() -> None:
    with pytest.raises(BadEvent, match="not UTF-8"):
        SseParser().feed(b"data: \xff\n\n")


# --- STATE ------------------------------------------------------------------------------------


def domain(name: str, state: str = "active") -> dict[str, Any]:
    return {"name": name, "state": state, "reason": "", "config": {"origins": ["http://o.test"]}}


def test_apply_every_kind() -> None:
    state = empty_state()
    apply_change(state, "domain.upsert", {"domain": domain("a.test")})
    apply_change(state, "domain.upsert", {"domain": domain("b.test")})
    replaced = domain("a.test") | {"config": {"origins": ["http://new.test"]}}
    apply_change(state, "domain.upsert", {"domain": replaced})
    assert state["domains"] == [replaced, domain("b.test")]  # replaced in place
    apply_change(state, "domain.state", {"name": "b.test", "state": "suspended", "reason": "r"})
    assert state["domains"][1]["state"] == "suspended"
    assert state["domains"][1]["reason"] == "r"
    apply_change(state, "domain.delete", {"name": "a.test"})
    assert [d["name"] for d in state["domains"]] == ["b.test"]
    apply_change(state, "block", {"domain": "b.test", "pattern": "/x*", "reason": "court"})
    apply_change(state, "block", {"domain": "b.test", "pattern": "/x*", "reason": "again"})
    assert state["blocks"] == [{"domain": "b.test", "pattern": "/x*", "reason": "again"}]
    apply_change(state, "purge", {"task": 1, "type": "domain", "items": []})
    apply_change(state, "prefetch", {"task": 2, "items": []})
    apply_change(state, "unblock", {"domain": "b.test", "pattern": "/x*"})
    assert state["blocks"] == []


class Recorder:
    """A follower with no network: events go straight to `_handle`."""

    def __init__(self, tmp: Path) -> None:
        self.states: list[State] = []
        self.changes: list[Change] = []
        self.follower = ControlFollower(
            ControlSettings("http://127.0.0.1:1", "cdn_edge_secret"),
            tmp,
            on_state=self.states.append,
            on_change=self.changes.append,
            applied=lambda: 0,
        )

    def snapshot(self, version: int, *domains: dict[str, Any]) -> None:
        data = {"version": version, "domains": list(domains), "blocks": []}
        self.follower._handle(SseEvent("snapshot", str(version), json.dumps(data)))

    def change(
        self, version: int, kind: str, payload: dict[str, Any], at: str | None = None
    ) -> None:
        data = {"version": version, "kind": kind, "payload": payload, "at": at}
        self.follower._handle(SseEvent("change", str(version), json.dumps(data)))


def test_changes_apply_in_order_duplicates_ignored_gaps_refused(tmp_path: Path) -> None:
    r = Recorder(tmp_path)
    r.snapshot(3, domain("a.test"))
    assert r.follower.version == 3 and r.follower.has_state
    r.change(4, "domain.upsert", {"domain": domain("b.test")})
    r.change(4, "domain.delete", {"name": "b.test"})  # a replay: already applied
    r.change(2, "domain.delete", {"name": "a.test"})
    assert [c["version"] for c in r.changes] == [4]
    assert [d["name"] for d in r.follower.state["domains"]] == ["a.test", "b.test"]
    with pytest.raises(ProtocolError, match="change 6 follows version 4") as gap:
        r.change(6, "domain.delete", {"name": "a.test"})
    assert not isinstance(gap.value, BadEvent)  # asked again from 4, not from a snapshot
    assert r.follower.version == 4  # the caller reconnects with since=4
    r.change(5, "domain.state", {"name": "a.test", "state": "suspended", "reason": "unpaid"})
    assert r.follower.version == 5
    assert [c["kind"] for c in r.changes] == ["domain.upsert", "domain.state"]
    # A snapshot replaces everything, even with an older version (a restored control plane).
    r.snapshot(2)
    assert r.follower.state == {"version": 2, "at": None, "domains": [], "blocks": []}
    assert len(r.states) == 2


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("snapshot", "{not json"),
        ("snapshot", '{"version": 1, "domains": {}}'),
        ("change", '{"version": 1, "kind": "domain.delete", "payload": {}}'),
        ("change", '{"kind": "domain.delete"}'),
    ],
)
def test_malformed_events_are_bad_events(tmp_path: Path, event: str, data: str) -> None:
    r = Recorder(tmp_path)
    with pytest.raises(BadEvent, match=f"malformed {event} event"):
        r.follower._handle(SseEvent(event, "1", data))


def test_at_purges_and_flush_are_kept(tmp_path: Path) -> None:
    """A change's "at" becomes the state's; purging changes wait in `unled` until the lead
    stored them; a snapshot owes a flush, which covers whatever was unled."""
    r = Recorder(tmp_path)
    terminated = {"name": "b.test", "state": "terminated", "reason": ""}  # may lack "config"
    r.snapshot(1, domain("a.test"), terminated)
    assert r.follower.flush_owed and r.follower.unled == []
    r.follower.flushed()
    r.change(2, "purge", {"task": 1, "type": "url", "items": []}, at="2026-01-01T00:00:02Z")
    r.change(3, "block", {"domain": "a.test", "pattern": "/x", "reason": "r"}, at="t3")
    r.change(4, "domain.upsert", {"domain": terminated}, at="t4")
    r.change(5, "domain.state", {"name": "a.test", "state": "terminated", "reason": ""}, at="t5")
    r.change(6, "domain.delete", {"name": "a.test"}, at="t6")
    assert r.follower.state["at"] == "t6"
    assert [c["version"] for c in r.follower.unled] == [2, 4, 5, 6]
    assert r.follower.unled[0] == {
        "version": 2, "kind": "purge", "payload": {"task": 1, "type": "url", "items": []},
    }  # fmt: skip
    r.follower.led(4)
    assert [c["version"] for c in r.follower.unled] == [5, 6]
    assert not r.follower.flush_owed
    r.snapshot(7)
    assert r.follower.flush_owed and r.follower.unled == []


def test_flush_and_unled_are_saved_and_loaded(tmp_path: Path) -> None:
    state = {"version": 9, "at": "t9", "domains": [domain("a.test")], "blocks": []}
    unled = [{"version": 9, "kind": "purge", "payload": {"type": "domain", "items": []}}]
    write_atomically(tmp_path / "control" / "state.json", Saved(state, True, unled).encode())
    r = Recorder(tmp_path)
    assert r.follower.load()
    assert r.follower.state == state and r.follower.persisted == 9
    assert r.follower.flush_owed and r.follower.unled == unled


def test_the_token_is_not_in_the_settings_repr() -> None:
    assert "secret" not in repr(ControlSettings("http://c.test", "cdn_edge_secret"))


# --- saving -----------------------------------------------------------------------------------


def test_write_atomically_and_load(tmp_path: Path) -> None:
    path = tmp_path / "control" / "state.json"
    assert load_saved(path) is None
    state = {"version": 7, "at": "t", "domains": [domain("a.test")], "blocks": []}
    write_atomically(path, json.dumps(state).encode())
    assert load_saved(path) == Saved(state)
    assert os.listdir(path.parent) == ["state.json"]
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_crash_mid_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "state.json"
    old = {"version": 1, "at": None, "domains": [], "blocks": []}
    write_atomically(path, json.dumps(old).encode())

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="power cut"):
        write_atomically(path, json.dumps({"version": 2}).encode() * 1000)
    monkeypatch.undo()
    assert load_saved(path) == Saved(old)
    # The next write replaces the leftover temp file too.
    write_atomically(path, json.dumps(old | {"version": 3}).encode())
    assert load_saved(path) == Saved(old | {"version": 3})
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{trunc",
        b"[]",
        b'{"version": -1, "domains": [], "blocks": []}',
        b'{"version": 1, "at": 5, "domains": [], "blocks": []}',
        b'{"version": 1, "domains": [], "blocks": [], "unled": [{"version": 1}]}',
    ],
)
def test_an_unusable_saved_state_is_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "control" / "state.json"
    path.parent.mkdir()
    path.write_bytes(content)
    r = Recorder(tmp_path)
    assert not r.follower.load()
    assert not r.follower.has_state and r.follower.version == 0
    assert "ignoring the saved control state" in caplog.text


def test_load_takes_a_state_saved_by_an_older_edge(tmp_path: Path) -> None:
    state = {"version": 9, "domains": [domain("a.test")], "blocks": []}
    write_atomically(tmp_path / "control" / "state.json", json.dumps(state).encode())
    r = Recorder(tmp_path)
    assert r.follower.load()
    assert r.follower.state == state | {"at": None} and r.follower.persisted == 9
    assert not r.follower.flush_owed and r.follower.unled == []
