"""The key registry when the store forgets it, in one process: the marker that tells a
lost registry from a live one, the write-back of a node's view (which version wins),
nodes writing back at once, the snapshot a node starts from, and the window counters
written back after a store loss (the over-admission bound, measured).

Real redis-servers where the behaviour is the store's (``FLUSHALL``, the real driver);
the memory store on trio's ``autojump_clock`` where the property is a duration (the
keyring's poll interval). Real node processes and clusters: tests/test_store_loss.py.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tests.support.redis_servers import RedisServer
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import Settings
from tokenguard.limiting.keyring import POLL_SECONDS, Keyring
from tokenguard.limiting.registry import KEY, MARKER, TIER, KeyRecord, newer
from tokenguard.limiting.snapshot import Snapshot, SnapshotError, read_snapshot, write_snapshot
from tokenguard.model import digest_of
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.rows import Row
from tokenguard.store.window_store import Registry, open_store

TEST_TIMEOUT = 20.0
CONFIG: dict[str, Any] = {
    "tiers": {"free": {"rpm": 3}, "pro": {"rpm": 60}},
    "keys": [
        {"key": "sk-config", "name": "config-key", "tier": "free"},
        {"key": "sk-other", "name": "other", "tier": "pro"},
    ],
}
MADE = digest_of("sk-made")  # a key created through the admin API


def settings_of(config: dict[str, Any] = CONFIG) -> Settings:
    return parse_settings(config, "<test>", environ={})


def wipe(store: MemoryStore) -> None:
    """The memory store's registry as a store that lost its data has it: empty, at
    version 0, all at once (as ``FLUSHALL`` or a restart is: deleting the records one
    by one would let a poll read a registry half gone but still marked)."""
    store._registry.clear()  # type: ignore[attr-defined]
    store._registry_version = 0  # type: ignore[attr-defined]


async def until(check: Any) -> None:
    """Poll ``check()`` until true (the caller bounds the wait)."""
    while not check():  # noqa: ASYNC110 (another task's progress: nothing to wait on)
        await trio.sleep(0.01)


def admin_key(name: str, *, revoked: bool = False, at: int = 100) -> str:
    record = KeyRecord(
        name=name,
        digest="" if revoked else digest_of(f"sk-{name}"),
        tier=None if revoked else "free",
        source="admin",
        revoked=revoked,
        updated_at=at,
    )
    return record.to_json()


CONFIG_KEY = KeyRecord(name="k", digest=digest_of("sk-k"), tier="free").to_json()


@pytest.mark.parametrize(
    ("mine", "theirs", "wins"),
    [
        (CONFIG_KEY, None, True),  # the store lacks it
        (admin_key("k"), CONFIG_KEY, True),  # an admin change over the config's
        (CONFIG_KEY, admin_key("k"), False),
        (KeyRecord(name="k", digest=digest_of("x"), tier="free").to_json(), CONFIG_KEY, False),
        (admin_key("k", at=101), admin_key("k", at=100), True),  # the later one
        (admin_key("k", at=100), admin_key("k", at=101), False),
        (admin_key("k", revoked=True), admin_key("k"), True),  # a tombstone wins a tie
        (admin_key("k"), admin_key("k", revoked=True), False),
        (admin_key("k", revoked=True, at=99), admin_key("k", at=100), False),  # re-created
        (admin_key("k", revoked=True), CONFIG_KEY, True),  # never served again
        (CONFIG_KEY, "not json", True),  # a record that does not parse loses
        ("not json", CONFIG_KEY, False),
        (admin_key("k"), admin_key("k"), False),  # the same: nothing to write
    ],
)
def test_a_written_back_record_wins_only_when_newer(
    mine: str, theirs: str | None, wins: bool
) -> None:
    assert newer(mine, theirs) is wins


async def test_a_flushed_registry_is_written_back_and_no_key_is_ever_refused_meanwhile(
    redis_server: RedisServer,
) -> None:
    """``FLUSHALL`` on a real Redis under a running keyring: its view never drops a key
    (config keys served, the admin-made key served, the revoked key refused, checked
    every 10 ms), and the registry is back in Redis with a new marker: config records,
    the admin-made key and the revocation's tombstone. A node that starts afterwards
    from its config alone still refuses the revoked key."""
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(RedisStore.from_url(redis_server.url)) as store:
            keyring = Keyring(settings, store)
            async with trio.open_nursery() as nursery:
                await nursery.start(keyring.run)
                await keyring.create_key("made", MADE, tier="free")
                await keyring.revoke_key("config-key")
                before = keyring.marker
                checks = 0

                async def never_forgets() -> None:
                    nonlocal checks
                    while True:
                        assert keyring.by_digest(digest_of("sk-other")) is not None
                        assert keyring.by_digest(MADE) is not None
                        assert keyring.by_digest(digest_of("sk-config")) is None
                        checks += 1
                        await trio.sleep(0.01)

                nursery.start_soon(never_forgets)
                redis_server.command("FLUSHALL")
                while MARKER not in (await store.registry_load())[1]:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await until(lambda: keyring.marker != before and keyring.restores == 1)
                await trio.sleep(0.1)  # a few more checks on the restored view
                nursery.cancel_scope.cancel()
            _, records = await store.registry_load()
            assert records[MARKER] == keyring.marker != before
            assert records[(KEY, "made")] == keyring.view.records[(KEY, "made")]
            assert KeyRecord.from_json(records[(KEY, "config-key")]).revoked
            assert {(TIER, "free"), (TIER, "pro"), (KEY, "other")} <= set(records)
            assert checks > 5

            fresh = Keyring(settings, store)
            await fresh.refresh()
            assert fresh.by_name("config-key") is None
            assert fresh.by_digest(MADE) is not None


async def test_a_registry_reseeded_at_the_same_version_is_noticed_by_its_marker(
    redis_server: RedisServer,
) -> None:
    """Node A seeds and creates a key; the store is flushed; node B seeds it again and
    creates another key: the registry is back at A's very version number. A notices
    by the marker (a poll of the version alone would not), writes its key back, and
    both nodes end with both keys."""
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(RedisStore.from_url(redis_server.url)) as store:
            a, b = Keyring(settings, store), Keyring(settings, store)
            await a.refresh()
            await a.create_key("made", MADE, tier="free")
            version = await store.registry_version()
            redis_server.command("FLUSHALL")
            await b.refresh()
            await b.create_key("theirs", digest_of("sk-theirs"), tier="pro")
            assert await store.registry_version() == version == a.version  # the trap
            assert a.marker != b.marker

            assert await a.refresh()
            assert a.marker == b.marker
            assert a.by_digest(MADE) is not None and a.by_name("theirs") is not None
            assert (await store.registry_get(KEY, "made")) is not None
            await b.refresh()
            assert b.by_digest(MADE) is not None
            assert a.restores == 1 and b.restores == 0


async def test_a_revocation_wins_over_a_node_that_seeded_the_key_again() -> None:
    """The store lost its data; a node restarting from its config seeds the revoked key
    as a live config key: the node that saw the revocation writes its tombstone back
    over it, so the key is refused again on both."""
    store = MemoryStore()
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        old = Keyring(settings, store)
        await old.refresh()
        await old.revoke_key("config-key")
        wipe(store)
        restarted = Keyring(settings, store)
        await restarted.refresh()
        assert restarted.by_name("config-key") is not None  # from its config alone
        await old.refresh()
        assert old.by_name("config-key") is None
        await restarted.refresh()
        assert restarted.by_name("config-key") is None
        assert KeyRecord.from_json(old.view.records[(KEY, "config-key")]).revoked


async def test_nodes_writing_back_at_once_lose_no_write() -> None:
    """Two nodes find the registry lost at the same moment, one knowing a key the other
    does not yet: both write back at once (compare-and-set each), the store ends with
    every record and one marker, which both adopt."""
    store = MemoryStore()
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        a, b = Keyring(settings, store), Keyring(settings, store)
        await a.refresh()
        await b.refresh()
        await b.create_key("b-made", digest_of("sk-b"), tier="free")
        await a.create_key("a-made", digest_of("sk-a"), tier="pro")  # (a reads b-made first)
        assert b.by_name("a-made") is None  # b has not seen it
        wipe(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.refresh)
            nursery.start_soon(b.refresh)
        _, records = await store.registry_load()
        assert {(KEY, "a-made"), (KEY, "b-made"), (KEY, "config-key"), (KEY, "other")} <= set(
            records
        )
        assert a.marker == b.marker == records[MARKER]
        await b.refresh()
        assert b.by_name("a-made") is not None and a.by_name("b-made") is not None


async def test_the_registry_is_back_within_a_poll_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    """On trio's clock: the registry wiped at t0 is written back by the next poll, at
    most ``POLL_SECONDS`` (0.25 s) later, well within the second promised; the view
    serves every key throughout."""
    store = MemoryStore()
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        keyring = Keyring(settings, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(keyring.run)
            for _ in range(3):
                await trio.sleep(0.1)  # anywhere in the poll cycle
                wiped = trio.current_time()
                wipe(store)
                while await store.registry_get(*MARKER) is None:  # noqa: ASYNC110
                    assert keyring.by_name("config-key") is not None
                    await trio.sleep(0.001)
                back = trio.current_time() - wiped
                assert back <= POLL_SECONDS + 0.01 < 1.0, back
                assert keyring.by_name("config-key") is not None
            nursery.cancel_scope.cancel()
        assert keyring.restores == 3


# --- the snapshot ---------------------------------------------------------------------------


async def test_the_snapshot_follows_the_view_atomically_0600_and_without_keys(
    tmp_path: Path,
) -> None:
    """A running keyring writes its view to the snapshot when it changes: mode 0600
    (whatever the umask), no temporary file left behind, digests but never the key."""
    path = tmp_path / "registry.json"
    store = MemoryStore()
    with trio.fail_after(TEST_TIMEOUT):
        old_umask = os.umask(0)
        try:
            keyring = Keyring(settings_of(), store, snapshot=path)
            async with trio.open_nursery() as nursery:
                await nursery.start(keyring.run)
                await keyring.create_key("made", digest_of("sk-made-secret-value"), tier="free")
                await keyring.revoke_key("config-key")

                def saved() -> Snapshot | None:
                    return read_snapshot(path) if path.exists() else None

                await until(
                    lambda: (
                        (s := saved()) is not None
                        and (KEY, "made") in s.records
                        and KeyRecord.from_json(s.records[(KEY, "config-key")]).revoked
                    )
                )
                nursery.cancel_scope.cancel()
        finally:
            os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["registry.json"]  # no temporary file left
    text = path.read_text()
    assert "sk-made-secret-value" not in text and "sk-config" not in text
    assert digest_of("sk-made-secret-value") in text
    snapshot = read_snapshot(path)
    assert snapshot is not None and snapshot.marker == keyring.marker
    assert snapshot.version == keyring.version and MARKER not in snapshot.records


async def snapshot_of_admin_changes(settings: Settings, path: Path) -> Registry:
    """A node creates ``made`` and revokes ``config-key`` through its keyring and its
    view is saved at ``path``, as a running node's snapshot would be; its records."""
    earlier = Keyring(settings, MemoryStore())
    await earlier.refresh()
    await earlier.create_key("made", MADE, tier="free")
    await earlier.revoke_key("config-key")
    records = {k: v for k, v in earlier.view.records.items() if k != MARKER}
    write_snapshot(path, Snapshot(records=records, marker=earlier.marker))
    return records


