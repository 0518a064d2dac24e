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

import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Self

import attrs
import trio

from drivers.memory_counters import BucketCounter, LeaseCounter, new_counter
from drivers.memory_tickets import TicketLine
from tokenguard.store.leases import HeldLeases
from tokenguard.store.rows import NOT_RESERVED, Admission, Lease, Reservation, Row, RowState
from tokenguard.store.window_store import (
    ANYTHING,
    NOBODY,
    TICKET_SEQUENCE_MS,
    Ahead,
    Registry,
    RegistryExpect,
    TicketHolder,
    TicketOp,
    WindowStore,
    behind_waiters,
    check_record,
    redact_url,
)

# times in milliseconds, as in the Redis driver's Lua scripts, so both drivers round alike

# Messages a subscription holds before new ones are dropped for it.
SUBSCRIPTION_BUFFER = 4096
# Records (record_put) kept at most; past it the oldest put goes first.
MAX_RECORDS = 100_000


class MemoryStore(WindowStore):
    """Counters in a dict, keyed by partition and row counter.

    ``clock`` returns seconds (``time.time`` by default); tests inject a fake one.
    :meth:`admit` and :meth:`settle` never wait (``never_waits``): no other task runs
    during them, which is also what makes them atomic.
    """

    never_waits = True

    def __init__(self, clock: Callable[[], float] = time.time, url: str = "memory://") -> None:
        self.url = url
        self._clock = clock
        # partition -> counter name -> counter: the partition is looked up once per
        # call, then each row by its counter name (a str, whose hash Python caches).
        self._partitions: dict[str, dict[str, BucketCounter | LeaseCounter]] = {}
        self.leases = HeldLeases()  # this store's leases, renewed in run()
        self._lease_ids = itertools.count(1)
        self.sweep_seconds = 10.0
        self._channels: dict[str, set[trio.MemorySendChannel[bytes]]] = {}
        self.dropped = 0  # pub/sub messages dropped for subscriptions that were full
        self._registry: Registry = {}
        self._registry_version = 0
        # name -> (expiry in ms, value), in the order they were put (the oldest first)
        self._records: dict[str, tuple[int, str]] = {}
        self._ticket_lines: dict[tuple[str, str], TicketLine] = {}
        # (partition, holder) -> (line, ticket) -> expiry (ms): a key's live tickets
        self._holders: dict[tuple[str, str], dict[tuple[str, int], int]] = {}

    def wall_time(self) -> float:
        """The store's own (injectable) clock."""
        return self._clock()

    @classmethod
    def from_url(cls, url: str) -> Self:
        rest = url.removeprefix("memory://")
        if rest not in ("", "/"):
            raise ValueError(f"memory:// takes no host, path or options, got {redact_url(url)!r}")
        return cls(url="memory://")

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def now_ms(self) -> int:
        """This store's clock in whole milliseconds: what its buckets are numbered by
        (bucket ``now_ms() // row.bucket_ms``)."""
        return self._now_ms()

    def _counter(self, partition: str, row: Row) -> BucketCounter | LeaseCounter:
        counters = self._partitions.get(partition)
        if counters is None:
            counters = self._partitions[partition] = {}
        counter = counters.get(row.counter)
        if counter is None:
            counter = counters[row.counter] = new_counter(row)
        return counter

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        # The hot path: no await, so no other task interleaves (atomicity). Every row is
        # paid for by every decision, so the common case (windowed rows that all fit,
        # amounts >= 0) takes ONE pass that checks and consumes each row at once, and
        # undoes what it consumed if some row turns out not to fit, or to need the
        # general path (a lease row, a negative amount): nothing else can have seen it.
        now_ms = int(self._clock() * 1000)
        counters = self._partitions.get(partition)
        if counters is None:
            counters = self._partitions[partition] = {}
        consumed: list[BucketCounter] = []
        buckets: list[int] = []
        states: list[RowState] = []
        alerting: list[int] = []  # the rows with a near-limit mark
        for row in rows:
            counter = counters.get(row.counter)
            if type(counter) is not BucketCounter:
                if counter is not None or row.is_lease:
                    break
                counter = counters[row.counter] = BucketCounter(row)
            amount = row.amount
            bucket_ms = counter.bucket_ms
            bucket = now_ms // bucket_ms
            if counter.low < bucket - counter.span:
                counter.current(now_ms)
            used = counter.total + amount
            if used > row.limit or amount < 0:
                break
            if amount:  # (BucketCounter.add for a positive amount, inlined)
                held = counter.buckets
                held[bucket] = held.get(bucket, 0) + amount
                counter.total = used
                if bucket > counter.high:
                    counter.high = bucket
                if bucket < counter.low:
                    counter.low = bucket
            if row.alert_at > 0:
                alerting.append(len(states))
            consumed.append(counter)
            buckets.append(bucket)
            reset_ms = (counter.high + counter.span + 1) * bucket_ms - now_ms
            states.append(RowState(row, used, reset_ms / 1000 if counter.buckets else 0.0))
        else:
            for i in alerting:  # now that every row is consumed: once per window
                row, counter, state = rows[i], consumed[i], states[i]
                if state.used >= row.alert_at and counter.alert(buckets[i]):
                    states[i] = attrs.evolve(state, near_limit=True)
            reservation = Reservation(partition, tuple(rows), tuple(buckets), None)
            return Admission(admitted=True, states=tuple(states), reservation=reservation)
        for counter, bucket, row in zip(consumed, buckets, rows, strict=False):
            if row.amount:
                counter.add(bucket, -row.amount)
                counter.bounds()
        return self._admit_checked(partition, rows, counters, now_ms)

    def _admit_checked(
        self,
        partition: str,
        rows: Sequence[Row],
        counters: dict[str, BucketCounter | LeaseCounter],
        now_ms: int,
    ) -> Admission:
        """:meth:`admit` in two passes, for every case: check every row, then (only if
        every enforcing row fits) consume them. Each row is checked as it was before
        this admission."""
        checked = []
        everything = True  # every row fits, shadow rows included
        for row in rows:
            counter = counters.get(row.counter)
            if counter is None:
                counter = counters[row.counter] = new_counter(row)
            bucket, used = counter.current(now_ms)
            if used + row.amount > row.limit:
                everything = False
                if row.enforce:
                    return self._refused(partition, rows, now_ms)
            checked.append((counter, bucket, used))
        # Every enforcing row fits: consume them (shadow rows only if every row fits).
        lease = None
        after = []
        buckets = []
        for row, (counter, bucket, used) in zip(rows, checked, strict=True):
            if not (everything or row.enforce):
                after.append(counter.state(row, now_ms, used, row.amount))
                buckets.append(NOT_RESERVED)
                continue
            amount = row.amount
            if type(counter) is BucketCounter:
                counter.add(bucket, amount)
                near = row.alert_at > 0 and counter.total >= row.alert_at and counter.alert(bucket)
                after.append(counter.consumed(row, now_ms, near))
            else:
                if amount:
                    if lease is None:
                        lease_rows = tuple(r for r in rows if r.is_lease)
                        lease = Lease(partition, f"m{next(self._lease_ids)}", lease_rows)
                    counter.expiries[lease.id] = now_ms + row.window_ms
                after.append(counter.state(row, now_ms, used + amount, 0))
            buckets.append(bucket)
        reservation = Reservation(partition, tuple(rows), tuple(buckets), lease)
        if lease is not None:
            self.leases.add(lease)
        return Admission(admitted=True, states=tuple(after), reservation=reservation)

    def _refused(self, partition: str, rows: Sequence[Row], now_ms: int) -> Admission:
        """A refusal: every row's state, nothing consumed."""
        states = []
        for row in rows:
            counter = self._counter(partition, row)
            _, used = counter.current(now_ms)
            states.append(counter.state(row, now_ms, used, row.amount))
        return Admission(admitted=False, states=tuple(states))

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        reservation.check_deltas(deltas)
        rows, buckets = reservation.rows, reservation.buckets
        lease = reservation.lease
        counters = self._partitions.get(reservation.partition, {})
        if lease is not None:
            for row in rows:
                held = counters.get(row.counter) if row.is_lease else None
                if type(held) is LeaseCounter:
                    held.expiries.pop(lease.id, None)
            self.leases.discard(lease)
        # Most rows of a settlement have no delta (only output rows are corrected):
        # they cost one test each.
        now_ms = int(self._clock() * 1000)
        for i, delta in enumerate(deltas):
            if not delta:
                continue
            row = rows[i]
            if row.is_lease:
                continue
            bucket = buckets[i]
            if bucket < now_ms // row.bucket_ms - row.span:
                if delta < 0 or bucket == NOT_RESERVED:
                    continue  # that bucket already left the window: nothing to refund
                bucket = now_ms // row.bucket_ms  # a charge is never dropped: counted now
            counter = counters.get(row.counter)
            if counter is None:
                counter = self._counter(reservation.partition, row)
            counter.add(bucket, delta)  # type: ignore[union-attr]

    async def renew(self, leases: Sequence[Lease]) -> None:
        now_ms = self._now_ms()
        for lease in leases:
            for row in lease.rows:
                held = self._partitions.get(lease.partition, {}).get(row.counter)
                if type(held) is not LeaseCounter:
                    continue
                expiry = held.expiries.get(lease.id)
                if expiry is not None and expiry > now_ms:
                    held.expiries[lease.id] = now_ms + row.window_ms
        await trio.lowlevel.checkpoint()

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        now_ms = self._now_ms()
        states = []
        counters = self._partitions.get(partition, {})
        for row in rows:
            counter = counters.get(row.counter)
            if counter is None:
                counter = new_counter(row)
            _, used = counter.current(now_ms)
            states.append(counter.state(row, now_ms, used, row.amount))
        return tuple(states)

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        for subscription in self._channels.get(channel, ()):
            for message in messages:
                try:
                    subscription.send_nowait(message)
                except trio.WouldBlock:
                    self.dropped += 1  # that subscriber is behind: never wait for it
                except trio.BrokenResourceError:
                    break  # that subscriber is leaving: nothing more for it
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

    async def admit_in_turn(
        self, partition: str, rows: Sequence[Row], ahead: Ahead, rank: int = 0
    ) -> Admission:
        # No await before admit's own work: checked and admitted in one step.
        now_ms = self._now_ms()
        for index, line in ahead:
            entry = self._ticket_lines.get((partition, line))
            if entry is not None:
                entry.drop_expired(now_ms)
                if entry.holds(rank):
                    return behind_waiters(self._refused(partition, rows, now_ms), index)
        return await self.admit(partition, rows)

    async def tickets(
        self, partition: str, line: str, op: TicketOp, ticket: int = 0, by: TicketHolder = NOBODY
    ) -> tuple[int, int]:
        await trio.lowlevel.checkpoint()
        now_ms = self._now_ms()
        entry = self._ticket_lines.setdefault((partition, line), TicketLine())
        if not by.name:
            return entry.step(op, ticket, now_ms, by)
        held = self._holders.setdefault((partition, by.name), {})
        for old in [t for t, expiry in held.items() if expiry <= now_ms]:
            del held[old]
        if op == "take" and 0 < by.most <= len(held):
            entry.drop_expired(now_ms)
            return 0, entry.turn(by.share)
        ticket, first = entry.step(op, ticket, now_ms, by)
        if op in ("drop", "admitted"):
            held.pop((line, ticket), None)
        else:
            held[(line, ticket)] = now_ms + by.ttl_ms
        if not held:
            del self._holders[(partition, by.name)]
        return ticket, first

    # -- the registry (in this process only, like the counters)

    async def registry_version(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._registry_version

    async def registry_load(self) -> tuple[int, Registry]:
        await trio.lowlevel.checkpoint()
        return self._registry_version, dict(self._registry)

    async def registry_get(self, kind: str, name: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return self._registry.get((kind, name))

    async def registry_put(
        self, kind: str, name: str, record: str | None, *, expect: RegistryExpect = ANYTHING
    ) -> int | None:
        await trio.lowlevel.checkpoint()
        current = self._registry.get((kind, name))
        if current == record:
            return self._registry_version
        if expect is not ANYTHING and current != expect:
            return None
        if record is None:
            del self._registry[(kind, name)]
        else:
            self._registry[(kind, name)] = record
        self._registry_version += 1
        return self._registry_version

    # -- records (in this process only; bounded by MAX_RECORDS and their ttl)

    async def record_put(self, name: str, value: str, ttl_seconds: float) -> None:
        check_record(name, value, ttl_seconds)
        await trio.lowlevel.checkpoint()
        self._records.pop(name, None)  # a record put again is the newest
        while len(self._records) >= MAX_RECORDS:
            del self._records[next(iter(self._records))]
        self._records[name] = (self._now_ms() + int(ttl_seconds * 1000), value)

    async def record_get(self, name: str) -> str | None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(name)
        if record is None:
            return None
        expiry, value = record
        if expiry <= self._now_ms():
            del self._records[name]
            return None
        return value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drop idle keys' counters every ``sweep_seconds``, so memory follows active keys;
        renew the leases of live requests (:class:`~tokenguard.store.leases.HeldLeases`)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.leases.renew_forever, self.renew)
            task_status.started()
            while True:
                await trio.sleep(self.sweep_seconds)
                self.sweep()

    def held_buckets(self) -> Iterator[tuple[str, Row, int, int]]:
        """Every bucket with a positive amount still in its window, as
        ``(partition, row, bucket, amount)`` (lease rows left out). It reads the live
        counters: consume it with no await in between for a consistent snapshot."""
        now_ms = self._now_ms()
        for partition, counters in list(self._partitions.items()):
            for counter in list(counters.values()):
                if type(counter) is not BucketCounter:
                    continue
                counter.current(now_ms)  # (drops the buckets that left the window)
                for bucket, amount in list(counter.buckets.items()):
                    yield partition, counter.row, bucket, amount

    def sweep(self) -> int:
        """Drop stale buckets and empty counters; return how many counters remain."""
        now_ms = self._now_ms()
        remaining = 0
        for partition, counters in list(self._partitions.items()):
            for name, counter in list(counters.items()):
                current, _ = counter.current(now_ms)
                if type(counter) is LeaseCounter:
                    if not counter.expiries:
                        del counters[name]
                elif not counter.buckets and counter.alerted < current - counter.span:
                    del counters[name]
            if not counters:
                del self._partitions[partition]
            remaining += len(counters)
        for where, entry in list(self._ticket_lines.items()):
            if not entry.held and entry.touched_ms + TICKET_SEQUENCE_MS <= now_ms:
                del self._ticket_lines[where]
        for where, held in list(self._holders.items()):
            if all(expiry <= now_ms for expiry in held.values()):
                del self._holders[where]
        return remaining
