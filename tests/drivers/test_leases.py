"""Leases (``max_concurrent``) and near-limit signals: the behaviour every window-store
driver must have, on the same three stores as the rest of the suite (``harness``, from
tests/drivers/conftest.py: ``memory`` on a fake clock, one real ``redis``, a real
3-master ``redis-cluster``).

Redis runs in real time on the server's clock: as in the whole suite, every timing
assertion is made only when the call's bracket of server-clock readings is conclusive.
"""

from __future__ import annotations

import gc

import attrs
import pytest
import trio

from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tests.support.guarded_memory import guarded
from tests.support.window_harness import MARGIN_MS, TEST_TIMEOUT, Driver, Harness, leaves
from tokenguard.store.local_windows import LocalReservation
from tokenguard.store.rows import CONCURRENT, LEASE_RETRY_SECONDS, Admission, Row
from tokenguard.store.window_store import open_store

LEASE_MS = 300


def lease_row(
    limit: int, amount: int = 1, *, scope: str = "key:a", lease_ms: int = LEASE_MS
) -> Row:
    return Row(
        scope, CONCURRENT, window_ms=lease_ms, bucket_ms=lease_ms, limit=limit, amount=amount
    )


async def in_flight(harness: Harness, row: Row, partition: str = "p") -> int:
    return (await harness.usage([row], partition)).value[0].used


# --- leases -----------------------------------------------------------------------------


