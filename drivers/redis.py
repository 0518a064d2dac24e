"""The Redis window store: counters shared by every node, checked by Lua on the server.

Store URLs (see ``docs/redis.md``)::

    redis://[[user]:password@]host[:port][/db][?timeout=0.5]
    rediss://...                                   (TLS; ?ssl_ca_certs=, ?ssl_cert_reqs=)
    unix://[[user]:password@]/path/to.sock[?db=0]
    redis+sentinel://[[user]:password@]host[:port][,host2[:port2]]/service_name[/db]
    redis+cluster://[[user]:password@]host[:port][,host2[:port2]]

Guarantees:

* Same semantics as :mod:`drivers.memory`, to the millisecond: admission, settlement and
  usage are each ONE Lua script (``admit.lua``, ``settle.lua``, ``usage.lua``) run
  atomically by Redis, on the Redis server's own clock (``TIME``), so nodes with skewed
  clocks agree. An admission consumes every row or none.
* Every key of a partition is ``tg:{<partition>}:<row.counter>``: one hash tag, so an
  admission touches one slot and works unchanged on Redis Cluster. Partitions are key
  ids, never API keys. Each key expires when its newest bucket leaves the window.
* The trio event loop never blocks: redis-py's synchronous client runs in worker threads
  (at most ``pipelines`` of them, a :class:`trio.CapacityLimiter`), and the calls that
  arrive while round trips are in flight are coalesced into the next pipelines
  (auto-pipelining): ``calls`` and ``round_trips`` count both. The driver packs the
  ``EVALSHA`` commands itself and sends them on redis-py's pooled connections; on a
  standalone Redis without TLS (``redis://``, ``unix://``), each of the ``pipelines``
  has a connection of its own on trio's sockets instead (:class:`_Wire`: no thread hop
  per batch, which was most of an admission's latency and CPU).
* Scripts are loaded once and called by SHA; after ``NOSCRIPT`` (a restart, a failover,
  ``SCRIPT FLUSH``) they are loaded again and the call retried, unseen by callers.
* On Redis Cluster, a batch goes out as one pipeline per node that owns some of its
  slots, all at once; redirected calls are resent through redis-py's cluster client.
* Publish/subscribe is Redis pub/sub (``PUBLISH``/``SUBSCRIBE``; on a cluster, plain
  ``PUBLISH`` reaches the subscribers of every node), kept off the pipelines above:
  one publishing connection of its own (standalone without TLS: on trio's sockets;
  otherwise redis-py in a thread of its own), and per subscription its own connection
  read by a worker thread of its own, ``PUBSUB_POLL`` seconds at a time. A lost
  subscription is re-established with backoff (messages published meanwhile are lost);
  a subscription buffers at most ``SUBSCRIPTION_BUFFER`` messages, then drops new ones
  (``pubsub_dropped``).

* The registry (API keys and tiers, :mod:`tokenguard.limiting.keyring`) is one hash and a
  version counter under the hash tag ``{registry}``, written and read by
  ``registry_put.lua`` / ``registry_load.lua`` (atomic, one slot: Cluster-safe), sent
  with ``EVAL`` from a thread of its own, off the pipelines. No expiry.
* The server's ``maxmemory-policy`` is read (``CONFIG GET``) at start, again within
  ``EVICTION_POLL`` of the store answering after a lost connection (a restart, a
  failover), and every ``EVICTION_RECHECK`` seconds: ``eviction_policy``, ``"unknown"``
  when the server refuses to say. One that can evict counters or the registry
  (``volatile-*``, ``allkeys-*``: :func:`tokenguard.store.window_store.evictable`) is logged as a
  warning.

Raises:

* :class:`~tokenguard.store.window_store.StoreError` for every failure of Redis or of the network
  (connection refused or lost, timeouts, server errors, cluster down), from ``admit``,
  ``settle`` and ``usage``, and from :meth:`RedisStore.run` when the server cannot be
  reached at start. Socket timeouts default to 1 s (``?timeout=``).
* ``ValueError`` from :meth:`RedisStore.from_url` for a malformed URL.

A caller cancelled while its call is in flight does not un-send it: an admission may
then be consumed with nobody told (the app shields admissions for this reason). Calls
that may have run are never sent twice, except admissions after a dropped connection
(counted twice at worst: fewer admissions, never more); settlements never.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import logging
import math
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, Self
from urllib.parse import parse_qsl, unquote

import attrs
import hiredis
import redis
import redis.exceptions
import trio
from redis._parsers import BaseParser
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from tokenguard.store.leases import HeldLeases
from tokenguard.store.window_store import (
    ANYTHING,
    NOT_RESERVED,
    Admission,
    Lease,
    Registry,
    RegistryExpect,
    Reservation,
    Row,
    RowState,
    StoreError,
    WindowStore,
    check_record,
    evictable,
    redact_url,
)

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_TIMEOUT = 1.0
# Two pipelines in flight let Redis run one batch while Python encodes/decodes the other.
DEFAULT_PIPELINES = 2
MAX_PIPELINES = 16
KEY_PREFIX = "tg"
# Pub/sub: how long a listener thread waits for a message before it returns to trio
# (the longest a cancelled subscription waits for its thread), how many messages one
# thread hop takes at most, what a subscription buffers, and the re-subscribe backoff.
# A refund waits at most this long (s) for another call's pipeline to ride with.
REFUND_DELAY = 0.005
# Calls pending at once up to which one flusher sends them all in one pipeline.
SPLIT_ABOVE = 16
PUBSUB_POLL = 0.2
PUBSUB_READ_BATCH = 1000
SUBSCRIPTION_BUFFER = 4096
RESUBSCRIBE_BACKOFF = (0.05, 2.0)
# The server's maxmemory-policy is read at start, within this long (s) of the store
# answering again after a lost connection (a restart, a failover), and at least this
# often (s) besides (CONFIG SET changes it without a reconnect).
EVICTION_POLL = 1.0
EVICTION_RECHECK = 60.0

# Redis errors that mean "this node does not own the slot (any more)": the cluster
# client's own execute_command follows the redirect and refreshes its slot table.
_REDIRECTS = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
)
# Replies after which a cluster's slot table is read again: a node is unreachable or
# the cluster is failing one over (CLUSTERDOWN until a replica is promoted).
_TOPOLOGY_CHANGING = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
)
# What redis-py raises: its own errors, and the cluster client's (not a RedisError).
_REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)
# A reply that means the connection was lost: the next one is a reconnect, maybe to
# another server (a restart, a failover).
_CONNECTION_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


# --- scripts --------------------------------------------------------------------------


@attrs.frozen
class LuaScript:
    """One of the driver's scripts, with the SHA1 Redis knows it by."""

    name: str
    source: str
    sha: str = attrs.field(init=False)
    sha_bytes: bytes = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode()).hexdigest()
        object.__setattr__(self, "sha", sha)
        object.__setattr__(self, "sha_bytes", sha.encode())

    @classmethod
    def packaged(cls, name: str) -> LuaScript:
        """``drivers/counter.lua`` (the shared counter functions) then
        ``drivers/<name>.lua``, as one script: package data beside this module."""
        # Beside this very file (not resources.files("drivers"): a tests/drivers
        # directory on sys.path could make "drivers" a namespace package).
        here = Path(__file__).parent
        source = "".join((here / f"{part}.lua").read_text("utf-8") for part in ("counter", name))
        return cls(name=name, source=source)


