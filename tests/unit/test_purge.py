"""edge.purge (bans) and the ban checks of edge.tiers' lookup, without sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

import edge.disk
from edge import policy
from edge.config import CacheSettings
from edge.controlstate import Purge
from edge.purge import NEVER, URL_BAN_KEEP, Ban, BanKeeper, BanList, bans_for
from edge.slices import slice_key
from edge.store import CachedObject, MemoryTier, tags_of
from edge.tiers import Tiers


def obj(key: str, *, at: float = 1000.0, tags: str = "", body: bytes = b"x") -> CachedObject:
    fields = [("Cache-Control", "max-age=600")]
    headers = policy.combine_fields(fields)
    return CachedObject(
        key=key,
        vary_names=(),
        vary_values=(),
        status=200,
        fields=fields,
        headers=headers,
        body=body,
        directives=policy.response_directives(headers),
        lifetime=600.0,
        request_time=at,
        response_time=at,
        initial_age=0.0,
        tags=tags,
    )


def ban(kind: str, key: str, tag: str = "", at: float = 2000.0, version: int = 1) -> Ban:
    return Ban(version, kind, key, tag, at)


def test_tags_come_from_surrogate_key_and_cache_tag() -> None:
    fields = [
        ("Surrogate-Key", " product-7  shelf/1 "),
        ("cache-tag", "a, b ,,product-7"),
        ("Content-Type", "text/plain"),
    ]
    assert tags_of(fields) == "product-7\nshelf/1\na\nb"
    assert tags_of([("Content-Type", "text/plain")]) == ""


def test_ban_matching() -> None:
    url = ban("url", "a.test/x?v=1")
    assert url.matches("a.test/x?v=1", "")
    assert url.matches(slice_key("a.test/x?v=1", 1 << 20, 3), "")  # its slices
    assert not url.matches("a.test/x?v=12", "")
    domain = ban("prefix", "a.test/")
    assert domain.matches("a.test/", "") and domain.matches("a.test/deep/er?q", "")
    assert not domain.matches("a.testing/x", "")  # the name ends at the path's slash
    prefix = ban("prefix", "a.test/img/")
    assert prefix.matches("a.test/img/1.png", "") and not prefix.matches("a.test/im", "")
    tag = ban("tag", "a.test/", "p7")
    assert tag.matches("a.test/x", "p1\np7") and not tag.matches("a.test/x", "p77")
    assert not tag.matches("b.test/x", "p7") and not tag.matches("a.test/x", "")


def test_ban_list_matches_only_objects_stored_before_the_ban() -> None:
    bans = BanList()
    assert bans.newest == NEVER and len(bans) == 0
    bans.add(ban("prefix", "a.test/img/", at=2000.0))
    bans.add(ban("url", "a.test/x", at=3000.0))
    assert bans.newest == 3000.0 and len(bans) == 2
    assert bans.banned("a.test/img/1", "", 1999.0)
    assert not bans.banned("a.test/img/1", "", 2000.5)  # stored after the ban: fresh
    assert bans.banned("a.test/x", "", 2500.0) and not bans.banned("a.test/x", "", 3000.0)
    assert not bans.banned("a.test/y", "", 0.0)
    bans.add(ban("url", "a.test/x", at=2500.0))  # an older url ban never shadows a newer one
    assert bans.banned("a.test/x", "", 2900.0)


def test_bans_for_purges() -> None:
    made = bans_for([(9, Purge("url", "a.test/x")), (8, Purge("tag", "a.test/", "t"))], 123.0)
    assert made == [Ban(9, "url", "a.test/x", "", 123.0), Ban(8, "tag", "a.test/", "t", 123.0)]


def test_memory_remove_where() -> None:
    tier = MemoryTier(1 << 20)
    for key in ("a.test/1", "b.test/2", "a.test/3"):
        tier.put(obj(key, tags="t" if key.endswith("3") else ""))
    assert tier.remove_where(lambda o: o.key.startswith("a.test/") and "t" in o.tags) == 1
    assert tier.remove_where(lambda o: o.key.startswith("a.test/")) == 1
    assert len(tier) == 1 and tier.lookup("a.test/1", {}) == (None, "uri-miss")
    assert tier.lookup("b.test/2", {})[0] is not None
    tier.put(obj("a.test/1"))  # the variant bookkeeping is consistent after a removal
    assert tier.lookup("a.test/1", {})[0] is not None


def tiers(tmp_path: Path, disk: int = 0) -> Tiers:
    return Tiers(MemoryTier(1 << 20), CacheSettings(disk=disk), str(tmp_path))


def test_lookup_fast_path_without_bans(tmp_path: Path, monkeypatch: Any) -> None:
    t = tiers(tmp_path)
    t.memory.put(obj("a.test/x"))

    def never(*args: Any) -> bool:
        raise AssertionError("a ban check without bans")

    monkeypatch.setattr(BanList, "banned", never)
    assert t.lookup("a.test/x", {})[0] is not None


def test_memory_object_is_checked_once_per_ban(tmp_path: Path, monkeypatch: Any) -> None:
    t = tiers(tmp_path)
    t.memory.put(obj("a.test/x", at=1000.0))
    t.memory.put(obj("a.test/old", at=1000.0, tags="t1"))
    t.bans.add(ban("tag", "a.test/", "t1", at=2000.0))
    calls: list[str] = []
    real = BanList.banned

    def counted(self: BanList, key: str, tags: str, since: float) -> bool:
        calls.append(key)
        return real(self, key, tags, since)

    monkeypatch.setattr(BanList, "banned", counted)
    for _ in range(3):
        assert t.lookup("a.test/x", {})[0] is not None
    assert calls == ["a.test/x"]  # then marked checked up to the newest ban
    assert t.lookup("a.test/old", {}) == (None, "uri-miss")
    assert len(t.memory) == 1  # and removed
    t.bans.add(ban("prefix", "b.test/", at=2001.0))
    assert t.lookup("a.test/x", {})[0] is not None
    assert calls == ["a.test/x", "a.test/old", "a.test/x"]


def put_on_disk(t: Tiers, o: CachedObject) -> None:
    writer = t.spool(o, len(o.body))
    assert writer is not None
    writer.append(o.body)
    assert t.commit(writer, o)


def disk_files(root: Path) -> list[Path]:
    return [p for p in (root / "cache" / "objects").rglob("*") if p.is_file()]


async def test_disk_object_banned_at_lookup_keeps_its_tags(tmp_path: Path) -> None:
    t = tiers(tmp_path, disk=1 << 24)
    put_on_disk(t, obj("a.test/x", at=1000.0, tags="t1\nt2"))
    put_on_disk(t, obj("a.test/y", at=1000.0, tags="t3"))
    found, _ = t.lookup("a.test/x", {})
    assert found is not None and found.tags == "t1\nt2"  # from the file's meta
    t.memory.remove("a.test/x")
    t.bans.add(ban("tag", "a.test/", "t2", at=2000.0))
    assert t.lookup("a.test/x", {}) == (None, "uri-miss")
    assert len(disk_files(tmp_path)) == 1  # the banned file went
    assert t.lookup("a.test/y", {})[0] is not None
    await t.close()


async def test_lead_lurks_and_persists_until_done(tmp_path: Path) -> None:
    t = tiers(tmp_path, disk=1 << 24)
    for key, tags in (("a.test/1", "t"), ("a.test/2", ""), ("b.test/1", "t")):
        put_on_disk(t, obj(key, at=1000.0, tags=tags))
    keeper = BanKeeper(t, str(tmp_path))
    keeper.load()
    durable = keeper.add([ban("tag", "a.test/", "t", at=2000.0, version=4)], lead=True)
    assert durable is not None
    await durable
    saved = json.loads((tmp_path / "control" / "bans.json").read_text())
    assert saved["version"] == 4 and len(saved["bans"]) == 1  # before the walk
    for _ in range(200):
        if not len(t.bans):
            break
        await asyncio.sleep(0.01)
    assert not len(t.bans)
    assert len(disk_files(tmp_path)) == 2  # only a.test/1 was tagged t
    await keeper.close()  # writes what is pending
    saved = json.loads((tmp_path / "control" / "bans.json").read_text())
    assert saved == {"version": 4, "bans": []}
    await t.close()


async def test_bans_survive_a_restart_and_others_prune_by_the_leads_file(
    tmp_path: Path,
) -> None:
    t = tiers(tmp_path)
    lead = BanKeeper(t, str(tmp_path))
    lead.add([ban("prefix", "a.test/", at=2000.0, version=7)], lead=True)
    await lead.close()  # the walk never ran: the ban stays in the file
    t2 = tiers(tmp_path)
    restarted = BanKeeper(t2, str(tmp_path))
    restarted.load()
    assert [b.version for b in t2.bans] == [7]
    other = BanKeeper(tiers(tmp_path), str(tmp_path))
    other.add([ban("prefix", "a.test/", version=7), ban("url", "a.test/z", version=8)], lead=False)
    await other.close()  # its pruning in the background is done
    assert sorted(b.version for b in other.tiers.bans) == [7, 8]  # the lead's 7 is pending
    (tmp_path / "control" / "bans.json").write_text(json.dumps({"version": 7, "bans": []}))
    other.add([], lead=False)  # the lead finished 7, has not applied 8 yet
    await pruned(other, 1)
    assert [b.version for b in other.tiers.bans] == [8]


async def pruned(keeper: BanKeeper, count: int) -> None:
    for _ in range(200):
        if len(keeper.tiers.bans) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(keeper.tiers.bans)} bans, expected {count}")


async def test_other_workers_keep_a_ban_of_everything(tmp_path: Path) -> None:
    """Versions may start over after a flush (a restored control plane): a ban of everything
    is never pruned by the lead's file, only replaced by a newer one."""
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "bans.json").write_text(json.dumps({"version": 90, "bans": []}))
    other = BanKeeper(tiers(tmp_path), str(tmp_path))
    other.add(
        [ban("prefix", "", at=2000.0, version=3), ban("url", "a.test/z", version=4)], lead=False
    )
    await pruned(other, 1)
    other.add([ban("prefix", "", at=3000.0, version=5)], lead=False)
    await pruned(other, 1)
    assert [(b.version, b.time) for b in other.tiers.bans] == [(5, 3000.0)]
    assert other.tiers.bans.banned("b.test/x", "", 2500.0)


