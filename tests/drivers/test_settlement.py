"""The window-store contract, settlement: refunds and charges land in the right bucket,
counts never below zero: on every driver (``harness``, from tests/drivers/conftest.py:
memory on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import attrs
import pytest
import trio

from tests.support.window_harness import (
    BUCKET_MS,
    MARGIN_MS,
    SPAN,
    TEST_TIMEOUT,
    Harness,
    leaves,
    used,
)
from tokenguard.store.rows import NOT_RESERVED, Reservation

# --- settlement ------------------------------------------------------------------------


async def test_a_refund_lands_in_the_reserved_bucket_and_leaves_with_it(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=10)
        aligned = await harness.align()
        big = (await harness.admit([attrs.evolve(row, amount=10)])).value
        assert big.admitted
        (first,) = big.reservation.buckets
        if harness.exact:
            assert first == aligned

        await harness.sleep_until((first + 1) * BUCKET_MS + MARGIN_MS)
        full = await harness.usage([row])
        if full.before(leaves(first)):
            assert used(full) == 10
        await harness.store.settle(big.reservation, [-6])  # used 4 of 10, in bucket `first`
        later = await harness.admit([attrs.evolve(row, amount=6)])
        assert later.value.admitted
        (second,) = later.value.reservation.buckets
        assert second > first
        if later.before(leaves(first)):
            assert later.value.states[0].used == 10

        # When bucket `first` leaves, only what is left in it (4) goes: the refund was
        # taken from that bucket, not from the newest one.
        await harness.sleep_until(leaves(first) + (0 if harness.exact else MARGIN_MS))
        after = await harness.usage([row])
        if after.after(leaves(first)) and after.before(leaves(second)):
            assert used(after) == 6


async def test_a_refund_after_the_bucket_left_is_a_no_op(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=10)
        await harness.align()
        old = (await harness.admit([attrs.evolve(row, amount=5)])).value
        assert old.admitted
        await harness.sleep_until(leaves(old.reservation.buckets[0]) + MARGIN_MS)
        fresh = (await harness.admit([attrs.evolve(row, amount=3)])).value
        assert fresh.admitted and fresh.states[0].used == 3
        await harness.store.settle(old.reservation, [-5])
        assert used(await harness.usage([row])) == 3


async def test_a_charge_after_the_bucket_left_counts_in_the_current_bucket(
    harness: Harness,
) -> None:
    # An upstream that used more than was reserved, reported after the reservation's
    # bucket left the window: the excess is charged now, for a whole window, not dropped.
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=10, dimension="output_tokens")
        first = await harness.align()
        old = (await harness.admit([attrs.evolve(row, amount=2)])).value
        assert old.admitted and old.reservation.buckets == (first,)
        late = first + SPAN + 2  # `first` left the window one bucket before
        await harness.sleep_until(late * BUCKET_MS + MARGIN_MS)
        charged = await harness.observe(harness.store.settle, old.reservation, [7])
        after = await harness.usage([row])
        if charged.after(late * BUCKET_MS) and after.before((late + 1) * BUCKET_MS):
            assert used(after) == 7
            refused = (await harness.admit([attrs.evolve(row, amount=4)])).value
            assert not refused.admitted and refused.states[0].used == 7
        # It leaves with the bucket it was charged in, not before.
        await harness.sleep_until(leaves(late) - (1 if harness.exact else MARGIN_MS))
        before = await harness.usage([row])
        if before.before(leaves(late)) and charged.before((late + 1) * BUCKET_MS):
            assert used(before) == 7
        await harness.sleep_until(leaves(late) + (0 if harness.exact else MARGIN_MS))
        assert used(await harness.usage([row])) == 0


async def test_a_row_that_was_not_reserved_is_never_charged(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        row = harness.row(limit=10, dimension="output_tokens")
        unreserved = Reservation("p", (row,), (NOT_RESERVED,))
        await harness.store.settle(unreserved, [5])
        assert used(await harness.usage([row])) == 0


async def test_a_count_never_goes_below_zero(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        row = harness.row(limit=10)
        a = (await harness.admit([attrs.evolve(row, amount=3)])).value
        b = (await harness.admit([attrs.evolve(row, amount=2)])).value
        # One bucket holds 5 (down to 0), or (a call late past a boundary) a's holds 3
        # (down to 0) and b's keeps its 2: never a negative count taken off the others.
        left = 0 if a.reservation.buckets == b.reservation.buckets else 2
        if harness.exact:
            assert left == 0
        await harness.store.settle(a.reservation, [-100])
        state = (await harness.usage([row])).value[0]
        assert (state.used, state.remaining) == (left, 10 - left)
        if not left:
            assert state.reset_after == 0.0
        assert (await harness.admit([attrs.evolve(row, amount=10 - left)])).value.admitted


async def test_settlement_changes_only_the_rows_given_deltas(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        requests = harness.row(limit=10, amount=1)
        output = harness.row(limit=1000, amount=500, dimension="output_tokens")
        admission = (await harness.admit([requests, output])).value
        await harness.store.settle(admission.reservation, [0, -380])
        assert [s.used for s in (await harness.usage([requests, output])).value] == [1, 120]
        await harness.store.settle(admission.reservation, [0, 0])  # nothing to do
        await harness.store.settle(Reservation("p", (), ()), [])
        assert [s.used for s in (await harness.usage([requests, output])).value] == [1, 120]


async def test_a_settlement_with_a_delta_count_other_than_the_rows_changes_nothing(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        requests = harness.row(limit=10, amount=1)
        output = harness.row(limit=1000, amount=500, dimension="output_tokens")
        admission = (await harness.admit([requests, output])).value
        for deltas in ([-380], [0, -380, 0]):
            with pytest.raises(ValueError, match=f"{len(deltas)} deltas for a reservation of 2"):
                await harness.store.settle(admission.reservation, deltas)
        assert [s.used for s in (await harness.usage([requests, output])).value] == [1, 500]
