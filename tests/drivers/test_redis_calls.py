"""Redis-only behaviour of drivers/redis/ on the wire, against real redis-server processes.

The window semantics are in the suite every driver runs (the tests of tests/drivers/ on
``harness``); here: key names (the partition as hash tag, one slot, never the API key),
the stored layout and the previous one, NOSCRIPT recovery, auto-pipelining (refunds
riding with other calls, round trips shared), several nodes sharing one Redis, and the
memory a counter takes.
"""

from __future__ import annotations

import math
import struct

import attrs
import pytest
import redis.crc
import trio
import trio.testing

from drivers.redis import (
    RedisStore,
    key_name,
)
from drivers.redis.batching import SPLIT_ABOVE
from tests.support.redis_rows import TEST_TIMEOUT, a_row
from tests.support.redis_servers import (
    RedisClusterServers,
    RedisServer,
)
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.model import ApiKey, Limits, digest_of
from tokenguard.store.rows import CONCURRENT, Row
from tokenguard.store.window_store import StoreError, open_store

# --- key names ---------------------------------------------------------------------------


def test_key_names_carry_the_partition_as_hash_tag() -> None:
    row = a_row()
    assert key_name("abc123", row) == "tg:{abc123}:key:a:requests:60000:1000"
    lease = Row("key:a", CONCURRENT, window_ms=30_000, bucket_ms=30_000, limit=5, amount=1)
    assert key_name("abc123", lease) == "tg:{abc123}:key:a:concurrent"
    with pytest.raises(ValueError, match="partition"):
        key_name("", row)


