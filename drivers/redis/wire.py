"""The bytes on the wire: RESP packing, one exchange of pipelines on redis-py's pooled
connections, and the driver's own trio connection to a standalone Redis (:class:`_Wire`)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.exceptions
import trio
from redis._parsers import BaseParser

from drivers.redis.urls import RedisTarget
from tokenguard.store.window_store import StoreError

PUBSUB_READ_BATCH = 1000
# What redis-py raises: its own errors, and the cluster client's (not a RedisError).
_REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)
# A reply that means the connection was lost: the next one is a reconnect, maybe to
# another server (a restart, a failover).
_CONNECTION_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


# Before redis-py 5.3, ConnectionPool.get_connection required a command name.
_COMMAND_NAME = inspect.signature(redis.ConnectionPool.get_connection).parameters.get(
    "command_name"
)
_GET_CONNECTION_NEEDS_NAME = (
    _COMMAND_NAME is not None and _COMMAND_NAME.default is inspect.Parameter.empty
)


def pack_evalsha(sha: bytes, keys: Sequence[str], argv: str | bytes) -> bytes:
    """``EVALSHA sha numkeys key... argv`` in RESP, ready for the socket.

    Packed here rather than by redis-py's pipeline: it costs a fraction of the generic
    encoder per call, and the driver is run for every request.
    """
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (len(keys) + 4, sha)]
    count = str(len(keys)).encode()
    parts.append(b"$%d\r\n%s\r\n" % (len(count), count))
    parts += [b"$%d\r\n%s\r\n" % (len(data), data) for data in map(str.encode, keys)]
    data = argv if isinstance(argv, bytes) else argv.encode()
    parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _connection(pool: redis.ConnectionPool) -> redis.connection.Connection:
    if _GET_CONNECTION_NEEDS_NAME:
        return pool.get_connection("EVALSHA")
    return pool.get_connection()


def exchange(
    groups: Sequence[tuple[redis.ConnectionPool, list[bytes]]], traffic: Traffic | None = None
) -> list[list[Any]]:
    """Send each group's packed commands on one connection of its pool, every group
    before reading any (so the nodes of a cluster work at once), and read the replies.

    Returns, per group, a reply or an exception per command: an error reply is its
    ``ResponseError``; a connection failure fills the rest of the group. A connection
    that failed or was left with unread replies is closed, never reused. ``traffic``
    is told of each group written and of each reply read, as it happens.
    """
    connections: list[redis.connection.Connection | None] = []
    results: list[list[Any]] = []
    try:
        for pool, packed in groups:
            connection = None
            try:
                connection = _connection(pool)
                connection.send_packed_command([b"".join(packed)])
                if traffic is not None:
                    traffic.note_sent()
            except _REDIS_ERRORS as exc:
                if connection is not None:
                    connection.disconnect()
                    pool.release(connection)
                connection = None
                results.append([exc] * len(packed))
            else:
                results.append([])
            connections.append(connection)
        for (_, packed), connection, replies in zip(groups, connections, results, strict=True):
            if connection is None:
                continue
            try:
                for _ in packed:
                    try:
                        replies.append(connection.read_response())
                    except redis.exceptions.ResponseError as exc:
                        replies.append(exc)
                    if traffic is not None:
                        traffic.note_heard()
            except _REDIS_ERRORS as exc:
                connection.disconnect()
                replies += [exc] * (len(packed) - len(replies))
    except BaseException:
        for connection in connections:
            if connection is not None:
                connection.disconnect()
        raise
    finally:
        for (pool, _), connection in zip(groups, connections, strict=False):
            if connection is not None:
                pool.release(connection)
    return results


class Traffic:
    """When a store's pipelines were last written to its server, and when the server
    was last heard from (a reply, or part of one), on the clock of the trio run that
    uses the store (``trio.current_time()``, ``-inf`` before anything happened).

    Noted the moment it happens, by the flushers' own connections in trio and by
    redis-py's in worker threads alike (a float assignment: atomic under the GIL), so
    that a caller judging the server by its replies (tokenguard/store/guarded.py) counts
    from the real write, and sees the replies already in before its task runs.
    """

    __slots__ = ("clock", "sent", "heard")

    def __init__(self, clock: trio.abc.Clock) -> None:
        self.clock = clock
        self.sent = -math.inf
        self.heard = -math.inf

    def note_sent(self) -> None:
        self.sent = self.clock.current_time()

    def note_heard(self) -> None:
        self.heard = self.clock.current_time()


# --- the driver's own connections: standalone Redis on trio's sockets -----------------


def pack_command(*args: bytes) -> bytes:
    """Any command in RESP (the few the driver's own connections send besides EVALSHA)."""
    parts = [b"*%d\r\n" % len(args)]
    parts += [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
    return b"".join(parts)


def reply_reader() -> hiredis.Reader:
    """A RESP reply parser (hiredis, as redis-py uses when it is installed): bytes are
    fed in as they arrive; ``gets()`` returns each whole reply, or ``False`` while the
    next one is not all in. Error replies come out as redis-py's exception for them
    (``NoScriptError`` for ``NOSCRIPT``...), returned rather than raised."""
    return hiredis.Reader(
        protocolError=redis.exceptions.InvalidResponse, replyError=BaseParser.parse_error
    )


class _Wire:
    """One connection of the driver's own to a standalone Redis (TCP or unix socket, no
    TLS), on trio's sockets: a pipeline goes out and its replies come back with no
    thread hop and no lock. Connects (``AUTH``, ``SELECT``) on first use; any failure
    closes it, and the next use connects again. ``timeout`` bounds connecting, and a
    whole pipeline's write and replies. ``traffic``, if given, is told of every write
    and of every chunk of replies read."""

    def __init__(self, target: RedisTarget, traffic: Traffic | None = None) -> None:
        self.target = target
        self.traffic = traffic
        self._stream: trio.abc.Stream | None = None
        self._reader = reply_reader()

    async def roundtrip(self, packed: Sequence[bytes]) -> list[Any]:
        """Send the commands in one write; a reply (or its exception) for each. When the
        connection fails, the replies not read are its exception (redis-py's
        ``ConnectionError`` or ``TimeoutError``: a command may then have run)."""
        replies: list[Any] = []
        try:
            if self._stream is None:
                await self._connect()
            await self._exchange(packed, replies)
        except trio.TooSlowError:
            error: Exception = redis.exceptions.TimeoutError("Timeout reading from socket")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            error = redis.exceptions.ConnectionError(f"Error talking to Redis: {exc}")
        except redis.exceptions.RedisError as exc:  # refused AUTH, a protocol error
            error = exc
        except BaseException:
            await self.close()  # cancelled mid-pipeline: its replies are unread
            raise
        else:
            return replies
        await self.close()
        return replies + [error] * (len(packed) - len(replies))

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def subscribe(self, channel: bytes) -> None:
        """Connect and ``SUBSCRIBE``; return once Redis confirmed. Raises redis-py's
        ``ConnectionError``/``TimeoutError`` (or the server's error) on failure."""
        try:
            await self._connect()
            replies: list[Any] = []
            await self._exchange([pack_command(b"SUBSCRIBE", channel)], replies)
        except trio.TooSlowError:
            raise redis.exceptions.TimeoutError(
                f"no confirmation of SUBSCRIBE {channel!r}"
            ) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise redis.exceptions.ConnectionError(f"Error talking to Redis: {exc}") from exc
        (reply,) = replies
        if isinstance(reply, Exception):
            raise reply
        if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
            raise redis.exceptions.InvalidResponse(f"unexpected reply to SUBSCRIBE: {reply!r}")

    async def pushed(self) -> list[bytes]:
        """On a subscribed connection: wait for messages, and return the data of every
        ``message`` push now in (at most ``PUBSUB_READ_BATCH``), oldest first. Raises
        redis-py's ``ConnectionError`` when the connection is lost."""
        stream = self._stream
        assert stream is not None
        reader = self._reader
        while True:
            messages: list[bytes] = []
            while len(messages) < PUBSUB_READ_BATCH:
                reply = reader.gets()
                if reply is False:
                    break
                if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                    messages.append(reply[2])
            if messages:
                return messages
            try:
                data = await stream.receive_some(65536)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise redis.exceptions.ConnectionError(f"Error reading from Redis: {exc}") from exc
            if not data:
                raise redis.exceptions.ConnectionError("Connection closed by server.")
            reader.feed(data)

    async def _connect(self) -> None:
        target = self.target
        with trio.fail_after(target.timeout):
            if target.unix_socket is not None:
                stream: trio.abc.Stream = await trio.open_unix_socket(target.unix_socket)
            else:
                ((host, port),) = target.hosts
                stream = await trio.open_tcp_stream(host, port)
        self._stream, self._reader = stream, reply_reader()
        hello = []
        if target.password is not None:
            user = [target.username.encode()] if target.username else []
            hello.append(pack_command(b"AUTH", *user, target.password.encode()))
        if target.db:
            hello.append(pack_command(b"SELECT", str(target.db).encode()))
        replies: list[Any] = []
        await self._exchange(hello, replies)
        for reply in replies:
            if isinstance(reply, redis.exceptions.AuthenticationError):
                raise reply
            if isinstance(reply, redis.exceptions.ResponseError):
                raise redis.exceptions.AuthenticationError(str(reply))

    async def _exchange(self, packed: Sequence[bytes], replies: list[Any]) -> None:
        if not packed:
            return
        stream = self._stream
        assert stream is not None
        reader = self._reader
        traffic = self.traffic
        with trio.fail_after(self.target.timeout):
            await stream.send_all(b"".join(packed))
            if traffic is not None:
                traffic.note_sent()
            while len(replies) < len(packed):
                reply = reader.gets()
                if reply is False:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise redis.exceptions.ConnectionError("Connection closed by server.")
                    if traffic is not None:
                        traffic.note_heard()
                    reader.feed(data)
                    continue
                replies.append(reply)


def _store_error(exc: BaseException) -> StoreError:
    return StoreError(f"redis: {type(exc).__name__}: {exc}")
