"""The in-memory window store: one process, exact, and driven by an injectable clock.

``memory://`` needs no server. Its counters live in this process only, so it suits a
single node, tests, and benchmarks of the limiter's own cost. Atomicity comes from
trio: :meth:`MemoryStore.admit` never awaits between checking and consuming, so no
other task can interleave.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Self

import trio

from tokenguard.windows import (
    Admission,
    Reservation,
    Row,
    RowState,
    WindowStore,
)

# times in milliseconds, as in the Redis driver's Lua scripts, so both drivers round alike


class _Counter:
    """The buckets of one row: absolute bucket index -> amount."""

    __slots__ = ("buckets", "bucket_ms", "span")

    def __init__(self, row: Row) -> None:
        self.buckets: dict[int, int] = {}
        self.bucket_ms = row.bucket_ms
        self.span = row.span

    def prune(self, oldest: int) -> None:
        stale = [b for b in self.buckets if b < oldest]
        for b in stale:
            del self.buckets[b]


def _state(row: Row, counter: _Counter, now_ms: int, amount: int) -> RowState:
    """The row's state at ``now_ms`` if ``amount`` were asked; pure, consumes nothing."""
    bucket_ms = row.bucket_ms
    n = row.span
    current = now_ms // bucket_ms
    oldest = current - n
    live = sorted((b, v) for b, v in counter.buckets.items() if b >= oldest and v > 0)
    used = sum(v for _, v in live)
    fits = used + amount <= row.limit
    retry_ms: int | None = None
    if not fits and amount <= row.limit:
        # Bucket b leaves the window when the clock reaches (b + n + 1) * bucket_ms.
        freed = 0
        for b, v in live:
            freed += v
            if used - freed + amount <= row.limit:
                retry_ms = (b + n + 1) * bucket_ms - now_ms
                break
    reset_ms = (live[-1][0] + n + 1) * bucket_ms - now_ms if live else 0
    return RowState(
        row=row,
        used=used,
        reset_after=reset_ms / 1000,
        fits=fits,
        retry_after=None if retry_ms is None else retry_ms / 1000,
    )


class MemoryStore(WindowStore):
    """Counters in a dict, keyed by partition and row counter.

    ``clock`` returns seconds (``time.time`` by default); tests inject a fake one.
    """

    def __init__(self, clock: Callable[[], float] = time.time, url: str = "memory://") -> None:
        self.url = url
        self._clock = clock
        self._counters: dict[tuple[str, str], _Counter] = {}
        self.sweep_seconds = 10.0

    @classmethod
    def from_url(cls, url: str) -> Self:
        rest = url.removeprefix("memory://")
        if rest not in ("", "/"):
            raise ValueError(f"memory:// takes no host, path or options, got {url!r}")
        return cls(url="memory://")

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _counter(self, partition: str, row: Row) -> _Counter:
        key = (partition, row.counter)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = _Counter(row)
        return counter

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        now_ms = self._now_ms()
        counters = [self._counter(partition, row) for row in rows]
        states = [
            _state(row, counter, now_ms, row.amount)
            for row, counter in zip(rows, counters, strict=True)
        ]
        if not all(s.fits for s in states):
            return Admission(admitted=False, states=tuple(states))
        buckets = []
        after = []
        for row, counter in zip(rows, counters, strict=True):
            current = now_ms // row.bucket_ms
            counter.prune(current - row.span)
            if row.amount:
                counter.buckets[current] = counter.buckets.get(current, 0) + row.amount
            buckets.append(current)
            after.append(_state(row, counter, now_ms, 0))
        reservation = Reservation(partition=partition, rows=tuple(rows), buckets=tuple(buckets))
        return Admission(admitted=True, states=tuple(after), reservation=reservation)

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        now_ms = self._now_ms()
        for row, bucket, delta in zip(reservation.rows, reservation.buckets, deltas, strict=True):
            if not delta:
                continue
            oldest = now_ms // row.bucket_ms - row.span
            if bucket < oldest:
                continue  # that bucket already left the window: nothing to refund
            counter = self._counter(reservation.partition, row)
            counter.buckets[bucket] = max(0, counter.buckets.get(bucket, 0) + delta)

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        now_ms = self._now_ms()
        states = []
        for row in rows:
            counter = self._counters.get((partition, row.counter)) or _Counter(row)
            states.append(_state(row, counter, now_ms, 0))
        return tuple(states)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drop idle keys' counters every ``sweep_seconds``, so memory follows active keys."""
        task_status.started()
        while True:
            await trio.sleep(self.sweep_seconds)
            self.sweep()

    def sweep(self) -> int:
        """Drop stale buckets and empty counters; return how many counters remain."""
        now_ms = self._now_ms()
        for key, counter in list(self._counters.items()):
            counter.prune(now_ms // counter.bucket_ms - counter.span)
            if not counter.buckets:
                del self._counters[key]
        return len(self._counters)
