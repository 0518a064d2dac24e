"""The guarded store against a failing or hung store: each call's deadline, the breaker
that opens after three failures in a row and probes once a second, records while it is
open, a store down at start. The store behind the guard is a memory store made to fail,
hang or refuse to start (tests/support/guarded_memory.py); trio's clock jumps over every
wait (``autojump_clock``), so the timings asserted here are the code's, not the
machine's.
"""

from __future__ import annotations

import logging

import pytest
import trio

from tests.support.guarded_memory import breaker_closed, guarded, rows
from tokenguard.log_throttle import LogThrottle
from tokenguard.store.breaker import Breaker
from tokenguard.store.guarded import TICKET_SECONDS
from tokenguard.store.local_windows import LocalReservation
from tokenguard.store.rows import Reservation
from tokenguard.store.window_store import StoreError, TicketHolder


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