async def test_leases_cap_requests_in_flight_and_settlement_releases_them(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        requests = harness.row(limit=100)
        concurrent = lease_row(limit=2)
        first = (await harness.admit([requests, concurrent])).value
        second = (await harness.admit([requests, concurrent])).value
        assert first.admitted and second.admitted
        assert [s.used for s in first.states] == [1, 1]
        assert [s.used for s in second.states] == [2, 2]
        assert first.reservation.lease is not None and second.reservation.lease is not None
        assert first.reservation.lease.id != second.reservation.lease.id
        assert first.reservation.lease.rows == (concurrent,)

        third: Admission = (await harness.admit([requests, concurrent])).value
        assert not third.admitted
        assert third.reservation is None
        refusing = third.refusing
        assert [s.row for s in refusing] == [concurrent]
        assert refusing[0].used == 2
        assert refusing[0].retry_after == LEASE_RETRY_SECONDS
        assert third.retry_after == LEASE_RETRY_SECONDS
        # All or nothing: the request row was not consumed by the refusal.
        assert [s.used for s in (await harness.usage([requests, concurrent])).value] == [2, 2]

        await harness.store.settle(first.reservation, [0, 0])
        assert await in_flight(harness, concurrent) == 1
        await harness.store.settle(first.reservation, [0, 0])  # twice: a no-op
        assert await in_flight(harness, concurrent) == 1
        fourth = (await harness.admit([requests, concurrent])).value
        assert fourth.admitted
        assert fourth.states[1].used == 2


async def test_a_lease_is_taken_only_when_every_row_fits(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        tokens = harness.row(limit=10, amount=8, dimension="input_tokens")
        concurrent = lease_row(limit=5)
        assert (await harness.admit([tokens, concurrent])).value.admitted
        refused = (await harness.admit([tokens, concurrent])).value
        assert not refused.admitted
        assert [s.fits for s in refused.states] == [False, True]
        assert await in_flight(harness, concurrent) == 1  # no lease for the refusal


async def test_leases_count_per_scope_and_a_shadow_lease_row_never_refuses(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        a = lease_row(limit=1, scope="key:a")
        b = lease_row(limit=1, scope="key:b")
        assert (await harness.admit([a])).value.admitted
        assert (await harness.admit([b])).value.admitted
        assert not (await harness.admit([a])).value.admitted
        shadow = attrs.evolve(a, enforce=False)
        admission = (await harness.admit([shadow])).value
        assert admission.admitted and admission.would_refuse
        assert admission.reservation.lease is None  # as enforcing would: not taken
        assert await in_flight(harness, a) == 1


async def test_a_lease_expires_after_its_lease_time_unless_renewed(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        concurrent = lease_row(limit=1)
        held = await harness.admit([concurrent])
        assert held.value.admitted
        lease = held.value.reservation.lease
        harness.store.leases.discard(lease)  # (the test renews it by hand, once)
        # Renewed two thirds into its time: it outlives its first expiry.
        await harness.sleep_until(held.end + 2 * LEASE_MS // 3)
        renewal = await harness.observe(harness.store.renew, [lease])
        await harness.sleep_until(held.end + LEASE_MS + MARGIN_MS)
        check = await harness.usage([concurrent])
        # (conclusive only if the renewal certainly came before the first expiry, and
        # the check certainly before the renewed one)
        if renewal.before(held.start + LEASE_MS) and check.before(renewal.start + LEASE_MS):
            assert check.value[0].used == 1
        # Not renewed again: gone one lease time after the renewal; the key is usable.
        await harness.sleep_until(renewal.end + LEASE_MS + 1)
        assert await in_flight(harness, concurrent) == 0
        again = (await harness.admit([concurrent])).value
        assert again.admitted
        # Renewing the expired lease does not bring it back (nor take another slot).
        await harness.store.renew([lease])
        assert await in_flight(harness, concurrent) == 1


async def test_renewing_a_released_lease_does_not_take_it_again(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        concurrent = lease_row(limit=1)
        held = (await harness.admit([concurrent])).value
        await harness.store.settle(held.reservation, [0])
        await harness.store.renew([held.reservation.lease])
        assert await in_flight(harness, concurrent) == 0


async def test_the_store_renews_live_leases_and_drops_forgotten_ones(driver: Driver) -> None:
    """The store's own task renews the leases of live requests (a third of the lease
    time apart); a request that is garbage without being settled stops being renewed,
    so its slot frees within a lease time (weakly held: see tokenguard/leases.py)."""
    if driver.clock is not None:
        pytest.skip("the renewal task runs on trio's clock, the fake store clock stays put")
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(driver.make_store()) as store:
            # Renewed every 0.5 s: a busy machine may hold this process up for 1 s.
            lease_ms = 5 * LEASE_MS
            concurrent = lease_row(limit=1, lease_ms=lease_ms)
            admission = await store.admit("p", [concurrent])
            assert admission.admitted
            await trio.sleep(3 * lease_ms / 1000)  # three lease times: renewed meanwhile
            assert (await store.usage("p", [concurrent]))[0].used == 1
            assert not (await store.admit("p", [concurrent])).admitted
            assert isinstance(store, RedisStore)
            assert store.leases.renewals >= 3
            del admission
            gc.collect()
            # Forgotten: dropped, once a renewal round in flight (holding it) is over.
            while len(store.leases):  # noqa: ASYNC110 (a value to watch)
                await trio.sleep(0.01)
            await trio.sleep(lease_ms / 1000 + 0.1)  # (its last renewal is older)
            assert (await store.usage("p", [concurrent]))[0].used == 0


async def test_memory_store_renews_on_its_own_clock() -> None:
    """The memory store's renewal extends a lease from ITS clock's now."""
    now = [1_000.0]
    store = MemoryStore(clock=lambda: now[0])
    concurrent = lease_row(limit=1, lease_ms=30_000)
    admission = await store.admit("p", [concurrent])
    now[0] += 25
    await store.renew([admission.reservation.lease])
    now[0] += 25  # 50 s after it was taken, 25 s after the renewal
    assert (await store.usage("p", [concurrent]))[0].used == 1
    assert (await store.usage("p", [concurrent]))[0].reset_after == pytest.approx(5.0)
    now[0] += 5
    assert (await store.usage("p", [concurrent]))[0].used == 0
    assert store.sweep() == 0


# --- near-limit -------------------------------------------------------------------------


def alerting_row(harness: Harness, limit: int, alert_at: int, amount: int = 1) -> Row:
    return attrs.evolve(harness.row(limit=limit, amount=amount), alert_at=alert_at)


async def test_near_limit_is_reported_once_per_window(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        first = await harness.align()
        row = alerting_row(harness, limit=10, alert_at=8, amount=4)
        one = (await harness.admit([row])).value
        two = (await harness.admit([row])).value  # 8: crosses
        assert [s.near_limit for s in one.states] == [False]
        assert [s.near_limit for s in two.states] == [True]
        small = attrs.evolve(row, amount=1)
        three = (await harness.admit([small])).value  # 9: already told in this window
        assert three.admitted and not three.states[0].near_limit
        refused = (await harness.admit([row])).value
        assert not refused.admitted and not refused.states[0].near_limit
        # Once those buckets (the alert's included) have left the window: again.
        await harness.sleep_until(leaves(first) + MARGIN_MS)
        observed = await harness.admit([attrs.evolve(row, amount=8)])
        if observed.start >= leaves(first) and observed.end < leaves(first + 1):
            assert observed.value.admitted
            assert observed.value.states[0].near_limit


async def test_near_limit_only_for_rows_with_a_mark(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        plain = harness.row(limit=10, amount=9)
        marked = alerting_row(harness, limit=100, alert_at=5, amount=9)
        admission = (await harness.admit([plain, marked])).value
        assert [s.near_limit for s in admission.states] == [False, True]


async def test_near_limit_is_told_to_one_node_only(driver: Driver) -> None:
    """Two stores sharing one Redis: the crossing is reported to whichever admission
    made it, and never again in that window, whichever node asks."""
    if driver.clock is not None:
        pytest.skip("memory:// is one process: nothing is shared")
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(driver.make_store()) as one, open_store(driver.make_store()) as two:
            row = Row("key:a", "requests", 60_000, 1_000, limit=10, amount=1, alert_at=3)
            told = []
            for i in range(8):
                admission = await (one if i % 2 else two).admit("p", [row])
                told.append(admission.states[0].near_limit)
            assert told == [False, False, True, False, False, False, False, False]


# --- one call per admission -------------------------------------------------------------


@pytest.mark.parametrize("deployment", ["redis", "redis-cluster"])
async def test_an_admission_with_leases_and_many_rules_is_one_lua_call(
    request: pytest.FixtureRequest, deployment: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        url = request.getfixturevalue("redis_url" if deployment == "redis" else "redis_cluster_url")
        async with open_store(url) as store:
            assert isinstance(store, RedisStore)
            rows = [
                Row(scope, dimension, window, bucket, limit=10**6, amount=1, alert_at=10)
                for scope in ("key:k", "team:t", "key:k:model:gpt-4o*")
                for dimension in ("requests", "input_tokens", "total_tokens")
                for window, bucket in ((60_000, 5_000), (3_600_000, 60_000))
            ]
            rows += [lease_row(limit=5, scope="key:k"), lease_row(limit=50, scope="team:t")]
            calls, round_trips = store.calls, store.round_trips
            admission = await store.admit("team:t", rows)
            assert admission.admitted
            assert store.calls - calls == 1
            assert store.round_trips - round_trips == 1
            assert [s.used for s in admission.states[-2:]] == [1, 1]
            # Settlement (refunds and the lease's release) is one call too.
            await store.settle(admission.reservation, [0] * len(rows))
            assert store.calls - calls == 2
            assert store.round_trips - round_trips == 2
            states = await store.usage("team:t", rows[-2:])
            assert [s.used for s in states] == [0, 0]


# --- a node without its store ----------------------------------------------------------


async def test_a_node_cut_off_from_its_store_takes_leases_locally_at_its_share() -> None:
    """GuardedStore, policy local: a lease is taken in the node's own windows, where
    max_concurrent is divided among the nodes like every other limit; it is released
    there, and renewed there while its request lives."""
    with trio.fail_after(TEST_TIMEOUT):
        async with guarded(cluster_size=2, node_id=0) as (store, primary):
            primary.mode = "fail"
            row = lease_row(limit=5, lease_ms=30_000)
            held = [await store.admit("k", [row]) for _ in range(3)]  # node 0's share: 3
            assert all(a.admitted for a in held)
            assert all(isinstance(a.reservation, LocalReservation) for a in held)
            assert all(a.reservation.lease is not None for a in held)
            refused = await store.admit("k", [row])
            assert not refused.admitted
            assert (refused.states[0].used, refused.states[0].limit) == (3, 3)
            assert refused.retry_after == LEASE_RETRY_SECONDS
            await store.settle(held[0].reservation, [0])
            held[0] = await store.admit("k", [row])
            assert held[0].admitted
            assert isinstance(store.fallback, MemoryStore)
            assert len(store.fallback.leases) == 3  # renewed by the local windows' task
            assert store.stats.written_back == 0  # leases are never written back