async def test_stored_keys_share_one_slot_and_never_name_the_api_key(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        secrets = [f"sk-live-{i:04d}-do-not-log" for i in range(20)]
        keys = [
            ApiKey(
                name=f"team-{i}",
                digest=digest_of(secret),
                limits=Limits(rpm=10, input_tpm=1000, output_tpm=1000),
            )
            for i, secret in enumerate(secrets)
        ]
        async with open_store(redis_cluster_url) as store:
            limiter = Limiter(store, window_seconds=60, bucket_seconds=1)
            for key in keys:
                assert (await limiter.admit(key, Cost(1, 10, 100))).admitted
        stored = []
        for server in redis_cluster.servers:
            with server.client() as client:
                stored += [k.decode() for k in client.scan_iter(count=1000)]
        assert len(stored) == 3 * len(keys)
        for key in keys:
            mine = [k for k in stored if f"{{{key.key_id}}}" in k]
            assert len(mine) == 3
            assert len({redis.crc.key_slot(k.encode()) for k in mine}) == 1
        for secret in secrets:
            assert not any(secret in k or digest_of(secret) in k for k in stored)


# --- the stored layout -------------------------------------------------------------------


async def test_counters_in_the_previous_layout_are_counted_and_stay_readable_by_it(
    redis_server: RedisServer,
) -> None:
    """A counter written by the previous version (a summary of four integers, no copy
    of the newest bucket's amount: see drivers/counter.lua) is counted right, newest
    bucket included; and every bucket field is still written, which is all that
    version reads besides the summary."""
    with trio.fail_after(TEST_TIMEOUT):
        row = Row("key:a", "requests", window_ms=60_000, bucket_ms=10_000, limit=100)
        async with open_store(redis_server.url) as store:
            assert isinstance(store, RedisStore)
            now = await store.server_time_ms()
            newest = now // row.bucket_ms
            key = key_name("p", row)
            # 3 in the bucket before, 5 in the newest: used 8, start s, alert never.
            summary = struct.pack("<qqqq", newest - row.span, 8, newest, -1)
            redis_server.command("HSET", key, str(newest - 1), "3", str(newest), "5", "m", summary)
            redis_server.command("PEXPIRE", key, 120_000)
            assert [s.used for s in await store.usage("p", [row])] == [8]

            admitted = await store.admit("p", [attrs.evolve(row, amount=2)])
            assert admitted.admitted and admitted.states[0].used == 10
            bucket = admitted.reservation.buckets[0]
            expected = (
                {newest - 1: 3, newest: 7}
                if bucket == newest
                else {newest - 1: 3, newest: 5, bucket: 2}
            )
            for b, amount in expected.items():
                assert redis_server.command("HGET", key, str(b)) == str(amount).encode()

            await store.settle(admitted.reservation, [-1])
            assert [s.used for s in await store.usage("p", [row])] == [9]
            assert (
                redis_server.command("HGET", key, str(bucket)) == str(expected[bucket] - 1).encode()
            )
            # Now in the newer layout: five integers, the last the newest bucket's amount.
            _start, used, n, _alert, in_newest = struct.unpack(
                "<qqqqq", redis_server.command("HGET", key, "m")
            )
            assert (used, n, in_newest) == (9, bucket, expected[bucket] - 1)


# --- scripts, pipelining ---------------------------------------------------------------


@pytest.mark.parametrize("deployment", ["redis", "redis-cluster"])
async def test_scripts_come_back_after_script_flush(
    request: pytest.FixtureRequest, deployment: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        if deployment == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            servers, url = [server], server.url
        else:
            cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
            servers, url = cluster.servers, cluster.url
        async with open_store(url) as store:
            assert (await store.admit("p", [a_row(amount=3)])).admitted
            for server in servers:
                server.command("SCRIPT", "FLUSH")
            admission = await store.admit("p", [a_row(amount=4)])
            assert admission.admitted
            assert admission.states[0].used == 7
            for server in servers:
                server.command("SCRIPT", "FLUSH")
            await store.settle(admission.reservation, [-4])
            for server in servers:
                server.command("SCRIPT", "FLUSH")
            assert (await store.usage("p", [a_row()]))[0].used == 3


@pytest.mark.parametrize("deployment", ["redis", "redis-cluster"])
async def test_concurrent_calls_share_round_trips(
    request: pytest.FixtureRequest, deployment: str
) -> None:
    """200 admissions at once (over 50 partitions) take far fewer than 200 round trips."""
    with trio.fail_after(TEST_TIMEOUT):
        url = request.getfixturevalue("redis_url" if deployment == "redis" else "redis_cluster_url")
        async with open_store(url) as store:
            assert isinstance(store, RedisStore)
            calls, round_trips = store.calls, store.round_trips
            admitted = []

            async def one(i: int) -> None:
                admitted.append((await store.admit(f"p{i % 50}", [a_row(limit=4)])).admitted)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            assert admitted.count(True) == 200
            assert store.calls - calls == 200
            # A burst goes out as one pipeline per flusher (per node, for a cluster).
            assert store.round_trips - round_trips <= 20


async def test_a_refund_rides_with_the_next_call(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refund does not start a pipeline of its own: queued alone, it is not sent
    (its delay is made endless here); the next call takes it along (one round trip for
    both, the refund first)."""
    monkeypatch.setattr("drivers.redis.batching.REFUND_DELAY", math.inf)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_url) as store:
            assert isinstance(store, RedisStore)
            first = await store.admit("refund", [a_row(amount=3, limit=10)])
            assert first.reservation is not None
            round_trips = store.round_trips
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.settle, first.reservation, [-2])
                await trio.testing.wait_all_tasks_blocked()  # the refund is queued
                assert store.round_trips == round_trips  # ... and not sent
                second = await store.admit("refund", [a_row(amount=1, limit=10)])
            assert store.round_trips - round_trips == 1
            assert second.states[0].used == 2  # 3 - 2 + 1: the refund went first
            assert second.reservation is not None


async def test_a_refund_with_nothing_to_ride_with_goes_alone(redis_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_url) as store:
            assert isinstance(store, RedisStore)
            admission = await store.admit("alone", [a_row(amount=3, limit=10)])
            assert admission.reservation is not None
            round_trips = store.round_trips
            await store.settle(admission.reservation, [-1])
            assert store.round_trips == round_trips + 1
            assert (await store.usage("alone", [a_row(limit=10)]))[0].used == 2


async def test_a_charge_and_a_pipeline_full_of_refunds_go_at_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the refund delay endless, a charge still goes (it is never held), and so do
    ``SPLIT_ABOVE`` refunds queued together (a pipeline of their own)."""
    monkeypatch.setattr("drivers.redis.batching.REFUND_DELAY", math.inf)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_url) as store:
            admission = await store.admit("charge", [a_row(amount=3, limit=10)])
            assert admission.reservation is not None
            await store.settle(admission.reservation, [+2])
            assert (await store.usage("charge", [a_row(limit=10)]))[0].used == 5
            many = [await store.admit("many", [a_row(limit=100)]) for _ in range(SPLIT_ABOVE)]
            async with trio.open_nursery() as nursery:
                for each in many:
                    assert each.reservation is not None
                    nursery.start_soon(store.settle, each.reservation, [-1])
            assert (await store.usage("many", [a_row(limit=100)]))[0].used == 0


@pytest.mark.parametrize("deployment", ["redis", "redis-cluster"])
async def test_the_store_notes_when_it_wrote_calls_and_heard_their_replies(
    request: pytest.FixtureRequest, deployment: str
) -> None:
    """``last_sent`` and ``last_heard`` (what the guarded store judges the server by)
    are noted by the pipelines themselves, on trio's clock: the write, then the read,
    both before the caller resumes (on the driver's own trio connection for a single
    Redis; in redis-py's worker thread for a cluster)."""
    with trio.fail_after(TEST_TIMEOUT):
        url = request.getfixturevalue("redis_url" if deployment == "redis" else "redis_cluster_url")
        async with open_store(url) as store:
            for _ in range(3):
                before = trio.current_time()
                await store.admit("p", [a_row()])
                assert before <= store.last_sent <= store.last_heard <= trio.current_time()


async def test_two_nodes_sharing_redis_admit_exactly_the_limit(redis_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_url) as node1, open_store(redis_url) as node2:
            outcomes: list[bool] = []

            async def one(store: RedisStore) -> None:
                outcomes.append((await store.admit("shared", [a_row(limit=7)])).admitted)

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, node1 if i % 2 else node2)
            assert outcomes.count(True) == 7


async def test_a_cancelled_caller_leaves_the_store_working(redis_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_url) as store:
            with trio.move_on_after(0):
                await store.admit("p", [a_row()])
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(store.admit, "p", [a_row()])
                nursery.cancel_scope.cancel()
            assert (await store.usage("p", [a_row()]))[0].used <= 21
            assert (await store.admit("p", [a_row()])).admitted


async def test_a_store_not_running_raises_store_error(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(StoreError, match="not running"):
        await store.admit("p", [a_row()])


async def test_server_time_is_the_clock_of_the_scripts(redis_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(redis_url) as store:
            before = await store.server_time_ms()
            admission = await store.admit("p", [a_row()])
            after = await store.server_time_ms()
            assert before // 1000 <= admission.reservation.buckets[0] <= after // 1000


# --- memory --------------------------------------------------------------------------------


async def test_memory_per_active_key_is_small_and_grows_with_buckets(
    redis_server: RedisServer,
) -> None:
    """An API key's three counters with every bucket of the window in use.

    A 600 ms window in 10 ms buckets has the shape of a 60 s window in 1 s buckets (61
    live buckets); one admission per bucket fills them all. Measured with MEMORY USAGE
    (figures in docs/redis.md).
    """
    with trio.fail_after(TEST_TIMEOUT):
        rows = [
            Row("key:k", dimension, window_ms=600, bucket_ms=10, limit=10**9, amount=amount)
            for dimension, amount in (
                ("requests", 1),
                ("input_tokens", 1500),
                ("output_tokens", 700),
            )
        ]
        async with open_store(redis_server.url) as store:
            one = await store.admit("0123456789abcdef", rows)
            assert one.admitted
            with redis_server.client() as client:
                keys = [k.decode() for k in client.scan_iter()]
                first = sum(client.memory_usage(k, samples=0) for k in keys)
            buckets = {one.reservation.buckets[0]}
            while len(buckets) < 61:
                admission = await store.admit("0123456789abcdef", rows)
                buckets.add(admission.reservation.buckets[0])
                await trio.sleep(0.004)
            with redis_server.client() as client:
                full = {k: client.memory_usage(k, samples=0) for k in keys}
                encodings = {client.object("encoding", k) for k in keys}
        assert len(keys) == 3
        print(
            f"\nmemory for one API key's 3 counters: {first} B with 1 bucket, "
            f"{sum(full.values())} B with 61 buckets ({sorted(full.values())})"
        )
        assert first < 600
        assert sum(full.values()) < 4 * 1024  # about 15 bytes per bucket and counter
        assert encodings <= {b"ziplist", b"listpack"}
