"""The guarded store in one process, over a memory store that fails, hangs or answers as
a pipeline does, on trio's clock (tests/store/test_guarded_*.py, and the metrics tests
that count its calls and stalls).

:func:`guarded` opens a :class:`~tokenguard.store.guarded.GuardedStore` over a
:class:`FlakyStore` (made to fail, hang, refuse to start or answer one call at a time);
:func:`pipelined` one over a :class:`PipelinedStore` (calls go out together and are
answered on the server's own schedule, whatever the node does). :func:`burst` admits
many calls at once beside a task such as :func:`stall`, a node stall. Every clock is
trio's (:func:`trio_clock`): the timings the tests assert are the code's, not the
machine's.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from drivers.memory import MemoryStore
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.rows import Admission, Reservation, Row, RowState
from tokenguard.store.stalls import StallMeter
from tokenguard.store.window_store import NOBODY, StoreError, TicketHolder, TicketOp, open_store

BASE = 1_000_000.0  # the fake wall clock starts here (seconds)


def rows(*, requests: int = 1, tokens: int = 0, rpm: int = 30, tpm: int = 1000) -> list[Row]:
    return [
        Row("key:k", "requests", 60_000, 5_000, rpm, requests),
        Row("key:k", "output_tokens", 60_000, 5_000, tpm, tokens),
    ]


class FlakyStore(MemoryStore):
    """A memory store (the "shared store") that can fail, hang or refuse to start."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock, url="flaky://")
        self.mode = "ok"  # "ok", "fail", "hang" or "serial"
        self.start_failures = 0
        self.calls = 0
        self.started = 0
        self._one_at_a_time = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.start_failures:
            self.start_failures -= 1
            raise StoreError("connection refused")
        self.started += 1
        await super().run(task_status=task_status)

    async def _gate(self) -> None:
        self.calls += 1
        if self.mode == "fail":
            raise StoreError("connection refused")
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "serial":  # one call at a time, 40 ms each: a queue
            async with self._one_at_a_time:
                await trio.sleep(0.04)

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        await self._gate()
        return await super().admit(partition, rows)

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        await self._gate()
        await super().settle(reservation, deltas)

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        await self._gate()
        return await super().usage(partition, rows)

    async def tickets(
        self, partition: str, line: str, op: TicketOp, ticket: int = 0, by: TicketHolder = NOBODY
    ) -> tuple[int, int]:
        await self._gate()
        return await super().tickets(partition, line, op, ticket, by)


@attrs.define(eq=False)
class Pending:
    """A call in a :class:`PipelinedStore`: what the server runs, and its caller's wait."""

    run: Callable[[], Awaitable[Any]]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None


