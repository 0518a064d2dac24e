"""The behaviour every window-store driver must have, run against each of them.

One suite, parametrised over the drivers: ``memory`` (with a fake clock the tests move
instantly, so times are checked to the millisecond), ``redis`` (one real redis-server)
and ``redis-cluster`` (a real 3-master cluster). The Redis drivers run on the Redis
server's clock, in real time, with sub-second windows (400 ms in buckets of 100 ms).

Real time is never trusted blindly: every Redis observation is bracketed by two
readings of the server clock (``TIME``) taken just before and just after the call, and a
timing assertion is made only when that bracket lies wholly on one side of the moment
it is about (a slow machine makes a check inconclusive, never wrong). Amounts are
placed in known buckets, from the reservation's bucket index, which is exact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import attrs
import pytest
import trio

from drivers import memory as memory_driver
from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tests.support.redis_servers import RedisClusterServers, RedisServer
from tokenguard.config.prices import Price
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.model import ApiKey, Limits, digest_of, user_digest
from tokenguard.store.rows import NOT_RESERVED, Admission, Reservation, Row, RowState
from tokenguard.store.window_store import (
    MAX_RECORD_NAME,
    MAX_RECORD_VALUE,
    WAITERS_RETRY_SECONDS,
    StoreError,
    TicketHolder,
    TicketOp,
    WindowStore,
    open_store,
)

WINDOW_MS = 400
BUCKET_MS = 100
SPAN = 4  # ceil(WINDOW_MS / BUCKET_MS)
# How far from a bucket boundary the Redis tests aim their calls.
MARGIN_MS = 30
# Every test's bound: I/O-bound tests must never hang.
TEST_TIMEOUT = 15.0
START_MS = 1_700_000_000_000  # the fake clock's start: a realistic epoch, in ms


class FakeClock:
    """Seconds for :class:`MemoryStore`, moved by the test; ``ms`` is the truth.

    Half a millisecond in, so that ``int(clock() * 1000)`` is exactly ``ms`` despite
    binary floating point.
    """

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000


@attrs.frozen
class Observed:
    """A call's result and the store clock just before and just after it (ms): the
    store's own ``now`` during the call lies in ``[start, end]``."""

    value: Any
    start: int
    end: int

    def before(self, moment: int) -> bool:
        """Certainly happened before ``moment``."""
        return self.end < moment

    def after(self, moment: int) -> bool:
        """Certainly happened at or after ``moment``."""
        return self.start >= moment


@attrs.define
class Driver:
    """How to build one driver's store and look at its clock and its counters."""

    name: str
    make_store: Callable[[], WindowStore]
    clock: FakeClock | None = None
    servers: list[RedisServer] = attrs.Factory(list)


