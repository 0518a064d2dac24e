"""The guarded store (tokenguard/resilience.py) in one process: deadlines, the breaker,
the three failure policies, the local windows' shares, recovery with write-back, and
the config and command line that choose them.

The store behind the guard is a memory store that can be made to fail, hang or refuse
to start (:class:`FlakyStore`); trio's clock jumps over every wait
(``autojump_clock``), so the timings asserted here are the code's, not the machine's.
Real Redis, slow networks and real processes are in tests/store/test_faults_*.py.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.cli import main as cli
from tokenguard.cli import serve
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError, Settings
from tokenguard.log_throttle import LogThrottle
from tokenguard.store.breaker import Breaker
from tokenguard.store.guarded import (
    TICKET_SECONDS,
    GuardedStore,
    UncheckedReservation,
    guarded_store,
)
from tokenguard.store.local_windows import LocalReservation, node_share
from tokenguard.store.rows import Admission, Reservation, Row, RowState
from tokenguard.store.stalls import PROBE_PERIOD, StallMeter
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


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [1, 2, 3, 7, 10])
def test_node_shares_add_up_to_the_limit_exactly(cluster_size: int) -> None:
    for limit in [*range(0, 40), 1000, 1001, 999_999]:
        shares = [node_share(limit, cluster_size, i) for i in range(cluster_size)]
        assert sum(shares) == limit
        assert max(shares) - min(shares) <= 1
        # Without spreading (ids not known unique) each node gets the floor.
        floor = [node_share(limit, cluster_size, i, spread=False) for i in range(cluster_size)]
        assert floor == [limit // cluster_size] * cluster_size


def test_a_limit_below_the_cluster_size_leaves_some_nodes_nothing() -> None:
    assert [node_share(2, 3, i) for i in range(3)] == [1, 1, 0]


def test_breaker_opens_after_three_failures_in_a_row_and_only_close_closes_it() -> None:
    breaker = Breaker()
    breaker = breaker.failed(1.0).failed(2.0)
    assert not breaker.is_open and breaker.failures == 2
    assert breaker.succeeded().failures == 0  # a success in between: count again
    breaker = breaker.failed(3.0)
    assert breaker.is_open and breaker.opened_at == 3.0 and breaker.state == "open"
    assert breaker.succeeded() is breaker  # a late success does not close it
    assert breaker.failed(4.0).opened_at == 3.0
    assert breaker.close() == Breaker()


def test_log_throttle_counts_what_it_holds_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("tokenguard.store.guarded.time.monotonic", lambda: now[0])
    throttle = LogThrottle(1.0)
    assert throttle.ready() == 0
    assert throttle.ready() is None and throttle.ready() is None
    now[0] += 1.0
    assert throttle.ready() == 2


# --- deadlines and the breaker ------------------------------------------------------------


async def test_a_hung_ticket_step_fails_alone_and_never_moves_admissions(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        primary.mode = "hang"
        for _ in range(5):  # more than the breaker's threshold
            start = trio.current_time()
            with pytest.raises(StoreError):
                await store.tickets("k", "line", "take", by=TicketHolder(1000))
            assert trio.current_time() - start == pytest.approx(TICKET_SECONDS)
        assert not store.breaker.is_open and store.stats.failures == 0
        primary.mode = "ok"
        admission = await store.admit("k", rows())
        assert admission.admitted
        assert not isinstance(admission.reservation, LocalReservation)


async def test_a_hung_store_costs_one_timeout_per_call_until_the_breaker_opens(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        primary.mode = "hang"
        took = []
        for _ in range(5):
            start = trio.current_time()
            admission = await store.admit("k", rows())
            took.append(trio.current_time() - start)
            assert admission.admitted
            assert isinstance(admission.reservation, LocalReservation)
        # Three calls wait for the 100 ms deadline, then the breaker is open: no wait.
        assert took[:3] == [pytest.approx(0.1)] * 3
        assert took[3:] == [0.0, 0.0]
        assert primary.calls == 3
        assert store.breaker.is_open
        assert store.stats.timeouts == 3
        status = store.status()
        assert status["store"] == "unavailable" and status["breaker"] == "open"
        assert status["local_admissions"] == 5


async def test_records_reach_the_store_and_fail_at_once_while_the_breaker_is_open(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        await store.record_put("responses/k/resp_1", "totals", 60)
        assert await primary.record_get("responses/k/resp_1") == "totals"
        assert await store.record_get("responses/k/resp_1") == "totals"
        primary.mode = "hang"
        for _ in range(3):  # three timeouts open the breaker
            await store.admit("k", rows())
        assert store.breaker.is_open
        with pytest.raises(StoreError):
            await store.record_get("responses/k/resp_1")
        with pytest.raises(StoreError):
            await store.record_put("responses/k/resp_2", "totals", 60)


async def test_many_concurrent_calls_on_a_hung_store_all_answer_within_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("closed") as (store, primary):
        primary.mode = "hang"
        outcomes: list[tuple[float, str]] = []

        async def one() -> None:
            start = trio.current_time()
            try:
                await store.admit("k", rows())
                outcome = "admitted"
            except StoreError:
                outcome = "503"
            outcomes.append((trio.current_time() - start, outcome))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(one)
        assert len(outcomes) == 200
        assert all(took <= 0.1 + 1e-9 and outcome == "503" for took, outcome in outcomes)
        assert store.breaker.is_open


async def test_a_queue_behind_a_store_that_keeps_answering_is_no_failure(
    autojump_clock: trio.abc.Clock,
) -> None:
    """20 calls queued on a store answering one call per 40 ms: the last waits 0.8 s,
    but the store answered every 40 ms, so none fails (the deadline is 100 ms without
    an answer). One call stuck while the others are answered fails at 10x the timeout."""
    async with guarded("closed") as (store, primary):
        primary.mode = "serial"
        took: list[float] = []

        async def one() -> None:
            start = trio.current_time()
            assert (await store.admit("k", rows(rpm=1000))).admitted
            took.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert max(took) == pytest.approx(0.8)
        assert store.stats.failures == 0 and not store.breaker.is_open

        stuck = trio.Event()
        original = primary.usage

        async def usage_stuck(partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
            stuck.set()
            await trio.sleep_forever()
            raise AssertionError

        primary.usage = usage_stuck  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:

            async def stuck_call() -> None:
                start = trio.current_time()
                with pytest.raises(StoreError, match="no answer within 100 ms"):
                    await store.usage("k", rows())
                took.append(trio.current_time() - start)

            nursery.start_soon(stuck_call)
            await stuck.wait()
            for _ in range(40):  # meanwhile the store answers other calls
                await store.admit("k", rows(rpm=1000))
        primary.usage = original  # type: ignore[method-assign]
        assert took[-1] == pytest.approx(1.0)


async def test_a_pipeline_sent_late_by_a_stalled_node_is_not_the_stores_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """20 calls are made; the node stalls 60 ms before their pipeline goes out (a full GC
    pass in a burst: time passes, no task runs); the store answers 80 ms after it was
    sent them, 141 ms after they were made: none fails, for the store kept within its
    100 ms. A store that never answers still fails them 100 ms after it was sent them."""
    async with pipelined() as (store, primary):

        async def stall_then_send() -> None:
            await trio.sleep(0.001)  # every call made and queued
            autojump_clock.jump(0.06)  # the stall: no task runs meanwhile
            primary.send.set()

        for latency, outcome, took in ((0.08, "admitted", 0.141), (math.inf, "failed", 0.161)):
            primary.latency, primary.send = latency, trio.Event()
            outcomes = await burst(store, stall_then_send)
            assert outcomes == [(pytest.approx(took), outcome)] * 20
        assert store.stats.failures == store.stats.timeouts == 20


async def test_a_node_stall_while_calls_wait_is_not_counted_against_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """20 calls are sent at once; 25 ms later the node stalls for 100 ms (a task blocks
    the loop: time passes, no task runs); the store answers 160 ms after the send, of
    which the node was running for 60 ms: no call fails, the breaker stays closed."""
    async with pipelined() as (store, primary):
        primary.latency = 0.16
        outcomes = await burst(store, stall(autojump_clock, 0.025, 0.1))
        assert outcomes == [(pytest.approx(0.16), "admitted")] * 20
        assert store.stats.failures == 0 and not store.breaker.is_open
        # The probe saw the stall: all of it but what came before its next due time.
        assert 0.1 - PROBE_PERIOD - 1e-9 <= store.stalls.total <= 0.1 + 1e-9  # (float sums)


async def test_a_hung_store_costs_each_call_its_timeout_after_the_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """20 calls are made; the node sends them 40 ms later (its pipelines were busy); the
    store never answers: each call fails 100 ms after the send, and the breaker opens."""
    async with pipelined() as (store, primary):
        primary.latency, primary.send = math.inf, trio.Event()

        async def send_later() -> None:
            await trio.sleep(0.04)
            primary.send.set()

        outcomes = await burst(store, send_later)
        assert outcomes == [(pytest.approx(0.14), "failed")] * 20
        assert store.stats.timeouts == 20 and store.breaker.is_open


async def test_a_call_is_cut_on_its_own_deadline_beside_a_longer_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A write-back (a 2 s deadline) waits on a hung store; a request's call made 50 ms
    later still fails 100 ms after its send, not when the write-back's time is up."""
    async with pipelined() as (store, primary):
        primary.latency = math.inf

        async def write_back() -> None:
            with pytest.raises(StoreError), store._deadline(2.0):
                await primary.usage("k", rows())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_back)
            await trio.sleep(0.05)
            outcomes = await burst(store, trio.lowlevel.checkpoint, count=1)
        assert outcomes == [(pytest.approx(0.1), "failed")]


