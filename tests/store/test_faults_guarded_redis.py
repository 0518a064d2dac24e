"""Faults in one process: the guarded store on the real Redis driver, Redis slow, flaky or paused.

Through :mod:`tests.support.latency_proxy` (5, 50 and 200 ms of latency with jitter,
stalls, resets, refused connections) or against a Redis paused with ``CLIENT PAUSE``:
every call answers within its deadline, limits stay exact while Redis keeps up, the
policy applies when it does not, and nothing piles up (threads, connections, queued
calls). Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from tests.support.guarded_redis import ROWS_LIMIT, Load, a_row, admissions, guarded_redis
from tests.support.latency_proxy import LatencyProxy, running_proxy
from tests.support.redis_servers import RedisServer
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.stalls import PROBE_PERIOD

DEADLINE = 0.25  # the store's deadline in test_slow_redis_... (the default is 0.1)


@asynccontextmanager
async def warm_redis_behind_a_proxy(
    redis_server: RedisServer, **options: Any
) -> AsyncIterator[tuple[LatencyProxy, GuardedStore]]:
    """A one-node :class:`GuardedStore` on ``redis_server`` through a latency proxy (no
    latency yet), both its pipelines' connections already open: a new connection costs
    redis-py 3 round trips (connect, CLIENT SETINFO x2), which latency set afterwards
    must not add to the calls it measures."""
    async with running_proxy((redis_server.host, redis_server.port)) as proxy:
        async with guarded_redis(proxy.url, cluster_size=1, **options) as store:
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(store.admit, "warm", [a_row()])
            yield proxy, store


async def test_store_admissions_in_flight_when_the_breaker_opens_count_locally(
    redis_server: RedisServer,
) -> None:
    """30 admissions are on their way to a slow Redis (50 ms) when the breaker opens
    (tripped by hand here; under load, by other calls missing the deadline): the 40
    that follow go to the local windows, which already count the 30 in flight, so the
    node admits exactly the limit (50), not 30 + 40."""
    admissions: list[bool] = []

    async def admit(store: GuardedStore) -> None:
        admissions.append((await store.admit("in-flight", [a_row()])).admitted)

    with trio.fail_after(30):
        async with warm_redis_behind_a_proxy(redis_server) as (proxy, store):
            proxy.latency = 0.05
            async with trio.open_nursery() as nursery:
                for _ in range(30):
                    nursery.start_soon(admit, store)
                await trio.sleep(0.01)  # all 30 sent, none answered yet
                assert not admissions
                store._trip("test: the breaker opens with calls in flight")
                for _ in range(40):
                    nursery.start_soon(admit, store)
            status = store.status()
    assert status["breaker"] == "open"
    assert sum(admissions) == ROWS_LIMIT
    assert status["local_admissions"] == ROWS_LIMIT - 30


async def test_uneven_nodes_stay_within_the_limit_when_they_fall_back(redis_url: str) -> None:
    """Three nodes (cluster_size 3: shares 17, 17, 16 of 50) whose traffic was uneven
    before the outage: node 0 admitted 40, node 1 6 and node 2 4, through Redis. When
    the store goes away, node 0 has spent more than its share, and the others' shares
    minus their own admissions (11 and 12) would take the cluster to 73; but each node
    also saw, in its last reply from Redis, how much of the limit the cluster had left
    (0 and 1), and its local windows allow no more than its part of that."""
    with trio.fail_after(30):
        async with (
            guarded_redis(redis_url, cluster_size=3, node_id=0) as node0,
            guarded_redis(redis_url, cluster_size=3, node_id=1) as node1,
            guarded_redis(redis_url, cluster_size=3, node_id=2) as node2,
        ):
            nodes = (node0, node1, node2)
            before = 0
            for node, count in ((node0, 40), (node1, 5), (node2, 4), (node1, 1)):
                for _ in range(count):
                    before += (await node.admit("uneven", [a_row()])).admitted
            assert before == ROWS_LIMIT
            for node in nodes:
                node._trip("test: the store is gone")
            during = [0, 0, 0]
            for _ in range(30):
                for i, node in enumerate(nodes):
                    during[i] += (await node.admit("uneven", [a_row()])).admitted
    assert during == [0, 0, 0], during


async def test_a_stalled_node_does_not_blame_the_store(redis_server: RedisServer) -> None:
    """The node's own event loop stalls for 250 ms (a long GC pass, a starved CPU) while
    200 admissions wait on a Redis 5 ms away: the stall is measured and left out of
    their deadlines, and the replies that arrived meanwhile are read before any
    deadline is judged, so no call fails and the breaker stays closed, however slow
    the machine.
    """

    async def stall() -> None:
        await trio.sleep(0.004)  # the first pipeline is on its way
        time.sleep(0.25)  # noqa: ASYNC251 - blocks the event loop, as a GC pass would

    with trio.fail_after(30):
        async with warm_redis_behind_a_proxy(redis_server) as (proxy, store):
            proxy.latency = 0.005
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stall)
                load = await admissions(store, tasks=200, each=1, partition="stall")
            status = store.status()
    assert load.outcomes == {"store": ROWS_LIMIT, "refused": 200 - ROWS_LIMIT}
    assert status["breaker"] == "closed" and status["failures"] == 0
    assert status["node_stalled_seconds"] >= 0.25 - PROBE_PERIOD - 1e-9  # seen, not blamed


@pytest.mark.parametrize(
    ("latency", "jitter"), [(0.005, 0.002), (0.06, 0.02), (0.5, 0.05)], ids=["5ms", "60ms", "500ms"]
)
async def test_slow_redis_answers_within_the_deadline_and_nothing_piles_up(
    redis_server: RedisServer, latency: float, jitter: float
) -> None:
    """200 concurrent admissions against limit 50 through a proxy adding latency: while
    Redis keeps within the deadline (250 ms here) exactly 50 pass, through the store,
    and no call fails; at 500 ms every call misses it, the breaker opens, the local
    windows (one node: the whole limit) answer, and still exactly 50 pass. Threads and
    connections stay bounded, and nothing is left queued. (The deadline is wider than
    the 100 ms default because the proxy runs on the node's own event loop: its
    latency is the node's work as much as Redis's. How long calls take is printed, not
    asserted: it depends on the machine; the deadline's rules are asserted exactly, on
    a mock clock, in test_resilience.py.)"""
    threads_before = threading.active_count()
    with trio.fail_after(30):
        async with warm_redis_behind_a_proxy(redis_server, timeout=DEADLINE) as (proxy, store):
            proxy.latency, proxy.jitter = latency, jitter
            load = await admissions(store, tasks=200, each=1)
            pending = len(store.primary._pending)  # type: ignore[attr-defined]
            status = store.status()
    assert load.admitted == ROWS_LIMIT and load.outcomes["refused"] == 150
    print(
        f"{latency * 1000:g} ms: {dict(load.outcomes)}, breaker {status['breaker']}, "
        f"slowest {max(load.durations) * 1000:.0f} ms, threads +{load.max_threads - threads_before}"
        f", connections {proxy.max_connections}"
    )
    if latency + jitter < DEADLINE:  # Redis answers within the deadline: no call fails
        assert load.outcomes["store"] == ROWS_LIMIT
        assert status["breaker"] == "closed" and status["failures"] == 0
    if latency - jitter > DEADLINE:
        assert status["breaker"] == "open" and status["timeouts"] >= 3
        assert load.outcomes["local"] == ROWS_LIMIT
    assert pending == 0
    # Two pipelines (threads, connections) at most, plus the probe's.
    assert load.max_threads - threads_before <= 2 + 2
    assert proxy.max_connections <= 2 + 2


async def test_dropped_and_refused_connections_apply_the_policy_then_recover(
    redis_server: RedisServer,
) -> None:
    """Connections reset under load: every call still gets an answer (the driver resends
    an admission whose connection dropped before any reply; the others take the
    policy). Then the proxy stalls (a hung network): calls miss the guard's deadline
    (not the driver's 1 s socket timeout), the breaker opens, the local windows answer.
    Then it refuses connections: still local, and no call reaches for the store. Back to
    normal: the breaker closes by itself, and Redis was told of every admission, local
    ones included."""
    limit = 10_000
    with trio.fail_after(60):
        async with running_proxy((redis_server.host, redis_server.port), latency=0.005) as proxy:
            async with guarded_redis(proxy.url, cluster_size=1) as store:
                loads: list[Load] = []

                async def reset_load() -> None:
                    loads.append(await admissions(store, 20, 10, 0.01, limit))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reset_load)
                    for _ in range(5):
                        await trio.sleep(0.03)
                        proxy.reset_all()
                await breaker_closed(store)

                proxy.stall()
                timeouts = store.stats.timeouts
                stalled = await admissions(store, 10, 3, 0.05, limit)
                assert store.breaker.is_open
                stalled_timeouts = store.stats.timeouts - timeouts
                proxy.refusing = True
                proxy.reset_all()
                proxy.resume()
                failures = store.stats.failures
                refused = await admissions(store, 5, 2, 0.0, limit)
                refused_failures = store.stats.failures - failures

                proxy.refusing = False
                back = trio.current_time()
                await breaker_closed(store)
                recovered_after = trio.current_time() - back
                used = (await store.usage("p", [a_row(limit=limit)]))[0].used
    resets = loads[0]
    assert resets.admitted == 200
    assert stalled.admitted == 30 and stalled.outcomes["local"] >= 30 - 3
    assert stalled_timeouts >= 3  # the deadline cut them
    assert refused.outcomes["local"] == 10 and refused_failures == 0  # the store untried
    print(f"proxy faults: recovered {recovered_after:.2f} s after the proxy was fixed")
    assert used >= 200 + 30 + 10  # Redis knows every admission (maybe a few twice)


async def breaker_closed(store: GuardedStore) -> None:
    while store.breaker.is_open:  # noqa: ASYNC110 (a value to watch, not an event)
        await trio.sleep(0.01)


async def test_a_redis_paused_with_client_pause_never_holds_a_request(
    extra_redis_server: RedisServer,
) -> None:
    """``CLIENT PAUSE 1500``: Redis holds every command. Admissions are cut by the
    guard's deadline (not by the driver's 1 s socket timeout, nor the pause's end), then
    the breaker is open and they go to the local windows; once the pause ends the
    breaker closes by itself, and Redis knows every admission."""
    with trio.fail_after(30):
        async with guarded_redis(extra_redis_server.url, cluster_size=1) as store:
            assert (await store.admit("p", [a_row()])).admitted
            await trio.to_thread.run_sync(extra_redis_server.command, "CLIENT", "PAUSE", "1500")
            paused = trio.current_time()
            load = await admissions(store, tasks=20, each=5, pause=0.02)
            assert store.breaker.is_open
            timeouts = store.stats.timeouts
            await breaker_closed(store)
            back_after = trio.current_time() - paused - 1.5
            used = (await store.usage("p", [a_row()]))[0].used
    print(f"CLIENT PAUSE: slowest call {max(load.durations):.3f} s, back {back_after:.2f} s")
    assert timeouts >= 3
    assert load.outcomes["local"] + load.outcomes["store"] == 49  # limit 50, 1 before
    assert used >= 50
    assert back_after < 2


async def test_noscript_after_a_script_flush_never_reaches_the_guard(redis_url: str) -> None:
    with trio.fail_after(10):
        async with guarded_redis(redis_url) as store:
            assert (await store.admit("p", [a_row()])).admitted
            server = store.primary._client  # type: ignore[attr-defined]
            await trio.to_thread.run_sync(server.script_flush)
            assert (await store.admit("p", [a_row()])).admitted
            assert store.stats.failures == 0
