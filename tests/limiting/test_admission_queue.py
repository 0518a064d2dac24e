"""The admission queue on trio (tokenguard/limiting/admission_queue.py), over the memory
store driven by trio's MockClock: waits are virtual, so no test sleeps, and the store
calls a wait makes are counted exactly."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from drivers.memory import MemoryStore
from tokenguard.limiting.admission_queue import AdmissionQueue, QueueClosed, Queued
from tokenguard.limiting.limiter import Cost, Decision, Limiter
from tokenguard.limiting.wait_lines import BATCH, INTERACTIVE, WaitPolicy
from tokenguard.model import ApiKey, Limits, Team, partition_of

WINDOW, BUCKET = 10, 1


class Setup:
    """A memory store on trio's clock, a limiter over it, one key of ``rpm`` requests
    per 10 s window, and a queue; ``calls`` counts the admissions made."""

    def __init__(self, limits: Limits, *, tickets: bool = False) -> None:
        self.store = MemoryStore(clock=trio.current_time)
        self.limiter = Limiter(self.store, window_seconds=WINDOW, bucket_seconds=BUCKET)
        self.key = ApiKey(name="k", digest="a" * 64, limits=limits)
        self.queue = AdmissionQueue(batch_share=0.1, store=self.store if tickets else None)
        self.calls = 0
        self.counters = tuple(r.counter for r in self.limiter.rows(self.key, Cost()))

    async def attempt(self, behind: int | None) -> Decision:
        self.calls += 1
        return await self.limiter.admit(self.key, Cost(), behind=behind)

    async def admit(self, bound: float) -> tuple[Decision, float]:
        queued = await self.queue.admit(
            partition_of(self.key), self.key.key_id, WaitPolicy(bound), self.counters, self.attempt
        )
        return queued.decision, queued.waited


def to_quarter_past_a_second(clock: trio.testing.MockClock) -> float:
    """Jump ``clock`` to a quarter past a whole second (inside a bucket, as a real clock
    would be); that second."""
    now = trio.current_time()
    second = math.floor(now) + 1
    clock.jump(second + 0.25 - now)
    return second


def one_rpm(clock: trio.testing.MockClock) -> Setup:
    """A key of 1 request a window, from a quarter past a second."""
    to_quarter_past_a_second(clock)
    return Setup(Limits(rpm=1))


async def test_a_waiter_calls_the_store_twice_and_is_admitted_when_room_frees(
    autojump_clock: trio.testing.MockClock,
) -> None:
    setup = one_rpm(autojump_clock)
    assert (await setup.admit(15))[0].admitted
    refused = await setup.limiter.usage(setup.key)
    assert refused[0].used == 1
    decision, waited = await setup.admit(15)
    assert decision.admitted
    # The refusal's retry-after, exactly: the first request's bucket leaves the window.
    assert waited == pytest.approx(WINDOW + BUCKET - 0.25, abs=0.002)
    assert setup.calls == 3  # the first admission, then the refusal and the admission


async def test_a_refusal_beyond_the_bound_is_answered_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    setup = one_rpm(autojump_clock)
    await setup.admit(15)
    decision, waited = await setup.admit(5)
    assert not decision.admitted
    assert decision.admission.retry_after == pytest.approx(WINDOW + BUCKET - 0.25, abs=0.002)
    assert waited == 0.0
    assert setup.calls == 2


async def test_a_waiter_consumes_nothing_and_leaves_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    setup = one_rpm(autojump_clock)
    await setup.admit(15)
    with trio.move_on_after(3):
        await setup.admit(15)
    assert setup.queue.lines.waiting() == {}
    assert (await setup.limiter.usage(setup.key))[0].used == 1


async def test_closing_the_queue_answers_its_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    setup = one_rpm(autojump_clock)
    await setup.admit(15)
    closed: list[float] = []

    async def wait() -> None:
        try:
            await setup.admit(15)
        except QueueClosed as exc:
            closed.append(exc.retry_after)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(2)
        setup.queue.close()
    assert len(closed) == 1 and closed[0] >= 1.0
    assert setup.queue.lines.waiting() == {}


@pytest.mark.parametrize("tickets", [False, True], ids=["per node", "store tickets"])
async def test_waiters_are_admitted_in_arrival_order(
    autojump_clock: trio.testing.MockClock, tickets: bool
) -> None:
    to_quarter_past_a_second(autojump_clock)
    setup = Setup(Limits(rpm=2), tickets=tickets)
    order: list[int] = []

    async def one(i: int) -> None:
        decision, _ = await setup.admit(15)
        assert decision.admitted
        order.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
            await trio.sleep(0.01)
    assert order == list(range(6))
    # Two a window: the refusal, then one try at each moment room freed, per waiter
    # (and the ones that found the room taken by the waiter ahead once more).
    assert setup.calls <= 6 + 4 + 2


async def test_a_settlement_that_frees_a_slot_wakes_the_line_before_its_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = to_quarter_past_a_second(autojump_clock)
    setup = Setup(Limits(max_concurrent=1))
    first, _ = await setup.admit(15)
    admitted_at = math.nan

    async def second() -> None:
        nonlocal admitted_at
        decision, _ = await setup.admit(15)
        assert decision.admitted
        admitted_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(0.3)  # a lease refusal's retry is a second
        await setup.limiter.settle(first, output_tokens=0)
        lease_rows = [r.counter for r in first.reservation.rows if r.is_lease]  # type: ignore[union-attr]
        setup.queue.freed(lease_rows)
    assert admitted_at == pytest.approx(start + 0.55, abs=0.002)


@pytest.mark.parametrize("announced", [True, False], ids=["announced", "not announced"])
async def test_a_settlement_at_another_node_wakes_the_line_when_it_is_announced(
    autojump_clock: trio.testing.MockClock, announced: bool
) -> None:
    start = to_quarter_past_a_second(autojump_clock)
    setup = Setup(Limits(max_concurrent=1), tickets=True)
    node_b = AdmissionQueue(batch_share=0.1, store=setup.store)
    first, _ = await setup.admit(15)  # node B's request, say: it holds the one slot
    admitted_at = math.nan

    async def waiter_at_node_a() -> None:
        nonlocal admitted_at
        decision, _ = await setup.admit(15)
        assert decision.admitted
        admitted_at = trio.current_time()

    async with trio.open_nursery() as nodes:
        await nodes.start(setup.queue.run)
        await nodes.start(node_b.run)
        async with trio.open_nursery() as requests:
            requests.start_soon(waiter_at_node_a)
            await trio.sleep(0.3)  # it waits: a lease refusal's retry is a second
            await setup.limiter.settle(first, output_tokens=0)
            if announced:
                lease_rows = [r.counter for r in first.reservation.rows if r.is_lease]  # type: ignore[union-attr]
                node_b.announce_freed(lease_rows)
        nodes.cancel_scope.cancel()
    # Announced, it goes at once; else at its refusal's retry (a second after it).
    expected = start + 0.55 if announced else start + 1.25
    assert admitted_at == pytest.approx(expected, abs=0.002)


async def test_past_max_waiting_a_request_is_answered_as_without_a_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    setup = one_rpm(autojump_clock)
    await setup.admit(15)
    outcomes: list[tuple[bool, float]] = []

    async def one() -> None:
        queued = await setup.queue.admit(
            partition_of(setup.key),
            setup.key.key_id,
            WaitPolicy(15, max_waiting=1),
            setup.counters,
            setup.attempt,
        )
        outcomes.append((queued.decision.admitted, queued.waited))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.sleep(1)
        nursery.start_soon(one)
    assert outcomes[0] == (False, 0.0)  # the second waiter: its one try, refused
    assert outcomes[1][0] and outcomes[1][1] > 0  # the first: admitted once room freed


async def test_a_fresh_request_at_another_node_does_not_take_the_room_a_waiter_waits_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    to_quarter_past_a_second(autojump_clock)
    setup = Setup(Limits(max_concurrent=1), tickets=True)
    node_b = AdmissionQueue(batch_share=0.1, store=setup.store)
    first, _ = await setup.admit(15)  # holds the one slot
    admitted: list[str] = []

    async def request(queue: AdmissionQueue, name: str) -> None:
        queued = await queue.admit(
            partition_of(setup.key), setup.key.key_id, WaitPolicy(15), setup.counters, setup.attempt
        )
        assert queued.decision.admitted
        admitted.append(name)
        await trio.sleep(0.5)
        await setup.limiter.settle(queued.decision, output_tokens=0)

    async with trio.open_nursery() as nodes:
        await nodes.start(setup.queue.run)
        await nodes.start(node_b.run)
        async with trio.open_nursery() as requests:
            requests.start_soon(request, setup.queue, "waiter at node A")
            await trio.sleep(0.3)  # it waits: a lease refusal's retry is a second
            await setup.limiter.settle(first, output_tokens=0)  # node A is not told
            requests.start_soon(request, node_b, "later request at node B")
        nodes.cancel_scope.cancel()
    assert admitted == ["waiter at node A", "later request at node B"]


async def test_past_max_waiting_on_other_nodes_a_request_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    setup = one_rpm(autojump_clock)
    setup.queue = AdmissionQueue(batch_share=0.1, store=setup.store)
    node_b = AdmissionQueue(batch_share=0.1, store=setup.store)
    policy = WaitPolicy(15, max_waiting=2)
    await setup.admit(15)

    async def admit(queue: AdmissionQueue) -> Queued:
        return await queue.admit(
            partition_of(setup.key), setup.key.key_id, policy, setup.counters, setup.attempt
        )

    async def waiter() -> None:
        await admit(setup.queue)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert setup.queue.lines.waiting() == {setup.key.key_id: 2}
        asked = trio.current_time()
        third = await admit(node_b)
        assert trio.current_time() == asked  # at once
        assert not third.decision.admitted and third.waited == 0.0
        assert third.decision.admission.retry_after is not None
        assert node_b.lines.waiting() == {}
        nursery.cancel_scope.cancel()


class TwoNodesOfATeam:
    """Two nodes (queues) on one memory store, over a team of one request in flight
    (``max_concurrent = 1``) with an interactive key and a batch key; ``admitted``
    lists the keys' names in the order their requests were admitted."""

    def __init__(self, batch_share: float) -> None:
        team = Team("t", Limits(max_concurrent=1))
        self.interactive = ApiKey(name="i", digest="a" * 64, limits=Limits(), team=team)
        self.batch = ApiKey(name="b", digest="b" * 64, limits=Limits(), team=team)
        self.store = MemoryStore(clock=trio.current_time)
        self.limiter = Limiter(self.store, window_seconds=WINDOW, bucket_seconds=BUCKET)
        self.nodes = [AdmissionQueue(batch_share=batch_share, store=self.store) for _ in "ab"]
        self.admitted: list[str] = []

    async def request(self, node: int, key: ApiKey) -> None:
        """One request of ``key`` at ``node``, that may wait 15 s; it holds its slot
        half a second once admitted."""

        async def attempt(behind: int | None) -> Decision:
            return await self.limiter.admit(key, Cost(), behind=behind)

        policy = WaitPolicy(15, BATCH if key is self.batch else INTERACTIVE)
        counters = tuple(r.counter for r in self.limiter.rows(key, Cost()))
        queue = self.nodes[node]
        queued = await queue.admit(partition_of(key), key.key_id, policy, counters, attempt)
        assert queued.decision.admitted
        self.admitted.append(key.name)
        await trio.sleep(0.5)
        await self.limiter.settle(queued.decision, output_tokens=0)

    async def run(self, *requests: tuple[int, ApiKey]) -> None:
        """The slot taken, then ``requests`` (node, key) arriving 0.1 s apart and
        waiting; then the slot freed, no node told; until every request is admitted."""
        first = await self.limiter.admit(self.interactive, Cost())
        async with trio.open_nursery() as nodes:
            for queue in self.nodes:
                await nodes.start(queue.run)
            async with trio.open_nursery() as waiting:
                for node, key in requests:
                    waiting.start_soon(self.request, node, key)
                    await trio.sleep(0.1)  # (a lease refusal's retry is a second)
                await self.limiter.settle(first, output_tokens=0)
            nodes.cancel_scope.cancel()


async def test_an_interactive_waiter_goes_before_an_earlier_batch_one_at_another_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    to_quarter_past_a_second(autojump_clock)
    team = TwoNodesOfATeam(batch_share=0.1)
    await team.run((0, team.batch), (1, team.interactive))
    assert team.admitted == ["i", "b"]


async def test_a_batch_waiter_gets_its_share_before_later_interactive_ones_at_another_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    to_quarter_past_a_second(autojump_clock)
    team = TwoNodesOfATeam(batch_share=0.5)  # one interactive admission, then batch
    await team.run((0, team.batch), *[(1, team.interactive)] * 3)
    assert team.admitted == ["i", "b", "i", "i"]