@attrs.define
class Harness:
    """A running store plus control of (or a view on) its clock."""

    driver: Driver
    store: WindowStore

    @property
    def exact(self) -> bool:
        """Times are exact (fake clock): compare to the millisecond."""
        return self.driver.clock is not None

    def row(
        self,
        limit: int,
        amount: int = 1,
        *,
        dimension: str = "requests",
        scope: str = "key:a",
        window_ms: int = WINDOW_MS,
        bucket_ms: int = BUCKET_MS,
        enforce: bool = True,
    ) -> Row:
        return Row(
            scope=scope,
            dimension=dimension,
            window_ms=window_ms,
            bucket_ms=bucket_ms,
            limit=limit,
            amount=amount,
            enforce=enforce,
        )

    async def now_ms(self) -> int:
        clock = self.driver.clock
        if clock is not None:
            return clock.ms
        assert isinstance(self.store, RedisStore)
        return await self.store.server_time_ms()

    async def sleep_until(self, moment_ms: int) -> None:
        """Until the store clock reads ``moment_ms`` (at once if it is past)."""
        clock = self.driver.clock
        if clock is not None:
            clock.ms = max(clock.ms, moment_ms)
            return
        now = await self.now_ms()
        if moment_ms > now:
            # +1: TIME is truncated to the ms, so `now` may be up to 1 ms late.
            await trio.sleep((moment_ms - now + 1) / 1000)

    async def align(self, offset_ms: int = MARGIN_MS) -> int:
        """Wait until ``offset_ms`` into the next bucket; return that bucket's index."""
        bucket = await self.now_ms() // BUCKET_MS + 1
        await self.sleep_until(bucket * BUCKET_MS + offset_ms)
        return bucket

    async def observe(self, call: Callable[..., Awaitable[Any]], *args: Any) -> Observed:
        start = await self.now_ms()
        value = await call(*args)
        end = await self.now_ms()
        return Observed(value, start, end)

    async def admit(self, rows: list[Row], partition: str = "p") -> Observed:
        return await self.observe(self.store.admit, partition, rows)

    async def usage(self, rows: list[Row], partition: str = "p") -> Observed:
        return await self.observe(self.store.usage, partition, rows)

    async def live_counters(self) -> int:
        """Counters still stored: memory sweeps; Redis counts the keys that exist."""
        if isinstance(self.store, MemoryStore):
            return self.store.sweep()
        return len(await trio.to_thread.run_sync(self.redis_ttls))

    def redis_ttls(self) -> dict[str, int]:
        """Every key on every server, with its PTTL in ms (blocking)."""
        ttls = {}
        for server in self.driver.servers:
            with server.client() as client:
                for key in client.scan_iter(count=1000):
                    ttl = client.pttl(key)
                    if ttl != -2:  # expired between SCAN and PTTL
                        ttls[key.decode()] = ttl
        return ttls


def leaves(bucket: int, span: int = SPAN, bucket_ms: int = BUCKET_MS) -> int:
    """When an amount in ``bucket`` stops counting (store clock, ms)."""
    return (bucket + span + 1) * bucket_ms


def used(observed: Observed, index: int = 0) -> int:
    states: tuple[RowState, ...] = observed.value
    return states[index].used


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    if request.param == "memory":
        clock = FakeClock(START_MS)
        yield Driver("memory", lambda: MemoryStore(clock=clock), clock=clock)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield Driver("redis", lambda: RedisStore.from_url(server.url), servers=[server])
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        yield Driver(
            "redis-cluster", lambda: RedisStore.from_url(cluster.url), servers=cluster.servers
        )


@pytest.fixture
async def harness(driver: Driver) -> AsyncIterator[Harness]:
    # Opening is bounded by the driver itself (1 s socket timeouts for Redis).
    async with open_store(driver.make_store()) as running:
        yield Harness(driver, running)


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


# --- publish/subscribe -----------------------------------------------------------------


async def receive_n(messages: AsyncIterator[bytes], n: int) -> list[bytes]:
    received = []
    async for message in messages:
        received.append(message)
        if len(received) == n:
            break
    return received


