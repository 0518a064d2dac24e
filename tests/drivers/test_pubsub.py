"""The window-store contract, publish/subscribe: order, other stores on the same server,
separate channels, slow subscribers, a Redis restart: on every driver (``harness``, from
tests/drivers/conftest.py: memory on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.support.window_harness import TEST_TIMEOUT, Harness
from tokenguard.store.window_store import StoreError, open_store

# --- publish/subscribe -----------------------------------------------------------------


async def receive_n(messages: AsyncIterator[bytes], n: int) -> list[bytes]:
    received = []
    async for message in messages:
        received.append(message)
        if len(received) == n:
            break
    return received


async def test_published_messages_reach_every_subscriber_in_order(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        sent = [f"m{i}".encode() for i in range(50)]
        async with (
            harness.store.subscribe("chan") as first,
            harness.store.subscribe("chan") as second,
        ):
            await harness.store.publish("chan", sent[:1])
            await harness.store.publish("chan", sent[1:])
            assert await receive_n(first, 50) == sent
            assert await receive_n(second, 50) == sent


async def test_another_store_on_the_same_server_receives_them(harness: Harness) -> None:
    """What one node publishes reaches a subscriber on another node (Redis drivers: a
    second store object, its own connections; memory has no other node)."""
    if harness.exact:
        pytest.skip("the memory store has no other node")
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(harness.driver.make_store()) as other:
            async with other.subscribe("chan") as messages:
                await harness.store.publish("chan", [b"a", b"b", b"c"])
                assert await receive_n(messages, 3) == [b"a", b"b", b"c"]


async def test_channels_are_separate_and_publishing_to_nobody_is_fine(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.store.publish("nobody", [b"lost"])
        await harness.store.publish("nobody", [])
        async with harness.store.subscribe("a") as a_messages:
            await harness.store.publish("b", [b"for b"])
            await harness.store.publish("a", [b"for a"])
            assert await receive_n(a_messages, 1) == [b"for a"]
        # Left: publishing to a channel nobody listens to any more still works.
        await harness.store.publish("a", [b"again"])


async def test_a_subscriber_that_does_not_read_loses_messages_never_blocks(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full subscription drops new messages: the publisher never waits for it, and
    the subscription works again once it is read."""
    import drivers.memory
    import drivers.redis.pubsub

    monkeypatch.setattr(drivers.memory, "SUBSCRIPTION_BUFFER", 10)
    monkeypatch.setattr(drivers.redis.pubsub, "SUBSCRIPTION_BUFFER", 10)
    with trio.fail_after(TEST_TIMEOUT):
        async with harness.store.subscribe("chan") as messages:
            for i in range(100):
                await harness.store.publish("chan", [b"%d" % i])
            # Long enough for the Redis listener to have taken every message.
            await trio.sleep(0 if harness.exact else 1.0)
            assert await receive_n(messages, 10) == [b"%d" % i for i in range(10)]
            dropped = getattr(harness.store, "dropped", None)
            if dropped is None:
                dropped = harness.store.pubsub_dropped  # type: ignore[attr-defined]
            assert dropped == 90
            await harness.store.publish("chan", [b"fresh"])
            assert await receive_n(messages, 1) == [b"fresh"]


async def test_a_redis_subscription_survives_a_server_restart(extra_redis_server: Any) -> None:
    """Redis restarted: the subscription is re-established by itself and delivers
    messages published after it is back."""
    with trio.fail_after(TEST_TIMEOUT):
        url = extra_redis_server.url
        async with open_store(url) as publisher, open_store(url) as subscriber:
            async with subscriber.subscribe("chan") as messages:
                await publisher.publish("chan", [b"before"])
                assert await receive_n(messages, 1) == [b"before"]
                await trio.to_thread.run_sync(extra_redis_server.stop)
                await trio.to_thread.run_sync(extra_redis_server.start)
                # Until the subscription is back, messages are lost: publish until one
                # arrives (the publisher's own pool reconnects on its next command).
                async with trio.open_nursery() as nursery:

                    async def keep_publishing() -> None:
                        while True:
                            with contextlib.suppress(StoreError):
                                await publisher.publish("chan", [b"after"])
                            await trio.sleep(0.05)

                    nursery.start_soon(keep_publishing)
                    assert await receive_n(messages, 1) == [b"after"]
                    nursery.cancel_scope.cancel()
