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

from tokenguard.store.leases import HeldLeases
from tokenguard.store.window_store import (
    ANYTHING,
    LEASE_RETRY_SECONDS,
    NOBODY,
    NOT_RESERVED,
    TICKET_SEQUENCE_MS,
    Admission,
    Ahead,
    Lease,
    Registry,
    RegistryExpect,
    Reservation,
    Row,
    RowState,
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


class _Counter:
    """The buckets of one row: absolute bucket index -> amount (zeros are not kept).

    ``total`` is their sum and ``low``/``high`` the oldest and newest bucket kept
    (:data:`_NO_LOW`/:data:`_NO_HIGH` when there is none), maintained on every change
    so that a decision costs O(1) per row, not O(buckets). ``alerted``: the bucket in which the
    row last crossed its ``alert_at`` (see :attr:`tokenguard.store.window_store.Row.alert_at`).
    ``row``: the row it was made for (its counter, window and buckets are every such
    row's; its limit and amount mean nothing here).
    """

    __slots__ = ("row", "buckets", "bucket_ms", "span", "total", "low", "high", "alerted")

    def __init__(self, row: Row) -> None:
        self.row = row
        self.buckets: dict[int, int] = {}
        self.bucket_ms = row.bucket_ms
        self.span = row.span
        self.total = 0
        self.low, self.high = _NO_LOW, _NO_HIGH
        self.alerted = _NO_HIGH

    def current(self, now_ms: int) -> tuple[int, int]:
        """Drop buckets that left the window; return (current bucket, amount in window)."""
        current = now_ms // self.bucket_ms
        if self.low < current - self.span:
            oldest = current - self.span
            buckets = self.buckets
            for b in [b for b in buckets if b < oldest]:
                self.total -= buckets.pop(b)
            self.bounds()
        return current, self.total

    def bounds(self) -> None:
        """Set ``low`` and ``high`` from the buckets kept."""
        buckets = self.buckets
        self.low = min(buckets) if buckets else _NO_LOW
        self.high = max(buckets) if buckets else _NO_HIGH

    def add(self, bucket: int, delta: int) -> None:
        """Add ``delta`` to ``bucket`` (never below 0; a bucket at 0 is dropped)."""
        buckets = self.buckets
        before = buckets.get(bucket, 0)
        after = before + delta
        if after > 0:
            buckets[bucket] = after
            self.total += after - before
            if bucket < self.low:
                self.low = bucket
            if bucket > self.high:
                self.high = bucket
        elif before:
            del buckets[bucket]
            self.total -= before
            if bucket in (self.low, self.high):
                self.bounds()

    def alert(self, bucket: int) -> bool:
        """True once per window: when no crossing was reported in the window yet."""
        if self.alerted >= bucket - self.span:
            return False
        self.alerted = bucket
        return True

    def leaves_at(self, bucket: int) -> int:
        """The time (ms) at which ``bucket`` leaves the window."""
        return (bucket + self.span + 1) * self.bucket_ms

    def consumed(self, row: Row, now_ms: int, near: bool) -> RowState:
        """The row's state right after an admission consumed it."""
        reset_ms = self.leaves_at(self.high) - now_ms if self.buckets else 0
        return RowState(row, self.total, reset_ms / 1000, True, None, near)

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
        reset_ms = self.leaves_at(self.high) - now_ms if self.buckets else 0
        return RowState(
            row,
            used,
            reset_ms / 1000,
            fits,
            None if retry_ms is None else retry_ms / 1000,
        )


class _Leases:
    """The leases of one lease row: lease id -> expiry (ms); expired ones are dropped
    on every touch."""

    __slots__ = ("expiries",)

    def __init__(self) -> None:
        self.expiries: dict[str, int] = {}

    def current(self, now_ms: int) -> tuple[int, int]:
        """Drop expired leases; return (0, leases held): the lease row's "bucket" and
        usage, shaped as :meth:`_Counter.current`."""
        expiries = self.expiries
        if expiries and min(expiries.values()) <= now_ms:
            for lease in [k for k, t in expiries.items() if t <= now_ms]:
                del expiries[lease]
        return 0, len(expiries)

    def state(self, row: Row, now_ms: int, used: int, amount: int) -> RowState:
        fits = used + amount <= row.limit
        reset_ms = max(self.expiries.values()) - now_ms if self.expiries else 0
        retry = LEASE_RETRY_SECONDS if not fits and amount <= row.limit else None
        return RowState(row, used, reset_ms / 1000, fits, retry)


# The bounds of a counter without buckets: above and below every bucket index.
_NO_LOW = 2**62
_NO_HIGH = -(2**62)


@attrs.define
class _TicketLine:
    """One line of waiting tickets: the last ticket given, each held one's rank and
    expiry (ms, the store's clock), and the admissions of rank 0 in a row (``run``)."""

    last: int = 0
    held: dict[int, tuple[int, int]] = attrs.field(factory=dict)
    run: int = 0
    touched_ms: int = 0

    def drop_expired(self, now_ms: int) -> None:
        for old in [t for t, (_, expiry) in self.held.items() if expiry <= now_ms]:
            del self.held[old]

    def holds(self, rank: int) -> bool:
        """Whether a ticket of ``rank`` or a lower one is held (expired ones dropped)."""
        return any(r <= rank for r, _ in self.held.values())

    def turn(self, share: int) -> int:
        """The ticket whose turn it is (see :meth:`WindowStore.tickets`); 0: none."""
        first = [min((t for t, (r, _) in self.held.items() if r == k), default=0) for k in (0, 1)]
        if first[1] and (not first[0] or 0 <= share <= self.run):
            return first[1]
        return first[0]

    def step(self, op: TicketOp, ticket: int, now_ms: int, by: TicketHolder) -> tuple[int, int]:
        self.drop_expired(now_ms)
        if op == "take":
            self.last += 1
            ticket = self.last
        if op in ("drop", "admitted"):
            self.held.pop(ticket, None)
            if op == "admitted":
                self.run = self.run + 1 if by.rank == 0 else 0
        else:
            self.held[ticket] = (by.rank, now_ms + by.ttl_ms)
        self.touched_ms = now_ms
        return ticket, self.turn(by.share)


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
        self._partitions: dict[str, dict[str, _Counter | _Leases]] = {}
        self.leases = HeldLeases()  # this store's leases, renewed in run()
        self._lease_ids = itertools.count(1)
        self.sweep_seconds = 10.0
        self._channels: dict[str, set[trio.MemorySendChannel[bytes]]] = {}
        self.dropped = 0  # pub/sub messages dropped for subscriptions that were full
        self._registry: Registry = {}
        self._registry_version = 0
        # name -> (expiry in ms, value), in the order they were put (the oldest first)
        self._records: dict[str, tuple[int, str]] = {}
        self._ticket_lines: dict[tuple[str, str], _TicketLine] = {}
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

    def _counter(self, partition: str, row: Row) -> _Counter | _Leases:
        counters = self._partitions.get(partition)
        if counters is None:
            counters = self._partitions[partition] = {}
        counter = counters.get(row.counter)
        if counter is None:
            counter = counters[row.counter] = _Leases() if row.is_lease else _Counter(row)
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
        consumed: list[_Counter] = []
        buckets: list[int] = []
        states: list[RowState] = []
        alerting: list[int] = []  # the rows with a near-limit mark
        for row in rows:
            counter = counters.get(row.counter)
            if type(counter) is not _Counter:
                if counter is not None or row.is_lease:
                    break
                counter = counters[row.counter] = _Counter(row)
            amount = row.amount
            bucket_ms = counter.bucket_ms
            bucket = now_ms // bucket_ms
            if counter.low < bucket - counter.span:
                counter.current(now_ms)
            used = counter.total + amount
            if used > row.limit or amount < 0:
                break
            if amount:  # (_Counter.add for a positive amount, inlined)
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
        counters: dict[str, _Counter | _Leases],
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
                counter = counters[row.counter] = _Leases() if row.is_lease else _Counter(row)
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
            if type(counter) is _Counter:
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
                if type(held) is _Leases:
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
                if type(held) is not _Leases:
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
                counter = _Leases() if row.is_lease else _Counter(row)
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
        entry = self._ticket_lines.setdefault((partition, line), _TicketLine())
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
                if type(counter) is not _Counter:
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
                if type(counter) is _Leases:
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
