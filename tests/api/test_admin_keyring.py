"""The keyring behind the admin API, in process: seeding, propagation, resolution.

The config seeds the store and an admin change wins over it; a change on one node
applies on another within a second; the store down is a 503 and the node keeps its
last view; the config view holds exactly the config's keys; a bad record leaves its
key out, never unlimited.
"""

from __future__ import annotations

import json

import trio

from drivers.memory import MemoryStore
from tests.support.admin_node import (
    CONFIG,
    TEST_TIMEOUT,
    answer,
    error,
    make_node,
    settings_of,
)
from tokenguard.config.limits_table import limits_from_table
from tokenguard.limiting.keyring import Keyring
from tokenguard.limiting.registry import KEY, TIER, KeyRecord, build_view, config_records, table_of
from tokenguard.model import digest_of
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.window_store import open_store


async def test_the_store_down_is_503_and_the_view_stays() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(GuardedStore(MemoryStore())) as guarded:
            node = await make_node(guarded)
            guarded._trip("test: the store is down")  # type: ignore[attr-defined]
            response = await node.call("POST", "/admin/keys", {"name": "new"})
            await error(response, 503, "store_unavailable")
            assert response.headers["retry-after"] == "1"
            await error(await node.call("GET", "/admin/keys"), 503, "store_unavailable")
            # The node keeps serving on its last view of the keys.
            assert (await node.chat("sk-config")).status_code == 200


# --- the keyring: config seeding, propagation, resolution ------------------------------------


async def test_config_seeds_the_store_and_an_admin_change_wins_over_it() -> None:
    store = MemoryStore()
    with trio.fail_after(TEST_TIMEOUT):
        first = await make_node(store)
        await answer(await first.call("PATCH", "/admin/keys/other", {"rpm": 7}), 200)
        await answer(await first.call("DELETE", "/admin/keys/config-key"), 200)
        # A restart with an edited config: the tier it changes is config's (updated);
        # the keys changed through the API keep their admin version; a config key no
        # longer in the config is removed; a new one is added.
        edited = json.loads(json.dumps(CONFIG))
        edited["tiers"]["free"]["rpm"] = 30
        edited["keys"][1]["rpm"] = 99
        edited["keys"].append({"key": "sk-new", "name": "new", "tier": "free"})
        second = await make_node(store, settings_of(edited))
        assert second.keyring.tiers["free"].rpm == 30
        assert second.keyring.by_name("other").limits.rpm == 7  # the admin's, not 99
        assert second.keyring.by_name("config-key") is None  # still revoked
        assert second.keyring.by_name("new").limits.rpm == 30
        assert (await second.chat("sk-config")).status_code == 401
        # The same config again writes nothing (every node seeds at its start).
        version = await store.registry_version()
        await make_node(store, settings_of(edited))
        assert await store.registry_version() == version
        # A key the config had, and no longer has, is gone (it was the config's).
        edited["keys"].pop()
        third = await make_node(store, settings_of(edited))
        assert third.keyring.by_name("new") is None


async def test_a_change_on_one_node_applies_on_another_within_a_second() -> None:
    store = MemoryStore()
    with trio.fail_after(TEST_TIMEOUT):
        one = await make_node(store)
        other = Keyring(one.settings, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(other.run)
            assert other.by_name("config-key").limits.rpm == 2
            with other.watching(digest_of("sk-config")) as revoked:
                await answer(await one.call("PATCH", "/admin/keys/config-key", {"rpm": 9}), 200)
                start = trio.current_time()
                # Polling the other keyring's view, as a request would see it.
                while other.by_name("config-key").limits.rpm != 9:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert trio.current_time() - start < 1.0
                assert not revoked.is_set()
                await answer(await one.call("DELETE", "/admin/keys/config-key"), 200)
                with trio.fail_after(1.0):
                    await revoked.wait()
            assert other.by_digest(digest_of("sk-config")) is None
            other.stop()


def test_the_config_view_is_exactly_the_configs_keys() -> None:
    """Resolving the seeded records gives the very keys and tiers settings.py built."""
    settings = settings_of()
    view = build_view(settings, None, config_records(settings))
    assert dict(view.tiers) == dict(settings.tiers)
    assert sorted(view.keys_by_name.values(), key=lambda k: k.name) == sorted(
        settings.keys, key=lambda k: k.name
    )
    for limits in settings.tiers.values():
        assert limits_from_table(table_of(limits), "<round trip>") == limits


def test_a_bad_record_leaves_its_key_out_never_unlimited() -> None:
    settings = settings_of()
    records = config_records(settings)
    broken = KeyRecord(name="x", digest=digest_of("sk-x"), tier="gone").to_json()
    records[(KEY, "x")] = broken
    records[(KEY, "y")] = "{not json"
    records[(TIER, "z")] = '{"limits": {"rpm": "many"}}'
    view = build_view(settings, 1, records)
    assert set(view.keys_by_name) == {"config-key", "other"}
    assert set(view.tiers) == {"free", "pro"}
