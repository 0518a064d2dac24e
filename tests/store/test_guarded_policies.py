"""The guarded store's three failure policies (``closed``, ``open``, ``local``): the local
windows' shares of every limit, what they remember, where settlements go, recovery with
write-back, and three nodes that never admit more than the limit together. The store
behind the guard is a memory store made to fail, hang or refuse to start
(tests/support/guarded_memory.py); trio's clock jumps over every wait
(``autojump_clock``), so the timings asserted here are the code's, not the machine's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.guarded_memory import FlakyStore, breaker_closed, guarded, rows, trio_clock
from tokenguard.store.guarded import GuardedStore, UncheckedReservation
from tokenguard.store.local_windows import LocalReservation, node_share
from tokenguard.store.rows import Reservation, Row
from tokenguard.store.window_store import StoreError

# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [1, 2, 3, 7, 10])
def test_node_shares_add_up_to_the_limit_exactly(cluster_size: int) -> None:
    for limit in [*range(0, 40), 1000, 1001, 999_999]:
        shares = [node_share(limit, cluster_size, i) for i in range(cluster_size)]
        assert sum(shares) == limit
        assert max(shares) - min(shares) <= 1
        # Without spreading (ids not known unique) each node gets the floor.
        floor = [node_share(limit, cluster_size, i, spread=False) for i in range(cluster_size)]
        assert floor == [limit // cluster_size] * cluster_size


def test_a_limit_below_the_cluster_size_leaves_some_nodes_nothing() -> None:
    assert [node_share(2, 3, i) for i in range(3)] == [1, 1, 0]


# --- the policies -------------------------------------------------------------------------


async def test_policy_closed_raises_store_error_and_usage_too(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("closed") as (store, primary):
        primary.mode = "fail"
        for _ in range(4):
            with pytest.raises(StoreError):
                await store.admit("k", rows())
        with pytest.raises(StoreError):
            await store.usage("k", rows())
        assert store.stats.refused_unavailable == 4


async def test_policy_open_admits_counts_and_logs_at_most_a_line_a_second(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tokenguard.store.guarded")
    async with guarded("open") as (store, primary):
        primary.mode = "fail"
        for _ in range(50):
            admission = await store.admit("k", rows(rpm=1))
            assert admission.admitted
            assert isinstance(admission.reservation, UncheckedReservation)
            await store.settle(admission.reservation, [0, -5])  # nothing to settle
        assert store.stats.fail_open_admissions == 50
        assert store.status()["fail_open_admissions"] == 50
        states = await store.usage("k", rows(rpm=1))
        assert [s.used for s in states] == [0, 0]
    lines = [r.getMessage() for r in caplog.records if "such admissions" in r.getMessage()]
    assert len(lines) == 1  # no time passed: one line, however many admissions
    assert "key id k unchecked" in lines[0]


@pytest.mark.parametrize("policy", ["closed", "open", "local"])
async def test_a_tally_reaches_the_store_and_is_dropped_while_it_is_down(
    autojump_clock: trio.abc.Clock, policy: str
) -> None:
    """A tally (a key's cache hits) is no admission: while the store is down it is
    dropped, never raised, answered or counted by the failure policy."""
    tally = Row("key:k", "cached_input_tokens", 60_000, 1000, 10**15, 7, enforce=False)
    async with guarded(policy) as (store, primary):
        await store.tally("k", tally)
        primary.mode = "fail"
        for _ in range(4):  # the first ones fail in the store and open the breaker
            await store.tally("k", tally)
        assert store.breaker.is_open
        stats = store.stats
        assert (stats.fail_open_admissions, stats.local_admissions) == (0, 0)
        assert stats.refused_unavailable == 0
        primary.mode = "ok"
        read = attrs.evolve(tally, amount=0)
        assert [s.used for s in await primary.usage("k", [read])] == [7]


async def test_policy_local_splits_every_limit_over_the_nodes(
    autojump_clock: trio.abc.Clock,
) -> None:
    # rpm 10 over 3 nodes: node 0 gets 4, node 2 gets 3.
    for node_id, share in ((0, 4), (2, 3)):
        async with guarded("local", cluster_size=3, node_id=node_id) as (store, primary):
            primary.mode = "fail"
            admitted = [(await store.admit("k", rows(rpm=10))).admitted for _ in range(6)]
            assert admitted == [True] * share + [False] * (6 - share)
            refused = await store.admit("k", rows(rpm=10))
            state = refused.refusing[0]
            assert state.row.limit == share and state.retry_after is not None


async def test_policy_local_a_request_above_the_share_but_within_the_limit_may_retry(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local", cluster_size=4) as (store, primary):
        primary.mode = "fail"
        within = await store.admit("k", rows(tokens=400, tpm=1000))  # share 250
        assert not within.admitted and within.retry_after == 1.0
        beyond = await store.admit("k", rows(tokens=1001, tpm=1000))
        assert not beyond.admitted and beyond.retry_after is None  # never fits anywhere


async def test_the_local_windows_remember_what_the_node_admitted_before_the_outage(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local", cluster_size=2) as (store, primary):
        for _ in range(3):  # through the store: rpm 10, this node's share is 5
            admission = await store.admit("k", rows(rpm=10, tokens=100))
            assert type(admission.reservation) is Reservation
            await store.settle(admission.reservation, [0, -60])  # settled to 40 each
        primary.mode = "fail"
        local = await store.fallback.usage("k", rows())
        assert [s.used for s in local] == [3, 120]
        admitted = [(await store.admit("k", rows(rpm=10))).admitted for _ in range(4)]
        assert admitted == [True, True, False, False]  # 3 before + 2 now = its share


async def test_settlements_go_where_the_reservation_came_from(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        shared = await store.admit("k", rows(tokens=100))
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("other", rows())
        local = await store.admit("k", rows(tokens=100))
        assert isinstance(local.reservation, LocalReservation)
        primary.mode = "ok"
        await store.settle(local.reservation, [0, -70])
        assert primary.calls == 4  # the breaker is open: the store was not asked
        # The store's reservation, settled while it is down: not sent, mirrored locally.
        await store.settle(shared.reservation, [0, -90])
        assert store.stats.settlements_dropped == 1
        assert [s.used for s in await store.fallback.usage("k", rows())] == [2, 40]


async def test_recovery_writes_the_local_admissions_back_before_closing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local", cluster_size=1) as (store, primary):
        await store.admit("k", rows(tokens=10))
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("k", rows(tokens=10))  # the 3 failures: admitted locally
        assert store.breaker.is_open
        late = await store.admit("k", rows(tokens=100))
        await store.settle(late.reservation, [0, -40])  # before the write-back: travels
        primary.mode = "ok"
        with trio.fail_after(2):
            await breaker_closed(store)
        shared = await primary.usage("k", rows())
        assert [s.used for s in shared] == [5, 10 + 3 * 10 + 60]
        # The store now knows: rpm 5 is spent, on the store as on the local windows.
        calls = primary.calls
        refused = await store.admit("k", rows(rpm=5))
        assert not refused.admitted and primary.calls == calls + 1
        assert store.stats.written_back == 2


async def test_admissions_whose_window_passed_during_a_long_outage_are_not_written_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An outage of 200 s on a 60 s window: the 3 requests admitted locally at its start
    count in no window when the store is back, and are not written back (the store
    would count them in its current bucket, refusing requests the limit allows); the
    one admitted just before the end is."""
    async with guarded("local", cluster_size=1) as (store, primary):
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("k", rows(tokens=10))  # the 3 failures: admitted locally
        assert store.breaker.is_open
        await trio.sleep(200)
        await store.admit("k", rows(tokens=10))
        primary.mode = "ok"
        with trio.fail_after(5):
            await breaker_closed(store)
        assert [s.used for s in await primary.usage("k", rows())] == [1, 10]
        assert store.stats.written_back == 2  # its two rows


async def test_after_an_outage_a_node_keeps_to_its_share_while_the_others_write_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Other nodes write their outage back within a probe interval of their own: until
    then the store may count less than was admitted, so for that long (plus a margin)
    a node admits only what the store AND its share allow."""
    async with guarded("local", cluster_size=3) as (store, primary):  # rpm 9: share 3
        await primary.admit("full", rows(rpm=9, requests=9))  # another node's doing
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("other", rows())
        primary.mode = "ok"
        with trio.fail_after(2):
            await breaker_closed(store)
        assert store.status()["holding_seconds"] > 1.0
        admitted = [(await store.admit("k", rows(rpm=9))).admitted for _ in range(5)]
        assert admitted == [True, True, True, False, False]  # the store had room for 9
        assert (await primary.usage("k", rows()))[0].used == 3
        # The store refuses: the local part is undone.
        assert not (await store.admit("full", rows(rpm=9))).admitted
        assert (await store.fallback.usage("full", rows()))[0].used == 0
        await trio.sleep(1.5)
        assert "holding_seconds" not in store.status()
        admitted = [(await store.admit("k", rows(rpm=9))).admitted for _ in range(7)]
        assert admitted == [True] * 6 + [False]  # the store alone again


async def test_a_local_admission_before_the_breaker_opens_reaches_the_store_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One failure (the breaker stays closed): that request is admitted locally, and
    written back as soon as the store answers again, not at some later outage's end."""
    async with guarded("local") as (store, primary):
        primary.mode = "fail"
        local = await store.admit("k", rows(tokens=7))
        assert isinstance(local.reservation, LocalReservation)
        assert not store.breaker.is_open
        primary.mode = "ok"
        await store.admit("other", rows())
        await trio.sleep(0.05)
        assert [s.used for s in await primary.usage("k", rows())] == [1, 7]
        assert store.stats.written_back == 2


async def test_a_failed_write_back_keeps_the_breaker_open_and_loses_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        primary.mode = "fail"
        for _ in range(4):
            await store.admit("k", rows(tokens=10))
        primary.mode = "ok"
        original = primary.settle
        failures = [1]

        async def settle_fails_once(reservation: Reservation, deltas: Sequence[int]) -> None:
            if reservation.partition == "k" and failures[0]:
                failures[0] -= 1
                raise StoreError("lost on the way")
            await original(reservation, deltas)

        primary.settle = settle_fails_once  # type: ignore[method-assign]
        with trio.fail_after(5):
            await breaker_closed(store)
        assert failures == [0]
        assert [s.used for s in await primary.usage("k", rows())] == [4, 40]


async def test_three_nodes_with_local_windows_admit_no_more_than_the_limit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Three guarded nodes on one shared store; it goes down and comes back while
    requests arrive round-robin: over the whole window, no more than rpm = 30 pass."""
    primary = FlakyStore(trio_clock)
    admitted = 0
    async with trio.open_nursery() as nursery:
        stores = [
            GuardedStore(primary, cluster_size=3, node_id=i, fallback=MemoryStore(clock=trio_clock))
            for i in range(3)
        ]
        for store in stores:  # one server, three clients (each runs its sweeper)
            await nursery.start(store.run)
        for step in range(120):
            if step == 15:
                primary.mode = "fail"
            if step == 60:
                primary.mode = "ok"
            admission = await stores[step % 3].admit("k", rows(rpm=30))
            admitted += admission.admitted
            await trio.sleep(0.2)
        assert all(not s.breaker.is_open for s in stores)
        assert [s.used for s in await primary.usage("k", rows())][0] == admitted
        nursery.cancel_scope.cancel()
    assert admitted == 30
