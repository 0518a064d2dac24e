"""The ``local`` failure policy: this node admits against windows of its own, within its
share of every limit (:func:`node_share`), mirroring what it admits through the store
(:class:`_LocalWindows`, mixed into :class:`~tokenguard.store.guarded.GuardedStore`).

Guarantees: the shares of all nodes add up to at most each limit, so the nodes together
admit no more than the limit while the store is down; what this node admitted through
the store before the outage (mirrored from the moment an admission is sent), and its
last view of the cluster's usage, count against its share; right after an outage, an
admission needs the store AND the share.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from tokenguard.store.rows import NOT_RESERVED, Admission, Reservation, Row, RowState
from tokenguard.store.window_store import StoreError

# When a request fits the real limit but not this node's share of it, the local
# windows cannot tell when it will: retry after this long (the store may be back).
RETRY_AFTER_SHARE = 1.0
# Counters whose cluster-wide usage a node remembers at most (then it forgets the
# oldest half): about 100 bytes each.
SEEN_LIMIT = 100_000
# A limit no amount reaches: the local mirror of a store admission only adds.
UNCHECKED_LIMIT = 2**53


def node_share(limit: int, cluster_size: int, node_id: int, *, spread: bool = True) -> int:
    """This node's part of ``limit`` when each of ``cluster_size`` nodes counts alone.

    The parts add up to exactly ``limit``: every node gets ``limit // cluster_size``,
    and with ``spread`` nodes ``0 .. r-1`` (``r = limit % cluster_size``) one more. That
    needs node ids ``0 .. cluster_size-1``, each used once (the supervisor's); without
    ``spread`` (nodes over several machines, ids not unique) the remainder is left
    unused. A limit below ``cluster_size`` gives some nodes (or, without ``spread``,
    all) a share of 0: that key is refused on them until the store is back.
    """
    if cluster_size <= 1:
        return limit
    base, extra = divmod(limit, cluster_size)
    return base + (1 if spread and node_id % cluster_size < extra else 0)


@attrs.frozen
class LocalReservation(Reservation):
    """A reservation in the node's local windows (policy ``local``). ``epoch`` tells
    whether it was written back to the store yet (see ``GuardedStore._take_unsynced``)."""

    epoch: int = 0


class _LocalWindows:
    """The guard's local windows: mirrored, seeded and admitted against."""

    async def _precount(self, partition: str, rows: Sequence[Row]) -> Reservation | None:
        """Add an admission's amounts to the local windows unchecked (the store decides,
        not they); the reservation to undo it with."""
        return await self._add_locally(partition, [r for r in rows if not r.is_lease])

    async def _add_locally(self, partition: str, rows: Sequence[Row]) -> Reservation | None:
        """Add each row's amount to the local windows in the current bucket, whatever
        their limits (an admission that always fits); ``None`` if there was nothing."""
        counted = [
            attrs.evolve(row, limit=UNCHECKED_LIMIT, enforce=True, alert_at=0)
            for row in rows
            if row.amount
        ]
        if not counted:
            return None
        return (await self.fallback.admit(partition, counted)).reservation

    async def _uncount(self, mirror: Reservation | None) -> None:
        if mirror is not None:
            await self.fallback.settle(mirror, [-row.amount for row in mirror.rows])

    async def _admit_holding(self, partition: str, rows: Sequence[Row]) -> Admission:
        """Right after an outage: the store AND this node's share must both admit.

        Other nodes may not have written their outage back yet (each probes on its own
        second), so the store may count less than was admitted; within its share, this
        node cannot take what another node used. The local admission is the mirror.
        """
        local = await self._admit_local(partition, rows)
        if local.reservation is None:
            return local
        try:
            admission = await self._primary(self.primary.admit, partition, rows)
        except StoreError:
            return local  # as in the outage: the store is told when it is back
        self.stats.local_admissions -= 1
        self._unsynced_add(local.reservation, -1)
        if admission.reservation is None:  # the store refused: undo the local part
            await self.fallback.settle(local.reservation, [-r.amount for r in rows])
        return admission

    def _saw(self, partition: str, states: Sequence[RowState]) -> None:
        now = trio.current_time()
        seen = self._seen
        for state in states:
            row = state.row
            if row.enforce and not row.is_lease:
                seen[(partition, row.counter)] = (state.used, now)
        if len(seen) > SEEN_LIMIT:  # forget the oldest half (dicts keep insertion order)
            for key in list(seen)[: len(seen) // 2]:
                del seen[key]

    async def _seed_from_cluster(self, partition: str, rows: Sequence[Row]) -> None:
        """Before the first local admission of a partition's counters: make the local
        windows leave this node no more than its part of what the whole cluster had
        left when it last saw the counter, if that is less than its share minus what it
        admitted itself. (Nodes whose traffic was uneven: one that spent more than its
        share before the outage used up the others' parts too.) The seed sits in the
        current bucket and leaves with it, a window later.
        """
        now = trio.current_time()
        for row in rows:
            seen = self._seen.pop((partition, row.counter), None)
            if seen is None or row.is_lease or not row.enforce:
                continue
            used, when = seen
            if now - when >= row.window_ms / 1000:
                continue  # everything it counted has left the window since
            share = self.share(row.limit)
            probe = attrs.evolve(row, limit=share, amount=0)
            (own,) = await self.fallback.usage(partition, [probe])
            left_by_share = share - own.used
            left_in_cluster = self.share(max(0, row.limit - used))
            seed = left_by_share - left_in_cluster
            if seed > 0:
                await self._add_locally(partition, [attrs.evolve(row, amount=seed)])

    async def _admit_local(self, partition: str, rows: Sequence[Row]) -> Admission:
        """Admit against this node's share of every limit, in the local windows."""
        if self._seen:
            await self._seed_from_cluster(partition, rows)
        shared = [attrs.evolve(row, limit=self.share(row.limit)) for row in rows]
        admission = await self.fallback.admit(partition, shared)
        reservation = admission.reservation
        if reservation is None:
            self.stats.local_refusals += 1
            states = tuple(
                attrs.evolve(state, retry_after=RETRY_AFTER_SHARE)
                if state.never_fits and state.row.amount <= row.limit
                else state
                for state, row in zip(admission.states, rows, strict=True)
            )
            return attrs.evolve(admission, states=states)
        self.stats.local_admissions += 1
        local = LocalReservation(
            partition=reservation.partition,
            rows=reservation.rows,
            buckets=reservation.buckets,
            lease=reservation.lease,  # (the same object: the local store renews it)
            epoch=self._epoch,
        )
        self._unsynced_add(local, 1)
        return attrs.evolve(admission, reservation=local)

    def _unsynced_add(self, reservation: Reservation, sign: int) -> None:
        for row, bucket in zip(reservation.rows, reservation.buckets, strict=True):
            # (not a shadow row it did not consume; not a lease: those stay local)
            if row.amount and bucket != NOT_RESERVED and not row.is_lease:
                key = (reservation.partition, row.counter, bucket)
                entry = self._unsynced.setdefault(key, [row, 0])
                entry[1] = max(0, entry[1] + sign * row.amount)
                if not entry[1]:
                    del self._unsynced[key]