async def test_a_node_that_starts_with_the_store_down_uses_its_snapshot(
    tmp_path: Path,
) -> None:
    """The store cannot be read at start (its breaker open): the first view is the
    config's with the snapshot's admin records and tombstones over it, so a key revoked
    earlier stays refused and one created earlier is served. Without the snapshot the
    config alone would serve the revoked key."""
    path = tmp_path / "registry.json"
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        await snapshot_of_admin_changes(settings, path)

        async with open_store(GuardedStore(MemoryStore())) as down:
            down._trip("test: the store is down")  # type: ignore[attr-defined]
            keyring = Keyring(settings, down, snapshot=path)
            async with trio.open_nursery() as nursery:
                await nursery.start(keyring.run)
                assert keyring.version is None  # nothing read from the store
                assert keyring.by_name("config-key") is None
                assert keyring.by_digest(MADE) is not None
                assert keyring.by_name("other") is not None
                nursery.cancel_scope.cancel()
        assert Keyring(settings, MemoryStore()).by_name("config-key") is not None


async def test_a_store_that_lost_its_data_while_every_node_was_down_gets_the_snapshot_back(
    tmp_path: Path,
) -> None:
    """Every node restarts on an empty store: the first one's seeding writes the
    snapshot's admin-made key and tombstone into it, not only the config."""
    path = tmp_path / "registry.json"
    settings = settings_of()
    with trio.fail_after(TEST_TIMEOUT):
        records = await snapshot_of_admin_changes(settings, path)

        empty = MemoryStore()
        await Keyring(settings, empty, snapshot=path).refresh()
        _, stored = await empty.registry_load()
        assert stored[(KEY, "made")] == records[(KEY, "made")]
        assert KeyRecord.from_json(stored[(KEY, "config-key")]).revoked
        # A node with no snapshot, from the config alone, then reads them there.
        fresh = Keyring(settings, empty)
        assert fresh.by_name("config-key") is not None
        await fresh.refresh()
        assert fresh.by_name("config-key") is None and fresh.by_digest(MADE) is not None


