"""A Redis Sentinel failover, for real: the master dies, Sentinel promotes its replica,
and a node on ``redis+sentinel://`` follows it without losing count.

Real processes only: a master, one replica of it and a Sentinel (quorum 1, the master
deemed down after 500 ms), all redis-server; the node is a :class:`GuardedStore` (policy
``local``, one node) on the real Redis driver, in this process. The test shows:

1. before the failover, admissions go through the store, and the replica has them;
2. once the master is SIGKILLed, calls fail on the store within its deadline and the
   policy answers them from the local windows (none waits long), the breaker opens;
3. once Sentinel has promoted the replica, the breaker closes by itself (the probe
   asks Sentinel where the master is now), the local admissions are written back to
   the new master, later admissions land there, and the limit holds across the three
   phases: the key gets exactly its limit, no more.

The same, on Redis Cluster: three masters, each with a replica (``cluster-node-timeout``
500 ms), and the node on ``redis+cluster://``; the master that serves the test key's
slot is SIGKILLed, the cluster promotes its replica, and the node follows it (the
driver reads the slot table again after a connection error or CLUSTERDOWN); the breaker
closes only once the outage's admissions are written back to the promoted replica.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import attrs
import redis.crc
import trio

from drivers.redis import key_name
from tests.redis_servers import (
    RedisServer,
    running_redis_cluster_with_replicas,
    running_redis_sentinel_group,
    wait_replicated,
)
from tests.test_faults import ROWS_LIMIT, Load, a_row, admissions, guarded_redis
from tokenguard.resilience import GuardedStore
from tokenguard.windows import open_store

SERVICE = "tg"
PARTITION = "failover"
# Sentinel deems the master down after this long without an answer, then fails over
# at once (one Sentinel, quorum 1); a failed attempt is retried after twice the
# failover timeout.
# (Below Sentinel's 1 s reconnect period, the promoted replica itself is briefly
# flagged down right after the switch, until Sentinel has connected to it: redis-py
# refuses such a master, so the breaker may close a probe later. Longer is slower:
# at 1000 ms, Sentinel flagged the dead master after 2 s and switched after 3 s.)
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000
BEFORE = 20  # admissions through the master before it dies (of ROWS_LIMIT, 50)
FIRST_CALLS = 4  # made right after the kill: the first ones fail on the store
OUTAGE_PAUSE = 0.2  # then one admission this often while the breaker is open ...
OUTAGE_MAX = 20  # ... at most this many in all (BEFORE + these stay under the limit)
# Generous bounds for a loaded 2-core CI machine; the measured figures are far below
# (docs/reliability.md).
ANSWER_BOUND = 2.0  # any call during the outage (the store deadline is 100 ms)
CLOSE_BOUND = 15.0  # from the kill to the breaker closed again
TEST_TIMEOUT = 60.0
# Redis Cluster: a master unreachable this long is flagged failing (PFAIL), then failed
# (FAIL) once the other masters agree; its replica is then elected after 500-1000 ms.
CLUSTER_NODE_TIMEOUT_MS = 500


@attrs.define
class Failover:
    """What the test saw of a failover: when (trio.current_time()) each step came, and
    the calls made while the store was away."""

    killed_at: float
    promoted_at: float | None = None  # the replica is named the master
    closed_at: float | None = None  # the node's breaker closed again
    outage: Load = attrs.field(factory=Load)
    calls_before_promotion: int = 0

    def summary(self, status: dict[str, object]) -> str:
        assert self.promoted_at is not None and self.closed_at is not None
        durations = sorted(self.outage.durations)
        return (
            f"replica promoted {self.promoted_at - self.killed_at:.2f} s after the kill, "
            f"breaker closed after {self.closed_at - self.killed_at:.2f} s "
            f"(open {status['last_outage_seconds']} s); {len(durations)} calls answered "
            f"locally ({self.calls_before_promotion} before the promotion), median "
            f"{durations[len(durations) // 2] * 1000:.1f} ms, max {durations[-1] * 1000:.1f} ms"
        )


async def used_on(server: RedisServer) -> int:
    """How much of the test key's window is used, read on ``server`` itself."""
    async with open_store(server.url) as store:
        (state,) = await store.usage(PARTITION, [a_row()])
    return state.used


async def admit_into(store: GuardedStore, load: Load) -> None:
    """One admission, its duration and outcome added to ``load``."""
    one = await admissions(store, tasks=1, each=1, partition=PARTITION)
    load.durations += one.durations
    load.outcomes.update(one.outcomes)


async def watch_until(
    promoted: Callable[[], bool], store: GuardedStore, failover: Failover
) -> None:
    """Record when ``promoted()`` (blocking: run in a thread) first says the replica is
    the master now, and when the breaker (open by then) closes again."""
    while failover.promoted_at is None or failover.closed_at is None:
        if failover.promoted_at is None:
            if await trio.to_thread.run_sync(promoted):
                failover.promoted_at = trio.current_time()
        if failover.closed_at is None and not store.breaker.is_open:
            if store.stats.breaker_opened:
                failover.closed_at = trio.current_time()
        await trio.sleep(0.02)


