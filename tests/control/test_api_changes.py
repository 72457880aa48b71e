"""The changes the API publishes are the whole story: replaying them from nothing gives exactly
the snapshot edges get, whatever sequence of writes came before."""

from __future__ import annotations

from typing import Any

from control.schema import Change
from tests.control.conftest import Api


def replay(changes: list[Change]) -> dict[str, Any]:
    """An edge's view built from the change log alone (control/README.md "Changes")."""
    domains: dict[str, dict[str, Any]] = {}
    blocks: dict[tuple[str, str], str] = {}
    for change in changes:
        payload = change.payload
        if change.kind == "domain.upsert":
            domains[payload["domain"]["name"]] = payload["domain"]
        elif change.kind == "domain.delete":
            del domains[payload["name"]]
        elif change.kind == "domain.state":
            domains[payload["name"]] |= {"state": payload["state"], "reason": payload["reason"]}
            if payload["state"] == "terminated":  # only answered 404 from now on
                del domains[payload["name"]]["config"]
        elif change.kind == "block":
            blocks[(payload["domain"], payload["pattern"])] = payload["reason"]
        elif change.kind == "unblock":
            del blocks[(payload["domain"], payload["pattern"])]
        else:
            assert change.kind in ("purge", "prefetch"), change.kind
    return {
        "version": changes[-1].version,
        "at": changes[-1].created_at.isoformat(timespec="microseconds"),
        "domains": [domains[name] for name in sorted(domains)],
        "blocks": [
            {"domain": d, "pattern": p, "reason": r} for (d, p), r in sorted(blocks.items())
        ],
    }


async def test_replaying_the_changes_gives_the_snapshot(api: Api) -> None:
    first_id, first = await api.account("first")
    second_id, second = await api.account("second")
    _, edge = await api.edge()
    for name in ("a.example.com", "b.example.com", "c.example.com"):
        await api.domain(first, name)
    await api.domain(second, "z.example.com", rules=[{"suffix": [".css"], "ttl": "1d"}])
    await api.ok("PUT", "/v1/domains/a.example.com", first, {"origins": ["https://a2.example"]})
    await api.ok("POST", "/v1/domains/b.example.com/suspend", body={"reason": "spam"})
    await api.ok("POST", f"/v1/accounts/{first_id}/suspend", body={"reason": "unpaid"})
    await api.ok("POST", "/v1/blocks", body={"url": "http://a.example.com/x", "reason": "r1"})
    block = await api.ok(
        "POST", "/v1/blocks", body={"url": "http://z.example.com/*", "reason": "r2"}
    )
    await api.ok("POST", "/v1/purge", second, {"type": "domain", "domains": ["z.example.com"]})
    await api.ok("POST", f"/v1/accounts/{first_id}/resume")
    await api.call("DELETE", "/v1/domains/c.example.com", first)
    await api.call("DELETE", f"/v1/blocks/{block['id']}")
    await api.ok("POST", f"/v1/accounts/{second_id}/terminate", body={"reason": "gone"})
    await api.domain(first, "c.example.com")

    changes = await api.changes()
    assert [c.version for c in changes] == list(range(1, len(changes) + 1))
    snapshot = await api.ok("GET", "/v1/edge/snapshot", edge)
    assert replay(changes) == snapshot
    states = {d["name"]: (d["state"], d["reason"]) for d in snapshot["domains"]}
    assert states == {
        "a.example.com": ("active", ""),
        "b.example.com": ("suspended", "spam"),
        "c.example.com": ("active", ""),
        "z.example.com": ("terminated", "gone"),
    }
