"""The oracle: every admission and settlement of a simulation, and the invariants on them.

It is told what the clients saw (each request's authentication, answer and end, from
:mod:`bench.simulate.node`), what the product settled (the gateway's
:class:`~bench.simulate.node.Witness`) and what the store applied (registry writes, the
loss of its data, registry reads by each node). It checks, as they happen:

* the counters' invariants (:mod:`bench.simulate.counter_invariants`): **window**
  (``over-admission``: never more admitted in a window than the documented bounds
  allow), **local-share** and **max-concurrent**;
* **deadline**: every admission is answered within ``MAX_WAIT_FACTOR`` times the store
  timeout (plus any stall of the whole event loop meanwhile): the guarded store's
  deadline (tokenguard/store/deadlines.py).
* **unknown-key**: a config key is never refused as unknown unless it was revoked; a
  key created through the admin API is not refused by a node that has read the
  registry since it was created.
* **revoked-key**: a revoked key is refused by a node once it has read the registry
  since the revocation, and by every node within ``REVOCATION_SECONDS`` unless a fault
  cut that node off from the store meanwhile (then: once it reads the registry).
* **settled-once**: every admitted request that ended is settled exactly once, with the
  deltas its end implies (what it produced, less what it reserved, in output and
  total-tokens rows; its lease released), within ``SETTLE_GRACE`` unless its node died.
* **feed** (:mod:`bench.simulate.feed_invariant`): a watcher's events come from each
  node in order, never twice, never more than the decisions they report;
* at the end (:meth:`Oracle.final`), **bounded**: nothing left to write back, no call
  waiting, no lease held, an empty settler queue, the limiter's cache within its
  bound, the breaker closed; and, a window and a lease time later, no counter left in
  the store or a node's local windows but the long-window ones (hour, day).

The first violation ends the run (``abort``) and is kept with the trace's last lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bench.simulate.counter_invariants import SLACK, CounterInvariants, Entry, Incarnation
from bench.simulate.faults import IMPAIRING, Fault
from bench.simulate.feed_invariant import FeedInvariant
from bench.simulate.product import (
    KEY,
    MAX_WAIT_FACTOR,
    NOT_RESERVED,
    OUTGOING_LIMIT,
    SEEN_LIMIT,
    TEMPLATE_CACHE,
    ApiKey,
    Decision,
    KeyRecord,
    LocalReservation,
    Reservation,
    Row,
)
from bench.simulate.trace import Trace
from bench.simulate.traffic import SimConfig

if TYPE_CHECKING:
    from bench.simulate.node import SimNode
    from bench.simulate.traffic import Request

# A revoked key is refused everywhere within this long (docs/design.md: the keyring
# polls every 0.25 s; "within a second").
REVOCATION_SECONDS = 1.0
# After a fault that cuts a node off, its breaker closes at the next probe (1 s), then
# holds (1.25 s), then its keyring polls (0.25 s): a revocation may take this long more.
RECOVERY_SECONDS = 3.0
# A refund handed to the settler reaches the store's witness within this long.
SETTLE_GRACE = 5.0


@attrs.frozen
class Violation:
    """An invariant that did not hold: which, why, when, and the last events before."""

    invariant: str
    message: str
    time: float
    trace: tuple[str, ...]
    key: str | None = None  # the key whose request broke it, when one did


@attrs.define(slots=True)
class _Admitted:
    node: SimNode
    request: Request
    decision: Decision
    entries: list[Entry]
    leases: list[tuple[str, str]]


@attrs.define(slots=True)
class _Pending:
    node: SimNode
    key: str
    number: int
    deltas: list[int]
    due: float
    reservation: Reservation


class Oracle:
    """The invariants of one simulation (see the module docstring)."""

    def __init__(
        self,
        config: SimConfig,
        faults: Sequence[Fault],
        trace: Trace,
        *,
        shares_per_node: bool = False,
    ) -> None:
        settings = config.settings
        # Local admissions count per node incarnation (a restarted node's local windows
        # start empty: docs/reliability.md), or, with ``shares_per_node``, per node
        # across its restarts (what a node that kept its windows would guarantee).
        self.shares_per_node = shares_per_node
        self.trace = trace
        self.cluster_size = settings.supervised_nodes
        self.deadline = MAX_WAIT_FACTOR * settings.store_timeout_ms / 1000
        self.violation: Violation | None = None
        self.abort: Callable[[], None] = lambda: None
        self._config_digests = {k.digest: k.name for k in config.keys}
        self._name_digest = {k.name: k.digest for k in config.keys}
        self._created: dict[str, float] = {}  # digest -> when the store applied it
        self._revoked: dict[str, float] = {}  # digest -> when the store applied it
        self._loaded: dict[Incarnation, float] = {}  # latest registry read applied
        self.counters = CounterInvariants(self.cluster_size, self.fail)
        self.feed = FeedInvariant(trace, self.fail)
        self._admitted: dict[int, _Admitted] = {}  # id(reservation) ->
        self._pending: dict[int, _Pending] = {}  # id(reservation) ->
        self._loop_stalls = [f for f in faults if f.kind == "loop-stall"]
        self._impaired = [
            (f.start, f.end + RECOVERY_SECONDS, f.node) for f in faults if f.kind in IMPAIRING
        ]
        self.long_window = 0.0  # windows longer than this are "long" (set by the runner)
        self.counts: dict[str, int] = {}

    # -- reporting

    def fail(self, invariant: str, message: str, key: str | None = None) -> None:
        """Keep the first violation (with the trace's last lines) and end the run
        (``abort``); later ones are ignored: the first is the one to explain."""
        if self.violation is not None:
            return
        self.trace.add(None, "VIOLATION", f"{invariant}: {message}")
        self.violation = Violation(
            invariant, message, trio.current_time(), tuple(self.trace.last()), key
        )
        self.abort()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # -- the store

    def registry_written(self, kind: str, name: str, record: str | None) -> None:
        """The store applied a registry write."""
        if kind != KEY or record is None:
            return
        key = KeyRecord.from_json(record)
        now = trio.current_time()
        if key.revoked:
            digest = self._name_digest.get(name)
            if digest is not None and digest not in self._revoked:
                self._revoked[digest] = now
                self.trace.add(None, "revoked", name)
            return
        self._name_digest[name] = key.digest
        if key.digest not in self._config_digests and key.digest not in self._created:
            self._created[key.digest] = now
            self.trace.add(None, "created", name)

    def store_lost(self) -> None:
        """The store lost every counter and the registry: what it counted is forgotten."""
        self.counters.store_lost()
        self.trace.add(None, "store-lost")

    def registry_loaded(self, node: SimNode, applied_at: float) -> None:
        incarnation = (node.index, node.incarnation)
        self._loaded[incarnation] = max(self._loaded.get(incarnation, -math.inf), applied_at)

    # -- nodes

    def node_serving(self, node: SimNode) -> None:
        self.trace.add(node.index, "serving", f"incarnation {node.incarnation}")
        self.feed.restarted(node.index)

    def node_crashed(self, node: SimNode) -> None:
        """Its requests are gone (their leases stay in the store until they expire)."""
        for ident, admitted in list(self._admitted.items()):
            if admitted.node is node:
                self._land(admitted)
                del self._admitted[ident]
        for ident, pending in list(self._pending.items()):
            if pending.node is node:
                del self._pending[ident]

    def attempting(self, rows: Iterable[Row], partition: str) -> None:
        """An admission is about to be asked for these rows (long windows are noted:
        their counters may stay in the store after the run)."""
        self.counters.attempting(rows, partition, self.long_window)

    # -- requests

    def authenticated(self, node: SimNode, request: Request, key: ApiKey | None) -> None:
        now = trio.current_time()
        digest = request.digest
        incarnation = (node.index, node.incarnation)
        loaded = self._loaded.get(incarnation, -math.inf)
        revoked = self._revoked.get(digest)
        if key is None:
            self._count("401")
            self.trace.add(node.index, "401", f"#{request.number} {request.key.name}")
            if revoked is not None:
                return
            if digest in self._config_digests:
                self.fail(
                    "unknown-key",
                    f"config key {request.key.name!r} refused as unknown by node {node.name}"
                    f" (it last read the registry as the store was at {loaded:.3f} s)",
                    request.key.name,
                )
                return
            created = self._created.get(digest)
            if created is not None and loaded > created:
                self.fail(
                    "unknown-key",
                    f"key {request.key.name!r}, created at {created:.3f} s, refused as "
                    f"unknown by node {node.name}, which read the registry at {loaded:.3f} s",
                    request.key.name,
                )
            return
        if revoked is None:
            return
        if loaded > revoked:
            self.fail(
                "revoked-key",
                f"key {key.name!r}, revoked at {revoked:.3f} s, served by node {node.name}, "
                f"which read the registry at {loaded:.3f} s",
                key.name,
            )
        elif now - revoked > REVOCATION_SECONDS and not self._cut_off(node.index, revoked, now):
            self.fail(
                "revoked-key",
                f"key {key.name!r}, revoked at {revoked:.3f} s, still served by node "
                f"{node.name} {now - revoked:.3f} s later with no fault in between",
                key.name,
            )

    def _cut_off(self, index: int, start: float, end: float) -> bool:
        return any(
            s <= end and e >= start - REVOCATION_SECONDS and (n is None or n == index)
            for s, e, n in self._impaired
        )

    def answered(
        self,
        node: SimNode,
        request: Request,
        key: ApiKey,
        started: float,
        status: int,
        decision: Decision | None,
        asked: Sequence[Row],
    ) -> None:
        """An admission was answered; ``asked`` are its rows as the limiter built them
        (with the real limits: a local admission's own rows carry the node's share)."""
        now = trio.current_time()
        stalled = sum(f.duration for f in self._loop_stalls if started <= f.start <= now)
        if now - started > self.deadline + stalled + SLACK:
            self.fail(
                "deadline",
                f"request #{request.number} ({key.name}) on node {node.name} answered "
                f"{now - started:.3f} s after it asked the store (deadline {self.deadline} s)",
                key.name,
            )
        kind = "200" if decision is not None and decision.reservation is not None else str(status)
        self.feed.decided(node.index, key.name, kind)
        if decision is None or decision.reservation is None:
            self._count(str(status))
            self.trace.add(node.index, str(status), f"#{request.number} {key.name}")
            return
        reservation = decision.reservation
        local = isinstance(reservation, LocalReservation)
        self._count("200 local" if local else "200")
        cost = decision.cost
        self.trace.add(
            node.index,
            "200",
            f"#{request.number} {key.name} {'local' if local else 'store'} "
            f"in={cost.input_tokens} out={cost.output_tokens}",
        )
        incarnation = None
        if local:
            incarnation = (node.index, 0 if self.shares_per_node else node.incarnation)
        admitted = _Admitted(node, request, decision, [], [])
        self._admitted[id(reservation)] = admitted
        partition = reservation.partition
        for row, bucket in zip(asked, reservation.buckets, strict=True):
            if not row.enforce or bucket == NOT_RESERVED:
                continue
            counter = (partition, row.counter)
            if row.is_lease:
                admitted.leases.append(counter)
                self.counters.lease(node, request, counter, row, started, incarnation)
            elif row.amount > 0:
                entry = Entry(now, row.amount, row.limit, row.dimension, incarnation)
                admitted.entries.append(entry)
                self.counters.window(node, counter, row, entry, key.name)

    def _land(self, admitted: _Admitted) -> None:
        """The request is over: it no longer holds its leases."""
        self.counters.land(admitted.request.number, admitted.leases)

    def finished(self, node: SimNode, decision: Decision, produced: int) -> None:
        """The request ended, having produced ``produced`` output tokens."""
        reservation = decision.reservation
        assert reservation is not None
        admitted = self._admitted.pop(id(reservation), None)
        if admitted is None:
            return
        self._land(admitted)
        # The gateway settles every request that ended (its feed says so even when the
        # store has nothing to correct).
        self.feed.decided(node.index, admitted.request.key.name, "settled")
        delta = produced - decision.cost.output_tokens
        for entry in admitted.entries:
            if entry.dimension in ("output_tokens", "total_tokens"):
                entry.amount = max(0, entry.amount + delta)
        deltas = [
            delta
            if bucket != NOT_RESERVED and row.dimension in ("output_tokens", "total_tokens")
            else 0
            for row, bucket in zip(reservation.rows, reservation.buckets, strict=True)
        ]
        if any(deltas) or reservation.lease is not None:
            self._pending[id(reservation)] = _Pending(
                node,
                admitted.request.key.name,
                admitted.request.number,
                deltas,
                trio.current_time() + SETTLE_GRACE,
                reservation,
            )

    def settling(self, node: SimNode, reservation: Reservation, deltas: Sequence[int]) -> None:
        """The product settles ``reservation`` (the gateway's store was called)."""
        pending = self._pending.pop(id(reservation), None)
        if pending is None or pending.reservation is not reservation:
            self.fail(
                "settled-once",
                f"node {node.name} settled a reservation that awaits no settlement "
                f"(settled twice, or its request never ended): {reservation.partition}",
            )
            return
        self._count("settled")
        self.trace.add(node.index, "settle", f"#{pending.number} {list(deltas)}")
        if list(deltas) != pending.deltas:
            self.fail(
                "settled-once",
                f"request #{pending.number} on node {node.name} settled with deltas "
                f"{list(deltas)}, its end implies {pending.deltas}",
                pending.key,
            )

    def feed_event(self, node: SimNode, body: str) -> None:
        """A feed watcher on ``node`` took this event."""
        self.feed.event(node.index, body)

    async def watch(self) -> None:
        """Check overdue settlements once a second until cancelled."""
        while True:
            await trio.sleep(1.0)
            self.overdue()

    def overdue(self) -> None:
        now = trio.current_time()
        for pending in self._pending.values():
            if pending.due < now and not pending.node.dead:
                self.fail(
                    "settled-once",
                    f"request #{pending.number} on node {pending.node.name} ended "
                    f"{now - pending.due + SETTLE_GRACE:.3f} s ago and was never settled",
                    pending.key,
                )
                return

    # -- the end

    def final(self, nodes: Iterable[SimNode]) -> None:
        """What must hold once traffic stopped, faults ended and nodes recovered."""
        for pending in self._pending.values():
            if not pending.node.dead:
                self.fail(
                    "settled-once",
                    f"request #{pending.number} on node {pending.node.name} was never settled",
                    pending.key,
                )
                return
        counters = self.counters.attempted_counters
        buckets = self.counters.attempted_buckets
        for node in nodes:
            sizes = node.sizes()
            limits = {
                # A local admission made while the breaker stayed closed waits for the
                # node's next store call that succeeds: one entry per counter and bucket.
                "unsynced": buckets,
                "waiting": 0,
                "store_leases": 0,
                "local_leases": 0,
                "settler_queue": 0,
                "templates": TEMPLATE_CACHE,
                "feed_queue": OUTGOING_LIMIT,
                "seen": min(SEEN_LIMIT, counters),
            }
            for what, most in limits.items():
                if sizes[what] > most:
                    self.fail(
                        "bounded",
                        f"node {node.name}: {what} is {sizes[what]} at the end (at most {most})",
                    )
                    return
            if sizes["breaker"] != "closed":
                self.fail("bounded", f"node {node.name}: breaker still open at the end")
                return

    def final_counters(self, remaining: dict[str, int]) -> None:
        """After a window and a lease time with no traffic: counters left in each store
        (``where -> count``), at most the long-window ones."""
        most = self.counters.long_counters
        for where, count in remaining.items():
            if count > most:
                self.fail(
                    "bounded",
                    f"{where}: {count} counters left after a quiet window, at most {most} "
                    "(hour and day windows)",
                )
                return

    def summary(self) -> dict[str, Any]:
        return dict(sorted(self.counts.items()))
