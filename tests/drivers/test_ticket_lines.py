"""The window-store contract, ticket lines (the admission queue's order across nodes) and
admissions in turn: on every driver (``harness``, from tests/drivers/conftest.py: memory
on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import trio

from tests.support.window_harness import BUCKET_MS, TEST_TIMEOUT, WINDOW_MS, Harness
from tokenguard.store.window_store import WAITERS_RETRY_SECONDS, TicketHolder, TicketOp

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