ADMIT = LuaScript.packaged("admit")
SETTLE = LuaScript.packaged("settle")
USAGE = LuaScript.packaged("usage")
RENEW = LuaScript.packaged("renew")
SCRIPTS = (ADMIT, SETTLE, USAGE, RENEW)
# The registry (API keys, tiers): one hash and its version counter under one hash tag,
# so each script touches one slot. Rare calls, sent with EVAL off the pipelines.
REGISTRY_RECORDS = f"{KEY_PREFIX}:{{registry}}:records"
REGISTRY_VERSION = f"{KEY_PREFIX}:{{registry}}:version"
REGISTRY_PUT = (Path(__file__).parent / "registry_put.lua").read_text("utf-8")
REGISTRY_LOAD = (Path(__file__).parent / "registry_load.lua").read_text("utf-8")


def record_key(name: str) -> str:
    """The Redis key of a record (``record_put``): ``tg:record:{<name>}``. One key per
    record, each its own hash tag: records spread over a cluster's slots."""
    return f"{KEY_PREFIX}:record:{{{name}}}"


def key_name(partition: str, row: Row) -> str:
    """The Redis key of a row's counter: ``tg:{<partition>}:<scope>:<dim>:<window>:<bucket>``
    (a hash, see ``drivers/counter.lua``), or of a lease row's set of leases:
    ``tg:{<partition>}:<scope>:concurrent``.

    The partition is the hash tag, so all of a partition's keys share one cluster slot.
    """
    return key_prefix(partition) + row.counter


