"""The registry (versioned records of API keys and tiers) of every driver: memory, a real
redis-server and a real 3-master Redis Cluster, and through the GuardedStore wrapper.

What the keyring relies on: the version starts at 0 and grows by one per write that
changed something; a write is a compare-and-set; a write of what is already there
succeeds without a write (so a resent call never reports a conflict); every node sharing
the store sees the same records; concurrent compare-and-set writers never lose one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

import attrs
import pytest
import trio

from drivers.memory import MemoryStore
from drivers.redis import REGISTRY_RECORDS, REGISTRY_VERSION, RedisStore
from tests.support.redis_servers import RedisClusterServers, RedisServer
from tokenguard.config.loading import parse_settings
from tokenguard.limiting.keyring import Keyring
from tokenguard.model import digest_of
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.window_store import StoreError, WindowStore, open_store

TEST_TIMEOUT = 15.0


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], WindowStore]]:
    """Makes a store; every store one call makes shares its registry (one node each)."""
    if request.param == "memory":
        shared = MemoryStore()
        yield lambda: shared  # one process: the same store is the only way to share
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield lambda: RedisStore.from_url(server.url)
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        yield lambda: RedisStore.from_url(cluster.url)


@pytest.fixture
async def store(make_store: Callable[[], WindowStore]) -> AsyncIterator[WindowStore]:
    async with open_store(make_store()) as running:
        yield running


async def test_an_empty_registry_is_version_0(store: WindowStore) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await store.registry_version() == 0
        assert await store.registry_load() == (0, {})


async def test_each_write_bumps_the_version_once(store: WindowStore) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await store.registry_put("key", "alice", '{"a":1}') == 1
        assert await store.registry_put("tier", "pro", '{"rpm":5}') == 2
        assert await store.registry_put("key", "alice", '{"a":2}') == 3
        assert await store.registry_version() == 3
        assert await store.registry_load() == (
            3,
            {("key", "alice"): '{"a":2}', ("tier", "pro"): '{"rpm":5}'},
        )
        assert await store.registry_put("key", "alice", None) == 4
        assert await store.registry_load() == (4, {("tier", "pro"): '{"rpm":5}'})


async def test_writes_are_compare_and_set(store: WindowStore) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await store.registry_put("key", "k", "one", expect=None) == 1
        # Expecting it absent, or expecting another value: nothing is written.
        assert await store.registry_put("key", "k", "two", expect=None) is None
        assert await store.registry_put("key", "k", "two", expect="zero") is None
        assert await store.registry_load() == (1, {("key", "k"): "one"})
        assert await store.registry_put("key", "k", "two", expect="one") == 2
        # A delete expecting a value it no longer has does nothing either.
        assert await store.registry_put("key", "k", None, expect="one") is None
        assert await store.registry_put("key", "k", None, expect="two") == 3
        assert await store.registry_put("key", "k", "x", expect="two") is None
        assert await store.registry_load() == (3, {})


async def test_writing_what_is_there_succeeds_without_a_write(store: WindowStore) -> None:
    """A call resent after a lost reply finds its own write: success, same version."""
    with trio.fail_after(TEST_TIMEOUT):
        assert await store.registry_put("key", "k", "v", expect=None) == 1
        assert await store.registry_put("key", "k", "v", expect=None) == 1
        assert await store.registry_put("key", "k", "v", expect="old") == 1
        assert await store.registry_put("key", "gone", None) == 1
        assert await store.registry_put("key", "gone", None, expect="old") == 1
        assert await store.registry_version() == 1


async def test_one_record_is_read_alone(store: WindowStore) -> None:
    """``registry_get``: what the keyring polls the marker with, every 0.25 s."""
    with trio.fail_after(TEST_TIMEOUT):
        assert await store.registry_get("meta", "epoch") is None
        await store.registry_put("meta", "epoch", '{"epoch":"e1"}')
        await store.registry_put("key", "a/b", "v")
        assert await store.registry_get("meta", "epoch") == '{"epoch":"e1"}'
        assert await store.registry_get("key", "a/b") == "v"
        assert await store.registry_get("key", "a") is None
        await store.registry_put("meta", "epoch", None)
        assert await store.registry_get("meta", "epoch") is None


async def test_names_and_records_round_trip(store: WindowStore) -> None:
    names = ["a/b/c", "bot@example.com", "x:y+z", "ünïcödé", "k" * 100]
    record = json.dumps({"text": 'é \u2603 "quoted"\n', "n": 1}, ensure_ascii=False)
    with trio.fail_after(TEST_TIMEOUT):
        for name in names:
            await store.registry_put("key", name, record)
        version, records = await store.registry_load()
    assert version == len(names)
    assert records == {("key", name): record for name in names}


async def test_every_node_sees_the_same_registry(make_store: Callable[[], WindowStore]) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(make_store()) as one, open_store(make_store()) as two:
            await one.registry_put("tier", "free", '{"rpm":3}')
            assert await two.registry_version() == 1
            assert await two.registry_put("tier", "free", '{"rpm":4}', expect='{"rpm":3}') == 2
            assert await one.registry_load() == (2, {("tier", "free"): '{"rpm":4}'})


async def test_concurrent_compare_and_set_writers_lose_nothing(
    make_store: Callable[[], WindowStore],
) -> None:
    """Two nodes, 8 tasks each, each adding 5 to one counter by read-then-CAS: the
    counter ends at exactly 80 and the version counts exactly the 80 writes. (Each
    record names its writer: two writers writing the same text would both succeed, by
    the idempotence rule, as the keyring's whole-state records want.)"""

    async def add(store: WindowStore, writer: int, times: int) -> None:
        for _ in range(times):
            while True:
                _, records = await store.registry_load()
                current = records.get(("tier", "counter"))
                value = 0 if current is None else int(current.split(":")[0])
                record = f"{value + 1}:{writer}"
                if await store.registry_put("tier", "counter", record, expect=current):
                    break

    with trio.fail_after(TEST_TIMEOUT * 2):
        async with open_store(make_store()) as one, open_store(make_store()) as two:
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(add, one if i % 2 else two, i, 5)
            version, records = await one.registry_load()
    assert version == 80
    assert records[("tier", "counter")].startswith("80:")


async def test_redis_keeps_the_registry_under_one_hash_tag(redis_server: RedisServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_server.url) as store:
            await store.registry_put("key", "a", "1")
            await store.registry_put("tier", "b", "2")
    names = sorted(k.decode() for k in redis_server.command("KEYS", "*"))  # type: ignore[union-attr]
    assert names == sorted([REGISTRY_RECORDS, REGISTRY_VERSION])
    assert all("{registry}" in name for name in names)
    # No expiry: unlike counters, keys and tiers must outlive any idle time.
    assert redis_server.command("TTL", REGISTRY_RECORDS) == -1


async def test_a_store_that_is_not_running_raises_store_error(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url)
    with trio.fail_after(TEST_TIMEOUT):
        for call in (
            store.registry_version(),
            store.registry_load(),
            store.registry_put("key", "k", "v"),
        ):
            with pytest.raises(StoreError):
                await call


async def test_the_guarded_store_passes_the_registry_through(redis_server: RedisServer) -> None:
    """Through a node's GuardedStore: the same registry; with the breaker open, every
    registry call fails at once (the keyring then keeps its last view)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(GuardedStore(RedisStore.from_url(redis_server.url))) as guarded:
            assert await guarded.registry_put("key", "k", "v", expect=None) == 1
            assert await guarded.registry_load() == (1, {("key", "k"): "v"})
            assert await guarded.registry_version() == 1
            assert await guarded.registry_get("key", "k") == "v"
            guarded._trip("test: the store is down")  # type: ignore[attr-defined]
            for call in (
                guarded.registry_version(),
                guarded.registry_load(),
                guarded.registry_get("key", "k"),
                guarded.registry_put("key", "k", "w"),
            ):
                failed = False
                with trio.CancelScope() as scope:
                    scope.cancel()  # a call that waited on anything would be cancelled
                    try:
                        await call
                    except StoreError:
                        failed = True
                assert failed  # at once, without waiting on anything
    assert redis_server.command("HGET", REGISTRY_RECORDS, "key/k") == b"v"


async def test_a_driver_without_a_registry_says_so() -> None:
    class Bare(MemoryStore):
        registry_version = WindowStore.registry_version
        registry_load = WindowStore.registry_load
        registry_get = WindowStore.registry_get
        registry_put = WindowStore.registry_put

    store = Bare()
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(StoreError, match="keeps no registry"):
            await store.registry_version()
        with pytest.raises(StoreError, match="keeps no registry"):
            await store.registry_put("key", "k", None)
        with pytest.raises(StoreError, match="keeps no registry"):
            await store.registry_get("key", "k")  # (the default reads every record)


async def test_two_nodes_keyrings_agree_within_a_second(
    make_store: Callable[[], WindowStore],
) -> None:
    """Two nodes' keyrings on one registry: both seed the config (the second writes
    nothing), a key created through one is live on the other within a second, and a
    revocation too (its watchers told)."""
    settings = parse_settings(
        {"tiers": {"t": {"rpm": 5}}, "keys": [{"key": "sk-a", "name": "a", "tier": "t"}]},
        "<test>",
        environ={},
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_store(make_store()) as one_store,
            open_store(make_store()) as two_store,
            trio.open_nursery() as nursery,
        ):
            one, two = Keyring(settings, one_store), Keyring(settings, two_store)
            await nursery.start(one.run)
            seeded = await one_store.registry_version()
            await nursery.start(two.run)
            # tier t, key a, then the marker
            assert await two_store.registry_version() == seeded == 3
            await one.create_key("b", digest_of("sk-b"), tier="t", limits={"tpm": 9})
            start = trio.current_time()
            while two.by_digest(digest_of("sk-b")) is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert trio.current_time() - start < 1.0
            assert two.by_name("b").limits == attrs.evolve(settings.tiers["t"], tpm=9)
            with two.watching(digest_of("sk-b")) as revoked:
                assert not revoked.is_set()
                await one.revoke_key("b")
                with trio.fail_after(1.0):
                    await revoked.wait()
            assert two.by_name("b") is None and two.by_name("a") is not None
            nursery.cancel_scope.cancel()
