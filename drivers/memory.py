"""The in-memory window store: one process, exact, and driven by an injectable clock.

``memory://`` needs no server. Its counters live in this process only, so it suits a
single node, tests, and benchmarks of the limiter's own cost. Atomicity comes from
trio: :meth:`MemoryStore.admit` never awaits between checking and consuming, so no
other task can interleave.

Publish/subscribe is an in-process fan-out: each subscription has a bounded buffer of
``SUBSCRIPTION_BUFFER`` messages; when it is full, new messages for that subscription
are dropped (counted in ``MemoryStore.dropped``), never waited for.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Self

import trio

from tokenguard.windows import (
    NOT_RESERVED,
    Admission,
    Reservation,
    Row,
    RowState,
    WindowStore,
)

# times in milliseconds, as in the Redis driver's Lua scripts, so both drivers round alike

# Messages a subscription holds before new ones are dropped for it.
SUBSCRIPTION_BUFFER = 4096


class _Counter:
    """The buckets of one row: absolute bucket index -> amount (zeros are not kept)."""

    __slots__ = ("buckets", "bucket_ms", "span")

    def __init__(self, row: Row) -> None:
        self.buckets: dict[int, int] = {}
        self.bucket_ms = row.bucket_ms
        self.span = row.span

    def current(self, now_ms: int) -> tuple[int, int]:
        """Drop buckets that left the window; return (current bucket, amount in window)."""
        current = now_ms // self.bucket_ms
        oldest = current - self.span
        buckets = self.buckets
        if buckets and min(buckets) < oldest:
            for b in [b for b in buckets if b < oldest]:
                del buckets[b]
        return current, sum(buckets.values())

    def leaves_at(self, bucket: int) -> int:
        """The time (ms) at which ``bucket`` leaves the window."""
        return (bucket + self.span + 1) * self.bucket_ms

    def state(self, row: Row, now_ms: int, used: int, amount: int) -> RowState:
        """The row's state given its ``used`` amount, if ``amount`` were asked."""
        fits = used + amount <= row.limit
        retry_ms: int | None = None
        if not fits and amount <= row.limit:
            # The oldest buckets leave first: wait until enough of them have gone.
            freed = 0
            for b in sorted(self.buckets):
                freed += self.buckets[b]
                if used - freed + amount <= row.limit:
                    retry_ms = self.leaves_at(b) - now_ms
                    break
        reset_ms = self.leaves_at(max(self.buckets)) - now_ms if self.buckets else 0
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
        self._channels: dict[str, set[trio.MemorySendChannel[bytes]]] = {}
        self.dropped = 0  # pub/sub messages dropped for subscriptions that were full

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
        current = [counter.current(now_ms) for counter in counters]
        fits = [
            used + row.amount <= row.limit for row, (_, used) in zip(rows, current, strict=True)
        ]
        # Shadow rows (enforce=False) never refuse; they are consumed only if all rows fit.
        everything = all(fits)
        if not everything and not all(f for f, row in zip(fits, rows, strict=True) if row.enforce):
            states = tuple(
                counter.state(row, now_ms, used, row.amount)
                for row, counter, (_, used) in zip(rows, counters, current, strict=True)
            )
            return Admission(admitted=False, states=states)
        after = []
        buckets = []
        for row, counter, (bucket, used) in zip(rows, counters, current, strict=True):
            if not (everything or row.enforce):
                after.append(counter.state(row, now_ms, used, row.amount))
                buckets.append(NOT_RESERVED)
                continue
            if row.amount:
                counter.buckets[bucket] = counter.buckets.get(bucket, 0) + row.amount
            after.append(counter.state(row, now_ms, used + row.amount, 0))
            buckets.append(bucket)
        reservation = Reservation(partition=partition, rows=tuple(rows), buckets=tuple(buckets))
        return Admission(admitted=True, states=tuple(after), reservation=reservation)

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        now_ms = self._now_ms()
        for row, bucket, delta in zip(reservation.rows, reservation.buckets, deltas, strict=True):
            if not delta:
                continue
            counter = self._counter(reservation.partition, row)
            if bucket < now_ms // row.bucket_ms - row.span:
                continue  # that bucket already left the window: nothing to refund
            value = max(0, counter.buckets.get(bucket, 0) + delta)
            if value:
                counter.buckets[bucket] = value
            else:
                counter.buckets.pop(bucket, None)

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        now_ms = self._now_ms()
        states = []
        for row in rows:
            counter = self._counters.get((partition, row.counter)) or _Counter(row)
            _, used = counter.current(now_ms)
            states.append(counter.state(row, now_ms, used, 0))
        return tuple(states)

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        for subscription in self._channels.get(channel, ()):
            for message in messages:
                try:
                    subscription.send_nowait(message)
                except trio.WouldBlock:
                    self.dropped += 1  # that subscriber is behind: never wait for it
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        send, receive = trio.open_memory_channel[bytes](SUBSCRIPTION_BUFFER)
        subscriptions = self._channels.setdefault(channel, set())
        subscriptions.add(send)
        try:
            async with receive:
                yield receive
        finally:
            subscriptions.discard(send)
            if not subscriptions:
                self._channels.pop(channel, None)
            send.close()

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
            counter.current(now_ms)
            if not counter.buckets:
                del self._counters[key]
        return len(self._counters)
