"""What idle end users cost the store: 10,000 distinct users of one key, through the
limiter, on a real redis-server and on the memory store. Their per-user buckets live
only as long as their windows; the memory they take is within the bound documented in
docs/design.md ("Per-end-user limits"), and it drains once the windows pass.

On Redis the window is long enough (60 s in 5 s buckets) that no bucket can leave it
while the 10,000 admissions are still being made on a busy machine; draining is shown
by every counter's TTL, which Redis enforces: none outlives its window plus a bucket.
On the memory store, an injected clock moves past the window and the sweep empties it."""

from __future__ import annotations

from typing import Any

import trio

from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.model import ApiKey, Limits, digest_of, user_digest
from tokenguard.store.window_store import open_store

USERS = 10_000
# The documented bound: store memory per idle end user with one per-user limit (Redis:
# one hash of a bucket and its summary, with its TTL), bytes.
BYTES_PER_USER = 400
WINDOW_S, BUCKET_S = 60, 5  # on Redis
KEY = ApiKey("app", digest_of("sk-app"), Limits(rpm=1_000_000, per_user=Limits(rpm=5)))


async def admit_users(limiter: Limiter, users: range) -> int:
    admitted = 0

    async def batch(part: range) -> None:
        nonlocal admitted
        for i in part:
            decision = await limiter.admit(KEY, Cost(), user=user_digest(f"user-{i}"))
            admitted += decision.admitted

    async with trio.open_nursery() as nursery:
        for start in range(0, len(users), len(users) // 20):
            nursery.start_soon(batch, users[start : start + len(users) // 20])
    return admitted


def every_ttl_ms(server: Any) -> list[int]:
    """The PTTL of every key (-1: none; -2: gone meanwhile)."""
    with server.client() as client:
        names = list(client.scan_iter(count=1000))
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.pttl(name)
        return pipe.execute()


def info(server: Any, field: str) -> int:
    with server.client() as client:
        return int(client.info("memory")[field]) if field != "keys" else client.dbsize()


async def test_ten_thousand_idle_users_stay_within_the_bound_and_drain_on_redis(
    extra_redis_server: Any,
) -> None:
    with trio.fail_after(120):
        async with open_store(RedisStore.from_url(extra_redis_server.url)) as store:
            limiter = Limiter(store, window_seconds=WINDOW_S, bucket_seconds=BUCKET_S)
            # Warm-up: the key's own counter, the script, the connections.
            assert (await limiter.admit(KEY, Cost(), user=user_digest("warm"))).admitted
            before = await trio.to_thread.run_sync(info, extra_redis_server, "used_memory")
            keys_before = await trio.to_thread.run_sync(info, extra_redis_server, "keys")
            assert await admit_users(limiter, range(USERS)) == USERS
            grown = await trio.to_thread.run_sync(info, extra_redis_server, "used_memory")
            keys = await trio.to_thread.run_sync(info, extra_redis_server, "keys")
            assert keys - keys_before == USERS  # one counter per user
            per_user = (grown - before) / USERS
            print(f"redis: {per_user:.0f} bytes per idle end user")  # noqa: T201
            assert per_user <= BYTES_PER_USER
            ttls = await trio.to_thread.run_sync(every_ttl_ms, extra_redis_server)
    assert len(ttls) == keys
    assert all(0 < ttl <= (WINDOW_S + BUCKET_S) * 1000 for ttl in ttls)


async def test_ten_thousand_idle_users_drain_from_the_memory_store() -> None:
    now = [1_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    limiter = Limiter(store, window_seconds=2, bucket_seconds=1)
    assert await admit_users(limiter, range(USERS)) == USERS
    assert store.sweep() == USERS + 1  # each user's counter, and the key's
    now[0] += 3.0  # past every bucket's window
    assert store.sweep() == 0
