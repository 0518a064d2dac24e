"""Publish/subscribe on Redis pub/sub, kept off the pipelines (:class:`_PubSub`, mixed
into :class:`~drivers.redis.store.RedisStore`)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import redis
import redis.exceptions
import trio
from redis.cluster import RedisCluster

from drivers.redis.urls import RedisTarget
from drivers.redis.wire import _REDIS_ERRORS, PUBSUB_READ_BATCH, _store_error, _Wire, pack_command
from tokenguard.store.window_store import StoreError

if TYPE_CHECKING:
    from drivers.redis.store import RedisStore

log = logging.getLogger(__name__)

# Pub/sub: how long a listener thread waits for a message before it returns to trio
# (the longest a cancelled subscription waits for its thread), how many messages one
# thread hop takes at most, what a subscription buffers, and the re-subscribe backoff.
PUBSUB_POLL = 0.2
SUBSCRIPTION_BUFFER = 4096
RESUBSCRIBE_BACKOFF = (0.05, 2.0)


class _PubSub:
    """The store's publishing connection and subscriptions."""

    # -- publish/subscribe (not on the pipelines: connections and threads of their own)

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        client = self._client
        if client is None or not self._running:
            raise StoreError(f"store {self.url} is not running (use it inside run())")
        if not messages:
            return
        wire = self._publish_wire
        if wire is not None:
            name = channel.encode()
            packed = [pack_command(b"PUBLISH", name, message) for message in messages]
            async with self._publish_lock:  # one pipeline at a time: messages keep order
                replies = await wire.roundtrip(packed)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise _store_error(reply) from reply
            return
        try:
            await trio.to_thread.run_sync(
                _publish, client, channel, list(messages), limiter=self._publish_thread
            )
        except _REDIS_ERRORS as exc:
            raise _store_error(exc) from exc

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        if not self._running:
            raise StoreError(f"store {self.url} is not running (use it inside run())")
        send, receive = trio.open_memory_channel[bytes](SUBSCRIPTION_BUFFER)
        # Standalone Redis without TLS: its own connection on trio's sockets (no
        # thread, no polling); otherwise redis-py's PubSub in a worker thread of its own.
        link: _Subscription = (
            _WireSubscription(self.target, channel)
            if self._native
            else _ThreadSubscription(self, channel)
        )
        try:
            await link.open(refresh=False)
        except (*_REDIS_ERRORS, StoreError) as exc:
            await link.close()
            raise StoreError(f"cannot subscribe to {channel!r} on {self.url}: {exc}") from exc
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, channel, link, send)
            try:
                async with receive:
                    yield receive
            finally:
                nursery.cancel_scope.cancel()

    def _open_pubsub(self, channel: str, refresh: bool) -> redis.client.PubSub:
        """Subscribe on a connection of its own; return once Redis confirmed (so every
        message published from then on is delivered). Blocking: in a worker thread."""
        client = self._client
        if client is None:
            raise StoreError(f"store {self.url} is closed")
        if isinstance(client, RedisCluster):
            # A cluster forwards PUBLISH to every node: any node serves the subscription.
            if refresh:
                client.nodes_manager.initialize()
            node = client.nodes_manager.get_node_from_slot(client.keyslot(channel))
            client = client.get_redis_connection(node)
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(channel)
            deadline = time.monotonic() + self.target.timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise redis.exceptions.TimeoutError(f"no confirmation of SUBSCRIBE {channel}")
                message = pubsub.get_message(timeout=remaining)
                if message is not None and message["type"] == "subscribe":
                    return pubsub
        except BaseException:
            pubsub.close()
            raise

    async def _listen(
        self, channel: str, link: _Subscription, send: trio.MemorySendChannel[bytes]
    ) -> None:
        """Hand the subscription's messages to ``send`` until cancelled; re-subscribe
        (with backoff) whenever the connection is lost. Closes the connection at the end."""
        backoff = RESUBSCRIBE_BACKOFF[0]
        connected = True
        try:
            while True:
                if not connected:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, RESUBSCRIBE_BACKOFF[1])
                    try:
                        await link.open(refresh=True)
                    except (*_REDIS_ERRORS, StoreError) as exc:
                        log.debug("re-subscribing to %s failed: %s", channel, exc)
                        await link.close()
                        continue
                    connected = True
                    log.info("subscription to %s on %s re-established", channel, self.url)
                    backoff = RESUBSCRIBE_BACKOFF[0]
                try:
                    messages = await link.read()
                except _REDIS_ERRORS as exc:
                    log.warning("subscription to %s on %s lost: %s", channel, self.url, exc)
                    await link.close()
                    connected = False
                    continue
                for message in messages:
                    try:
                        send.send_nowait(message)
                    except trio.WouldBlock:
                        self.pubsub_dropped += 1  # the subscriber is behind: never wait
                    except trio.BrokenResourceError:
                        return  # the subscriber left (we are being cancelled)
        finally:
            await link.close()


