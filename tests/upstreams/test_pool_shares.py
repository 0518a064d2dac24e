"""Each key's share of a node's upstream pool (tokenguard/pool_shares.py), on trio's
MockClock: waits are virtual, so no test sleeps."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tokenguard.config.settings import UpstreamSettings
from tokenguard.upstreams.pool_shares import PoolShares, ShareTimeout


async def test_a_key_holds_at_most_its_slots_and_waits_for_its_own_to_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shares = PoolShares(2)
    first = await shares.acquire("alice", within=5)
    await shares.acquire("alice", within=5)
    assert shares.held("alice") == 2
    got = []

    async def third() -> None:
        got.append(await shares.acquire("alice", within=5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.sleep(1)
        assert got == []  # waiting for one of alice's own
        first.release()
    assert len(got) == 1 and shares.held("alice") == 2


async def test_another_keys_share_is_its_own(autojump_clock: trio.testing.MockClock) -> None:
    shares = PoolShares(1)
    await shares.acquire("alice", within=5)
    with trio.fail_after(0.001):  # no wait at all: bob's slot is free
        bob = await shares.acquire("bob", within=5)
    assert (shares.held("alice"), shares.held("bob")) == (1, 1)
    bob.release()


async def test_a_full_share_times_out_and_leaves_nothing_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shares = PoolShares(1)
    slot = await shares.acquire("alice", within=5)
    started = trio.current_time()
    with pytest.raises(ShareTimeout):
        await shares.acquire("alice", within=2)
    assert trio.current_time() - started == pytest.approx(2)
    assert shares.held("alice") == 1
    slot.release()
    slot.release()  # idempotent
    assert shares.held("alice") == 0
    assert shares._keys == {}  # a key no request holds or waits for costs no memory


async def test_a_cancelled_wait_gives_its_place_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shares = PoolShares(1)
    slot = await shares.acquire("alice", within=5)
    with trio.move_on_after(1):
        await shares.acquire("alice", within=5)
    slot.release()
    assert shares._keys == {}
    again = await shares.acquire("alice", within=5)
    assert shares.held("alice") == 1
    again.release()


@pytest.mark.parametrize(
    ("max_connections", "key_share", "per_key"),
    [(100, 0.25, 25), (2, 0.25, 1), (1, 0.25, 1), (10, 1.0, 10), (7, 0.5, 3)],
)
def test_a_keys_connections_are_its_share_of_the_pool_and_at_least_one(
    max_connections: int, key_share: float, per_key: int
) -> None:
    settings = UpstreamSettings(max_connections=max_connections, key_share=key_share)
    assert settings.connections_per_key == per_key
