"""The window-store contract, the sliding window: when amounts leave, never more than the
limit in any window, idle counters that disappear: on every driver (``harness``, from
tests/drivers/conftest.py: memory on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import random

import attrs
import pytest
import trio

from tests.support.window_harness import (
    BUCKET_MS,
    MARGIN_MS,
    SPAN,
    TEST_TIMEOUT,
    WINDOW_MS,
    Harness,
    Observed,
    leaves,
    used,
)

# --- the sliding window ---------------------------------------------------------------


async def test_amounts_leave_exactly_when_their_bucket_passes(harness: Harness) -> None:
    """Put 1, 2, 4, 8 in four consecutive buckets; watch them leave one by one."""
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=100)
        first = await harness.align()
        buckets: list[int] = []
        for amount in (1, 2, 4, 8):  # each in the bucket after the last (or a later one)
            after = buckets[-1] + 1 if buckets else first
            await harness.sleep_until(after * BUCKET_MS + MARGIN_MS)
            admission = (await harness.admit([attrs.evolve(row, amount=amount)])).value
            assert admission.admitted
            buckets.append(admission.reservation.buckets[0])
        assert buckets == sorted(set(buckets))
        if harness.exact:
            assert buckets == [first, first + 1, first + 2, first + 3]

        amounts = dict(zip(buckets, (1, 2, 4, 8), strict=True))

        def expected(observed: Observed) -> int | None:
            """What the store counted during the call; None if a bucket may have left
            during it (a slow call: inconclusive)."""
            if any(observed.start < leaves(b) <= observed.end for b in buckets):
                return None
            return sum(a for b, a in amounts.items() if leaves(b) > observed.end)

        checked = []
        for bucket in buckets:
            moment = leaves(bucket)
            margin = 1 if harness.exact else MARGIN_MS
            await harness.sleep_until(moment - margin)
            just_before = await harness.usage([row])
            await harness.sleep_until(moment + (0 if harness.exact else MARGIN_MS))
            just_after = await harness.usage([row])
            for observed in (just_before, just_after):
                if (count := expected(observed)) is not None:
                    assert used(observed) == count
                    checked.append(count)
        assert checked[-1] == 0  # (the last call came after every bucket left)
        if harness.exact:
            assert checked == [15, 14, 14, 12, 12, 8, 8, 0]


@pytest.mark.parametrize("window_ms", [WINDOW_MS, WINDOW_MS - BUCKET_MS // 2])
async def test_an_amount_counts_for_at_least_a_window(harness: Harness, window_ms: int) -> None:
    """Admitted at the very end of a bucket, an amount still counts a full window later
    (also when the window is not a whole number of buckets)."""
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=1, window_ms=window_ms)
        assert row.span == SPAN
        aligned = await harness.align(offset_ms=BUCKET_MS - (1 if harness.exact else MARGIN_MS))
        admitted = await harness.admit([row])
        assert admitted.value.admitted
        (bucket,) = admitted.value.reservation.buckets
        if admitted.before((aligned + 1) * BUCKET_MS):  # (a late call: in a later bucket)
            assert bucket == aligned
        admitted_at = admitted.end  # the latest the store can have admitted it

        await harness.sleep_until(admitted_at + window_ms)
        still = await harness.admit([row])
        if still.before(leaves(bucket)):
            assert not still.value.admitted
            if harness.exact:
                assert still.value.retry_after == (leaves(bucket) - still.start) / 1000
        if not still.value.admitted:  # (admitted: too late to check, and it took the place)
            await harness.sleep_until(leaves(bucket))
            assert (await harness.admit([row])).value.admitted


async def test_never_more_than_the_limit_in_any_window(harness: Harness) -> None:
    """Random traffic for three windows: the admitted amounts of any ``span + 1``
    consecutive buckets (any window-long interval overlaps no more) stay within the
    limit; with exact times, so do those of every window-long interval."""
    with trio.fail_after(TEST_TIMEOUT):
        rng = random.Random(20240611)
        limit = 10
        admitted: list[tuple[int, int, int]] = []  # (bucket, amount, store time if exact)
        refused = 0
        start = await harness.align(offset_ms=0)
        end_ms = (start + 3 * SPAN) * BUCKET_MS
        while (now := await harness.now_ms()) < end_ms:
            amount = rng.randint(1, 4)
            admission = (await harness.admit([harness.row(limit=limit, amount=amount)])).value
            if admission.admitted:
                admitted.append((admission.reservation.buckets[0], amount, now))
            else:
                refused += 1
                assert admission.states[0].used + amount > limit
            step = rng.randint(5, BUCKET_MS // 2)
            await harness.sleep_until(now + step)
        assert admitted and refused  # the test did push against the limit

        per_bucket: dict[int, int] = {}
        for bucket, amount, _ in admitted:
            per_bucket[bucket] = per_bucket.get(bucket, 0) + amount
        for c in range(start - SPAN, end_ms // BUCKET_MS + 1):
            assert sum(per_bucket.get(b, 0) for b in range(c - SPAN, c + 1)) <= limit
        if harness.exact:
            for _, _, t in admitted:
                in_window = sum(a for _, a, u in admitted if t <= u < t + WINDOW_MS)
                assert in_window <= limit


# --- idle counters ---------------------------------------------------------------------


async def test_idle_counters_disappear(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        rows = [
            harness.row(limit=10),
            harness.row(limit=100, amount=7, dimension="input_tokens"),
            harness.row(limit=100, amount=9, dimension="output_tokens", scope="key:b"),
        ]
        admission = (await harness.admit(rows)).value
        assert admission.admitted
        first = admission.reservation.buckets[0]
        assert await harness.live_counters() == 3
        if not harness.exact:
            ttls = await trio.to_thread.run_sync(harness.redis_ttls)
            assert len(ttls) == 3
            for ttl in ttls.values():
                assert 0 < ttl <= WINDOW_MS + BUCKET_MS
        await harness.sleep_until(leaves(first) + (0 if harness.exact else MARGIN_MS))
        assert await harness.live_counters() == 0


async def test_a_counter_keeps_living_while_it_is_used(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=100)
        first = await harness.align()
        buckets: list[int] = []
        for i in range(SPAN + 3):  # longer than a window, one admission per bucket
            await harness.sleep_until((first + i) * BUCKET_MS + MARGIN_MS)
            admission = (await harness.admit([row])).value
            assert admission.admitted
            (bucket,) = admission.reservation.buckets
            buckets.append(bucket)
            # Those of the buckets in its window (one each, unless calls came late).
            assert admission.states[0].used == sum(b >= bucket - SPAN for b in buckets)
            if harness.exact:
                assert admission.states[0].used == min(i + 1, SPAN + 1)
        assert await harness.live_counters() == 1