class _Subscription(Protocol):
    """One subscription's connection, as :meth:`RedisStore._listen` drives it. Errors
    are redis-py's (or :class:`StoreError` for a closed store)."""

    async def open(self, *, refresh: bool) -> None:
        """Connect and subscribe; return once Redis confirmed. ``refresh``: the
        connection was lost, look the server up again (a cluster's topology)."""

    async def read(self) -> list[bytes]:
        """The next messages' data, oldest first (none after a quiet poll)."""

    async def close(self) -> None:
        """Close the connection, if open (shielded: also when cancelled)."""


class _ThreadSubscription:
    """redis-py's PubSub on a connection and a worker thread of its own (Sentinel,
    Cluster, TLS), polled ``PUBSUB_POLL`` seconds at a time."""

    def __init__(self, store: RedisStore, channel: str) -> None:
        self.store, self.channel = store, channel
        self.thread = trio.CapacityLimiter(1)
        self.pubsub: redis.client.PubSub | None = None

    async def open(self, *, refresh: bool) -> None:
        self.pubsub = await trio.to_thread.run_sync(
            self.store._open_pubsub, self.channel, refresh, limiter=self.thread
        )

    async def read(self) -> list[bytes]:
        assert self.pubsub is not None
        return await trio.to_thread.run_sync(_read_messages, self.pubsub, limiter=self.thread)

    async def close(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pubsub.close, limiter=self.thread)


class _WireSubscription:
    """A subscription on the driver's own connection (standalone Redis, no TLS)."""

    def __init__(self, target: RedisTarget, channel: str) -> None:
        self.target, self.channel = target, channel
        self.wire: _Wire | None = None

    async def open(self, *, refresh: bool) -> None:
        self.wire = _Wire(self.target)
        await self.wire.subscribe(self.channel.encode())

    async def read(self) -> list[bytes]:
        assert self.wire is not None
        return await self.wire.pushed()

    async def close(self) -> None:
        wire, self.wire = self.wire, None
        if wire is not None:
            await wire.close()  # (a forceful close: it never blocks)


def _publish(client: redis.Redis | RedisCluster, channel: str, messages: list[bytes]) -> None:
    """PUBLISH each message, in order, in one round trip where the client allows."""
    if len(messages) == 1 or isinstance(client, RedisCluster):
        for message in messages:
            client.publish(channel, message)
        return
    with client.pipeline(transaction=False) as pipe:
        for message in messages:
            pipe.publish(channel, message)
        pipe.execute()


def _read_messages(pubsub: redis.client.PubSub) -> list[bytes]:
    """Wait up to ``PUBSUB_POLL`` s for a message, then take what else is already in."""
    messages: list[bytes] = []
    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_POLL)
    while message is not None:
        if message["type"] == "message":
            messages.append(message["data"])
        if len(messages) >= PUBSUB_READ_BATCH:
            break
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
    return messages
