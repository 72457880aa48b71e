"""edge.controlstate: the control plane's STATE and changes as a worker enforces them (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from edge.controlstate import (
    EMPTY,
    ControlState,
    Purge,
    apply,
    apply_snapshot,
    canonical_path,
    parse_state,
)

ORIGIN = {"origins": ["http://127.0.0.1:9"]}


def domain(name: str, state: str = "active", reason: str = "", **config: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "reason": reason, "config": {**ORIGIN, **config}}


def state(
    *domains: dict[str, Any], blocks: list[dict[str, str]] | None = None, version: int = 5
) -> ControlState:
    applied = parse_state({"version": version, "domains": list(domains), "blocks": blocks or []})
    assert applied.problems == () and applied.purges == ()
    return applied.state


# ------------------------------------------------------------------------------ parse


def test_parse_state_routes_active_and_suspended_domains_only() -> None:
    s = state(
        domain("a.test"),
        domain("S.test.", "suspended", "unpaid invoice"),
        domain("t.test", "terminated", "agreement ended"),
    )
    assert s.version == 5
    assert set(s.domains) == {"a.test", "s.test", "t.test"}
    assert set(s.serving) == {"a.test", "s.test"}  # terminated: 404, like an unknown host
    assert s.serving["a.test"].origins == ("http://127.0.0.1:9",)
    assert set(s.gates) == {"s.test"}  # an open domain has no gate: one failed dict lookup
    assert s.gates["s.test"].refusal("/x") == (403, "domain suspended: unpaid invoice")
    with pytest.raises(TypeError):
        s.serving["b.test"] = s.serving["a.test"]  # type: ignore[index]


def test_parse_state_blocks_exact_paths_and_prefixes() -> None:
    s = state(
        domain("a.test"),
        blocks=[
            {"domain": "a.test", "pattern": "/court/order.html", "reason": "order 7"},
            {"domain": "a.test", "pattern": "/leaks/*", "reason": ""},
            {"domain": "a.test", "pattern": "/%7Euser/file?x=1", "reason": "r"},
        ],
    )
    gate = s.gates["a.test"]
    assert gate.refusal("/court/order.html") == (451, "unavailable for legal reasons: order 7")
    assert gate.refusal("/court/order.htm") is None
    assert gate.refusal("/leaks/") == (451, "unavailable for legal reasons")
    assert gate.refusal("/leaks/a/b") is not None
    assert gate.refusal("/leaksx") is None
    # %-encoding of unreserved characters does not step around a block, in either place.
    assert gate.refusal("/court/%6Frder.html") is not None
    assert gate.refusal("/%6Ceaks/x") is not None
    assert gate.refusal("/~user/file") == (451, "unavailable for legal reasons: r")


def test_a_domain_the_edge_parser_refuses_is_absent_not_fatal() -> None:
    applied = parse_state(
        {
            "version": 3,
            "domains": [
                domain("ok.test"),
                domain("bad.test", origins=["ftp://x"]),
                {"name": "broken.test"},  # no state, no config
                domain("bad name!"),
            ],
            "blocks": [{"domain": "ok.test"}],
        }
    )
    s = applied.state
    assert set(s.serving) == {"ok.test"}
    assert s.domains["bad.test"].config is None  # known, refused: 404 until fixed
    assert len(applied.problems) == 4
    assert any("bad.test" in p and "origins[0]" in p for p in applied.problems)


# ------------------------------------------------------------------------------ apply


def test_changes_in_order_and_old_versions_ignored() -> None:
    s = state(domain("a.test"))
    applied = apply(s, 6, "domain.state", {"name": "a.test", "state": "suspended", "reason": "x"})
    assert applied.state.version == 6 and "a.test" in applied.state.gates
    again = apply(applied.state, 6, "domain.state", {"name": "a.test", "state": "active"})
    assert again.state is applied.state and again.purges == ()  # redelivered: no-op
    older = apply(applied.state, 2, "domain.delete", {"name": "a.test"})
    assert older.state is applied.state and older.purges == ()
    assert s.gates == {} and s.version == 5  # the old state is never changed
    skipped = apply(applied.state, 9, "unblock", {"domain": "a.test", "pattern": "/x"})
    assert skipped.state.version == 9 and "skipped" in skipped.problems[0]


def test_domain_upsert_adds_replaces_and_refuses() -> None:
    s = apply(EMPTY, 1, "domain.upsert", {"domain": domain("n.test")}).state
    assert set(s.serving) == {"n.test"}
    s2 = apply(s, 2, "domain.upsert", {"domain": domain("n.test", query={"mode": "ignore_all"})})
    assert s2.state.serving["n.test"].query.mode == "ignore_all"
    bad = apply(s2.state, 3, "domain.upsert", {"domain": domain("n.test", origins=[])})
    assert "n.test" not in bad.state.serving and bad.state.version == 3
    assert bad.problems and "refused" in bad.problems[0]
    gone = apply(s2.state, 3, "domain.upsert", {"domain": domain("n.test", "terminated")})
    assert gone.purges == (Purge("prefix", "n.test/"),)


def test_domain_states_and_delete() -> None:
    s = state(domain("a.test"))
    suspended = apply(
        s, 6, "domain.state", {"name": "a.test", "state": "suspended", "reason": "abuse"}
    )
    assert suspended.purges == ()
    assert suspended.state.gates["a.test"].refusal("/") == (403, "domain suspended: abuse")
    resumed = apply(suspended.state, 7, "domain.state", {"name": "a.test", "state": "active"})
    assert resumed.state.gates == {} and "a.test" in resumed.state.serving
    terminated = apply(
        resumed.state, 8, "domain.state", {"name": "a.test", "state": "terminated", "reason": "6.3"}
    )
    assert "a.test" not in terminated.state.serving
    assert terminated.purges == (Purge("prefix", "a.test/"),)  # agreement 6.3
    deleted = apply(s, 6, "domain.delete", {"name": "a.test"})
    assert "a.test" not in deleted.state.domains
    assert deleted.purges == (Purge("prefix", "a.test/"),)
    unknown = apply(s, 6, "domain.state", {"name": "zz.test", "state": "active"})
    assert unknown.problems and unknown.state.version == 6


def test_purge_kinds_become_cache_key_instructions() -> None:
    s = state(domain("a.test"), domain("q.test", query={"mode": "keep", "params": ["v"]}))

    def purges(kind: str, *items: tuple[str, str]) -> tuple[Purge, ...]:
        payload = {"task": 1, "type": kind, "items": [{"domain": d, "value": v} for d, v in items]}
        applied = apply(s, 6, "purge", payload)
        assert applied.state.version == 6
        return applied.purges

    # url: the cache key by the domain's query policy, the path normalised as keys are.
    assert purges("url", ("a.test", "/x?b=1"), ("q.test", "/%7Ey?utm=1&v=2")) == (
        Purge("url", "a.test/x?b=1"),
        Purge("url", "q.test/~y?v=2"),
    )
    assert purges("url", ("nobody.test", "/x")) == ()
    assert purges("prefix", ("a.test", "/img/")) == (Purge("prefix", "a.test/img/"),)
    assert purges("prefix", ("a.test", "img")) == (Purge("prefix", "a.test/img"),)
    assert purges("domain", ("a.test", "")) == (Purge("prefix", "a.test/"),)
    assert purges("tag", ("a.test", "product-7")) == (Purge("tag", "a.test/", "product-7"),)


def test_blocks_and_unblocks() -> None:
    s = state(domain("a.test"))
    blocked = apply(s, 6, "block", {"domain": "a.test", "pattern": "/x/*", "reason": "dmca"})
    assert blocked.state.gates["a.test"].refusal("/x/1") == (
        451,
        "unavailable for legal reasons: dmca",
    )
    unblocked = apply(blocked.state, 7, "unblock", {"domain": "a.test", "pattern": "/x/*"})
    assert unblocked.state.gates == {} and unblocked.state.blocks == {}


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("purge", {"type": "everything", "items": []}),
        ("purge", {"type": "url"}),
        ("domain.delete", {}),
        ("domain.state", {"name": "a.test", "state": "gone"}),
        ("block", ["not", "a", "dict"]),
        ("no.such.kind", {}),
    ],
)
def test_a_malformed_change_is_a_problem_not_a_crash(kind: str, payload: Any) -> None:
    s = state(domain("a.test"))
    applied = apply(s, 6, kind, payload)
    assert applied.state.version == 6 and applied.problems
    assert "a.test" in applied.state.serving


def test_prefetch_is_the_supervisors() -> None:
    applied = apply(
        state(domain("a.test")),
        6,
        "prefetch",
        {"task": 1, "items": [{"domain": "a.test", "value": "/x"}]},
    )
    assert applied.purges == () and applied.problems == () and applied.state.version == 6


def test_a_snapshot_purges_what_it_deleted_or_terminated() -> None:
    old = state(
        domain("a.test"), domain("b.test"), domain("c.test"), domain("t.test", "terminated")
    )
    applied = apply_snapshot(
        old,
        {
            "version": 40,
            "domains": [
                domain("a.test"),
                domain("b.test", "terminated"),
                domain("t.test", "terminated"),
            ],
            "blocks": [],
        },
    )
    assert applied.state.version == 40
    assert set(applied.purges) == {Purge("prefix", "b.test/"), Purge("prefix", "c.test/")}


# ------------------------------------------------------------------------------ canonical paths


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/blocked/file.txt", "/blocked/file.txt"),
        ("/public/../blocked/file.txt", "/blocked/file.txt"),
        ("/./blocked/file.txt", "/blocked/file.txt"),
        ("//blocked//file.txt", "/blocked/file.txt"),
        ("/blocked%2Ffile.txt", "/blocked/file.txt"),
        ("/blocked%2ffile.txt", "/blocked/file.txt"),
        ("/%2E%2E/%2e/blocked/%62lock%65d/..%2Ffile.txt", "/blocked/file.txt"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/.git", "/a/.git"),
        ("/a/..b/c", "/a/..b/c"),
        ("/../../..", "/"),  # '..' above the root stays at the root
        ("/..//../x", "/x"),
        ("/a%00b", "/a\x00b"),  # a NUL is one more character, not an end
        ("/a%zz%4%", "/a%zz%4%"),  # invalid escapes are kept as sent
        ("/%25%32%46", "/%2F"),  # decoded once, as an origin decodes it
        ("/caf%C3%A9", "/caf\xc3\xa9"),  # one character per byte
        ("", "/"),
        ("*", "/*"),
    ],
)
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


def test_canonical_path_of_hostile_lengths() -> None:
    assert canonical_path("/a" * 100_000) == "/a" * 100_000
    assert canonical_path("/.." * 100_000 + "/x") == "/x"
    assert canonical_path("/" * 100_000 + "x") == "/x"
    assert canonical_path("%2F" * 100_000) == "/"


def test_blocks_cannot_be_stepped_around() -> None:
    s = state(
        domain("a.test"),
        blocks=[
            {"domain": "a.test", "pattern": "/blocked/file.txt", "reason": "r"},
            {"domain": "a.test", "pattern": "/dir/*", "reason": "d"},
            {"domain": "a.test", "pattern": "/x/./y/../z%2Fw", "reason": "canonical too"},
            {"domain": "a.test", "pattern": "/caf\xe9/*", "reason": "utf-8"},
            {"domain": "a.test", "pattern": "/git/.*", "reason": "dot files"},
        ],
    )
    gate = s.gates["a.test"]
    for path in (
        "/public/../blocked/file.txt",
        "/./blocked/file.txt",
        "//blocked/file.txt",
        "/blocked%2Ffile.txt",
        "/blocked/%2E/file.txt",
        "/dir%2Fsecret",
        "/other/..%2Fdir/a",
        "/x/z/w",
        "/caf%C3%A9/menu",
        "/git/.env",
    ):
        assert gate.refusal(path) is not None, path
    for path in ("/blocked/file.txt/..", "/dir", "/dirx/a", "/git/./x", "/cafe/menu"):
        assert gate.refusal(path) is None, path


# ------------------------------------------------------------------------------ terminated


def test_a_terminated_domain_needs_no_config() -> None:
    applied = parse_state(
        {
            "version": 3,
            "domains": [
                {"name": "t.test", "state": "terminated", "reason": "6.3"},
                {"name": "u.test", "state": "terminated", "config": {"origins": []}},
            ],
            "blocks": [],
        }
    )
    assert applied.problems == ()
    assert applied.state.domains["t.test"].state == "terminated"
    assert applied.state.serving == {}
    upsert = apply(
        state(domain("a.test")),
        6,
        "domain.upsert",
        {"domain": {"name": "a.test", "state": "terminated", "reason": "x"}},
    )
    assert upsert.problems == () and upsert.purges == (Purge("prefix", "a.test/"),)
    assert "a.test" not in upsert.state.serving
    unknown = apply(
        state(domain("a.test")),
        6,
        "domain.state",
        {"name": "gone.test", "state": "terminated", "reason": "x"},
    )
    assert unknown.problems == () and unknown.purges == (Purge("prefix", "gone.test/"),)
    assert unknown.state.domains["gone.test"].state == "terminated"
