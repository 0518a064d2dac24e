"""The window-store contract suite's harness (tests/drivers/): a store of one driver,
its clock, and what it counted, read between two readings of that clock.

``memory`` runs on a :class:`FakeClock` the tests move instantly, so times are checked
to the millisecond; the Redis drivers run on the Redis server's clock, in real time,
with sub-second windows (:data:`WINDOW_MS` in buckets of :data:`BUCKET_MS`).

Real time is never trusted blindly: every Redis observation is bracketed by two
readings of the server clock (``TIME``) taken just before and just after the call, and a
timing assertion is made only when that bracket lies wholly on one side of the moment
it is about (a slow machine makes a check inconclusive, never wrong). Amounts are
placed in known buckets, from the reservation's bucket index, which is exact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tests.support.redis_servers import RedisServer
from tokenguard.store.rows import Row, RowState
from tokenguard.store.window_store import WindowStore

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
