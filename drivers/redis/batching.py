"""Auto-pipelining: script calls queued by many tasks go out together, a share per
flusher, refunds riding along with the next call (:class:`_Batching`, mixed into
:class:`~drivers.redis.store.RedisStore`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
import redis.exceptions
import trio
from redis.cluster import RedisCluster

from drivers.redis.scripts import SETTLE, LuaScript
from drivers.redis.wire import (
    _CONNECTION_LOST,
    _REDIS_ERRORS,
    _store_error,
    _Wire,
    exchange,
    pack_evalsha,
)
from tokenguard.store.window_store import StoreError

log = logging.getLogger(__name__)

# A refund waits at most this long (s) for another call's pipeline to ride with.
REFUND_DELAY = 0.005
# Calls pending at once up to which one flusher sends them all in one pipeline.
SPLIT_ABOVE = 16


class _Call:
    """One script call: what to send, the caller's task parked until ``reply`` is set
    (``None`` once the caller has been cancelled), and the reply or its exception."""

    __slots__ = ("script", "keys", "argv", "task", "reply")

    def __init__(self, script: LuaScript, keys: list[str], argv: str | bytes) -> None:
        self.script = script
        self.keys = keys
        self.argv = argv
        self.task: trio.lowlevel.Task | None = None
        self.reply: Any = None


class _Batching:
    """The store's pipelines: its calls' queue, flushers and retries."""

    def _count(self, *, round_trips: int) -> None:
        with self._count_lock:
            self.round_trips += round_trips

    # -- coalescing

    async def _call(
        self, script: LuaScript, keys: list[str], argv: str | bytes, *, lazy: bool = False
    ) -> Any:
        """Queue one script call for the next pipeline; park until its reply is in.

        A ``lazy`` call (a refund) does not start a pipeline itself: it rides with the
        next call that does, or goes after at most ``REFUND_DELAY`` seconds, or as soon
        as ``SPLIT_ABOVE`` calls are waiting. Under traffic, a request's refund then
        costs no round trip of its own.
        """
        if not self._running:
            raise StoreError(f"store {self.url} is not running (use it inside run())")
        call = _Call(script, keys, argv)
        call.task = trio.lowlevel.current_task()
        self._pending.append(call)
        self.calls += 1
        if lazy and len(self._pending) < SPLIT_ABOVE:
            self._refund_queued.set()
        else:  # (enough refunds to fill a pipeline of their own go at once too)
            self._wakeup.set()

        def abort(_: object) -> trio.lowlevel.Abort:
            # Cancelled: the call may already be on the wire; its reply is dropped.
            call.task = None
            if call in self._pending:
                self._pending.remove(call)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        reply = call.reply
        if isinstance(reply, StoreError):
            raise StoreError(str(reply)) from reply.__cause__
        if isinstance(reply, BaseException):
            raise _store_error(reply) from reply
        return reply

    @staticmethod
    def _answer(calls: Sequence[_Call], replies: Sequence[Any]) -> None:
        for call, reply in zip(calls, replies, strict=True):
            call.reply = reply
            if call.task is not None:
                trio.lowlevel.reschedule(call.task)
                call.task = None

    async def _flush_forever(self) -> None:
        """Take a share of the pending calls, send them as one pipeline; repeat.

        The share is the pending calls divided among the flushers not busy, so a burst
        goes out as that many pipelines at once: Redis runs one while Python packs the
        next and hands out the replies of the last.
        """
        wire = _Wire(self.target, self._traffic) if self._native else None
        try:
            await self._flush_with(wire)
        finally:
            if wire is not None:
                await wire.close()

    async def _flush_with(self, wire: _Wire | None) -> None:
        while True:
            if not (self._pending and self._wakeup.is_set()):
                # Nothing to send, or only refunds waiting for a call to ride with.
                await self._wakeup.wait()
                # Let every task woken with us queue its call first: a burst then goes
                # out whole instead of its first call alone.
                await trio.lowlevel.checkpoint()
                if not self._pending and self._wakeup.is_set():
                    self._wakeup = trio.Event()  # set, and nothing left: re-arm it
                continue
            free = self.target.pipelines - self._busy
            # A few calls go out together (one round trip, and a waiting refund rides
            # with the call that woke us); a burst is shared among the free flushers.
            pending = len(self._pending)
            share = pending if pending <= SPLIT_ABOVE else -(-pending // max(1, free))
            calls = self._pending[:share]
            del self._pending[:share]
            if not self._pending and self._wakeup.is_set():
                self._wakeup = trio.Event()
            self._busy += 1
            self._in_flight.update(calls)
            try:
                if wire is not None:
                    replies = await self._execute_native(wire, calls)
                else:
                    replies = await trio.to_thread.run_sync(
                        self._execute, calls, limiter=self._threads
                    )
            except Exception as exc:  # a bug, not Redis: report it, keep serving
                log.exception("redis driver failed on a batch of %d calls", len(calls))
                replies = [StoreError(f"redis driver error: {exc!r}")] * len(calls)
            finally:
                self._busy -= 1
            self._in_flight.difference_update(calls)
            self._answer(calls, replies)

    async def _refunds_forever(self) -> None:
        """Send refunds that found no call to ride with within ``REFUND_DELAY``."""
        while True:
            await self._refund_queued.wait()
            self._refund_queued = trio.Event()
            await trio.sleep(REFUND_DELAY)
            if self._pending:
                self._wakeup.set()

    async def _execute_native(self, wire: _Wire, calls: list[_Call]) -> list[Any]:
        """:meth:`_execute` on a flusher's own connection (standalone Redis): the same
        retry after a dropped connection (settlements excepted) and after NOSCRIPT."""
        packed = [pack_evalsha(c.script.sha_bytes, c.keys, c.argv) for c in calls]
        self._count(round_trips=1)
        replies = await wire.roundtrip(packed)
        if replies and isinstance(replies[-1], _CONNECTION_LOST):  # (fills the rest)
            self._policy_stale = True
        if replies and type(replies[0]) is redis.exceptions.ConnectionError:
            # Dropped before any reply (a stale connection after a restart): once more,
            # except settlements: one that did run must not run twice.
            retry = [i for i, call in enumerate(calls) if call.script is not SETTLE]
            if retry:
                self._count(round_trips=1)
                again = await wire.roundtrip([packed[i] for i in retry])
                for i, reply in zip(retry, again, strict=True):
                    replies[i] = reply
        missing = [
            i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)
        ]
        if missing:
            log.info("Redis lost the scripts (restart, failover or SCRIPT FLUSH): reloading")
            client = self._client
            try:
                if client is None:
                    raise StoreError(f"store {self.url} is closed")
                await trio.to_thread.run_sync(self._load_scripts, client, limiter=self._threads)
            except (*_REDIS_ERRORS, StoreError) as exc:
                for i in missing:
                    replies[i] = exc
            else:
                # NOSCRIPT: those calls did not run, so running them now is safe.
                self._count(round_trips=1)
                again = await wire.roundtrip([packed[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        return replies

    # -- in a worker thread

    def _execute(self, calls: list[_Call]) -> list[Any]:
        """Run the calls (one pipeline per node); NOSCRIPT: load the scripts, retry."""
        client = self._client
        if client is None:
            return [StoreError(f"store {self.url} is closed")] * len(calls)
        packed = [pack_evalsha(c.script.sha_bytes, c.keys, c.argv) for c in calls]
        replies = self._send(client, calls, packed)
        missing = [
            i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)
        ]
        if missing:
            log.info("Redis lost the scripts (restart, failover or SCRIPT FLUSH): reloading")
            try:
                self._load_scripts(client)
            except (*_REDIS_ERRORS, StoreError) as exc:
                for i in missing:
                    replies[i] = exc
            else:
                # NOSCRIPT: those calls did not run, so running them now is safe.
                again = self._send(
                    client, [calls[i] for i in missing], [packed[i] for i in missing]
                )
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        return replies

    def _send(
        self, client: redis.Redis | RedisCluster, calls: list[_Call], packed: list[bytes]
    ) -> list[Any]:
        replies: list[Any] = [None] * len(calls)
        if isinstance(client, RedisCluster):
            self._send_cluster(client, calls, packed, replies)
        else:
            self._send_groups(
                [(client.connection_pool, list(range(len(calls))))], calls, packed, replies
            )
        return replies

    def _send_groups(
        self,
        groups: list[tuple[redis.ConnectionPool, list[int]]],
        calls: list[_Call],
        packed: list[bytes],
        replies: list[Any],
    ) -> None:
        """Send each group (call indexes) as one pipeline on its pool, all at once, and
        put the replies in ``replies``.

        A group whose connection dropped before any reply (a stale pooled socket after
        a restart) is sent once more, except its settlements: one that did run must not
        run twice (a refund counted twice would admit more than the limit), so it fails
        instead and its reservation stays whole. An admission counted twice only admits
        less.
        """
        self._count(round_trips=len(groups))
        traffic = self._traffic
        results = exchange(
            [(pool, [packed[i] for i in indexes]) for pool, indexes in groups], traffic
        )
        again: list[tuple[redis.ConnectionPool, list[int]]] = []
        for (pool, indexes), group_replies in zip(groups, results, strict=True):
            for i, reply in zip(indexes, group_replies, strict=True):
                replies[i] = reply
            if group_replies and isinstance(group_replies[-1], _CONNECTION_LOST):
                self._policy_stale = True  # (a failure fills the rest of the group)
            if group_replies and type(group_replies[0]) is redis.exceptions.ConnectionError:
                pool.disconnect(inuse_connections=False)  # its idle sockets are stale too
                retry = [i for i in indexes if calls[i].script is not SETTLE]
                if retry:
                    again.append((pool, retry))
        if again:
            self._count(round_trips=len(again))
            results = exchange(
                [(pool, [packed[i] for i in indexes]) for pool, indexes in again], traffic
            )
            for (_, indexes), group_replies in zip(again, results, strict=True):
                for i, reply in zip(indexes, group_replies, strict=True):
                    replies[i] = reply
