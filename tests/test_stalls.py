"""The node's stall meter (tokenguard/stalls.py): what it counts, once, and for how long.

Reports are fed by hand to test the arithmetic; the probe and the GC callback run on
trio's mock clock (a task that jumps the clock is a loop that ran nothing meanwhile),
and once on the real clock against a loop blocked by ``time.sleep``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tokenguard.store.stalls import MIN_STALL, StallMeter


@asynccontextmanager
async def running(meter: StallMeter) -> AsyncIterator[StallMeter]:
    async with trio.open_nursery() as nursery:
        await nursery.start(meter.run)
        yield meter
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("reports", "since", "until", "stalled"),
    [
        ([(1.0, 2.0)], 0.0, 10.0, 1.0),
        ([(1.0, 2.0)], 1.5, 10.0, 0.5),  # part of a stall
        ([(1.0, 2.0)], 0.0, 1.25, 0.25),
        ([(1.0, 2.0)], 1.2, 1.7, 0.5),  # within one stall
        ([(1.0, 2.0), (3.0, 3.5)], 0.0, 10.0, 1.5),
        ([(1.0, 2.0), (1.5, 2.5)], 0.0, 10.0, 1.5),  # overlapping: counted once
        ([(1.0, 2.0), (1.2, 1.4)], 0.0, 10.0, 1.0),  # inside another (a GC pass, a lag)
        ([(3.0, 3.5), (1.0, 2.0)], 0.0, 10.0, 1.5),  # reported out of order
        ([(1.0, 2.0), (3.0, 4.0), (1.5, 3.5)], 0.0, 10.0, 3.0),  # one joins two
        ([(1.0, 2.0), (3.0, 4.0), (2.2, 2.4)], 2.1, 3.5, 0.7),  # one between two
        ([(1.0, 1.0 + MIN_STALL / 2)], 0.0, 10.0, 0.0),  # timer jitter, not a stall
        ([(1.0, 2.0)], 5.0, 4.0, 0.0),  # an empty interval
    ],
)
def test_stalled_counts_the_reported_stalls_within_the_interval_once(
    reports: list[tuple[float, float]], since: float, until: float, stalled: float
) -> None:
    meter = StallMeter()
    for start, end in reports:
        meter.note(start, end)
    assert meter.stalled(since, until) == pytest.approx(stalled)


def test_the_oldest_stalls_are_forgotten_beyond_the_limit_and_the_total_stays() -> None:
    meter = StallMeter()
    for i in range(5000):
        meter.note(float(i), i + 0.5)
    assert meter.total == pytest.approx(2500)
    assert meter.stalled(4990.0, 5000.0) == pytest.approx(5.0)  # the newest are kept
    assert meter.stalled(0.0, 10.0) == 0.0  # the oldest are not


async def test_the_probe_sees_a_loop_that_ran_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A task holds the loop for 300 ms (the mock clock jumps, no task runs): the probe,
    due meanwhile, reports it, less what came before its due time (< one period)."""
    async with running(StallMeter(period=0.01)) as meter:
        await trio.sleep(0.025)
        autojump_clock.jump(0.3)
        await trio.sleep(0.05)
        assert 0.3 - 0.01 - 1e-9 <= meter.stalled(0.0, trio.current_time()) <= 0.3 + 1e-9
        assert meter.stalled(0.0, 0.025) == 0.0  # nothing before the stall
        await trio.sleep(1.0)  # a loop that runs: nothing more
        assert meter.total <= 0.3


async def test_a_task_woken_late_reports_its_own_lateness(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(StallMeter(period=3600)) as meter:
        due = trio.current_time() + 0.1
        await trio.sleep_until(due)
        autojump_clock.jump(0.2)  # as if this task had been woken 200 ms late
        meter.woke(due, trio.current_time())
        assert meter.stalled(0.0, 1.0) == pytest.approx(0.2)


async def test_gc_passes_are_measured_from_start_to_stop_while_the_meter_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The meter's GC callback is installed while it runs, and only then; a pass that
    takes 40 ms (played by a callback after the meter's that jumps the clock) counts
    40 ms, from its start; passes that take no time count nothing."""
    meter = StallMeter(period=3600)
    before = list(gc.callbacks)

    def slow_pass(phase: str, info: dict[str, object]) -> None:
        if phase == "start":
            autojump_clock.jump(0.04)

    async with running(meter):
        assert len(gc.callbacks) == len(before) + 1
        gc.collect()
        assert meter.total == 0.0
        await trio.sleep(0.5)
        gc.callbacks.append(slow_pass)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(slow_pass)
        assert meter.stalled(0.5, 0.54) == pytest.approx(0.04)
        assert meter.total == pytest.approx(0.04)
    assert gc.callbacks == before


async def test_on_the_real_clock_a_blocked_loop_is_seen() -> None:
    """``time.sleep(0.2)`` blocks the event loop: the probe wakes at least that late,
    less at most one period (a slower machine only makes it later)."""
    with trio.fail_after(30):
        async with running(StallMeter(period=0.01)) as meter:
            await trio.sleep(0.02)
            start = trio.current_time()
            time.sleep(0.2)  # noqa: ASYNC251 - blocks the event loop, as a GC pass would
            await trio.sleep(0.05)
            assert meter.stalled(start - 0.01, trio.current_time()) >= 0.2 - 0.01 - 1e-9


def test_a_probe_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period"):
        StallMeter(period=0)