async def test_a_hung_store_costs_each_call_its_timeout_plus_the_nodes_own_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store never answers and the node stalls for 100 ms while the calls wait: each
    call fails once the node has run for 100 ms since the send, 200 ms after it (less
    what the probe could not see of the stall: at most one probe period)."""
    async with pipelined() as (store, primary):
        primary.latency = math.inf
        outcomes = await burst(store, stall(autojump_clock, 0.025, 0.1))
        assert {outcome for _, outcome in outcomes} == {"failed"}
        assert all(0.2 - PROBE_PERIOD - 1e-9 <= t <= 0.2 + 1e-9 for t, _ in outcomes), outcomes
        assert store.stats.timeouts == 20 and store.breaker.is_open


async def test_a_reply_in_by_the_deadline_is_read_before_the_deadline_is_judged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store's replies arrive exactly at the calls' deadline, in the same scheduling
    round as the watchdog's wake: the watchdog lets the reader take them in before it
    judges, so no call fails."""
    async with pipelined() as (store, primary):
        primary.latency = store.timeout
        outcomes = await burst(store, trio.lowlevel.checkpoint)
        assert outcomes == [(pytest.approx(0.1), "admitted")] * 20
        assert store.stats.failures == 0


async def test_replies_that_keep_coming_in_for_a_long_pipeline_are_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One pipeline of 20 calls whose replies come in one by one, 20 ms apart, the first
    50 ms after the send: its callers are woken only once the last one is in (430 ms
    after the send), but the store was heard from all along, so none fails."""
    async with pipelined() as (store, primary):
        primary.latency, primary.spacing = 0.05, 0.02
        outcomes = await burst(store, trio.lowlevel.checkpoint)
        assert outcomes == [(pytest.approx(0.43), "admitted")] * 20
        assert store.stats.failures == 0


async def test_a_reply_that_came_in_during_a_long_stall_is_read_not_judged_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store answers 50 ms after the send, but the node stalls for 2 s from 10 ms on:
    when it runs again, its calls are past even their hard cap (1 s), yet their replies
    are in, and they are read before anything is judged: none fails."""
    async with pipelined() as (store, primary):
        outcomes = await burst(store, stall(autojump_clock, 0.01, 2.0))
        assert outcomes == [(pytest.approx(2.01), "admitted")] * 20
        assert store.stats.failures == 0 and store.stats.stalled_out == 0