@pytest.mark.parametrize("text", ["{", '{"version": 1}', '{"version": 1, "bans": [{"x": 1}]}'])
def test_an_unreadable_ban_file_is_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "bans.json").write_text(text)
    t = tiers(tmp_path)
    BanKeeper(t, str(tmp_path)).load()
    assert len(t.bans) == 0


async def test_url_bans_need_no_walk_and_expire_at_the_lead(
    tmp_path: Path, monkeypatch: Any
) -> None:
    t = tiers(tmp_path, disk=1 << 24)
    keeper = BanKeeper(t, str(tmp_path))
    now = 5000.0
    monkeypatch.setattr("edge.purge.time.time", lambda: now)
    keeper.add([ban("url", "a.test/x", at=now, version=3)], lead=True)
    assert keeper._lurk is None and len(t.bans) == 1  # its files went with the purge
    now += URL_BAN_KEEP + 1
    durable = keeper.add([], lead=True)
    assert len(t.bans) == 0 and durable is not None
    await durable
    assert json.loads((tmp_path / "control" / "bans.json").read_text()) == {
        "version": 3,
        "bans": [],
    }
    await t.close()


async def test_a_walk_never_removes_a_newer_object_at_the_same_path(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Another worker may store the key anew between the walk's check of a doomed file and
    its removal, and the filesystem may give the new file the old one's inode at once."""
    t = tiers(tmp_path, disk=1 << 24)
    put_on_disk(t, obj("a.test/x", at=1000.0))
    [path] = disk_files(tmp_path)
    unlink_same = edge.disk._unlink_same
    stored: list[Path] = []

    def stored_anew_first(p: Path, ino: int | None = None) -> int | None:
        if p == path and not stored:
            data = p.read_bytes()
            os.unlink(p)
            newer = path.with_name("newer")
            newer.write_bytes(data)
            os.replace(newer, p)
            stored.append(p)
        return unlink_same(p, ino)

    monkeypatch.setattr(edge.disk, "_unlink_same", stored_anew_first)
    assert t.disk is not None
    assert await t.disk.sweep(lambda meta: True) == 0
    assert path.exists()
    await t.close()


async def test_a_flush_starts_the_lead_files_versions_over(tmp_path: Path) -> None:
    """After a restored control plane (versions start over, with a flush) the other workers
    must not take the lead's old, higher version for having applied the new changes."""
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "bans.json").write_text(json.dumps({"version": 90, "bans": []}))
    lead = BanKeeper(tiers(tmp_path), str(tmp_path))
    lead.load()
    lead.add([ban("prefix", "", at=2000.0, version=3)], lead=True)
    await lead.close()
    assert json.loads((tmp_path / "control" / "bans.json").read_text())["version"] == 3
    other = BanKeeper(tiers(tmp_path), str(tmp_path))
    other.add([ban("prefix", "", at=2000.0, version=3)], lead=False)
    other.add([ban("prefix", "a.test/", at=2001.0, version=4)], lead=False)
    await other.close()
    assert sorted(b.version for b in other.tiers.bans) == [3, 4]


def test_a_ban_round_trips_through_its_json_fields() -> None:
    ban = Ban(version=7, kind="tag", key="example.test/", tag="t1", time=1700000000.25)
    assert set(ban.as_json()) == {f.name for f in dataclasses.fields(Ban)}
    assert Ban(**json.loads(json.dumps(ban.as_json()))) == ban
