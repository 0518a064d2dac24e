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

Cluster failovers are not tested (see docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from tests.redis_servers import (
    RedisSentinelGroup,
    RedisServer,
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


@attrs.define
class Failover:
    """When (trio.current_time()) the test saw each step of the failover."""

    killed_at: float
    promoted_at: float | None = None  # Sentinel names the replica as the master
    closed_at: float | None = None  # the node's breaker closed again


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


async def watch(group: RedisSentinelGroup, store: GuardedStore, failover: Failover) -> None:
    """Record when Sentinel first names the replica as master, and when the breaker
    (open by then) closes again."""
    replica = (group.replica.host, group.replica.port)
    while failover.promoted_at is None or failover.closed_at is None:
        if failover.promoted_at is None:
            if await trio.to_thread.run_sync(group.master_address) == replica:
                failover.promoted_at = trio.current_time()
        if failover.closed_at is None and not store.breaker.is_open:
            if store.stats.breaker_opened:
                failover.closed_at = trio.current_time()
        await trio.sleep(0.02)


async def test_a_sentinel_failover_is_followed_and_the_limit_holds(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with running_redis_sentinel_group(
            tmp_path,
            SERVICE,
            down_after_ms=DOWN_AFTER_MS,
            failover_timeout_ms=FAILOVER_TIMEOUT_MS,
        ) as group:
            async with guarded_redis(group.url, cluster_size=1) as store:
                # 1. Through the master, and replicated.
                before = await admissions(store, tasks=4, each=BEFORE // 4, partition=PARTITION)
                assert before.outcomes == {"store": BEFORE}
                await trio.to_thread.run_sync(wait_replicated, group.master, group.replica)
                assert await used_on(group.replica) == BEFORE
                assert store.stats.breaker_opened == 0

                # 2. The master dies; Sentinel has not noticed yet (500 ms).
                failover = Failover(killed_at=trio.current_time())
                await trio.to_thread.run_sync(group.master.kill)
                outage = Load()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch, group, store, failover)
                    for _ in range(FIRST_CALLS):
                        await admit_into(store, outage)
                    assert store.breaker.is_open, store.status()
                    assert failover.promoted_at is None  # all of that before the failover
                    assert store.stats.failures >= store.breaker.threshold
                    calls_before_promotion = len(outage.durations)
                    # ... until the probe finds the new master and the breaker closes.
                    with trio.move_on_after(CLOSE_BOUND):
                        while failover.closed_at is None:
                            if len(outage.durations) < OUTAGE_MAX and store.breaker.is_open:
                                await admit_into(store, outage)
                            if failover.promoted_at is None:
                                calls_before_promotion = len(outage.durations)
                            await trio.sleep(OUTAGE_PAUSE)
                    nursery.cancel_scope.cancel()
                assert failover.closed_at is not None, f"breaker still open: {store.status()}"
                assert failover.promoted_at is not None
                assert failover.promoted_at < failover.closed_at
                # Every call of the outage answered by the policy, none held long.
                local = outage.outcomes["local"]
                assert outage.outcomes == {"local": len(outage.durations)}, outage.outcomes
                assert max(outage.durations) < ANSWER_BOUND, outage.durations
                status = store.status()
                assert status["breaker"] == "closed", status
                assert store.stats.breaker_opened == 1
                assert store.stats.written_back >= 1

                # 3. On the new master: what was admitted before (replicated) and during
                # the outage (written back), then the rest of the limit, and no more.
                new_master = await trio.to_thread.run_sync(group.master_address)
                assert new_master == (group.replica.host, group.replica.port)
                assert await used_on(group.replica) == BEFORE + local
                after = await admissions(store, tasks=2, each=ROWS_LIMIT // 2, partition=PARTITION)
                assert after.outcomes == {
                    "store": ROWS_LIMIT - BEFORE - local,
                    "refused": BEFORE + local,
                }, after.outcomes
                assert BEFORE + local + after.admitted == ROWS_LIMIT
                assert await used_on(group.replica) == ROWS_LIMIT
                assert store.stats.breaker_opened == 1  # it stayed closed

                durations = sorted(outage.durations)
                print(
                    f"\nfailover: promoted {failover.promoted_at - failover.killed_at:.2f} s "
                    f"after the kill, breaker closed after "
                    f"{failover.closed_at - failover.killed_at:.2f} s "
                    f"(open {status['last_outage_seconds']} s); {len(durations)} calls "
                    f"answered locally ({calls_before_promotion} before the promotion), "
                    f"median {durations[len(durations) // 2] * 1000:.1f} ms, "
                    f"max {durations[-1] * 1000:.1f} ms"
                )
