"""The window-store contract, what a refusal and a usage read report: ``retry_after``,
used, remaining, reset: on every driver (``harness``, from tests/drivers/conftest.py:
memory on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import attrs
import trio

from tests.support.window_harness import BUCKET_MS, MARGIN_MS, TEST_TIMEOUT, Harness, leaves, used

# --- retry_after, usage ----------------------------------------------------------------


async def test_retry_after_is_when_the_request_fits(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=5)
        await harness.align()
        two = (await harness.admit([attrs.evolve(row, amount=2)])).value
        assert two.admitted
        (first,) = two.reservation.buckets
        await harness.sleep_until((first + 2) * BUCKET_MS + MARGIN_MS)
        three = (await harness.admit([attrs.evolve(row, amount=3)])).value
        assert three.admitted
        (third,) = three.reservation.buckets  # `first + 2`, or later if the call came late

        # Asking 2 must wait for bucket `first` to leave; asking 3 for `third` too.
        for amount, bucket in ((2, first), (3, third)):
            refused = await harness.admit([attrs.evolve(row, amount=amount)])
            if refused.value.admitted:  # a call so late that bucket `first` had left
                assert not refused.before(leaves(first))
                return  # (inconclusive: and it took the place the rest is about)
            wait = refused.value.retry_after
            assert refused.value.states[0].retry_after == wait
            moment = leaves(bucket)
            if harness.exact:
                assert wait == (moment - refused.start) / 1000
            else:
                assert moment - refused.end <= round(wait * 1000) <= moment - refused.start

        # Just before that moment the request still does not fit; at it, it does.
        ask = attrs.evolve(row, amount=2)
        moment = leaves(first)
        await harness.sleep_until(moment - (1 if harness.exact else MARGIN_MS))
        early = await harness.admit([ask])
        if early.before(moment):
            assert not early.value.admitted
            if harness.exact:
                assert early.value.retry_after == 0.001
        if not early.value.admitted:  # (admitted: it came after the moment, took the place)
            await harness.sleep_until(moment)
            on_time = await harness.admit([ask])
            assert on_time.value.admitted


async def test_usage_reports_used_remaining_and_reset(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=10)
        empty = (await harness.usage([row])).value[0]
        assert (empty.used, empty.remaining, empty.reset_after) == (0, 10, 0.0)
        assert empty.fits and empty.retry_after is None

        first = await harness.align()
        assert (await harness.admit([attrs.evolve(row, amount=3)])).value.admitted
        await harness.sleep_until((first + 1) * BUCKET_MS + MARGIN_MS)
        newest = (await harness.admit([attrs.evolve(row, amount=4)])).value
        assert newest.admitted

        snapshot = await harness.usage([row])
        state = snapshot.value[0]
        assert (state.used, state.remaining, state.fits) == (7, 3, True)
        reset = leaves(newest.reservation.buckets[0])  # the newest non-empty bucket leaves
        if harness.exact:
            assert state.reset_after == (reset - snapshot.start) / 1000
        else:
            assert reset - snapshot.end <= round(state.reset_after * 1000) <= reset - snapshot.start
        # And nothing was consumed by looking.
        assert used(await harness.usage([row])) == 7


async def test_usage_checks_amounts_as_admit_would_and_consumes_nothing(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        row = harness.row(limit=5)
        lease = harness.row(limit=1, dimension="concurrent", window_ms=5000)
        first = await harness.align()
        assert (await harness.admit([attrs.evolve(row, amount=2), lease])).value.admitted
        await harness.sleep_until((first + 1) * BUCKET_MS + MARGIN_MS)
        assert (await harness.admit([attrs.evolve(row, amount=3)])).value.admitted

        ask = [attrs.evolve(row, amount=2), lease, attrs.evolve(row, amount=6)]
        checked = await harness.usage(ask)
        refused = await harness.admit(ask)
        assert not refused.value.admitted
        assert [s.used for s in checked.value] == [s.used for s in refused.value.states]
        assert [s.fits for s in checked.value] == [s.fits for s in refused.value.states]
        assert not any(s.fits for s in checked.value)
        fits_later, lease_full, never = checked.value
        moment = leaves(first)
        if harness.exact:
            assert fits_later.retry_after == (moment - checked.start) / 1000
        else:
            waited = round(fits_later.retry_after * 1000)
            assert moment - checked.end <= waited <= moment - checked.start
        assert lease_full.retry_after == 1.0 and lease_full.used == 1
        assert never.retry_after is None and never.never_fits
        # Amounts that fit; and nothing was consumed by looking.
        small = await harness.usage([attrs.evolve(row, amount=0)])
        assert small.value[0].fits and small.value[0].retry_after is None
        assert used(small) == 5
