"""The window-store contract, admission: all rows or none, exactly the limit, independent
counters, rows of several windows and scopes, shadow rows: on every driver (``harness``,
from tests/drivers/conftest.py: memory on a fake clock, a real Redis, a real Redis
Cluster).
"""

from __future__ import annotations

import attrs
import pytest
import trio

from drivers.redis import RedisStore
from tests.support.window_harness import (
    BUCKET_MS,
    MARGIN_MS,
    SPAN,
    TEST_TIMEOUT,
    WINDOW_MS,
    Harness,
    leaves,
    used,
)
from tokenguard.store.rows import NOT_RESERVED, Admission, Row

# --- admission --------------------------------------------------------------------------


async def test_admits_all_rows_or_none(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        requests = harness.row(limit=10, amount=1)
        tokens = harness.row(limit=100, amount=60, dimension="input_tokens")
        first = (await harness.admit([requests, tokens])).value
        assert first.admitted
        assert [s.used for s in first.states] == [1, 60]

        second: Admission = (await harness.admit([requests, tokens])).value
        assert not second.admitted
        assert second.reservation is None
        assert [s.fits for s in second.states] == [True, False]
        assert [s.row for s in second.refusing] == [tokens]
        # The row that fitted was not consumed either.
        assert [s.used for s in (await harness.usage([requests, tokens])).value] == [1, 60]

        smaller = attrs.evolve(tokens, amount=40)
        third = (await harness.admit([requests, smaller])).value
        assert third.admitted
        assert [s.used for s in third.states] == [2, 100]
        assert [s.remaining for s in third.states] == [8, 0]


async def test_a_counter_named_by_two_rows_is_one_counter(harness: Harness) -> None:
    """Two rows of one admission on the same counter: both are checked as the counter
    was before the admission, both amounts land in it, all or nothing."""
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        three, four = harness.row(limit=10, amount=3), harness.row(limit=10, amount=4)
        first = (await harness.admit([three, four])).value
        assert first.admitted
        assert [s.used for s in first.states] == [3, 7]
        refused = (await harness.admit([three, four])).value  # 7 + 4 > 10
        assert not refused.admitted
        assert [s.fits for s in refused.states] == [True, False]
        assert used(await harness.usage([three])) == 7
        await harness.store.settle(first.reservation, [-1, -2])
        assert used(await harness.usage([three])) == 4


async def test_admits_exactly_the_limit(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()  # all in one bucket, none leaving meanwhile
        row = harness.row(limit=5)
        for n in range(1, 6):
            admission = (await harness.admit([row])).value
            assert admission.admitted
            assert (admission.states[0].used, admission.states[0].remaining) == (n, 5 - n)
        for _ in range(3):
            refused = (await harness.admit([row])).value
            assert not refused.admitted
            assert refused.states[0].used == 5
            assert refused.retry_after is not None and refused.retry_after > 0


async def test_a_zero_amount_is_checked_not_consumed(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        assert (await harness.admit([harness.row(limit=2, amount=2)])).value.admitted
        probe = (await harness.admit([harness.row(limit=2, amount=0)])).value
        assert probe.admitted
        assert probe.states[0].used == 2
        # A row already over its (lowered) limit refuses even a zero amount.
        assert not (await harness.admit([harness.row(limit=1, amount=0)])).value.admitted
        assert used(await harness.usage([harness.row(limit=2)])) == 2


async def test_a_request_larger_than_the_limit_never_fits(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        small = harness.row(limit=10, amount=1)
        huge = harness.row(limit=100, amount=101, dimension="output_tokens")
        admission = (await harness.admit([small, huge])).value
        assert not admission.admitted
        assert admission.states[1].never_fits
        assert admission.states[1].retry_after is None
        assert admission.retry_after is None  # the request as a whole can never fit
        assert not admission.states[0].never_fits
        assert [s.used for s in (await harness.usage([small, huge])).value] == [0, 0]


# --- independence and concurrency ------------------------------------------------------


async def test_partitions_scopes_dimensions_and_windows_are_independent(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        base = harness.row(limit=3, amount=3)
        variants = [
            base,
            attrs.evolve(base, scope="key:b"),
            attrs.evolve(base, dimension="input_tokens"),
            attrs.evolve(base, window_ms=2 * WINDOW_MS),
            attrs.evolve(base, bucket_ms=BUCKET_MS // 2, window_ms=WINDOW_MS),
        ]
        full_until: dict[tuple[str, Row], int] = {}
        for partition in ("p", "q"):
            for row in variants:
                admission = (await harness.admit([row], partition=partition)).value
                assert admission.admitted, (partition, row)
                assert admission.states[0].used == 3
                (bucket,) = admission.reservation.buckets
                full_until[partition, row] = leaves(bucket, row.span, row.bucket_ms)
        for (partition, row), moment in full_until.items():
            again = await harness.admit([row], partition=partition)
            if again.before(moment):  # (a slow machine: maybe after it left, unchecked)
                assert not again.value.admitted, (partition, row)


async def test_concurrent_admissions_admit_exactly_the_limit(harness: Harness) -> None:
    """100 tasks at once against a limit of 5: exactly 5 get in."""
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        row = harness.row(limit=5)
        outcomes: list[bool] = []

        async def one() -> None:
            outcomes.append((await harness.store.admit("p", [row])).admitted)

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
        assert len(outcomes) == 100
        assert outcomes.count(True) == 5
        assert used(await harness.usage([row])) == 5


# --- richer limits: rows of several windows and scopes, shadow rows --------------------


async def test_rows_of_different_windows_are_one_admission(harness: Harness) -> None:
    """A short and a long window in one call: all or nothing, each on its own window."""
    with trio.fail_after(TEST_TIMEOUT):
        short = harness.row(limit=2)
        long = harness.row(limit=3, window_ms=6 * WINDOW_MS, bucket_ms=6 * BUCKET_MS)
        assert long.span == SPAN
        first = await harness.align()
        for n in (1, 2):
            admission = (await harness.admit([short, long])).value
            assert admission.admitted and [s.used for s in admission.states] == [n, n]
        last = admission.reservation.buckets[0]  # (the first one's, unless it came late)
        refused = (await harness.admit([short, long])).value
        assert not refused.admitted and [s.fits for s in refused.states] == [False, True]
        assert refused.retry_after == refused.states[0].retry_after
        assert [s.used for s in (await harness.usage([short, long])).value] == [2, 2]

        # The short window frees (the long one holds for >= 2.4 s): one more fits.
        await harness.sleep_until(leaves(last) + (0 if harness.exact else MARGIN_MS))
        third = (await harness.admit([short, long])).value
        assert third.admitted and [s.used for s in third.states] == [1, 3]
        await harness.sleep_until(
            leaves(third.reservation.buckets[0]) + (0 if harness.exact else MARGIN_MS)
        )
        # Now the long window refuses, and the short row that fits is not consumed.
        by_long = await harness.admit([short, long])
        if by_long.before(first * BUCKET_MS + long.window_ms):
            assert not by_long.value.admitted
            assert [s.fits for s in by_long.value.states] == [True, False]
            assert by_long.value.refusing[0].row == long
            assert used(await harness.usage([short])) == 0


async def test_a_shadow_row_never_refuses_and_counts_as_if_enforced(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        enforced = harness.row(limit=5)
        shadow = harness.row(limit=1, scope="team:t", enforce=False)
        first = (await harness.admit([enforced, shadow])).value
        assert first.admitted and not first.would_refuse
        assert [s.used for s in first.states] == [1, 1]

        second = (await harness.admit([enforced, shadow])).value
        assert second.admitted and second.would_refuse
        assert second.refusing == () and second.retry_after == 0.0
        assert [s.row for s in second.shadow_refusing] == [shadow]
        assert second.states[1].retry_after is not None  # computed as enforcing would
        # The shadow row was not consumed (enforcing would have refused it all) ...
        assert second.reservation.buckets[1] == NOT_RESERVED
        assert [s.used for s in second.states] == [2, 1]
        # ... and settling its reservation leaves it alone.
        await harness.store.settle(second.reservation, [0, -1])
        assert [s.used for s in (await harness.usage([enforced, shadow])).value] == [2, 1]

        # Refused by an enforced row: nothing is consumed, shadow rows included.
        tight = attrs.evolve(enforced, limit=2)
        roomy = attrs.evolve(shadow, limit=10)
        refused = (await harness.admit([tight, roomy])).value
        assert not refused.admitted and not refused.would_refuse
        assert [s.used for s in (await harness.usage([tight, roomy])).value] == [2, 1]


async def test_one_round_trip_per_admission_whatever_the_rows(harness: Harness) -> None:
    """Eight rows (three windows, key and team scopes): still ONE Lua call, one round
    trip, on a single Redis and on a cluster (one partition: one slot)."""
    if harness.exact:
        pytest.skip("the memory store makes no round trips")
    store = harness.store
    assert isinstance(store, RedisStore)
    with trio.fail_after(TEST_TIMEOUT):
        rows = [
            harness.row(limit=100, dimension=d, scope=s, window_ms=w, bucket_ms=b)
            for d, s, w, b in [
                ("requests", "key:a", WINDOW_MS, BUCKET_MS),
                ("input_tokens", "key:a", WINDOW_MS, BUCKET_MS),
                ("output_tokens", "key:a", WINDOW_MS, BUCKET_MS),
                ("total_tokens", "key:a", WINDOW_MS, BUCKET_MS),
                ("requests", "key:a", 3_600_000, 60_000),
                ("requests", "key:a", 86_400_000, 3_600_000),
                ("requests", "team:t", WINDOW_MS, BUCKET_MS),
                ("total_tokens", "team:t:model:gpt-4o*", 86_400_000, 3_600_000),
            ]
        ]
        assert (await harness.admit(rows, partition="team:t")).value.admitted  # warm
        calls, trips = store.calls, store.round_trips
        for _ in range(10):
            admission = await store.admit("team:t", rows)
            assert admission.admitted
        assert (store.calls - calls, store.round_trips - trips) == (10, 10)
        states = await store.usage("team:t", rows)
        assert [s.used for s in states] == [11] * 8
