"""The leases a node holds, renewed while the requests holding them are alive.

A ``max_concurrent`` limit counts requests in flight as leases in the store (see
:class:`~tokenguard.store.rows.Lease`): taken by the admission, released by the
settlement, and expiring ``lease_seconds`` after they were taken or last renewed. A
driver that takes leases keeps them in a :class:`HeldLeases` and runs
:meth:`HeldLeases.renew_forever` inside its own ``run``, so every lease a live request
holds is renewed every third of its lease time, in one batch per round.

The leases are held *weakly*: a lease stays here only while something else (the
request's reservation, inside its decision, inside the request handler or the
response's stream) still refers to it. A request whose settlement never runs (a
stream dropped before its body was ever iterated) thus stops being renewed as soon as
it is garbage, and its slot frees within one lease time, as if its node had died.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable

import trio

from tokenguard.store.rows import Lease
from tokenguard.store.window_store import StoreError

log = logging.getLogger("tokenguard.store.leases")

# Renew this many times per lease time: a renewal may fail twice before a lease expires.
RENEWALS_PER_LEASE = 3
# Never renew more often than this (seconds), whatever the lease time.
MIN_RENEW_INTERVAL = 0.05
# How long a round waits when no lease is held (new leases wake it at once).
IDLE_WAIT = 60.0


class HeldLeases:
    """The leases of one node's admissions that are neither released nor garbage."""

    def __init__(self) -> None:
        self._held: weakref.WeakSet[Lease] = weakref.WeakSet()
        self._added = trio.Event()
        self.renewals = 0  # rounds that renewed at least one lease
        self.renewal_failures = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, lease: Lease) -> None:
        self._held.add(lease)
        self._added.set()

    def discard(self, lease: Lease) -> None:
        self._held.discard(lease)

    def held(self) -> list[Lease]:
        return list(self._held)

    def interval(self, leases: Iterable[Lease]) -> float:
        """Seconds until the next round: a third of the shortest lease time held."""
        times = [row.window_ms for lease in leases for row in lease.rows]
        if not times:
            return IDLE_WAIT
        return max(MIN_RENEW_INTERVAL, min(times) / 1000 / RENEWALS_PER_LEASE)

    async def renew_forever(self, renew: Callable[[list[Lease]], Awaitable[None]]) -> None:
        """Every :meth:`interval`, ``await renew(leases held)``, until cancelled. A
        failure (:class:`StoreError`) is logged and counted; the next round tries again."""
        while True:
            wait = self.interval(self._held)
            with trio.move_on_after(wait):
                self._added = trio.Event()
                await self._added.wait()
                # A new lease: the round is due no later than its own third.
                await trio.sleep(self.interval(self._held))
            leases = self.held()
            if not leases:
                continue
            try:
                await renew(leases)
            except StoreError as exc:
                self.renewal_failures += 1
                log.warning("renewing %d leases failed: %s", len(leases), exc)
            else:
                self.renewals += 1
            del leases  # never hold a lease while waiting: it must be able to die
