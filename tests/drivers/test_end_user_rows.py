"""The window-store contract, per-end-user rows: their own counters in the key's partition,
within the key's: on every driver (``harness``, from tests/drivers/conftest.py: memory
on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import attrs
import pytest
import trio

from drivers.redis import RedisStore
from tests.support.window_harness import MARGIN_MS, TEST_TIMEOUT, Harness, leaves
from tokenguard.model import user_digest
from tokenguard.store.rows import Row

# --- per-end-user rows ------------------------------------------------------------------


def user_rows(harness: Harness, user: str, *, key_limit: int = 100) -> list[Row]:
    """An admission of a key in a team with per-user limits, as the limiter builds it:
    the key's and the team's rows, then the end user's under each (by digest)."""
    digest = user_digest(user)
    return [
        harness.row(limit=key_limit, scope="key:a"),
        harness.row(limit=100, scope="team:t"),
        harness.row(limit=2, scope=f"key:a:user:{digest}"),
        harness.row(limit=100, amount=7, dimension="total_tokens", scope=f"key:a:user:{digest}"),
        harness.row(limit=3, scope=f"team:t:user:{digest}"),
    ]


async def test_each_end_user_has_their_own_rows_in_the_keys_partition(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        alice, bob = user_rows(harness, "alice"), user_rows(harness, "bob")
        outcomes = [(await harness.admit(alice, partition="team:t")).value for _ in range(3)]
        assert [a.admitted for a in outcomes] == [True, True, False]
        refused = outcomes[2]
        assert [s.row.scope for s in refused.refusing] == [alice[2].scope]
        # Alice's refusal consumed nothing; Bob has his own rows, the key and team are shared.
        admitted = (await harness.admit(bob, partition="team:t")).value
        assert admitted.admitted
        assert [s.used for s in admitted.states] == [3, 3, 1, 7, 1]
        assert [s.used for s in (await harness.usage(alice, partition="team:t")).value] == [
            3,
            3,
            2,
            14,
            2,
        ]


async def test_a_user_is_refused_by_the_key_row_when_the_key_is_out(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        assert (await harness.admit(user_rows(harness, "alice", key_limit=1))).value.admitted
        refused = (await harness.admit(user_rows(harness, "bob", key_limit=1))).value
        assert not refused.admitted
        assert [s.row.scope for s in refused.refusing] == ["key:a"]
        bob = await harness.usage(user_rows(harness, "bob", key_limit=1))
        assert [s.used for s in bob.value][2:] == [0, 0, 0]


async def test_concurrent_requests_of_one_user_admit_exactly_their_limit(
    harness: Harness,
) -> None:
    """60 tasks at once, 30 for each of two users with a per-user limit of 2: exactly 2
    each get in, whatever the interleaving."""
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        outcomes: dict[str, list[bool]] = {"alice": [], "bob": []}

        async def one(user: str) -> None:
            admission = await harness.store.admit("team:t", user_rows(harness, user))
            outcomes[user].append(admission.admitted)

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                for user in outcomes:
                    nursery.start_soon(one, user)
        assert {user: got.count(True) for user, got in outcomes.items()} == {
            "alice": 2,
            "bob": 2,
        }


async def test_idle_end_users_leave_nothing_behind(harness: Harness) -> None:
    """Buckets are created by a user's first request and leave with their window."""
    with trio.fail_after(TEST_TIMEOUT):
        await harness.align()
        last = 0
        for i in range(20):
            rows = [harness.row(limit=2, scope=f"key:a:user:{user_digest(str(i))}")]
            admission = (await harness.admit(rows)).value
            assert admission.admitted
            last = max(last, *admission.reservation.buckets)
        assert await harness.live_counters() == 20
        await harness.sleep_until(leaves(last) + (0 if harness.exact else MARGIN_MS))
        assert await harness.live_counters() == 0


async def test_per_user_rows_are_one_round_trip_with_the_others(harness: Harness) -> None:
    if harness.exact:
        pytest.skip("the memory store makes no round trips")
    store = harness.store
    assert isinstance(store, RedisStore)
    with trio.fail_after(TEST_TIMEOUT):
        rows = user_rows(harness, "alice", key_limit=100)
        rows[2] = attrs.evolve(rows[2], limit=100)
        rows[4] = attrs.evolve(rows[4], limit=100)
        assert (await harness.admit(rows, partition="team:t")).value.admitted  # warm
        calls, trips = store.calls, store.round_trips
        for _ in range(5):
            assert (await store.admit("team:t", rows)).admitted
        assert (store.calls - calls, store.round_trips - trips) == (5, 5)