async def test_replies_still_being_read_after_a_long_stall_are_all_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, but the 20 replies that came in during the stall are read two at a time
    (a buffer's worth per scheduling round, ten rounds in all): the watchdog keeps
    letting the reader run while it takes replies in, so none is judged late."""
    async with pipelined() as (store, primary):
        primary.per_read = 2
        outcomes = await burst(store, stall(autojump_clock, 0.01, 2.0))
        assert outcomes == [(pytest.approx(2.01), "admitted")] * 20
        assert store.stats.stalled_out == 0


async def test_a_stall_past_the_hard_cap_fails_the_calls_without_blaming_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store never answers and the node stalls for 2 s: the calls end at the hard
    cap (no call waits longer, however stalled the node), as a StoreError, but the store
    had no 100 ms of the node's running time to answer them: the breaker does not count
    them. A call made after the stall fails on its deadline as usual."""
    async with pipelined() as (store, primary):
        primary.latency = math.inf
        outcomes = await burst(store, stall(autojump_clock, 0.01, 2.0))
        assert outcomes == [(pytest.approx(2.01), "failed")] * 20
        assert store.stats.stalled_out == 20
        assert store.stats.failures == store.stats.timeouts == 0
        assert store.status()["consecutive_failures"] == 0
        with pytest.raises(StoreError):
            await store.admit("k", rows())
        assert store.stats.timeouts == 1


async def test_a_gc_pause_while_calls_wait_is_not_counted_against_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A garbage-collection pass of 50 ms (its start and stop seen by ``gc.callbacks``;
    the loop-lag probe is off here, so only they can tell) while 20 calls wait on a
    store answering 140 ms after the send: none fails. Without the pass, the same store
    fails them at 100 ms."""
    pause = [0.0]  # how long the next pass takes (then 0: passes the interpreter
    # starts by itself meanwhile take no time on the mock clock)

    def paused(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and pause[0]:
            autojump_clock.jump(pause[0])
            pause[0] = 0.0

    for seconds, outcome in ((0.05, "admitted"), (0.0, "failed")):

        async def collect(seconds: float = seconds) -> None:
            await trio.sleep(0.03)
            pause[0] = seconds
            gc.collect()

        async with pipelined(StallMeter(period=3600)) as (store, primary):
            primary.latency = 0.14
            gc.callbacks.append(paused)  # after the meter's own: it sees the start first
            try:
                outcomes = await burst(store, collect)
            finally:
                gc.callbacks.remove(paused)
            assert {o for _, o in outcomes} == {outcome}
            assert store.stalls.total == pytest.approx(seconds)


async def test_the_breaker_probes_once_a_second_and_closes_when_the_store_is_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("k", rows())
        assert store.breaker.is_open
        calls = primary.calls
        await trio.sleep(3.5)
        assert primary.calls - calls == 3  # one probe a second, nothing else
        primary.mode = "ok"
        back = trio.current_time()
        await breaker_closed(store)
        assert trio.current_time() - back <= 1.0
        admission = await store.admit("k", rows())
        assert admission.admitted and type(admission.reservation) is Reservation
        assert store.status()["store"] == "ok"


async def test_a_store_down_at_start_does_not_stop_the_node(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tokenguard.store.guarded")
    async with guarded("closed", start_failures=3) as (store, primary):
        assert store.breaker.is_open and primary.started == 0
        with pytest.raises(StoreError, match="policy closed"):
            await store.admit("k", rows())
        with trio.fail_after(5):
            await breaker_closed(store)
        assert primary.started == 1
        assert (await store.admit("k", rows())).admitted
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot reach the store at start" in m for m in messages)
    assert any("is back" in m for m in messages)


# --- the policies -------------------------------------------------------------------------


async def test_policy_closed_raises_store_error_and_usage_too(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("closed") as (store, primary):
        primary.mode = "fail"
        for _ in range(4):
            with pytest.raises(StoreError):
                await store.admit("k", rows())
        with pytest.raises(StoreError):
            await store.usage("k", rows())
        assert store.stats.refused_unavailable == 4


async def test_policy_open_admits_counts_and_logs_at_most_a_line_a_second(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tokenguard.store.guarded")
    async with guarded("open") as (store, primary):
        primary.mode = "fail"
        for _ in range(50):
            admission = await store.admit("k", rows(rpm=1))
            assert admission.admitted
            assert isinstance(admission.reservation, UncheckedReservation)
            await store.settle(admission.reservation, [0, -5])  # nothing to settle
        assert store.stats.fail_open_admissions == 50
        assert store.status()["fail_open_admissions"] == 50
        states = await store.usage("k", rows(rpm=1))
        assert [s.used for s in states] == [0, 0]
    lines = [r.getMessage() for r in caplog.records if "such admissions" in r.getMessage()]
    assert len(lines) == 1  # no time passed: one line, however many admissions
    assert "key id k unchecked" in lines[0]


async def test_policy_local_splits_every_limit_over_the_nodes(
    autojump_clock: trio.abc.Clock,
) -> None:
    # rpm 10 over 3 nodes: node 0 gets 4, node 2 gets 3.
    for node_id, share in ((0, 4), (2, 3)):
        async with guarded("local", cluster_size=3, node_id=node_id) as (store, primary):
            primary.mode = "fail"
            admitted = [(await store.admit("k", rows(rpm=10))).admitted for _ in range(6)]
            assert admitted == [True] * share + [False] * (6 - share)
            refused = await store.admit("k", rows(rpm=10))
            state = refused.refusing[0]
            assert state.row.limit == share and state.retry_after is not None


async def test_policy_local_a_request_above_the_share_but_within_the_limit_may_retry(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local", cluster_size=4) as (store, primary):
        primary.mode = "fail"
        within = await store.admit("k", rows(tokens=400, tpm=1000))  # share 250
        assert not within.admitted and within.retry_after == 1.0
        beyond = await store.admit("k", rows(tokens=1001, tpm=1000))
        assert not beyond.admitted and beyond.retry_after is None  # never fits anywhere


async def test_the_local_windows_remember_what_the_node_admitted_before_the_outage(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local", cluster_size=2) as (store, primary):
        for _ in range(3):  # through the store: rpm 10, this node's share is 5
            admission = await store.admit("k", rows(rpm=10, tokens=100))
            assert type(admission.reservation) is Reservation
            await store.settle(admission.reservation, [0, -60])  # settled to 40 each
        primary.mode = "fail"
        local = await store.fallback.usage("k", rows())
        assert [s.used for s in local] == [3, 120]
        admitted = [(await store.admit("k", rows(rpm=10))).admitted for _ in range(4)]
        assert admitted == [True, True, False, False]  # 3 before + 2 now = its share


async def test_settlements_go_where_the_reservation_came_from(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        shared = await store.admit("k", rows(tokens=100))
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("other", rows())
        local = await store.admit("k", rows(tokens=100))
        assert isinstance(local.reservation, LocalReservation)
        primary.mode = "ok"
        await store.settle(local.reservation, [0, -70])
        assert primary.calls == 4  # the breaker is open: the store was not asked
        # The store's reservation, settled while it is down: not sent, mirrored locally.
        await store.settle(shared.reservation, [0, -90])
        assert store.stats.settlements_dropped == 1
        assert [s.used for s in await store.fallback.usage("k", rows())] == [2, 40]


async def test_recovery_writes_the_local_admissions_back_before_closing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local", cluster_size=1) as (store, primary):
        await store.admit("k", rows(tokens=10))
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("k", rows(tokens=10))  # the 3 failures: admitted locally
        assert store.breaker.is_open
        late = await store.admit("k", rows(tokens=100))
        await store.settle(late.reservation, [0, -40])  # before the write-back: travels
        primary.mode = "ok"
        with trio.fail_after(2):
            await breaker_closed(store)
        shared = await primary.usage("k", rows())
        assert [s.used for s in shared] == [5, 10 + 3 * 10 + 60]
        # The store now knows: rpm 5 is spent, on the store as on the local windows.
        calls = primary.calls
        refused = await store.admit("k", rows(rpm=5))
        assert not refused.admitted and primary.calls == calls + 1
        assert store.stats.written_back == 2


async def test_admissions_whose_window_passed_during_a_long_outage_are_not_written_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An outage of 200 s on a 60 s window: the 3 requests admitted locally at its start
    count in no window when the store is back, and are not written back (the store
    would count them in its current bucket, refusing requests the limit allows); the
    one admitted just before the end is."""
    async with guarded("local", cluster_size=1) as (store, primary):
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("k", rows(tokens=10))  # the 3 failures: admitted locally
        assert store.breaker.is_open
        await trio.sleep(200)
        await store.admit("k", rows(tokens=10))
        primary.mode = "ok"
        with trio.fail_after(5):
            await breaker_closed(store)
        assert [s.used for s in await primary.usage("k", rows())] == [1, 10]
        assert store.stats.written_back == 2  # its two rows


async def test_after_an_outage_a_node_keeps_to_its_share_while_the_others_write_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Other nodes write their outage back within a probe interval of their own: until
    then the store may count less than was admitted, so for that long (plus a margin)
    a node admits only what the store AND its share allow."""
    async with guarded("local", cluster_size=3) as (store, primary):  # rpm 9: share 3
        await primary.admit("full", rows(rpm=9, requests=9))  # another node's doing
        primary.mode = "fail"
        for _ in range(3):
            await store.admit("other", rows())
        primary.mode = "ok"
        with trio.fail_after(2):
            await breaker_closed(store)
        assert store.status()["holding_seconds"] > 1.0
        admitted = [(await store.admit("k", rows(rpm=9))).admitted for _ in range(5)]
        assert admitted == [True, True, True, False, False]  # the store had room for 9
        assert (await primary.usage("k", rows()))[0].used == 3
        # The store refuses: the local part is undone.
        assert not (await store.admit("full", rows(rpm=9))).admitted
        assert (await store.fallback.usage("full", rows()))[0].used == 0
        await trio.sleep(1.5)
        assert "holding_seconds" not in store.status()
        admitted = [(await store.admit("k", rows(rpm=9))).admitted for _ in range(7)]
        assert admitted == [True] * 6 + [False]  # the store alone again


async def test_a_local_admission_before_the_breaker_opens_reaches_the_store_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One failure (the breaker stays closed): that request is admitted locally, and
    written back as soon as the store answers again, not at some later outage's end."""
    async with guarded("local") as (store, primary):
        primary.mode = "fail"
        local = await store.admit("k", rows(tokens=7))
        assert isinstance(local.reservation, LocalReservation)
        assert not store.breaker.is_open
        primary.mode = "ok"
        await store.admit("other", rows())
        await trio.sleep(0.05)
        assert [s.used for s in await primary.usage("k", rows())] == [1, 7]
        assert store.stats.written_back == 2


async def test_a_failed_write_back_keeps_the_breaker_open_and_loses_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with guarded("local") as (store, primary):
        primary.mode = "fail"
        for _ in range(4):
            await store.admit("k", rows(tokens=10))
        primary.mode = "ok"
        original = primary.settle
        failures = [1]

        async def settle_fails_once(reservation: Reservation, deltas: Sequence[int]) -> None:
            if reservation.partition == "k" and failures[0]:
                failures[0] -= 1
                raise StoreError("lost on the way")
            await original(reservation, deltas)

        primary.settle = settle_fails_once  # type: ignore[method-assign]
        with trio.fail_after(5):
            await breaker_closed(store)
        assert failures == [0]
        assert [s.used for s in await primary.usage("k", rows())] == [4, 40]


async def test_three_nodes_with_local_windows_admit_no_more_than_the_limit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Three guarded nodes on one shared store; it goes down and comes back while
    requests arrive round-robin: over the whole window, no more than rpm = 30 pass."""
    primary = FlakyStore(trio_clock)
    admitted = 0
    async with trio.open_nursery() as nursery:
        stores = [
            GuardedStore(primary, cluster_size=3, node_id=i, fallback=MemoryStore(clock=trio_clock))
            for i in range(3)
        ]
        for store in stores:  # one server, three clients (each runs its sweeper)
            await nursery.start(store.run)
        for step in range(120):
            if step == 15:
                primary.mode = "fail"
            if step == 60:
                primary.mode = "ok"
            admission = await stores[step % 3].admit("k", rows(rpm=30))
            admitted += admission.admitted
            await trio.sleep(0.2)
        assert all(not s.breaker.is_open for s in stores)
        assert [s.used for s in await primary.usage("k", rows())][0] == admitted
        nursery.cancel_scope.cancel()
    assert admitted == 30


# --- through the app ----------------------------------------------------------------------

APP_CONFIG: dict[str, Any] = {
    "store": {"url": "redis://127.0.0.1:1/0"},
    "keys": [{"key": "sk-k", "name": "k", "rpm": 10, "output_tpm": 1000}],
}


@asynccontextmanager
async def app_on(policy: str) -> AsyncIterator[tuple[Any, GuardedStore, FlakyStore]]:
    settings = parse_settings(APP_CONFIG, "<test>", environ={})
    async with guarded(policy) as (store, primary):
        yield create_app(settings, store).test_client(), store, primary


async def chat(client: Any) -> Any:
    return await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={"Authorization": "Bearer sk-k"},
    )


async def test_readyz_reports_the_store_and_healthz_does_not(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with app_on("closed") as (client, store, primary):
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert (await ready.get_json())["store"] == "ok"
        primary.mode = "fail"
        for _ in range(3):
            answer = await chat(client)
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            error = (await answer.get_json())["error"]
            assert error["code"] == "store_unavailable" and error["type"] == "server_error"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        body = await ready.get_json()
        assert body["status"] == "degraded" and body["breaker"] == "open"
        assert body["policy"] == "closed" and "last_error" in body
        assert (await client.get("/healthz")).status_code == 200


async def test_the_app_on_policy_local_and_open_never_answers_5xx(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with app_on("local") as (client, store, primary):
        primary.mode = "hang"
        statuses = [(await chat(client)).status_code for _ in range(12)]
        assert statuses == [200] * 10 + [429] * 2
        usage = await client.get("/v1/usage", headers={"Authorization": "Bearer sk-k"})
        assert (await usage.get_json())["dimensions"]["requests"]["used"] == 10
    async with app_on("open") as (client, store, primary):
        primary.mode = "fail"
        statuses = [(await chat(client)).status_code for _ in range(12)]
        assert statuses == [200] * 12
        assert (await (await client.get("/readyz")).get_json())["fail_open_admissions"] == 12


async def test_a_memory_store_app_is_always_ready() -> None:
    app = create_app(parse_settings({}, "<test>", environ={}), MemoryStore())
    ready = await app.test_client().get("/readyz")
    assert ready.status_code == 200
    assert (await ready.get_json())["store"] == "ok"


# --- config and command line --------------------------------------------------------------


def test_store_settings_parse_and_default() -> None:
    settings = parse_settings({}, "<test>", environ={})
    assert (settings.on_store_error, settings.store_timeout_ms, settings.cluster_size) == (
        "local",
        100,
        None,
    )
    settings = parse_settings(
        {"store": {"on_store_error": "open", "timeout_ms": 250, "cluster_size": 6}},
        "t.toml",
        environ={},
    )
    assert (settings.on_store_error, settings.store_timeout_ms, settings.cluster_size) == (
        "open",
        250,
        6,
    )


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"on_store_error": "ignore"}, "t.toml: store.on_store_error: must be one of local,"),
        ({"on_store_error": 1}, "t.toml: store.on_store_error: must be a non-empty string"),
        ({"timeout_ms": 0}, "t.toml: store.timeout_ms: must be at least 1"),
        ({"timeout_ms": "100"}, "t.toml: store.timeout_ms: must be an integer"),
        ({"cluster_size": 0}, "t.toml: store.cluster_size: must be at least 1"),
    ],
)
def test_bad_store_settings_name_the_file_and_key(store: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"store": store}, "t.toml", environ={})
    assert str(caught.value).startswith(message)


def test_guarded_store_from_settings() -> None:
    assert isinstance(guarded_store(Settings()), MemoryStore)  # memory:// cannot fail
    settings = Settings(store_url="redis://127.0.0.1:1/0", node_id=1, supervised_nodes=3)
    store = guarded_store(settings)
    assert isinstance(store, GuardedStore)
    assert (store.policy, store.timeout, store.cluster_size, store.spread) == (
        "local",
        0.1,
        3,
        True,
    )
    assert store.share(10) == 3
    # A cluster over several machines: the config's size wins, and no remainder.
    store = guarded_store(
        attrs.evolve(settings, cluster_size=4, on_store_error="open", store_timeout_ms=50)
    )
    assert isinstance(store, GuardedStore)
    assert (store.policy, store.timeout, store.cluster_size, store.spread) == (
        "open",
        0.05,
        4,
        False,
    )


def test_cli_flags_reach_the_settings_and_the_nodes(tmp_path: Path) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--on-store-error", "closed", "--cluster-size", "3"])
    settings = serve._settings(args)
    assert (settings.on_store_error, settings.supervised_nodes) == ("closed", 3)
    assert serve._settings(parser.parse_args(["serve"])).on_store_error == "local"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--on-store-error", "maybe"])
    args = parser.parse_args(
        ["serve", "--nodes", "3", "--on-store-error", "open", "--state-dir", str(tmp_path)]
    )
    node_args = serve._cluster(args).node_args
    assert node_args == ("--on-store-error", "open", "--cluster-size", "3")