async def admit_before(store: GuardedStore) -> None:
    """Phase 1: ``BEFORE`` admissions, all through the store."""
    before = await admissions(store, tasks=4, each=BEFORE // 4, partition=PARTITION)
    assert before.outcomes == {"store": BEFORE}
    assert store.stats.breaker_opened == 0


async def ride_out(
    store: GuardedStore, master: RedisServer, promoted: Callable[[], bool]
) -> Failover:
    """Phase 2: SIGKILL ``master``; make ``FIRST_CALLS`` admissions at once (before any
    promotion: they fail on the store and open the breaker), then one every
    ``OUTAGE_PAUSE`` while the breaker is open, until it closes by itself. Asserts that
    it closed within ``CLOSE_BOUND`` after the promotion, and that every call of the
    outage was answered by the policy, none held long."""
    failover = Failover(killed_at=trio.current_time())
    await trio.to_thread.run_sync(master.kill)
    outage = failover.outage
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_until, promoted, store, failover)
        for _ in range(FIRST_CALLS):
            await admit_into(store, outage)
        assert store.breaker.is_open, store.status()
        assert failover.promoted_at is None  # all of that before the failover
        assert store.stats.failures >= store.breaker.threshold
        failover.calls_before_promotion = len(outage.durations)
        with trio.move_on_after(CLOSE_BOUND):
            while failover.closed_at is None:
                if len(outage.durations) < OUTAGE_MAX and store.breaker.is_open:
                    await admit_into(store, outage)
                if failover.promoted_at is None:
                    failover.calls_before_promotion = len(outage.durations)
                await trio.sleep(OUTAGE_PAUSE)
        nursery.cancel_scope.cancel()
    assert failover.closed_at is not None, f"breaker still open: {store.status()}"
    assert failover.promoted_at is not None
    assert failover.promoted_at < failover.closed_at
    assert outage.outcomes == {"local": len(outage.durations)}, outage.outcomes
    assert max(outage.durations) < ANSWER_BOUND, outage.durations
    assert store.status()["breaker"] == "closed"
    assert store.stats.breaker_opened == 1
    assert store.stats.written_back >= 1
    return failover


async def admit_after(store: GuardedStore, new_master: RedisServer, failover: Failover) -> None:
    """Phase 3: the new master holds what was admitted before (replicated) and during
    the outage (written back); ``ROWS_LIMIT`` more attempts get the rest of the limit,
    through the store, and no more; the breaker stays closed."""
    local = failover.outage.outcomes["local"]
    assert await used_on(new_master) == BEFORE + local
    after = await admissions(store, tasks=2, each=ROWS_LIMIT // 2, partition=PARTITION)
    assert after.outcomes == {
        "store": ROWS_LIMIT - BEFORE - local,
        "refused": BEFORE + local,
    }, after.outcomes
    assert BEFORE + local + after.admitted == ROWS_LIMIT
    assert await used_on(new_master) == ROWS_LIMIT
    assert store.stats.breaker_opened == 1  # it stayed closed


def counter_on(server: RedisServer, *, replica: bool = False) -> dict[bytes, bytes]:
    """The test key's counter (a hash) as stored on ``server``; a ``replica`` is read
    with ``READONLY`` (a cluster replica otherwise redirects every read to its master)."""
    with server.client() as client:
        if replica:
            client.execute_command("READONLY")  # (one connection: the pool's only one)
        return client.hgetall(key_name(PARTITION, a_row()))


async def test_a_sentinel_failover_is_followed_and_the_limit_holds(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with running_redis_sentinel_group(
            tmp_path,
            SERVICE,
            down_after_ms=DOWN_AFTER_MS,
            failover_timeout_ms=FAILOVER_TIMEOUT_MS,
        ) as group:
            async with guarded_redis(group.url, cluster_size=1) as store:
                await admit_before(store)
                await trio.to_thread.run_sync(wait_replicated, group.master, group.replica)
                assert await used_on(group.replica) == BEFORE

                # Sentinel notices after 500 ms, then names the replica.
                replica = (group.replica.host, group.replica.port)
                failover = await ride_out(
                    store, group.master, lambda: group.master_address() == replica
                )

                assert await trio.to_thread.run_sync(group.master_address) == replica
                await admit_after(store, group.replica, failover)
                print(f"\nsentinel failover: {failover.summary(store.status())}")


async def test_a_cluster_failover_is_followed_and_the_limit_holds(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with running_redis_cluster_with_replicas(
            tmp_path, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS
        ) as cluster:
            slot = redis.crc.key_slot(key_name(PARTITION, a_row()).encode())
            doomed = cluster.master_of_slot(slot)
            master, replica = cluster.masters[doomed], cluster.replicas[doomed]
            async with guarded_redis(cluster.url, cluster_size=1) as store:
                await admit_before(store)
                await trio.to_thread.run_sync(wait_replicated, master, replica)
                assert await used_on(master) == BEFORE
                on_master = await trio.to_thread.run_sync(counter_on, master)
                assert on_master  # (not vacuous: the key is there)
                on_replica = await trio.to_thread.run_sync(
                    functools.partial(counter_on, replica, replica=True)
                )
                assert on_replica == on_master

                # The other masters flag it failed after the node timeout, then the
                # replica is elected.
                failover = await ride_out(
                    store, master, functools.partial(cluster.is_master, replica)
                )

                assert await trio.to_thread.run_sync(cluster.is_master, replica)
                await admit_after(store, replica, failover)
                print(f"\ncluster failover: {failover.summary(store.status())}")