def key_prefix(partition: str) -> str:
    """What every key of a partition starts with, ``tg:{<partition>}:``: a row's key
    is this then its ``counter``. Raises ``ValueError`` for an empty partition."""
    if not partition:
        # "{}" is no hash tag at all: the keys of one admission would spread over slots.
        raise ValueError("the partition must not be empty")
    return f"{KEY_PREFIX}:{{{partition}}}:"


# --- URLs -----------------------------------------------------------------------------


@attrs.frozen
class RedisTarget:
    """Where the store's Redis is and how to reach it; built by :func:`parse_redis_url`."""

    kind: Literal["standalone", "sentinel", "cluster"]
    hosts: tuple[tuple[str, int], ...] = ()
    unix_socket: str | None = None
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    sentinel_password: str | None = attrs.field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "required"
    timeout: float = DEFAULT_TIMEOUT
    pipelines: int = DEFAULT_PIPELINES

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's connections to a data node."""
        kwargs: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
        }
        if self.ssl:
            # Checking the host name needs a verified certificate.
            kwargs.update(
                ssl=True,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_cert_reqs == "required",
            )
            if self.ssl_ca_certs is not None:
                kwargs["ssl_ca_certs"] = self.ssl_ca_certs
        return kwargs

    def connect(self) -> redis.Redis | RedisCluster:
        """Build the redis-py client. Blocking (a cluster client reads the slot table
        here): call it from a worker thread."""
        kwargs = self.connection_kwargs()
        if self.kind == "cluster":
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.hosts],
                # No retries of a command that may have run (a timeout, a dropped
                # connection): a settlement must never count twice. Redirects are
                # still followed. A limiter answers quickly; an outage is a StoreError.
                retry=Retry(NoBackoff(), 0),
                **kwargs,
            )
        # Retry once, only on a dropped connection (a stale pooled socket after a
        # restart), never on a timeout: the command may have run.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        if self.kind == "sentinel":
            sentinel_kwargs = {
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                "password": self.sentinel_password,
            }
            sentinel = Sentinel(list(self.hosts), sentinel_kwargs=sentinel_kwargs)
            return sentinel.master_for(self.service_name, db=self.db, retry=retry, **kwargs)
        if self.unix_socket is not None:
            return redis.Redis(
                unix_socket_path=self.unix_socket,
                db=self.db,
                retry=retry,
                username=self.username,
                password=self.password,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
        ((host, port),) = self.hosts
        return redis.Redis(host=host, port=port, db=self.db, retry=retry, **kwargs)


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"bad Redis store URL {redact_url(url)!r}: {why}")


def _split_url(rest: str) -> tuple[str | None, str, str, str]:
    """``[userinfo@]hostlist[/path][?query]`` (what follows ``scheme://``) into its
    parts; userinfo is ``None`` when absent.

    By hand: urlsplit refuses ``h1:1,h2:2``, and a password may hold ``@`` or ``/``
    (it should be percent-encoded, but it must never end up in an error message).
    """
    before_query, _, query = rest.partition("?")
    at = before_query.rfind("@")
    userinfo = before_query[:at] if at >= 0 else None
    hostlist, slash, path = before_query[at + 1 :].partition("/")
    return userinfo, hostlist, slash + path, query


