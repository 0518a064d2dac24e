"""The oracle's invariants on counters: the amounts and leases admitted in each.

:class:`CounterInvariants` is told every amount and lease a simulated admission took
(by :class:`bench.simulate.oracle.Oracle`) and checks, at each one:

* **window** (``over-admission``): for every enforced counter (partition, scope,
  dimension, window), at every admission, the amounts admitted in the last window (a
  refund counts once its request has ended, which is never before the store knows it)
  are at most what the documented bounds allow for what happened in that window. Let
  ``L`` be the largest limit any of them was admitted under (a limit changed
  meanwhile): ``L`` if any went through the store (which counts every admission made
  through it, and every local one written back: so exactly ``L`` with no fault); plus
  ``node_share(L)`` for each node incarnation that admitted locally in it (policy
  ``local``: each node alone at its share, docs/reliability.md; so a window wholly in
  an outage gets exactly ``L``); plus twice what was admitted in it before the store
  lost its data (forgotten, and refunds of it landing in the empty store).
* **local-share**: a node's local admissions in any window never exceed its share (per
  incarnation: a restarted node's local windows start empty; ``shares_per_node``
  counts across restarts).
* **max-concurrent**: requests in flight with a lease taken through the store (for
  less than a lease time, so their lease cannot have expired unrenewed) are at most
  the limit; those with a local lease at most the node's share.

A violation is reported through the ``fail`` callable it is given (the oracle's), once
per admission at most; it never raises.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs
import trio

from bench.simulate.product import Row, node_share

if TYPE_CHECKING:
    from bench.simulate.node import SimNode
    from bench.simulate.traffic import Request

# Times are compared to the millisecond the stores count in.
SLACK = 0.001

Incarnation = tuple[int, int]
Counter = tuple[str, str]
"""``(partition, row.counter)``: one counter in the store."""
Fail = Callable[[str, str, str | None], None]
"""``fail(invariant, message, key)``: see :meth:`bench.simulate.oracle.Oracle.fail`."""


@attrs.define(slots=True)
class Entry:
    """One admitted amount in one counter (``amount`` drops to what was produced)."""

    t: float
    amount: int
    limit: int
    dimension: str
    local: Incarnation | None
    forgotten: bool = False


@attrs.define(slots=True)
class Flight:
    """A request holding a lease in one lease counter."""

    started: float
    limit: int
    lease_seconds: float
    local: Incarnation | None
    forgotten: bool = False


class CounterInvariants:
    """What was admitted in each counter, and the window, local-share and
    max-concurrent invariants on it (see the module docstring)."""

    def __init__(self, cluster_size: int, fail: Fail) -> None:
        self.cluster_size = cluster_size
        self.fail = fail
        self._counters: dict[Counter, deque[Entry]] = {}
        self._flights: dict[Counter, dict[int, Flight]] = {}
        self._long_counters: set[Counter] = set()
        # Every counter an admission asked for: how many buckets it keeps at most.
        self._attempted: dict[Counter, int] = {}

    def share(self, limit: int, index: int) -> int:
        """Node ``index``'s share of ``limit`` when it admits alone."""
        return node_share(limit, self.cluster_size, index, spread=True)

    @property
    def attempted_counters(self) -> int:
        """How many counters admissions asked for."""
        return len(self._attempted)

    @property
    def attempted_buckets(self) -> int:
        """How many buckets those counters keep, at most, all together."""
        return sum(self._attempted.values())

    @property
    def long_counters(self) -> int:
        """How many of those counters have a window longer than the run's long window."""
        return len(self._long_counters)

    def attempting(self, rows: Iterable[Row], partition: str, long_window: float) -> None:
        """An admission is about to be asked for these rows (windows longer than
        ``long_window`` seconds are noted: their counters may stay after the run)."""
        for row in rows:
            if row.is_lease:
                continue
            counter = (partition, row.counter)
            self._attempted[counter] = row.span + 1
            if row.window_ms / 1000 > long_window:
                self._long_counters.add(counter)

    def store_lost(self) -> None:
        """The store lost every counter: what it counted is forgotten."""
        for log in self._counters.values():
            for entry in log:
                entry.forgotten = True
        for flights in self._flights.values():
            for flight in flights.values():
                if flight.local is None:
                    flight.forgotten = True

    def window(self, node: SimNode, counter: Counter, row: Row, entry: Entry, key: str) -> None:
        """``entry`` was admitted in ``counter``: check the window and local-share
        invariants over the window that ends with it."""
        log = self._counters.get(counter)
        if log is None:
            log = self._counters[counter] = deque()
        log.append(entry)
        horizon = entry.t - row.window_ms / 1000 + SLACK
        while log[0].t <= horizon:
            log.popleft()
        total = forgotten = limit = 0
        through_store = False
        local: dict[Incarnation, int] = {}
        for e in log:
            total += e.amount
            limit = max(limit, e.limit)
            if e.forgotten:
                forgotten += e.amount
            if e.local is not None:
                local[e.local] = local.get(e.local, 0) + e.amount
            else:
                through_store = True
        shares = sum(self.share(limit, incarnation[0]) for incarnation in local)
        # The store admits at most the limit; each incarnation alone at most its share.
        stored = limit if through_store else 0
        allowed = stored + shares + 2 * forgotten
        if entry.local is not None and local[entry.local] > self.share(limit, entry.local[0]):
            self.fail(
                "local-share",
                f"node {node.name} admitted {local[entry.local]} locally on {counter[1]} "
                f"(partition {counter[0]}) within {row.window_ms / 1000:g} s: its share of "
                f"{limit} is {self.share(limit, entry.local[0])}",
                key,
            )
        elif total > allowed:
            self.fail(
                "over-admission",
                f"{total} admitted on {counter[1]} (partition {counter[0]}) within "
                f"{row.window_ms / 1000:g} s: at most {allowed} (limit {limit}: through the "
                f"store {stored}, local shares {shares} of {sorted(local)}, twice the "
                f"{forgotten} the store forgot)",
                key,
            )

    def lease(
        self,
        node: SimNode,
        request: Request,
        counter: Counter,
        row: Row,
        started: float,
        incarnation: Incarnation | None,
    ) -> None:
        """``request`` took a lease in ``counter``: check the max-concurrent invariant."""
        flights = self._flights.setdefault(counter, {})
        lease_seconds = row.window_ms / 1000
        flights[request.number] = Flight(started, row.limit, lease_seconds, incarnation)
        now = trio.current_time()
        limit = max(f.limit for f in flights.values())
        held = [
            f
            for f in flights.values()
            if f.local is None and not f.forgotten and now - f.started < f.lease_seconds
        ]
        mine = sum(
            1 for f in flights.values() if incarnation is not None and f.local == incarnation
        )
        if incarnation is not None and mine > self.share(limit, node.index):
            self.fail(
                "max-concurrent",
                f"node {node.name} holds {mine} local leases on {counter[1]} (partition "
                f"{counter[0]}): its share of {limit} is {self.share(limit, node.index)}",
                request.key.name,
            )
        elif len(held) > limit:
            self.fail(
                "max-concurrent",
                f"{len(held)} requests in flight on {counter[1]} (partition {counter[0]}) "
                f"with leases taken through the store: limit {limit}",
                request.key.name,
            )

    def land(self, number: int, leases: Iterable[Counter]) -> None:
        """Request ``number`` is over: it no longer holds its leases."""
        for counter in leases:
            self._flights[counter].pop(number, None)
