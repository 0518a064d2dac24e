"""What a node does when its shared window store fails: :class:`GuardedStore`.

Every node wraps its shared store (Redis) in a :class:`GuardedStore`, itself a
:class:`~tokenguard.store.window_store.WindowStore`, so the limiter and the app know nothing of it:

* **A deadline on every call** (``timeout``, 100 ms by default), judged by one
  watchdog task for all calls. A call fails on it only when the store had the time to
  answer and did not: once ``timeout`` of this node's *running* time has passed since
  the call was made or since the store last showed progress, whichever is later.
  Progress is the store answering any call of this node, being written calls (the
  driver notes when a pipeline's write is done: ``WindowStore.last_sent``), or being
  heard from (its replies read, before their callers run: ``last_heard``). Running
  time leaves out this node's own stalls (a GC pass, a starved CPU, a loop held by its
  own tasks), measured by a :class:`~tokenguard.store.stalls.StallMeter` (a loop-lag probe and
  ``gc.callbacks``). Before cutting any call, the watchdog lets the replies already in
  be read (a few scheduling rounds for the driver's reader, more while it is still
  reading). So a dead or hung store costs each call ``timeout`` after its send (plus
  the node's stalls meanwhile), while calls queued behind a store that keeps answering
  (a burst on a busy machine), sent late because this node stalled, or answered while
  it did not run, are not failures.

  Whatever happens, no call waits more than ``MAX_WAIT_FACTOR`` (10) times the timeout
  of wall time from when it was made (a store that answers others but never it: one
  Redis Cluster master hung). A call cut there before the store had ``timeout`` of the
  node's running time (the node stalled for most of it) fails with
  :class:`NodeStalled`: the policy answers it, but the breaker does not count it. A
  call that misses its deadline is abandoned (the Redis driver takes a call that has
  not been sent off its queue, and drops the reply of one that has; its worker threads
  and pipelines are bounded, so nothing piles up) and counts as a failure, like a
  :class:`StoreError`.
* **A circuit breaker** (:class:`Breaker`): ``threshold`` (3) failures in a row open it
  (the node's own stalls are never failures: see above). While it is open no request
  touches the store at all, so a dead or hung Redis adds no latency; a background task
  probes the store once a ``probe_interval`` (1 s) with one read. When a probe
  succeeds, the breaker closes (after the write-back below).
* **The failure policy** answers every call the store did not (a failure, or an open
  breaker):

  - ``local``: the node admits against windows of its own (a memory store) in which
    every limit is divided among the ``cluster_size`` nodes (:func:`node_share`), so
    the nodes together admit no more than the limit. The local windows also count
    what this node admitted through the store before the outage (every admission and
    settlement is mirrored into them: a few microseconds of in-process work), so a node
    that spent its share just before the outage does not get it again. An admission is
    counted there from the moment it is sent to the store (and taken back if the store
    refuses or fails), so admissions still in flight when the breaker opens are
    counted by the local admissions made meanwhile. When the store
    is back, what was admitted locally is written back into it (added to the very
    buckets it was counted in) *before* the breaker closes, so the shared windows know
    about the outage's traffic; then, for a probe interval more, the node admits only
    what the store *and* its share allow (the other nodes are writing theirs back).
    A local admission made while the breaker was still closed is written back as soon
    as the store answers again.
  - ``closed``: every such call raises :class:`StoreError` (the app answers 503 with
    ``retry-after: 1``).
  - ``open``: every admission is granted unchecked; each one is counted
    (``fail_open_admissions``) and logged (at most one line a second, with the count).

* A store that comes back **without its data** (no persistence, ``FLUSHALL``, a
  failover to a replica that lacks it, eviction): :meth:`GuardedStore.restore_windows`,
  called by the keyring when it finds the registry lost, writes what the local windows
  hold (policy ``local``: everything this node admitted in the current windows) back
  into the store's very buckets.
* A store that cannot be reached at start does not stop the node: it starts with the
  breaker open, and :meth:`GuardedStore.run` keeps trying to start the store, once a
  ``probe_interval``.

Where each reservation comes from is remembered (its type): a reservation of the local
windows is settled there, one of the store in the store (and mirrored locally), one of
the ``open`` policy nowhere.

Publish/subscribe go to the store unchanged, except that a publish fails at once while
the breaker is open.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Self

import attrs
import trio

from tokenguard.config.settings import STORE_ERROR_POLICIES, Settings
from tokenguard.log_throttle import LogThrottle
from tokenguard.store.breaker import BREAKER_THRESHOLD, Breaker
from tokenguard.store.deadlines import NodeStalled, _Deadlines, _Wait
from tokenguard.store.guard_stats import GuardStats
from tokenguard.store.local_windows import LocalReservation, _LocalWindows, node_share
from tokenguard.store.rows import Admission, Reservation, Row, RowState
from tokenguard.store.stalls import StallMeter
from tokenguard.store.window_store import (
    ANYTHING,
    NOBODY,
    Ahead,
    Registry,
    RegistryExpect,
    StoreError,
    TicketHolder,
    TicketOp,
    WindowStore,
    evictable,
    store_from_url,
)
from tokenguard.store.write_back import _WriteBack

log = logging.getLogger("tokenguard.store.guarded")

# A ticket step of the admission queue (WindowStore.tickets) is given up after this.
TICKET_SECONDS = 1.0

POLICIES = STORE_ERROR_POLICIES
Policy = Literal["local", "closed", "open"]
DEFAULT_POLICY: Policy = "local"
DEFAULT_TIMEOUT_MS = 100
PROBE_INTERVAL = 1.0
# The probe reads one counter no key ever uses.
PROBE_PARTITION = "tg-probe"
PROBE_ROW = Row(scope="probe", dimension="requests", window_ms=1000, bucket_ms=1000, limit=1)


@attrs.frozen
class UncheckedReservation(Reservation):
    """A reservation of the ``open`` policy: nothing was counted, nothing to settle."""


class GuardedStore(_Deadlines, _LocalWindows, _WriteBack, WindowStore):
    """The node's store: ``primary`` behind deadlines, a breaker and a failure policy.

    ``cluster_size`` and ``node_id`` size this node's share of each limit for the
    ``local`` policy (see :func:`node_share`; ``spread`` as there). ``fallback`` is the
    local windows (a fresh ``memory://`` store by default). ``stalls`` measures this
    node's own stalls, which no deadline counts against the store (a
    :class:`~tokenguard.store.stalls.StallMeter` of its own by default, run by :meth:`run`).
    """

    def __init__(
        self,
        primary: WindowStore,
        *,
        policy: Policy = DEFAULT_POLICY,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000,
        cluster_size: int = 1,
        node_id: int = 0,
        spread: bool = True,
        threshold: int = BREAKER_THRESHOLD,
        probe_interval: float = PROBE_INTERVAL,
        fallback: WindowStore | None = None,
        stalls: StallMeter | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"on_store_error must be one of {', '.join(POLICIES)}: {policy!r}")
        if not timeout > 0:
            raise ValueError(f"the store timeout must be > 0, got {timeout!r}")
        self.primary = primary
        self.url = primary.url
        self.policy: Policy = policy
        self.timeout = timeout
        self.cluster_size = max(1, cluster_size)
        self.node_id = node_id
        self.spread = spread
        self.probe_interval = probe_interval
        self.fallback = fallback if fallback is not None else store_from_url("memory://")
        self.stalls = stalls if stalls is not None else StallMeter()
        self.breaker = Breaker(threshold=threshold)
        self.stats = GuardStats()
        self._primary_running = False
        self._nursery: trio.Nursery | None = None
        # Local admissions not yet written back: (partition, counter, bucket) -> [row, amount]
        self._unsynced: dict[tuple[str, str, int], list[Any]] = {}
        self._epoch = 0
        # The cluster-wide usage this node last saw per counter, from the store's own
        # replies: (partition, counter) -> (used, trio.current_time()). Seeds the local
        # windows when they take over (see _seed_from_cluster).
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}
        self._recovering = False
        self._hold_until = -math.inf  # trio.current_time(); see _admit_holding
        # The deadline watchdog: calls waiting on the store, and when the store last
        # answered one (trio.current_time()).
        self._waiting: dict[trio.CancelScope, _Wait] = {}
        self._last_answer = -math.inf
        # While the watchdog sleeps, the shortest deadline of the calls it knows (inf:
        # none). A call with a shorter one (a request's beside a write-back's) may be
        # due before the watchdog's next look: it wakes it. (With equal deadlines, a
        # later call is never due sooner.)
        self._watchdog_shortest = math.inf
        self._rejudge = trio.Event()
        self._unsynced_soon = trio.Event()  # see _sync_forever
        self._open_log = LogThrottle()
        self._failure_log = LogThrottle()

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(store_from_url(url))

    # -- state

    def status(self) -> dict[str, Any]:
        """The store's state, for ``/readyz``."""
        breaker = self.breaker
        body: dict[str, Any] = {
            "store": "ok" if not breaker.is_open else "unavailable",
            "breaker": breaker.state,
            "policy": self.policy,
            "consecutive_failures": breaker.failures,
            "failures": self.stats.failures,
            "timeouts": self.stats.timeouts,
            "stalled_out": self.stats.stalled_out,
            "node_stalled_seconds": round(self.stalls.total, 3),
            "local_admissions": self.stats.local_admissions,
            "fail_open_admissions": self.stats.fail_open_admissions,
            "last_outage_seconds": self.stats.last_outage_seconds,
        }
        if breaker.opened_at is not None:
            body["open_for_seconds"] = round(time.monotonic() - breaker.opened_at, 3)
        holding = self._hold_until - trio.current_time()
        if not breaker.is_open and holding > 0:
            # Back on the store, but within this node's share too for this long more.
            body["holding_seconds"] = round(holding, 3)
        if self.stats.last_error is not None:
            body["last_error"] = self.stats.last_error
        policy = self.eviction_policy
        if policy is not None:
            body["eviction_policy"] = policy
            evicts = evictable(policy)
            body["evictable"] = None if evicts is None else list(evicts)
        return body

    def share(self, limit: int) -> int:
        return node_share(limit, self.cluster_size, self.node_id, spread=self.spread)

    @property
    def eviction_policy(self) -> str | None:  # type: ignore[override]
        return self.primary.eviction_policy

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the local windows and the store (or, if it cannot be reached, start
        with the breaker open); probe while the breaker is open."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.stalls.run)
            await nursery.start(self.fallback.run)
            try:
                await nursery.start(self.primary.run)
            except StoreError as exc:
                self._trip(f"cannot reach the store at start: {exc}")
            else:
                self._primary_running = True
            nursery.start_soon(self._probe_forever)
            nursery.start_soon(self._watchdog)
            nursery.start_soon(self._sync_forever)
            task_status.started()

    async def _probe_forever(self) -> None:
        while True:
            await trio.sleep(self.probe_interval)
            if self.breaker.is_open and not self._recovering:
                await self.probe()

    async def probe(self) -> bool:
        """One probe (starting the store first if it never started); on success, write
        back the local admissions and close the breaker. True if it closed."""
        if not self._primary_running:
            assert self._nursery is not None
            try:
                await self._nursery.start(self.primary.run)
            except StoreError as exc:
                self.stats.last_error = str(exc)
                return False
            self._primary_running = True
        try:
            with self._deadline():
                await self.primary.usage(PROBE_PARTITION, [PROBE_ROW])
        except StoreError as exc:
            self.stats.last_error = str(exc)
            return False
        return await self._recover()

    # -- the breaker

    def _failed(self, exc: StoreError) -> None:
        if isinstance(exc, NodeStalled):
            return  # not the store's failure: the breaker does not count it
        self.stats.failures += 1
        self.stats.last_error = str(exc)
        was_open = self.breaker.is_open
        self.breaker = self.breaker.failed(time.monotonic())
        if self.breaker.is_open and not was_open:
            self._opened(str(exc))
        elif not was_open:
            held = self._failure_log.ready()
            if held is not None:
                log.warning(
                    "store call failed (%d in a row; policy %s applies): %s",
                    self.breaker.failures,
                    self.policy,
                    exc,
                )

    def _trip(self, why: str) -> None:
        self.stats.last_error = why
        if not self.breaker.is_open:
            self.breaker = self.breaker.open(time.monotonic())
            self._opened(why)

    def _opened(self, why: str) -> None:
        self.stats.breaker_opened += 1
        what = {
            "local": f"each node admits against its own windows at 1/{self.cluster_size} "
            "of every limit",
            "closed": "requests are refused with 503",
            "open": "requests are admitted unchecked (and counted)",
        }[self.policy]
        log.warning(
            "store %s unavailable (%s): breaker open, policy %s: %s; probing every %g s",
            self.url,
            why,
            self.policy,
            what,
            self.probe_interval,
        )

    async def _primary(self, call: Any, *args: Any) -> Any:
        """``await call(*args)`` on the store within its deadline (:meth:`_deadline`);
        record the outcome for the breaker."""
        start = trio.current_time()
        try:
            with self._deadline():
                result = await call(*args)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._last_answer = trio.current_time()
        self.stats.call_seconds.observe(call.__name__, self._last_answer - start)
        self.breaker = self.breaker.succeeded()
        if self._unsynced and not self.breaker.is_open:
            self._unsynced_soon.set()  # the store answers: tell it what it missed
        return result

    # -- the WindowStore interface

    async def admit(
        self, partition: str, rows: Sequence[Row], ahead: Ahead = (), rank: int = 0
    ) -> Admission:
        """:meth:`WindowStore.admit`; with ``ahead``, :meth:`admit_in_turn` in the
        store (degraded: :meth:`admit` in the fallback, as the lines are the store's)."""
        if not self.breaker.is_open:
            if self.policy == "local" and trio.current_time() < self._hold_until:
                return await self._admit_holding(partition, rows)
            # Mirror: the local windows count what this node admits through the store,
            # from the moment it asks (so that a local admission made while this call
            # is in flight, the breaker having opened meanwhile, counts it too).
            mirror = await self._precount(partition, rows) if self.policy == "local" else None
            try:
                if ahead:
                    admission = await self._primary(
                        self.primary.admit_in_turn, partition, rows, ahead, rank
                    )
                else:
                    admission = await self._primary(self.primary.admit, partition, rows)
            except StoreError:
                if mirror is not None:
                    await self._uncount(mirror)
            else:
                if mirror is not None and admission.reservation is None:
                    await self._uncount(mirror)
                if self.policy == "local" and self.cluster_size > 1:
                    self._saw(partition, admission.states)
                return admission
        return await self._degraded_admit(partition, rows)

    async def _degraded_admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        if self.policy == "closed":
            self.stats.refused_unavailable += 1
            raise StoreError(f"store {self.url} unavailable (policy closed)")
        if self.policy == "open":
            self.stats.fail_open_admissions += 1
            held = self._open_log.ready()
            if held is not None:
                log.warning(
                    "store unavailable, policy open: admitted key id %s unchecked "
                    "(%d such admissions so far, %d since the last line)",
                    partition,
                    self.stats.fail_open_admissions,
                    held + 1,
                )
            states = tuple(RowState(row=row, used=0, reset_after=0.0) for row in rows)
            reservation = UncheckedReservation(
                partition=partition, rows=tuple(rows), buckets=(0,) * len(rows)
            )
            return Admission(admitted=True, states=states, reservation=reservation)
        return await self._admit_local(partition, rows)

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        if isinstance(reservation, UncheckedReservation):
            return
        if isinstance(reservation, LocalReservation):
            await self.fallback.settle(reservation, deltas)
            if reservation.epoch == self._epoch:  # not written back yet: travels settled
                for row, bucket, delta in zip(
                    reservation.rows, reservation.buckets, deltas, strict=True
                ):
                    entry = self._unsynced.get((reservation.partition, row.counter, bucket))
                    if entry is not None and delta:
                        entry[1] = max(0, entry[1] + delta)
            return
        if self.policy == "local":
            await self.fallback.settle(reservation, deltas)  # the mirror
        if self.breaker.is_open:
            # Not sent: the reservation stays whole in the store until its bucket
            # leaves the window (fewer admissions, never more).
            self.stats.settlements_dropped += 1
            return
        await self._primary(self.primary.settle, reservation, deltas)

    async def tally(self, partition: str, row: Row) -> None:
        """Into the store, or dropped: a tally is no admission, so no failure policy
        answers it (nor counts it) while the store is down."""
        if self.breaker.is_open:
            return
        try:
            await self._primary(self.primary.tally, partition, row)
        except StoreError:
            pass

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        if not self.breaker.is_open:
            try:
                return await self._primary(self.primary.usage, partition, rows)
            except StoreError:
                if self.policy == "closed":
                    raise
        if self.policy == "closed":
            raise StoreError(f"store {self.url} unavailable (policy closed)")
        if self.policy == "open":
            return tuple(RowState(row=row, used=0, reset_after=0.0) for row in rows)
        shared = [attrs.evolve(row, limit=self.share(row.limit)) for row in rows]
        return await self.fallback.usage(partition, shared)

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        if self.breaker.is_open:
            raise StoreError(f"store {self.url} unavailable: not published")
        await self.primary.publish(channel, messages)

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.primary.subscribe(channel)

    async def admit_in_turn(
        self, partition: str, rows: Sequence[Row], ahead: Ahead, rank: int = 0
    ) -> Admission:
        return await self.admit(partition, rows, ahead, rank)

    async def tickets(
        self, partition: str, line: str, op: TicketOp, ticket: int = 0, by: TicketHolder = NOBODY
    ) -> tuple[int, int]:
        # The queue's order across nodes: the store's or none (no local stand-in: a
        # queue that cannot reach it orders its waiters per node). Outside the
        # breaker's count, like the registry: a slow ticket step costs the order across
        # nodes, and must never send the node's admissions to `on_store_error`.
        if self.breaker.is_open:
            raise StoreError(f"store {self.url} unavailable: no ticket line")
        with self._deadline(TICKET_SECONDS):
            return await self.primary.tickets(partition, line, op, ticket, by)

    # The registry (keys, tiers) goes to the store unchanged, outside the breaker's
    # count: its callers bound their own waits and keep their last view on a failure.
    # While the breaker is open it fails at once, like publish.

    def _registry_open(self) -> None:
        if self.breaker.is_open:
            raise StoreError(f"store {self.url} unavailable: registry not reached")

    async def registry_version(self) -> int:
        self._registry_open()
        return await self.primary.registry_version()

    async def registry_load(self) -> tuple[int, Registry]:
        self._registry_open()
        return await self.primary.registry_load()

    async def registry_get(self, kind: str, name: str) -> str | None:
        self._registry_open()
        return await self.primary.registry_get(kind, name)

    async def registry_put(
        self, kind: str, name: str, record: str | None, *, expect: RegistryExpect = ANYTHING
    ) -> int | None:
        self._registry_open()
        return await self.primary.registry_put(kind, name, record, expect=expect)

    # Records go to the store as the registry does (outside the breaker's count).

    async def record_put(self, name: str, value: str, ttl_seconds: float) -> None:
        self._registry_open()
        await self.primary.record_put(name, value, ttl_seconds)

    async def record_get(self, name: str) -> str | None:
        self._registry_open()
        return await self.primary.record_get(name)


def guarded_store(settings: Settings) -> WindowStore:
    """The store a node uses: ``settings.store_url``'s, in a :class:`GuardedStore`
    unless it is ``memory://`` (in-process: it cannot fail)."""
    store = store_from_url(settings.store_url)
    if settings.store_url.startswith("memory:"):
        return store
    if settings.cluster_size is not None:  # nodes over several machines: ids may repeat
        cluster_size, spread = settings.cluster_size, False
    else:  # the supervisor's nodes: ids 0 .. n-1
        cluster_size, spread = settings.supervised_nodes, True
    return GuardedStore(
        store,
        policy=settings.on_store_error,  # type: ignore[arg-type]
        timeout=settings.store_timeout_ms / 1000,
        cluster_size=cluster_size,
        node_id=settings.node_id,
        spread=spread,
    )