def _parse_hosts(url: str, hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise _bad(url, "empty host in the host list")
        if item.startswith("["):  # [IPv6]:port
            host, bracket, port_text = item[1:].partition("]")
            if not bracket or (port_text and not port_text.startswith(":")):
                raise _bad(url, f"malformed IPv6 address {item!r}")
            port_text = port_text[1:]
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise _bad(url, f"no host name in {item!r}")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise _bad(url, f"port must be a number from 1 to 65535, got {port_text!r}")
            port = int(port_text)
        else:
            port = default_port
        hosts.append((unquote(host), port))
    return tuple(hosts)


def _parse_db(url: str, text: str) -> int:
    if not text.isdigit():
        raise _bad(url, f"the database must be a number >= 0, got {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a store URL (see the module docstring); ``ValueError`` saying what is wrong.

    Query options: ``timeout`` (seconds, > 0: socket connect and read timeout),
    ``pipelines`` (1-16: round trips in flight at once), ``db`` (``unix://`` only),
    ``sentinel_password`` (``redis+sentinel://``), ``ssl_ca_certs`` and
    ``ssl_cert_reqs`` (``rediss://``). Unknown options are errors.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise _bad(url, f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    userinfo, hostlist, path, query_text = _split_url(rest)
    if "#" in hostlist or "#" in path or "#" in query_text:
        raise _bad(url, "a fragment (#...) means nothing here")
    try:
        query = dict(parse_qsl(query_text, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise _bad(url, f"malformed query string {query_text!r}") from None
    username = password = None
    if userinfo is not None:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None

    options: dict[str, Any] = {"username": username, "password": password}
    if "timeout" in query:
        text = query.pop("timeout")
        try:
            timeout = float(text)
        except ValueError:
            raise _bad(url, f"timeout must be seconds, got {text!r}") from None
        if not (timeout > 0 and math.isfinite(timeout)):
            raise _bad(url, f"timeout must be > 0 seconds, got {text!r}")
        options["timeout"] = timeout
    if "pipelines" in query:
        text = query.pop("pipelines")
        if not text.isdigit() or not 1 <= int(text) <= MAX_PIPELINES:
            raise _bad(url, f"pipelines must be 1 to {MAX_PIPELINES}, got {text!r}")
        options["pipelines"] = int(text)

    if scheme == "unix":
        if hostlist:
            raise _bad(url, "unix:// takes a socket path, no host: unix:///path/to.sock")
        if not path or path == "/":
            raise _bad(url, "no socket path: unix:///path/to.sock")
        if "db" in query:
            options["db"] = _parse_db(url, query.pop("db"))
        target = RedisTarget(kind="standalone", unix_socket=unquote(path), **options)
    elif scheme in ("redis", "rediss"):
        if not hostlist:
            raise _bad(url, f"no host: {scheme}://host:port/db")
        hosts = _parse_hosts(url, hostlist, DEFAULT_PORT)
        if len(hosts) != 1:
            raise _bad(url, f"{scheme}:// takes one host; use redis+cluster:// for several")
        db_text = path.strip("/")
        db = _parse_db(url, db_text) if db_text else 0
        if scheme == "rediss":
            if "ssl_ca_certs" in query:
                options["ssl_ca_certs"] = query.pop("ssl_ca_certs")
            if "ssl_cert_reqs" in query:
                reqs = query.pop("ssl_cert_reqs")
                if reqs not in ("required", "optional", "none"):
                    raise _bad(url, f"ssl_cert_reqs must be required|optional|none, not {reqs!r}")
                options["ssl_cert_reqs"] = reqs
        target = RedisTarget(
            kind="standalone", hosts=hosts, db=db, ssl=scheme == "rediss", **options
        )
    elif scheme == "redis+sentinel":
        if not hostlist:
            raise _bad(url, "no sentinel host: redis+sentinel://host:port/service_name/db")
        hosts = _parse_hosts(url, hostlist, DEFAULT_SENTINEL_PORT)
        segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
        if not segments or not segments[0]:
            raise _bad(url, "no service name: redis+sentinel://host:port/service_name/db")
        if len(segments) > 2:
            raise _bad(url, "the path must be /service_name or /service_name/db")
        db = _parse_db(url, segments[1]) if len(segments) == 2 else 0
        if "sentinel_password" in query:
            options["sentinel_password"] = query.pop("sentinel_password")
        target = RedisTarget(
            kind="sentinel", hosts=hosts, service_name=segments[0], db=db, **options
        )
    else:  # redis+cluster
        if not hostlist:
            raise _bad(url, "no host: redis+cluster://host:port[,host:port...]")
        hosts = _parse_hosts(url, hostlist, DEFAULT_PORT)
        if path.strip("/") not in ("", "0"):
            raise _bad(url, "Redis Cluster has database 0 only; drop the path")
        target = RedisTarget(kind="cluster", hosts=hosts, **options)
    if query:
        raise _bad(url, f"unknown option(s) {', '.join(sorted(query))}")
    return target


# --- the wire -------------------------------------------------------------------------

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
    that a caller judging the server by its replies (tokenguard/resilience.py) counts
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


# --- the store ------------------------------------------------------------------------


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


def _store_error(exc: BaseException) -> StoreError:
    return StoreError(f"redis: {type(exc).__name__}: {exc}")


@functools.cache
def _packer(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}q")


def _pack(ints: Sequence[int]) -> bytes:
    """The scripts' arguments: little-endian 64-bit integers (Lua's struct 'i8'),
    unpacked by Redis in one call rather than parsed word by word."""
    return _packer(len(ints)).pack(*ints)


def _unpack(reply: bytes) -> tuple[int, ...]:
    """A script's packed reply (see ``drivers/counter.lua``)."""
    return _packer(len(reply) // 8).unpack(reply)


class RedisStore(WindowStore):
    """Window store on Redis (standalone, TLS, unix socket, Sentinel or Cluster).

    Use it inside :meth:`run` (or :func:`tokenguard.store.window_store.open_store`). ``calls``
    counts script calls and ``round_trips`` the pipelines sent for them (a cluster batch
    sends one per node it touches, at once), including script loads and retries.
    """

    def __init__(self, target: RedisTarget, url: str = "redis://") -> None:
        self.target = target
        self.url = redact_url(url)
        self.calls = 0
        self.round_trips = 0
        self._count_lock = threading.Lock()
        self._client: redis.Redis | RedisCluster | None = None
        self._threads = trio.CapacityLimiter(target.pipelines)
        self._traffic: Traffic | None = None  # the pipelines' writes and replies, in run()
        self._pending: list[_Call] = []
        self._in_flight: set[_Call] = set()
        self._busy = 0  # flushers with a pipeline in flight
        self._started = False  # run() entered
        self._running = False  # connected, flushers up: calls are accepted
        self._wakeup = trio.Event()
        self._refund_queued = trio.Event()  # see _refunds_forever
        self._refresh_topology = False
        # Publishing never takes a flusher's thread: one thread of its own.
        self._publish_thread = trio.CapacityLimiter(1)
        # Standalone Redis without TLS: each flusher sends its pipelines on a connection
        # of its own on trio's sockets (no thread hop per batch); Sentinel, Cluster and
        # TLS go through redis-py in worker threads.
        self._native = target.kind == "standalone" and not target.ssl
        # ... and publishing, in order, on one more (no thread hop per message either).
        self._publish_wire = _Wire(target) if self._native else None
        self._publish_lock = trio.Lock()
        self.pubsub_dropped = 0  # messages dropped for subscriptions that were full
        # Registry calls never take a flusher's thread either.
        self._registry_thread = trio.CapacityLimiter(1)
        # The server's maxmemory-policy (WindowStore.eviction_policy), read again once
        # a connection was lost (_policy_stale, set from any thread) and the store
        # answers, on a thread of its own.
        self._policy_stale = False
        self._policy_thread = trio.CapacityLimiter(1)
        # Lease ids: unique to this store object, whatever other node shares the store.
        # (an integer below 2**53, exact in Lua: 23 random bits, then a 30-bit counter)
        self._lease_base = secrets.randbits(23) << 30
        self._lease_ids = itertools.count(1)
        self.leases = HeldLeases()  # renewed in run() while their requests are alive

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Parse the URL (``ValueError`` if malformed); connects only in :meth:`run`."""
        return cls(parse_redis_url(url), url=url)

    @property  # type: ignore[override]
    def last_sent(self) -> float:
        """When a pipeline of calls was last written to the server (the write done)."""
        return -math.inf if self._traffic is None else self._traffic.sent

    @property  # type: ignore[override]
    def last_heard(self) -> float:
        """When a reply to a pipeline (or part of one) was last read from the server."""
        return -math.inf if self._traffic is None else self._traffic.heard

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, load the scripts, then send coalesced calls until cancelled.

        Raises :class:`StoreError` if Redis cannot be reached or refuses the scripts.
        When it ends, calls still waiting fail with :class:`StoreError`.
        """
        if self._started:
            raise RuntimeError(f"store {self.url} is already running")
        self._started = True
        try:
            self._client = await trio.to_thread.run_sync(self._connect, limiter=self._threads)
        except _REDIS_ERRORS as exc:
            self._started = False
            raise StoreError(f"cannot use Redis at {self.url}: {exc}") from exc
        except BaseException:
            self._started = False
            raise
        self._running = True
        self._wakeup = trio.Event()
        self._traffic = Traffic(trio.lowlevel.current_clock())
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.target.pipelines):
                    nursery.start_soon(self._flush_forever)
                nursery.start_soon(self._refunds_forever)
                nursery.start_soon(self.leases.renew_forever, self.renew)
                nursery.start_soon(self._eviction_policy_forever)
                task_status.started()
        finally:
            self._running = self._started = False
            closed = StoreError(f"store {self.url} is closed")
            leftover = [*self._pending, *self._in_flight]
            self._pending.clear()
            self._in_flight.clear()
            self._answer(leftover, [closed] * len(leftover))
            client, self._client = self._client, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(client.close)
                if self._publish_wire is not None:
                    await self._publish_wire.close()

    def _connect(self) -> redis.Redis | RedisCluster:
        client = self.target.connect()
        try:
            client.ping()
            self._load_scripts(client)
            self._read_eviction_policy(client)
        except BaseException:
            client.close()
            raise
        return client

    def _read_eviction_policy(self, client: redis.Redis | RedisCluster) -> None:
        """Read the server's ``maxmemory-policy`` into ``eviction_policy`` (blocking:
        in a worker thread), and log a warning when it can evict what the store keeps
        (at the first read and whenever it changes). ``"unknown"`` when the server
        refuses ``CONFIG GET`` (managed Redis, ACLs): not an error. Raises redis-py's
        errors when the server cannot be reached."""
        try:
            if isinstance(client, RedisCluster):
                # Each primary has its own: the one that evicts the most counts.
                nodes = [client.get_redis_connection(n) for n in client.get_primaries()]
            else:
                nodes = [client]
            policies = []
            for node in nodes:
                value = node.config_get("maxmemory-policy").get("maxmemory-policy")
                if isinstance(value, bytes):
                    value = value.decode()
                policies.append(value or "unknown")
            policy = max(policies, key=lambda p: len(evictable(p) or ()), default="unknown")
        except redis.exceptions.ResponseError as exc:
            policy = "unknown"
            if self.eviction_policy != policy:
                log.info("store %s: maxmemory-policy unknown (%s)", self.url, exc)
        self._policy_stale = False
        if policy == self.eviction_policy:
            return
        self.eviction_policy = policy
        evicts = evictable(policy)
        if evicts:
            log.warning(
                "store %s: maxmemory-policy %s can evict %s when Redis's memory is full "
                "(windows: limits admit more; registry: keys refused until it is written "
                "back); use noeviction (docs/redis.md)",
                self.url,
                policy,
                " and ".join(evicts),
            )

    async def _eviction_policy_forever(self) -> None:
        """Read the eviction policy again once a connection was lost (within
        ``EVICTION_POLL`` of the store answering again) and every ``EVICTION_RECHECK``."""
        last = trio.current_time()
        while True:
            await trio.sleep(EVICTION_POLL)
            if not self._policy_stale and trio.current_time() - last < EVICTION_RECHECK:
                continue
            client = self._client
            if client is None:
                continue
            try:
                await trio.to_thread.run_sync(
                    self._read_eviction_policy,
                    client,
                    limiter=self._policy_thread,
                    abandon_on_cancel=True,
                )
            except _REDIS_ERRORS:
                self._policy_stale = True  # not answering yet: try again
            else:
                last = trio.current_time()

    def _load_scripts(self, client: redis.Redis | RedisCluster) -> None:
        """SCRIPT LOAD every script (on every primary, for a cluster). Also at start
        and after ``NOSCRIPT``: a server that lost its scripts may be a new one (a
        restart, a failover), whose eviction policy is read again."""
        self._policy_stale = True
        for script in SCRIPTS:
            sha = client.script_load(script.source)
            if isinstance(sha, bytes):
                sha = sha.decode()
            if sha != script.sha:
                raise StoreError(f"Redis gave SHA {sha} for {script.name}.lua, not {script.sha}")
            self._count(round_trips=1)

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

    def _send_cluster(
        self, cluster: RedisCluster, calls: list[_Call], packed: list[bytes], replies: list[Any]
    ) -> None:
        """Group the calls by the node owning their slot: one pipeline per node.

        redis-py's ClusterPipeline refuses ``evalsha()`` and, through
        ``execute_command``, asks the server for each command's keys (``COMMAND
        GETKEYS``, a round trip per call); the hash tag gives us the slot instead.
        Calls redirected unexecuted (MOVED, ASK, TRYAGAIN) are sent again one by one
        through the cluster client, which follows redirects and updates its slot table.
        After a connection error, a timeout or CLUSTERDOWN the slot table is read again
        before the next batch: a master may have died and a replica be promoted.
        """
        if self._refresh_topology:
            try:
                cluster.nodes_manager.initialize()
                self._refresh_topology = False
            except _REDIS_ERRORS as exc:
                replies[:] = [exc] * len(calls)
                return
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, call in enumerate(calls):
            try:
                node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(call.keys[0]))
            except _REDIS_ERRORS as exc:
                replies[i] = exc
                continue
            by_node.setdefault(node.name, (node, []))[1].append(i)
        groups = [
            (cluster.get_redis_connection(node).connection_pool, indexes)
            for node, indexes in by_node.values()
        ]
        self._send_groups(groups, calls, packed, replies)
        for i, reply in enumerate(replies):
            if isinstance(reply, _TOPOLOGY_CHANGING):
                # CLUSTERDOWN too: a refresh made while a master is failed but not yet
                # replaced read the old table, and without another one the next batch
                # went to the dead master again after the promotion (a closing probe's
                # write-back failed: the breaker closed 1 s late). Not sent again: the
                # cluster client would sleep 0.25 s in a flusher's thread, try once
                # more and fail; CLUSTERDOWN lasts until the promotion.
                self._refresh_topology = True
            elif isinstance(reply, _REDIRECTS):
                call = calls[i]
                self._count(round_trips=1)
                try:
                    replies[i] = cluster.execute_command(
                        "EVALSHA", call.script.sha, len(call.keys), *call.keys, call.argv
                    )
                except _REDIS_ERRORS as exc:
                    replies[i] = exc

    # -- the WindowStore interface

    async def server_time_ms(self) -> int:
        """The Redis server's clock (``TIME``) in milliseconds: the clock the scripts use."""
        client = self._client
        if client is None:
            raise StoreError(f"store {self.url} is not running")
        try:
            seconds, micros = await trio.to_thread.run_sync(client.time, limiter=self._threads)
        except _REDIS_ERRORS as exc:
            raise _store_error(exc) from exc
        return seconds * 1000 + micros // 1000

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        if not rows:
            return Admission(admitted=True, states=(), reservation=Reservation(partition, (), ()))
        # Every row costs every decision: one pass over them builds the keys and the
        # arguments, and one pass reads the states back.
        prefix = key_prefix(partition)
        keys: list[str] = []
        ints: list[int] = []
        leased = False
        for r in rows:
            keys.append(prefix + r.counter)
            if r.is_lease:
                ints += (r.window_ms, -1, r.limit, r.amount, r.enforce)
                leased = True
            else:
                ints += (r.bucket_ms, r.span, r.limit, r.amount, r.alert_at * 2 + r.enforce)
        lease_id = self._lease_base + next(self._lease_ids) % (1 << 30) if leased else 0
        ints.append(lease_id)
        values = _unpack(await self._call(ADMIT, keys, _pack(ints)))
        outcome, now = values[0], values[1]
        count = len(rows)
        if outcome == 2:  # every row fitted and was consumed (see admit.lua)
            near = values[2 + 2 * count :]
            states_list = []
            bucket_list = []
            i = 2
            for row in rows:
                states_list.append(RowState(row, values[i], values[i + 1] / 1000))
                bucket_list.append(0 if row.is_lease else now // row.bucket_ms)
                i += 2
            if near:  # (rare: the first admission past a near-limit mark in its window)
                for j in near:
                    states_list[j - 1] = attrs.evolve(states_list[j - 1], near_limit=True)
            states = tuple(states_list)
            buckets = tuple(bucket_list)
        else:
            near = values[2 + 5 * count :]
            states = tuple(
                RowState(
                    row,
                    values[5 * i + 2],
                    values[5 * i + 3] / 1000,
                    values[5 * i + 4] == 1,
                    None if values[5 * i + 5] < 0 else values[5 * i + 5] / 1000,
                    bool(near) and i + 1 in near,
                )
                for i, row in enumerate(rows)
            )
            if outcome == 0:
                return Admission(admitted=False, states=states)
            buckets = tuple(values[6 : 5 * count + 2 : 5])
        lease = None
        if leased and any(
            row.is_lease and row.amount and bucket != NOT_RESERVED
            for row, bucket in zip(rows, buckets, strict=True)
        ):
            lease = Lease(partition, str(lease_id), tuple(r for r in rows if r.is_lease))
            self.leases.add(lease)
        reservation = Reservation(partition, tuple(rows), buckets, lease)
        return Admission(admitted=True, states=states, reservation=reservation)

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        reservation.check_deltas(deltas)
        rows, buckets = reservation.rows, reservation.buckets
        lease = reservation.lease
        counters: list[str] = []  # of the rows to send
        ints: list[int] = []
        if lease is not None:  # released in every lease row that took it
            for row, bucket in zip(rows, buckets, strict=True):
                if row.is_lease and bucket != NOT_RESERVED:
                    counters.append(row.counter)
                    ints += (0, -1, 0, 0)
            self.leases.discard(lease)
        # Most rows of a settlement have no delta (only output rows are corrected):
        # they cost one test each.
        for i, delta in enumerate(deltas):
            if delta:
                row = rows[i]
                if not row.is_lease:
                    counters.append(row.counter)
                    ints += (row.bucket_ms, row.span, buckets[i], delta)
        if counters:
            prefix = key_prefix(reservation.partition)
            ints.append(int(lease.id) if lease is not None else 0)
            # A refund may wait a little (the window counts the worst case meanwhile:
            # fewer admissions, never more); a charge or a lease release may not.
            refund = lease is None and all(delta <= 0 for delta in deltas)
            await self._call(SETTLE, [prefix + c for c in counters], _pack(ints), lazy=refund)

    async def renew(self, leases: Sequence[Lease]) -> None:
        by_partition: dict[str, tuple[list[str], list[int]]] = {}
        for lease in leases:
            keys, ints = by_partition.setdefault(lease.partition, ([], []))
            for row in lease.rows:
                keys.append(key_name(lease.partition, row))
                ints += (row.window_ms, int(lease.id))
        failures: list[StoreError] = []

        async def one(keys: list[str], argv: bytes) -> None:
            try:
                await self._call(RENEW, keys, argv)
            except StoreError as exc:
                failures.append(exc)

        # One call per partition (its keys share a slot), all of them at once.
        async with trio.open_nursery() as nursery:
            for keys, ints in by_partition.values():
                nursery.start_soon(one, keys, _pack(ints))
        if failures:
            raise StoreError(
                f"{len(failures)} of {len(by_partition)} renewals failed: {failures[0]}"
            )

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        if not rows:
            return ()
        keys = [key_name(partition, row) for row in rows]
        ints: list[int] = []
        for r in rows:
            ints += (r.window_ms, -1) if r.is_lease else (r.bucket_ms, r.span)
            ints += (r.limit, r.amount)
        values = _unpack(await self._call(USAGE, keys, _pack(ints)))
        return tuple(
            RowState(
                row=row,
                used=values[4 * i],
                reset_after=values[4 * i + 1] / 1000,
                fits=values[4 * i + 2] == 1,
                retry_after=None if values[4 * i + 3] < 0 else values[4 * i + 3] / 1000,
            )
            for i, row in enumerate(rows)
        )

    # -- the registry (not on the pipelines: rare calls, a thread of their own)

    async def _registry_call(self, command: Any, *args: Any, abandon: bool = True) -> Any:
        """``command(client, *args)`` in the registry's thread; a read (``abandon``) is
        left to finish alone if the caller is cancelled, a write is waited for."""
        client = self._client
        if client is None or not self._running:
            raise StoreError(f"store {self.url} is not running (use it inside run())")
        try:
            return await trio.to_thread.run_sync(
                command, client, *args, limiter=self._registry_thread, abandon_on_cancel=abandon
            )
        except _REDIS_ERRORS as exc:
            if isinstance(exc, _CONNECTION_LOST):
                self._policy_stale = True
            raise _store_error(exc) from exc

    async def registry_version(self) -> int:
        value = await self._registry_call(lambda client: client.get(REGISTRY_VERSION))
        return int(value or 0)

    async def registry_get(self, kind: str, name: str) -> str | None:
        value = await self._registry_call(
            lambda client: client.hget(REGISTRY_RECORDS, f"{kind}/{name}")
        )
        return None if value is None else value.decode()

    async def registry_load(self) -> tuple[int, Registry]:
        version, flat = await self._registry_call(
            lambda client: client.eval(REGISTRY_LOAD, 2, REGISTRY_RECORDS, REGISTRY_VERSION)
        )
        records: Registry = {}
        for field, record in zip(flat[::2], flat[1::2], strict=True):
            kind, _, name = field.decode().partition("/")
            records[(kind, name)] = record.decode()
        return int(version), records

    async def registry_put(
        self, kind: str, name: str, record: str | None, *, expect: RegistryExpect = ANYTHING
    ) -> int | None:
        if "/" in kind:
            raise ValueError(f"a registry kind has no '/': {kind!r}")
        if expect is ANYTHING:
            condition, expected = "any", ""
        elif expect is None:
            condition, expected = "absent", ""
        else:
            condition, expected = "equal", expect
        argv = (f"{kind}/{name}", condition, expected, "delete" if record is None else "put")
        argv += (record or "",)
        version = await self._registry_call(
            lambda client: client.eval(REGISTRY_PUT, 2, REGISTRY_RECORDS, REGISTRY_VERSION, *argv),
            abandon=False,
        )
        return None if version < 0 else int(version)

    # -- records (one key each, expiring; rare calls, on the registry's thread)

    async def record_put(self, name: str, value: str, ttl_seconds: float) -> None:
        check_record(name, value, ttl_seconds)
        ttl_ms = max(1, int(ttl_seconds * 1000))
        await self._registry_call(
            lambda client: client.set(record_key(name), value, px=ttl_ms), abandon=False
        )

    async def record_get(self, name: str) -> str | None:
        value = await self._registry_call(lambda client: client.get(record_key(name)))
        return None if value is None else value.decode()

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
