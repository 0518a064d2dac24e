"""The guarded store on the real Redis driver in one process, and admissions driven through it.

:func:`guarded_redis` opens a :class:`~tokenguard.store.guarded.GuardedStore` over a
``RedisStore`` of a URL (a real server, or a latency proxy in front of one);
:func:`admissions` admits :func:`a_row` (a limit of :data:`ROWS_LIMIT`) concurrently
and records each outcome and its time in a :class:`Load`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from drivers.redis import RedisStore
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.rows import Row
from tokenguard.store.window_store import open_store

# --- in one process: a slow, flaky or paused Redis ---------------------------------------

ROWS_LIMIT = 50


def a_row(amount: int = 1, limit: int = ROWS_LIMIT) -> Row:
    return Row("key:slow", "requests", 60_000, 5_000, limit, amount)


@asynccontextmanager
async def guarded_redis(url: str, **options: Any) -> AsyncIterator[GuardedStore]:
    store = GuardedStore(RedisStore.from_url(url), **options)
    async with open_store(store):
        yield store


@attrs.define
class Load:
    """What a burst of admissions saw: each call's duration and outcome."""

    durations: list[float] = attrs.field(factory=list)
    outcomes: Counter[str] = attrs.field(factory=Counter)
    max_threads: int = 0

    @property
    def admitted(self) -> int:
        return self.outcomes["store"] + self.outcomes["local"]


async def admissions(
    store: GuardedStore,
    tasks: int,
    each: int,
    pause: float = 0.0,
    limit: int = ROWS_LIMIT,
    partition: str = "p",
) -> Load:
    """``tasks`` tasks each making ``each`` admissions in a row (rpm ``limit``);
    threads sampled."""
    load = Load()

    async def one() -> None:
        for _ in range(each):
            start = trio.current_time()
            admission = await store.admit(partition, [a_row(limit=limit)])
            load.durations.append(trio.current_time() - start)
            if not admission.admitted:
                load.outcomes["refused"] += 1
            elif type(admission.reservation).__name__ == "LocalReservation":
                load.outcomes["local"] += 1
            else:
                load.outcomes["store"] += 1
            await trio.sleep(pause)

    async def sample() -> None:
        while True:
            load.max_threads = max(load.max_threads, threading.active_count())
            await trio.sleep(0.01)

    async with trio.open_nursery() as outer:
        outer.start_soon(sample)
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(one)
        outer.cancel_scope.cancel()
    return load
