"""The guarded store's deadlines judge the store, not the node: a queue the store keeps
answering, a pipeline a stalled node sent late, a node stall or a GC pass while calls
wait, replies in at the deadline or during a stall, a hung store's exact cost, the hard
cap.

The store behind the guard is a memory store (tests/support/guarded_memory.py): a
:class:`~tests.support.guarded_memory.FlakyStore` that hangs or answers one call at a
time, or a :class:`~tests.support.guarded_memory.PipelinedStore` played the way the
Redis driver works. trio's clock jumps over every wait (``autojump_clock``), so the
timings asserted here are the code's, not the machine's.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from tests.support.guarded_memory import burst, guarded, pipelined, rows, stall
from tokenguard.store.rows import Row, RowState
from tokenguard.store.stalls import PROBE_PERIOD, StallMeter
from tokenguard.store.window_store import StoreError


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
