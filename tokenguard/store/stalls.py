"""The node's own stalls: when its event loop could not run (a GC pass, a starved CPU).

A :class:`StallMeter` measures them two ways while :meth:`StallMeter.run` runs:

* **a loop-lag probe**: a task that sleeps ``period`` and notes how late it woke. A
  wake more than ``min_stall`` late means the loop ran none of it from its due time
  until then: the loop was blocked (a task holding it, a GC pass) or the process was
  not given the CPU. Any other task woken by a timer reports its own lateness the same
  way (:meth:`StallMeter.woke`), so a stall is known to the first task that runs after
  it, not only to the probe.
* **``gc.callbacks``**: every garbage-collection pass of ``min_stall`` or more, from
  its start to its stop, whichever thread ran it (a pass holds the GIL: no Python code
  of the process runs meanwhile).

:meth:`StallMeter.stalled` answers how much of an interval the node was stalled, time
covered by several reports counted once. The guarded store (tokenguard/store/guarded.py)
takes it out of a store call's wait before judging the store.

Guarantees and limits:

* A stall is reported only once it is over and a task ran after it; the part of a
  stall that began while the probe slept, before the probe's due time, is not seen by
  the probe (at most ``period``; a GC pass is seen whole). The measure thus errs
  towards too little stall, never more than the loop's real lateness.
* A busy loop counts too: a batch of tasks that holds the loop for 30 ms delays every
  other task (the store's reader among them) by as much.
* Reports older than ``keep`` seconds are forgotten.
* Times are trio's clock (``trio.current_time()``) of the run the meter was started
  in; the GC callback reads the same clock from any thread.
"""

from __future__ import annotations

import bisect
import collections
import gc
from typing import Any

import trio

# The probe's sleep (s): its wakes cost a few microseconds each.
PROBE_PERIOD = 0.01
# Lateness (s) below this is the timer's own jitter, not a stall.
MIN_STALL = 0.001
# Reports are kept this long (s): longer than any call waits.
KEEP = 60.0
# At most this many disjoint stalls are kept (then the oldest half are forgotten).
MAX_STALLS = 4096


class StallMeter:
    """The node's own stalls over the last ``keep`` seconds (see the module docstring).

    ``stalled``, ``woke`` and ``note`` are for the trio thread that runs :meth:`run`;
    only the GC callback runs on other threads, and it merely queues what it saw.
    """

    def __init__(
        self, *, period: float = PROBE_PERIOD, min_stall: float = MIN_STALL, keep: float = KEEP
    ) -> None:
        if not period > 0:
            raise ValueError(f"the probe period must be > 0, got {period!r}")
        self.period = period
        self.min_stall = min_stall
        self.keep = keep
        self._clock: trio.abc.Clock | None = None
        # Reports not yet merged: (start, end), appended from any thread.
        self._reported: collections.deque[tuple[float, float]] = collections.deque()
        self._gc_started: float | None = None
        # The merged stalls, disjoint and in order: starts, ends, and the stall time
        # counted before each one since the meter began (so that forgetting old ones
        # changes no difference of two cumulative values).
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._before: list[float] = []
        self._total = 0.0

    @property
    def total(self) -> float:
        """Seconds of stall measured since the meter started."""
        self._absorb()
        return self._total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch GC passes and probe the loop's lag until cancelled."""
        clock = trio.lowlevel.current_clock()
        self._clock = clock
        gc.callbacks.append(self._on_gc)
        try:
            task_status.started()
            while True:
                due = clock.current_time() + self.period
                await trio.sleep_until(due)
                self.woke(due, clock.current_time())
        finally:
            gc.callbacks.remove(self._on_gc)
            self._clock = None

    def woke(self, due: float, now: float) -> None:
        """A task that slept until ``due`` ran at ``now``: it was stalled in between
        (if that is ``min_stall`` or more)."""
        self.note(due, now)

    def note(self, start: float, end: float) -> None:
        """The node was stalled from ``start`` to ``end`` (ignored if shorter than
        ``min_stall``)."""
        if end - start >= self.min_stall:
            self._reported.append((start, end))

    def stalled(self, since: float, until: float) -> float:
        """Seconds of ``[since, until]`` the node is known to have been stalled."""
        if until <= since:
            return 0.0
        self._absorb()
        return max(0.0, self._cumulative(until) - self._cumulative(since))

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        clock = self._clock
        if clock is None:
            return
        if phase == "start":
            self._gc_started = clock.current_time()
        elif self._gc_started is not None:
            self.note(self._gc_started, clock.current_time())
            self._gc_started = None

    def _cumulative(self, t: float) -> float:
        """Stall time counted before ``t`` (since the meter began, less nothing)."""
        i = bisect.bisect_right(self._starts, t) - 1
        if i < 0:
            return self._before[0] if self._before else self._total
        return self._before[i] + min(t, self._ends[i]) - self._starts[i]

    def _absorb(self) -> None:
        """Merge the queued reports into the ordered, disjoint stalls."""
        reported = self._reported
        if not reported:
            return
        while reported:
            start, end = reported.popleft()
            self._insert(start, end)
        if self._clock is not None:
            self._forget_before(self._clock.current_time() - self.keep)
        if len(self._starts) > MAX_STALLS:
            self._forget(len(self._starts) // 2)

    def _insert(self, start: float, end: float) -> None:
        starts, ends, before = self._starts, self._ends, self._before
        first = bisect.bisect_left(ends, start)  # the first stall ending at or after it
        last = bisect.bisect_right(starts, end)  # the first stall starting after it
        if first == len(starts):  # after every known stall (the usual case)
            starts.append(start)
            ends.append(end)
            before.append(self._total)
            self._total += end - start
            return
        if first < last:  # overlaps stalls first .. last-1: one stall now
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
        counted_before = before[first]
        starts[first:last] = [start]
        ends[first:last] = [end]
        before[first:last] = [counted_before]
        for i in range(first + 1, len(starts)):
            before[i] = before[i - 1] + ends[i - 1] - starts[i - 1]
        self._total = before[-1] + ends[-1] - starts[-1]

    def _forget_before(self, horizon: float) -> None:
        self._forget(bisect.bisect_left(self._ends, horizon))

    def _forget(self, count: int) -> None:
        if count > 0:
            del self._starts[:count], self._ends[:count], self._before[:count]


__all__ = ["MIN_STALL", "PROBE_PERIOD", "StallMeter"]
