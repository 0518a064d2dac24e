"""The background settler (tokenguard/settler.py) with a real limiter on the memory
store, and through a real node: refunds are settled after the reply, charges at once,
a full queue falls back to settling at once, and a shutdown settles everything that
was accepted. Every test is bounded by ``trio.fail_after``."""

from __future__ import annotations

import attrs
import httpx
import pytest
import trio

from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tests.support.usage_feed import chat, running_node, settings_for
from tokenguard.limiting.limiter import Cost, Decision, Limiter
from tokenguard.limiting.settler import Settler, is_refund
from tokenguard.store.rows import Admission, Lease, Reservation
from tokenguard.store.window_store import open_store

TEST_TIMEOUT = 20.0


async def output_used(limiter: Limiter, decision: Decision) -> int:
    states = await limiter.usage(decision.key)
    (output,) = [s for s in states if s.row.dimension == "output_tokens"]
    return output.used


async def test_refunds_are_settled_in_the_background_and_drained_at_shutdown() -> None:
    key = settings_for().keys[0]
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(MemoryStore()) as store:
            limiter = Limiter(store, window_seconds=60, bucket_seconds=5)
            settled: list[int] = []
            gate = trio.Event()

            async def settle(
                decision: Decision, output: int, prompt: int | None, cached: int
            ) -> None:
                await gate.wait()  # held until the test lets the settlements through
                await limiter.settle(decision, output_tokens=output, input_tokens=prompt)
                settled.append(output)

            settler = Settler(settle, limit=3, tasks=2)
            decisions = [await limiter.admit(key, Cost(1, 10, 50)) for _ in range(5)]
            assert not settler.defer(decisions[0], 20, None)  # not running yet
            async with trio.open_nursery() as nursery:
                await nursery.start(settler.run)
                # A charge (more output than reserved, or more input) is never deferred.
                assert not settler.defer(decisions[0], 51, None)
                assert not settler.defer(decisions[0], 20, 11)
                for decision in decisions:
                    assert settler.defer(decision, 20, None)
                    await trio.testing.wait_all_tasks_blocked()
                # Two are held by the tasks, three queued: the queue is full.
                assert settler.queued == 3
                assert not settler.defer(decisions[0], 20, None)
                assert await output_used(limiter, decisions[0]) == 5 * 50
                # Shutdown (a cancellation) while all five are held: none is lost.
                nursery.cancel_scope.cancel()
                gate.set()
            assert settled == [20] * 5
            assert await output_used(limiter, decisions[0]) == 5 * 20
            assert settler.lost == 0
            assert not settler.defer(decisions[0], 20, None)  # stopped: settle yourself


def test_only_refunds_that_release_no_lease_are_deferred() -> None:
    key = settings_for().keys[0]
    reservation = Reservation("p", (), ())
    admission = Admission(admitted=True, states=(), reservation=reservation)
    decision = Decision(key=key, cost=Cost(1, 100, 64), admission=admission)
    assert is_refund(decision, 64, None)
    assert is_refund(decision, 0, 100)
    assert is_refund(decision, 10, 90)
    assert not is_refund(decision, 65, None)
    assert not is_refund(decision, 10, 101)
    # A max_concurrent lease is released at once: the next request may need it.
    leased = attrs.evolve(reservation, lease=Lease("p", "L1", ()))
    admission = attrs.evolve(admission, reservation=leased)
    assert not is_refund(attrs.evolve(decision, admission=admission), 10, None)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_node_settles_every_reply_and_the_usage_shows_it(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Through a real node: after the replies, the window holds what they produced, not
    their reservations. On the memory store (which never waits) each reply is settled
    before it is sent, so the usage is exact at once; on Redis the settler settles the
    refunds after the replies, within moments."""
    store = (
        MemoryStore()
        if kind == "memory"
        else RedisStore.from_url(request.getfixturevalue("redis_url"))
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(), store) as node, httpx.AsyncClient() as client:
            produced = 0
            for _ in range(20):
                response = await chat(client, node.url, "sk-alpha", max_tokens=60)
                assert response.status_code == 200
                produced += response.json()["usage"]["completion_tokens"]
            assert produced < 20 * 60

            async def output_used() -> int:
                usage = await client.get(
                    f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-alpha"}
                )
                assert usage.status_code == 200
                return usage.json()["dimensions"]["output_tokens"]["used"]

            if kind == "memory":
                assert await output_used() == produced
            else:
                while (used := await output_used()) != produced:
                    assert produced <= used <= 20 * 60  # refunds only ever lower it
                    await trio.sleep(0.01)