async def test_published_messages_reach_every_subscriber_in_order(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        sent = [f"m{i}".encode() for i in range(50)]
        async with (
            harness.store.subscribe("chan") as first,
            harness.store.subscribe("chan") as second,
        ):
            await harness.store.publish("chan", sent[:1])
            await harness.store.publish("chan", sent[1:])
            assert await receive_n(first, 50) == sent
            assert await receive_n(second, 50) == sent


async def test_another_store_on_the_same_server_receives_them(harness: Harness) -> None:
    """What one node publishes reaches a subscriber on another node (Redis drivers: a
    second store object, its own connections; memory has no other node)."""
    if harness.exact:
        pytest.skip("the memory store has no other node")
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(harness.driver.make_store()) as other:
            async with other.subscribe("chan") as messages:
                await harness.store.publish("chan", [b"a", b"b", b"c"])
                assert await receive_n(messages, 3) == [b"a", b"b", b"c"]


async def test_channels_are_separate_and_publishing_to_nobody_is_fine(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.store.publish("nobody", [b"lost"])
        await harness.store.publish("nobody", [])
        async with harness.store.subscribe("a") as a_messages:
            await harness.store.publish("b", [b"for b"])
            await harness.store.publish("a", [b"for a"])
            assert await receive_n(a_messages, 1) == [b"for a"]
        # Left: publishing to a channel nobody listens to any more still works.
        await harness.store.publish("a", [b"again"])


async def test_a_subscriber_that_does_not_read_loses_messages_never_blocks(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full subscription drops new messages: the publisher never waits for it, and
    the subscription works again once it is read."""
    import drivers.memory
    import drivers.redis.pubsub

    monkeypatch.setattr(drivers.memory, "SUBSCRIPTION_BUFFER", 10)
    monkeypatch.setattr(drivers.redis.pubsub, "SUBSCRIPTION_BUFFER", 10)
    with trio.fail_after(TEST_TIMEOUT):
        async with harness.store.subscribe("chan") as messages:
            for i in range(100):
                await harness.store.publish("chan", [b"%d" % i])
            # Long enough for the Redis listener to have taken every message.
            await trio.sleep(0 if harness.exact else 1.0)
            assert await receive_n(messages, 10) == [b"%d" % i for i in range(10)]
            dropped = getattr(harness.store, "dropped", None)
            if dropped is None:
                dropped = harness.store.pubsub_dropped  # type: ignore[attr-defined]
            assert dropped == 90
            await harness.store.publish("chan", [b"fresh"])
            assert await receive_n(messages, 1) == [b"fresh"]


async def test_a_redis_subscription_survives_a_server_restart(extra_redis_server: Any) -> None:
    """Redis restarted: the subscription is re-established by itself and delivers
    messages published after it is back."""
    with trio.fail_after(TEST_TIMEOUT):
        url = extra_redis_server.url
        async with open_store(url) as publisher, open_store(url) as subscriber:
            async with subscriber.subscribe("chan") as messages:
                await publisher.publish("chan", [b"before"])
                assert await receive_n(messages, 1) == [b"before"]
                await trio.to_thread.run_sync(extra_redis_server.stop)
                await trio.to_thread.run_sync(extra_redis_server.start)
                # Until the subscription is back, messages are lost: publish until one
                # arrives (the publisher's own pool reconnects on its next command).
                async with trio.open_nursery() as nursery:

                    async def keep_publishing() -> None:
                        while True:
                            with contextlib.suppress(StoreError):
                                await publisher.publish("chan", [b"after"])
                            await trio.sleep(0.05)

                    nursery.start_soon(keep_publishing)
                    assert await receive_n(messages, 1) == [b"after"]
                    nursery.cancel_scope.cancel()


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


# --- records -----------------------------------------------------------------------------


async def test_a_record_put_is_read_back_by_another_store_on_the_same_server(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.store.record_put("responses/k1/resp_1", '{"input": 12}', 60)
        assert await harness.store.record_get("responses/k1/resp_1") == '{"input": 12}'
        assert await harness.store.record_get("responses/k1/resp_2") is None
        if harness.driver.clock is None:  # a second node on the same Redis sees it
            async with open_store(harness.driver.make_store()) as other:
                assert await other.record_get("responses/k1/resp_1") == '{"input": 12}'


async def test_a_record_put_again_is_replaced(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.store.record_put("r", "first", 60)
        await harness.store.record_put("r", "second", 60)
        assert await harness.store.record_get("r") == "second"


async def test_a_record_is_gone_once_its_ttl_passed(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        start = await harness.now_ms()
        await harness.store.record_put("short", "v", 0.2)
        await harness.store.record_put("long", "v", 60)
        await harness.sleep_until(start + 400)
        assert await harness.store.record_get("short") is None
        assert await harness.store.record_get("long") == "v"


@pytest.mark.parametrize(
    ("name", "value", "ttl"),
    [
        ("", "v", 60),
        ("n" * (MAX_RECORD_NAME + 1), "v", 60),
        ("n", "v" * (MAX_RECORD_VALUE + 1), 60),
        ("n", "v", 0),
        ("n", "v", -1),
        ("n", "v", float("inf")),
        ("n", "v", float("nan")),
    ],
)
async def test_a_record_out_of_bounds_is_refused_and_nothing_is_kept(
    harness: Harness, name: str, value: str, ttl: float
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(ValueError):
            await harness.store.record_put(name, value, ttl)
        if name:
            assert await harness.store.record_get(name) is None


async def test_the_memory_store_keeps_a_bounded_number_of_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory_driver, "MAX_RECORDS", 3)
    store = MemoryStore(clock=FakeClock(START_MS))
    for i in range(5):
        await store.record_put(f"r{i}", str(i), 60)
    assert [await store.record_get(f"r{i}") for i in range(5)] == [None, None, "2", "3", "4"]


# --- per-end-user rows ------------------------------------------------------------------


def user_rows(harness: Harness, user: str, *, key_limit: int = 100) -> list[Row]:
    """An admission of a key in a team with per-user limits, as the limiter builds it:
    the key's and the team's rows, then the end user's under each (by digest)."""
    digest = user_digest(user)
    return [
        harness.row(limit=key_limit, scope="key:a"),
        harness.row(limit=100, scope="team:t"),
        harness.row(limit=2, scope=f"key:a:user:{digest}"),
        harness.row(limit=100, amount=7, dimension="total_tokens", scope=f"key:a:user:{digest}"),
        harness.row(limit=3, scope=f"team:t:user:{digest}"),
    ]


async def test_each_end_user_has_their_own_rows_in_the_keys_partition(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        alice, bob = user_rows(harness, "alice"), user_rows(harness, "bob")
        outcomes = [(await harness.admit(alice, partition="team:t")).value for _ in range(3)]
        assert [a.admitted for a in outcomes] == [True, True, False]
        refused = outcomes[2]
        assert [s.row.scope for s in refused.refusing] == [alice[2].scope]
        # Alice's refusal consumed nothing; Bob has his own rows, the key and team are shared.
        admitted = (await harness.admit(bob, partition="team:t")).value
        assert admitted.admitted
        assert [s.used for s in admitted.states] == [3, 3, 1, 7, 1]
        assert [s.used for s in (await harness.usage(alice, partition="team:t")).value] == [
            3,
            3,
            2,
            14,
            2,
        ]


async def test_a_user_is_refused_by_the_key_row_when_the_key_is_out(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        assert (await harness.admit(user_rows(harness, "alice", key_limit=1))).value.admitted
        refused = (await harness.admit(user_rows(harness, "bob", key_limit=1))).value
        assert not refused.admitted
        assert [s.row.scope for s in refused.refusing] == ["key:a"]
        bob = await harness.usage(user_rows(harness, "bob", key_limit=1))
        assert [s.used for s in bob.value][2:] == [0, 0, 0]


async def test_concurrent_requests_of_one_user_admit_exactly_their_limit(
    harness: Harness,
) -> None:
    """60 tasks at once, 30 for each of two users with a per-user limit of 2: exactly 2
    each get in, whatever the interleaving."""
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        outcomes: dict[str, list[bool]] = {"alice": [], "bob": []}

        async def one(user: str) -> None:
            admission = await harness.store.admit("team:t", user_rows(harness, user))
            outcomes[user].append(admission.admitted)

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                for user in outcomes:
                    nursery.start_soon(one, user)
        assert {user: got.count(True) for user, got in outcomes.items()} == {
            "alice": 2,
            "bob": 2,
        }


async def test_idle_end_users_leave_nothing_behind(harness: Harness) -> None:
    """Buckets are created by a user's first request and leave with their window."""
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        last = 0
        for i in range(20):
            rows = [harness.row(limit=2, scope=f"key:a:user:{user_digest(str(i))}")]
            admission = (await harness.admit(rows)).value
            assert admission.admitted
            last = max(last, *admission.reservation.buckets)
        assert await harness.live_counters() == 20
        await harness.sleep_until(leaves(last) + (0 if harness.exact else MARGIN_MS))
        assert await harness.live_counters() == 0


async def test_per_user_rows_are_one_round_trip_with_the_others(harness: Harness) -> None:
    if harness.exact:
        pytest.skip("the memory store makes no round trips")
    store = harness.store
    assert isinstance(store, RedisStore)
    with trio.fail_after(TEST_TIMEOUT):
        rows = user_rows(harness, "alice", key_limit=100)
        rows[2] = attrs.evolve(rows[2], limit=100)
        rows[4] = attrs.evolve(rows[4], limit=100)
        assert (await harness.admit(rows, partition="team:t")).value.admitted  # warm
        calls, trips = store.calls, store.round_trips
        for _ in range(5):
            assert (await store.admit("team:t", rows)).admitted
        assert (store.calls - calls, store.round_trips - trips) == (5, 5)


# --- spend rows -------------------------------------------------------------------------

# A budget of a million currency units, in micro-units: sums stay exact (integers far
# below 2**53, where Lua's doubles are exact).
BUDGET = 10**12


async def test_spend_rows_sum_micro_units_exactly_and_settle_to_the_real_cost(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        third = BUDGET // 3  # 333_333_333_333

        def spend(amount: int) -> Row:
            return harness.row(
                limit=BUDGET,
                amount=amount,
                dimension="spend",
                window_ms=3_600_000,
                bucket_ms=60_000,
            )

        reservations = []
        for _ in range(3):
            admission = (await harness.admit([spend(third)])).value
            assert admission.admitted
            reservations.append(admission.reservation)
        assert not (await harness.admit([spend(2)])).value.admitted  # 1 micro-unit left
        assert (await harness.admit([spend(1)])).value.admitted
        assert used(await harness.usage([spend(0)])) == BUDGET
        # Settled to a real cost 123_456 micro-units below the reservation: exactly that
        # much fits again, not a micro-unit more.
        await harness.store.settle(reservations[0], [-123_456])
        assert not (await harness.admit([spend(123_457)])).value.admitted
        assert (await harness.admit([spend(123_456)])).value.admitted
        assert used(await harness.usage([spend(0)])) == BUDGET


# --- calendar months (spend_per_month), as the limiter names and reports them ------------

PARIS = ZoneInfo("Europe/Paris")
# 2026-11-30 23:59:00 in Paris (UTC+1): a minute before December begins there.
NOV_END_PARIS = datetime(2026, 11, 30, 23, 59, tzinfo=PARIS).timestamp()


class WallClock:
    """POSIX seconds for the limiter's months, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def monthly(harness: Harness, wall: WallClock, timezone: ZoneInfo) -> tuple[Limiter, ApiKey]:
    key = ApiKey("k", digest_of(f"sk-{harness.driver.name}"), Limits(spend_per_month=100))
    limiter = Limiter(
        harness.store, window_seconds=60, bucket_seconds=5, timezone=timezone, wall_clock=wall
    )
    return limiter, key


async def test_a_monthly_budget_resets_when_the_calendar_month_ends_in_its_time_zone(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        wall = WallClock(NOV_END_PARIS)
        limiter, key = monthly(harness, wall, PARIS)
        price = Price(input=1_000_000, cached_input=1_000_000, output=1_000_000)
        cost = Cost(input_tokens=60, output_tokens=0, price=price)  # 60 micro-units
        assert (await limiter.admit(key, cost)).admitted
        refused = await limiter.admit(key, cost)
        assert not refused.admitted and refused.refusal is not None
        assert refused.refusal.row.scope.endswith(":month:2026-11")
        assert refused.admission.retry_after == pytest.approx(60.0)  # to Dec 1, 00:00 Paris
        (november,) = await limiter.usage(key)
        assert november.used == 60 and november.reset_after == pytest.approx(60.0)
        wall.now += 60  # 2026-12-01 00:00 in Paris (still 23:00 on Nov 30 in UTC)
        december = await limiter.admit(key, cost)
        assert december.admitted and december.state("spend").used == 60
        assert december.state("spend").row.scope.endswith(":month:2026-12")
        # A node still in November (a lagging clock) counts in November's counter only.
        wall.now -= 1
        assert not (await limiter.admit(key, cost)).admitted


async def test_the_same_instant_is_in_different_months_in_different_time_zones(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        instant = datetime(2026, 12, 31, 23, 30, tzinfo=UTC).timestamp()
        labels = {}
        for zone in ("UTC", "Pacific/Auckland", "America/Los_Angeles"):
            limiter, key = monthly(harness, WallClock(instant), ZoneInfo(zone))
            (state,) = await limiter.usage(key)
            labels[zone] = state.row.scope.rpartition(":month:")[2]
            left = state.reset_after if state.used else None
            assert left is None  # nothing spent yet
        assert labels == {
            "UTC": "2026-12",
            "Pacific/Auckland": "2027-01",
            "America/Los_Angeles": "2026-12",
        }


# --- ticket lines (the admission queue's order across nodes) ------------------------------


async def test_a_ticket_line_gives_rising_tickets_and_names_the_first_held(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        taken = [
            await store.tickets("p", "key:a:requests", "take", by=TicketHolder(60_000))
            for _ in range(3)
        ]
        assert taken == [(1, 1), (2, 1), (3, 1)]
        assert await store.tickets("p", "key:a:requests", "drop", 1) == (1, 2)
        assert await store.tickets("p", "key:a:requests", "check", 3, TicketHolder(60_000)) == (
            3,
            2,
        )
        assert await store.tickets("p", "key:a:requests", "drop", 2) == (2, 3)
        # Another line, another partition: their own sequences.
        assert await store.tickets("p", "key:b:requests", "take", by=TicketHolder(60_000)) == (1, 1)
        assert await store.tickets("q", "key:a:requests", "take", by=TicketHolder(60_000)) == (1, 1)
        assert await store.tickets("p", "key:a:requests", "drop", 3) == (3, 0)
        # The sequence outlives the line's tickets: a later waiter is never first by number.
        assert await store.tickets("p", "key:a:requests", "take", by=TicketHolder(60_000)) == (4, 4)


async def test_a_ticket_nobody_checks_expires_and_a_checked_one_keeps_its_place(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        start = await harness.now_ms()
        assert await store.tickets("p", "line", "take", by=TicketHolder(200)) == (
            1,
            1,
        )  # a dead node's
        assert await store.tickets("p", "line", "take", by=TicketHolder(10_000)) == (2, 1)
        await harness.sleep_until(start + 300)
        assert await store.tickets("p", "line", "check", 2, TicketHolder(10_000)) == (2, 2)
        # A waiter whose ticket expired while it waited is put back under its number.
        assert await store.tickets("p", "line", "check", 1, TicketHolder(10_000)) == (1, 1)


async def test_an_admission_in_turn_is_refused_while_a_line_of_its_rows_holds_a_ticket(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        rows = [harness.row(10), harness.row(10, scope="team:t")]
        ahead = [(0, "key:a"), (1, "team:t")]
        await store.tickets("p", "team:t", "take", by=TicketHolder(60_000))
        refused = await store.admit_in_turn("p", rows, ahead)
        assert not refused.admitted and refused.reservation is None
        assert [s.fits for s in refused.states] == [True, False]
        assert refused.retry_after == WAITERS_RETRY_SECONDS
        assert refused.states[1].used == 0  # nothing consumed
        # A line of another partition, or a ticket of a later rank, is not ahead of it.
        await store.tickets("q", "key:a", "take", by=TicketHolder(60_000))
        await store.tickets("p", "key:a", "take", by=TicketHolder(60_000, rank=1))
        assert (await store.admit_in_turn("p", rows, ahead[:1], rank=0)).admitted
        # ... but a request of that rank defers to it.
        assert not (await store.admit_in_turn("p", rows, ahead[:1], rank=1)).admitted
        # Once the line is empty, the same admission goes through, all rows.
        await store.tickets("p", "team:t", "drop", 1)
        admitted = await store.admit_in_turn("p", rows, ahead)
        assert admitted.admitted and [s.used for s in admitted.states] == [2, 2]


async def test_an_admission_in_turn_that_does_not_fit_keeps_its_own_refusal(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        assert (await store.admit("p", [harness.row(1)])).admitted
        await store.tickets("p", "key:a", "take", by=TicketHolder(60_000))
        refused = await store.admit_in_turn("p", [harness.row(1)], [(0, "key:a")])
        assert not refused.admitted
        assert refused.states[0].used == 1
        # Its own wait (room frees within a window), not the waiters' one.
        assert refused.retry_after is not None
        assert refused.retry_after <= (WINDOW_MS + BUCKET_MS) / 1000 < WAITERS_RETRY_SECONDS


async def test_an_admission_in_turn_ignores_an_expired_ticket(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        start = await harness.now_ms()
        await store.tickets("p", "key:a", "take", by=TicketHolder(200, rank=1))  # a dead node's
        await harness.sleep_until(start + 300)
        assert (await store.admit_in_turn("p", [harness.row(1)], [(0, "key:a")], 1)).admitted


async def test_a_holder_gets_no_ticket_past_its_bound_in_any_line_of_its_partition(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        assert await store.tickets("p", "key:a", "take", 0, TicketHolder(60_000, "a", 2)) == (1, 1)
        assert await store.tickets("p", "team:t", "take", 0, TicketHolder(60_000, "a", 2)) == (1, 1)
        assert await store.tickets("p", "key:a", "take", 0, TicketHolder(60_000, "a", 2)) == (0, 1)
        # Another holder, or the same one in another partition, has a bound of its own.
        assert await store.tickets("p", "key:a", "take", 0, TicketHolder(60_000, "b", 2)) == (2, 1)
        assert await store.tickets("q", "key:a", "take", 0, TicketHolder(60_000, "a", 2)) == (1, 1)
        # A ticket dropped (or checked, then dropped) makes room for one more.
        assert await store.tickets("p", "key:a", "check", 1, TicketHolder(60_000, "a", 2)) == (1, 1)
        assert await store.tickets("p", "key:a", "drop", 1, TicketHolder(60_000, "a", 2)) == (1, 2)
        assert await store.tickets("p", "key:a", "take", 0, TicketHolder(60_000, "a", 2)) == (3, 2)


async def test_a_holders_expired_tickets_leave_its_bound(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store
        start = await harness.now_ms()
        assert await store.tickets("p", "line", "take", 0, TicketHolder(200, "a", 1)) == (1, 1)
        assert await store.tickets("p", "line", "take", 0, TicketHolder(60_000, "a", 1)) == (0, 1)
        await harness.sleep_until(start + 300)
        assert await store.tickets("p", "line", "take", 0, TicketHolder(60_000, "a", 1)) == (2, 2)


async def test_a_ticket_lines_turn_is_interactive_first_and_batch_after_its_share(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = harness.store

        async def step(op: TicketOp, ticket: int = 0, rank: int = 0) -> tuple[int, int]:
            return await store.tickets(
                "p", "line", op, ticket, TicketHolder(60_000, rank=rank, share=2)
            )

        assert await step("take", rank=1) == (1, 1)  # a batch ticket alone has the turn
        assert await step("take") == (2, 2)  # an interactive one, arriving later, first
        assert await step("take") == (3, 2)
        assert await step("take") == (4, 2)
        assert await step("drop", 2) == (2, 3)  # (leaving unadmitted counts for nothing)
        assert await step("admitted", 3) == (3, 4)
        assert await step("take") == (5, 4)
        # Two interactive admissions in a row: the batch ticket has the turn.
        assert await step("admitted", 4) == (4, 1)
        assert await step("admitted", 1, rank=1) == (1, 5)  # and the run starts again
        assert await step("take", rank=1) == (6, 5)
        # share -1: interactive always first.
        assert await store.tickets("p", "line", "admitted", 5, TicketHolder(rank=0, share=-1)) == (
            5,
            6,
        )
        assert await store.tickets(
            "p", "line", "take", 0, TicketHolder(60_000, rank=0, share=-1)
        ) == (7, 7)