class PipelinedStore(MemoryStore):
    """A shared store played the way the Redis driver works, on trio's clock.

    Calls queue up and go out together, as one pipeline, once ``send`` is set (then
    ``last_sent``). The server answers the pipeline's first call ``latency`` after the
    send (never, if infinite) and each next one ``spacing`` after the one before, on its
    own, whatever the node does meanwhile. The node's reader task takes each reply in as
    it comes (``last_heard``) and, once the pipeline's last one is in, wakes its callers
    (a scheduling round later, like any task). A stall of the node (a task jumping the
    mock clock: no task runs) thus delays the reader, never the server.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock, url="pipelined://")
        self.send = trio.Event()
        self.send.set()
        self.latency = 0.05
        self.spacing = 0.0
        self.per_read = math.inf  # replies the reader takes in per step (a buffer's worth)
        self._queue: list[Pending] = []
        self._queued = trio.Event()
        self._arrive, self._arrived = trio.open_memory_channel[tuple[Pending, bool]](math.inf)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_forever, nursery)
            nursery.start_soon(self._read_forever)
            await super().run(task_status=task_status)

    async def _send_forever(self, nursery: trio.Nursery) -> None:
        while True:
            await self._queued.wait()
            await self.send.wait()
            self._queued = trio.Event()
            pipeline, self._queue = self._queue, []
            self.last_sent = trio.current_time()
            nursery.start_soon(self._serve, pipeline, self.latency, self.spacing)

    async def _serve(self, pipeline: list[Pending], latency: float, spacing: float) -> None:
        await trio.sleep(latency)
        for i, pending in enumerate(pipeline):
            if i and spacing:
                await trio.sleep(spacing)
            self._arrive.send_nowait((pending, i == len(pipeline) - 1))

    async def _read_forever(self) -> None:
        pipeline: list[Pending] = []
        while True:
            arrived = [await self._arrived.receive()]
            with contextlib.suppress(trio.WouldBlock):  # what is in, up to a buffer's worth
                while len(arrived) < self.per_read:
                    arrived.append(self._arrived.receive_nowait())
            self.last_heard = trio.current_time()
            for pending, last in arrived:
                pending.result = await pending.run()
                pipeline.append(pending)
                if last:
                    for each in pipeline:
                        each.done.set()
                    pipeline = []

    async def _pipelined(self, run: Callable[[], Awaitable[Any]]) -> Any:
        pending = Pending(run)
        self._queue.append(pending)
        self._queued.set()
        await pending.done.wait()
        return pending.result

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        return await self._pipelined(functools.partial(super().admit, partition, rows))

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        await self._pipelined(functools.partial(super().settle, reservation, deltas))

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        return await self._pipelined(functools.partial(super().usage, partition, rows))


async def breaker_closed(store: GuardedStore) -> None:
    """Wait until the store's breaker is closed (the caller bounds the wait)."""
    while store.breaker.is_open:  # noqa: ASYNC110 (a value, not an event, to watch)
        await trio.sleep(0.01)


def trio_clock() -> float:
    return BASE + trio.current_time()


@asynccontextmanager
async def guarded(
    policy: str = "local", *, cluster_size: int = 1, node_id: int = 0, start_failures: int = 0
) -> AsyncIterator[tuple[GuardedStore, FlakyStore]]:
    primary = FlakyStore(trio_clock)
    primary.start_failures = start_failures
    store = GuardedStore(
        primary,
        policy=policy,  # type: ignore[arg-type]
        cluster_size=cluster_size,
        node_id=node_id,
        fallback=MemoryStore(clock=trio_clock),
    )
    async with open_store(store):
        yield store, primary


@asynccontextmanager
async def pipelined(
    stalls: StallMeter | None = None,
) -> AsyncIterator[tuple[GuardedStore, PipelinedStore]]:
    """A guarded store (policy closed, timeout 100 ms) on a :class:`PipelinedStore`."""
    primary = PipelinedStore(trio_clock)
    store = GuardedStore(
        primary, policy="closed", fallback=MemoryStore(clock=trio_clock), stalls=stalls
    )
    async with open_store(store):
        yield store, primary


async def burst(
    store: GuardedStore, meanwhile: Callable[[], Awaitable[None]], count: int = 20
) -> list[tuple[float, str]]:
    """``count`` admissions at once (rpm 1000) while ``meanwhile`` runs beside them:
    each one's duration and outcome (``admitted``, or ``failed``: a StoreError)."""
    outcomes: list[tuple[float, str]] = []

    async def one() -> None:
        start = trio.current_time()
        try:
            await store.admit("k", rows(rpm=1000))
            outcomes.append((trio.current_time() - start, "admitted"))
        except StoreError:
            outcomes.append((trio.current_time() - start, "failed"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meanwhile)
        for _ in range(count):
            nursery.start_soon(one)
    return outcomes


def stall(
    clock: trio.testing.MockClock, at: float, seconds: float
) -> Callable[[], Awaitable[None]]:
    """A task for :func:`burst`: ``at`` seconds in, the node stalls for ``seconds`` (the
    mock clock jumps: time passes, no task runs), as a task blocking its loop would."""

    async def stalling() -> None:
        await trio.sleep(at)
        clock.jump(seconds)

    return stalling
