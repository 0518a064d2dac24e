"""The Redis window store itself: lifecycle, the WindowStore calls, the registry and the
eviction-policy watch; its pipelines, cluster routing and pub/sub are mixed in."""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
from collections.abc import Sequence
from typing import Any, Self

import attrs
import redis
import redis.exceptions
import trio
from redis.cluster import RedisCluster

from drivers.redis.batching import _Batching, _Call
from drivers.redis.pubsub import _PubSub
from drivers.redis.routing import _ClusterRouting
from drivers.redis.scripts import (
    ADMIT,
    REGISTRY_LOAD,
    REGISTRY_PUT,
    REGISTRY_RECORDS,
    REGISTRY_VERSION,
    RENEW,
    SCRIPTS,
    SETTLE,
    TICKETS,
    USAGE,
    _pack,
    _unpack,
    holder_key,
    key_name,
    key_prefix,
    record_key,
    ticket_keys,
)
from drivers.redis.urls import RedisTarget, parse_redis_url
from drivers.redis.wire import _CONNECTION_LOST, _REDIS_ERRORS, Traffic, _store_error, _Wire
from tokenguard.store.leases import HeldLeases
from tokenguard.store.rows import NOT_RESERVED, Admission, Lease, Reservation, Row, RowState
from tokenguard.store.window_store import (
    ANYTHING,
    NOBODY,
    TICKET_SEQUENCE_MS,
    Ahead,
    Registry,
    RegistryExpect,
    StoreError,
    TicketHolder,
    TicketOp,
    WindowStore,
    behind_waiters,
    check_record,
    evictable,
    redact_url,
)

log = logging.getLogger(__name__)

# The server's maxmemory-policy is read at start, within this long (s) of the store
# answering again after a lost connection (a restart, a failover), and at least this
# often (s) besides (CONFIG SET changes it without a reconnect).
EVICTION_POLL = 1.0
EVICTION_RECHECK = 60.0


class RedisStore(_Batching, _ClusterRouting, _PubSub, WindowStore):
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

    async def admit(
        self, partition: str, rows: Sequence[Row], ahead: Ahead = (), rank: int = 0
    ) -> Admission:
        """:meth:`WindowStore.admit`; with ``ahead``, :meth:`admit_in_turn` (one script:
        the ticket lines' keys and row indexes follow the rows', see ``lua/admit.lua``)."""
        if not rows:
            return Admission(admitted=True, states=(), reservation=Reservation(partition, (), ()))
        keys, ints, lease_id = self._admit_arguments(partition, rows, ahead, rank)
        values = _unpack(await self._call(ADMIT, keys, _pack(ints)))
        return self._admission(partition, rows, values, lease_id)

    def _admit_arguments(
        self, partition: str, rows: Sequence[Row], ahead: Ahead, rank: int
    ) -> tuple[list[str], list[int], int | None]:
        """``admit.lua``'s keys and integer arguments for ``rows`` (and the ticket lines
        of ``ahead`` up to ``rank``), and the lease id they take (``None``: no lease row)."""
        # Every row costs every decision: one pass over them builds the keys and the
        # arguments, and one pass (_admission) reads the states back.
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
        lease_id = self._lease_base + next(self._lease_ids) % (1 << 30) if leased else None
        ints.append(lease_id or 0)
        for index, line in ahead:  # admit_in_turn: each line's expiry sets of ranks 0..rank
            expiries = ticket_keys(partition, line)[1 : 2 + rank]
            keys += expiries
            ints += [index + 1] * len(expiries)
        return keys, ints, lease_id

    def _admission(
        self, partition: str, rows: Sequence[Row], values: tuple[int, ...], lease_id: int | None
    ) -> Admission:
        """The :class:`Admission` that ``admit.lua``'s reply ``values`` says, holding the
        lease ``lease_id`` (``None``: no lease row) when a lease row was consumed."""
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
            # After the states: outcome 3's row behind waiters, else the near-limit rows.
            near = values[2 + 5 * count :] if outcome != 3 else ()
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
            if outcome == 3:  # a ticket line of `ahead` holds a live ticket
                refused = Admission(admitted=False, states=states)
                return behind_waiters(refused, values[2 + 5 * count] - 1)
            buckets = tuple(values[6 : 5 * count + 2 : 5])
        lease = None
        if lease_id is not None and any(
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

    async def admit_in_turn(
        self, partition: str, rows: Sequence[Row], ahead: Ahead, rank: int = 0
    ) -> Admission:
        return await self.admit(partition, rows, ahead, rank)

    async def tickets(
        self, partition: str, line: str, op: TicketOp, ticket: int = 0, by: TicketHolder = NOBODY
    ) -> tuple[int, int]:
        keys = ticket_keys(partition, line)
        if by.name:
            keys += (holder_key(partition, by.name),)
        argv = (op, ticket, by.ttl_ms, TICKET_SEQUENCE_MS, by.most, line, by.rank, by.share)
        taken, first = await self._registry_call(
            lambda client: client.eval(TICKETS, len(keys), *keys, *argv), abandon=op != "take"
        )
        return int(taken), int(first)

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