@pytest.mark.parametrize("problem", ["group-writable", "another owner", "garbage", "old format"])
def test_an_unusable_snapshot_is_refused_and_the_config_used(
    tmp_path: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot others may write (or own) could add keys; one that does not parse says
    nothing: each is refused with an error logged, and the node starts from its
    config."""
    path = tmp_path / "registry.json"
    tombstone = admin_key("config-key", revoked=True)
    write_snapshot(path, Snapshot(records={(KEY, "config-key"): tombstone}))
    if problem == "group-writable":
        path.chmod(0o620)
    elif problem == "another owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(path, 65534, 65534)
    elif problem == "garbage":
        path.write_text("{not json")
    else:
        path.write_text(json.dumps({"format": 99, "records": []}))
    with pytest.raises(SnapshotError):
        read_snapshot(path)
    caplog.set_level(logging.ERROR, "tokenguard.limiting.keyring")
    keyring = Keyring(settings_of(), MemoryStore(), snapshot=path)
    assert keyring.by_name("config-key") is not None
    assert any("snapshot not used" in r.getMessage() for r in caplog.records)


# --- the window counters after a store loss ----------------------------------------------

LIMIT = 50
BEFORE = 40  # admitted before the store loses its data


def a_row(limit: int = LIMIT) -> Row:
    return Row("key:loss", "requests", 60_000, 5_000, limit, 1)


@asynccontextmanager
async def node_on(
    server: RedisServer, *, write_back: bool
) -> AsyncIterator[tuple[GuardedStore, Keyring]]:
    """One node's guarded store (policy local, alone) and keyring on ``server``, wired
    as tokenguard/node.py wires them (or without the window write-back)."""
    store = GuardedStore(RedisStore.from_url(server.url), cluster_size=1)
    async with open_store(store):
        restore = store.restore_windows if write_back else None
        yield store, Keyring(settings_of(), store, on_store_loss=restore)


async def admitted(store: GuardedStore, attempts: int) -> int:
    count = 0
    for _ in range(attempts):
        count += (await store.admit("loss", [a_row()])).admitted
    return count


@pytest.mark.parametrize(("write_back", "gap"), [(True, 5), (True, 20), (False, 5), (False, 20)])
async def test_over_admission_after_the_store_comes_back_empty_mid_window(
    redis_server: RedisServer, write_back: bool, gap: int
) -> None:
    """A key (limit 50) has 40 admitted; Redis then loses everything (``FLUSHALL``);
    ``gap`` more are admitted before the node's keyring sees it; then 100 attempts.

    Without the write-back, the window forgets the 40: 90 admitted in all, whatever the
    gap (over by everything admitted before the loss). With it, the node adds what its
    local windows hold (40 + the gap) into the fresh store, which already counts the
    gap: over by at most the gap beyond what was left (20 -> 60 admitted: 10 over;
    5 -> 45: none, 5 fewer than the limit: the gap counted twice)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with node_on(redis_server, write_back=write_back) as (store, keyring):
            await keyring.refresh()
            assert await admitted(store, BEFORE) == BEFORE
            redis_server.command("FLUSHALL")
            assert await admitted(store, gap) == gap  # the store counts from 0 again
            assert await keyring.refresh()  # the node sees the loss (one poll)
            if write_back:
                await until(lambda: store.stats.written_back > 0)
            after = await admitted(store, 100)
    total = BEFORE + gap + after
    expected = BEFORE + gap + max(0, LIMIT - BEFORE - 2 * gap) if write_back else BEFORE + LIMIT
    print(f"\nwrite-back {write_back}, gap {gap}: {total} admitted for a limit of {LIMIT}")
    assert total == expected
    over = max(0, total - LIMIT)
    assert over == (max(0, gap - (LIMIT - BEFORE)) if write_back else BEFORE)


BASE = 1_000_000.0  # the fake wall clock's start (s): a multiple of every bucket


def trio_clock() -> float:
    return BASE + trio.current_time()


def held(store: MemoryStore) -> list[tuple[str, str, int, int]]:
    return sorted((p, row.counter, b, amount) for p, row, b, amount in store.held_buckets())


async def test_restore_windows_adds_the_local_windows_into_the_very_buckets(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Admissions through the store are mirrored in the node's local windows; the store
    then loses them. ``restore_windows`` writes every bucket still in its window back
    into the same bucket of the store, refunds included; a bucket that has left the
    window is not written."""
    primary, fallback = MemoryStore(clock=trio_clock), MemoryStore(clock=trio_clock)
    store = GuardedStore(primary, cluster_size=1, fallback=fallback)
    tokens = Row("key:loss", "output_tokens", 60_000, 5_000, 1000, 30)
    with trio.fail_after(120):  # (trio's clock)
        async with open_store(store):
            for _ in range(3):
                await store.admit("loss", [a_row()])
            await trio.sleep(30)
            await store.admit("loss", [a_row()])
            refunded = await store.admit("loss", [a_row(), tokens])
            assert refunded.reservation is not None
            await store.settle(refunded.reservation, [0, -12])  # 18 of 30 used
            await trio.sleep(36)  # the first bucket has left the window (at 65 s)
            expected = held(fallback)
            assert expected == sorted(
                [("loss", a_row().counter, 200_006, 2), ("loss", tokens.counter, 200_006, 18)]
            )
            primary._partitions.clear()  # type: ignore[attr-defined] # the store forgets
            assert store.restore_windows() == 2
            await until(lambda: store.stats.written_back >= 2)
            assert held(primary) == expected


async def test_only_policy_local_has_windows_to_restore(autojump_clock: trio.abc.Clock) -> None:
    primary, fallback = MemoryStore(clock=trio_clock), MemoryStore(clock=trio_clock)
    store = GuardedStore(primary, policy="closed", fallback=fallback)
    async with open_store(store):
        await store.admit("loss", [a_row()])
        assert held(fallback) == [] and store.restore_windows() == 0
