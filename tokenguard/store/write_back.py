"""Write-back: what the local windows admitted while the store did not answer is added
into the store's very buckets before the breaker closes (:class:`_WriteBack`, mixed into
:class:`~tokenguard.store.guarded.GuardedStore`).

Guarantees: the breaker closes only after a write-back round found nothing new; what
fails to be written is kept for the next round (counted twice at worst: fewer
admissions, never more); a store that lost its data gets the local windows' contents
(:meth:`_WriteBack.restore_windows`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from tokenguard.store.rows import Reservation, Row
from tokenguard.store.window_store import StoreError

# One logger for the whole guard: its lines keep the name they are known by.
log = logging.getLogger("tokenguard.store.guarded")

# A write-back of the outage's local admissions gets this long per call (it is one
# call per key, sent concurrently, once, when the store is back).
WRITE_BACK_TIMEOUT = 2.0
WRITE_BACK_CONCURRENCY = 64
# After an outage (policy local, several nodes), a node admits only what both the store
# and its own share allow for a probe interval and this long, while the other nodes
# write their outage's admissions back.
HOLD_MARGIN = 0.25
# A local admission made while the breaker is closed is written back this soon.
SYNC_DELAY = 0.01
# A local bucket is written back while it is in its window or in this many windows
# after it, by the node's clock: the store numbers buckets by its own clock, and a
# bucket the store still counts must not be dropped for a node clock a little ahead.
WRITE_BACK_SLACK_WINDOWS = 1


class _WriteBack:
    """The guard's write-back of the local windows into the store."""

    def restore_windows(self) -> int:
        """The store lost its data (a restart with no persistence, ``FLUSHALL``, a
        failover to a replica without it, eviction: the keyring finds its registry's
        marker gone or changed). Queue what this node's local windows hold, bucket by
        bucket, to be added into the store's very buckets (settle-style), so that the
        fresh store counts what this node admitted in the current windows; returns
        how many buckets were queued.

        Policy ``local`` only: it alone mirrors every admission into the local windows.
        The write-back runs in the background, like that of local admissions (at once
        while the breaker is closed, else when it closes); what fails is kept for the
        next one. What the store admitted after it lost its data, before this runs, is
        then counted twice, as is the part of other nodes' usage the local windows
        were seeded with: fewer admissions, never more.
        """
        if self.policy != "local":
            return 0
        # What was not written back yet is in the windows too: replaced, not added.
        self._unsynced = {
            (partition, row.counter, bucket): [row, amount]
            for partition, row, bucket, amount in self.fallback.held_buckets()
        }
        self._unsynced_soon.set()
        return len(self._unsynced)

    async def _sync_forever(self) -> None:
        """Write back local admissions made while the breaker was still closed (one of
        the failures before it opens) as soon as the store answers a call again, not at
        the end of some later outage."""
        while True:
            await self._unsynced_soon.wait()
            self._unsynced_soon = trio.Event()
            await trio.sleep(SYNC_DELAY)  # gather a few
            if self.breaker.is_open or self._recovering or not self._unsynced:
                continue  # the recovery writes them back
            await self._write_back(self._take_unsynced())  # on failure: kept for later

    def _take_unsynced(self) -> dict[tuple[str, str, int], list[Any]]:
        """The local admissions not yet written back; the local reservations made so far
        are from now on settled locally only (their amounts travel as they are now)."""
        batch, self._unsynced = self._unsynced, {}
        if batch:
            self._epoch += 1
        return batch

    async def _write_back(self, batch: dict[tuple[str, str, int], list[Any]]) -> bool:
        """Add ``batch`` (local amounts by partition, counter and bucket) into the
        store's very buckets; ``False`` if some partition failed (kept for the next
        round).

        A bucket that left its window (and ``WRITE_BACK_SLACK_WINDOWS`` more) during a
        long outage counts in no window any more, and is not sent: the store adds a late
        charge to its current bucket (a request that outlived its window is never free),
        which would refuse a whole window of requests that the limit allows."""
        now_ms = self.fallback.now_ms()
        by_partition: dict[str, list[tuple[Row, int, int]]] = {}
        for (partition, _, bucket), (row, amount) in batch.items():
            oldest = now_ms // row.bucket_ms - row.span * (1 + WRITE_BACK_SLACK_WINDOWS)
            if amount > 0 and bucket >= oldest:
                by_partition.setdefault(partition, []).append((row, bucket, amount))
        failed: list[str] = []
        limiter = trio.CapacityLimiter(WRITE_BACK_CONCURRENCY)

        async def one(partition: str, entries: list[tuple[Row, int, int]]) -> None:
            reservation = Reservation(
                partition=partition,
                rows=tuple(row for row, _, _ in entries),
                buckets=tuple(bucket for _, bucket, _ in entries),
            )
            async with limiter:
                try:
                    with self._deadline(max(self.timeout, WRITE_BACK_TIMEOUT)):
                        await self.primary.settle(reservation, [a for _, _, a in entries])
                except StoreError as exc:
                    self.stats.last_error = f"write-back failed: {exc}"
                    failed.append(partition)

        async with trio.open_nursery() as nursery:
            for partition, entries in by_partition.items():
                nursery.start_soon(one, partition, entries)
        if failed:
            # Put back what did not get through (as it was: at worst, counted twice).
            lost = set(failed)
            for key, entry in batch.items():
                if key[0] in lost:
                    mine = self._unsynced.setdefault(key, [entry[0], 0])
                    mine[1] += entry[1]
            return False
        self.stats.written_back += sum(len(v) for v in by_partition.values())
        return True

    async def _recover(self) -> bool:
        if self._recovering:
            return False
        self._recovering = True
        try:
            # Requests keep going to the local windows meanwhile: repeat until a round
            # finds nothing new, then switch with no await in between.
            for _ in range(10):
                batch = self._take_unsynced()
                if not batch:
                    break
                if not await self._write_back(batch):
                    return False
            opened_at = self.breaker.opened_at
            self.breaker = self.breaker.close()
            if self.policy == "local" and self.cluster_size > 1:
                # Every other node writes its outage back within a probe interval.
                self._hold_until = trio.current_time() + self.probe_interval + HOLD_MARGIN
            outage = None if opened_at is None else time.monotonic() - opened_at
            self.stats.last_outage_seconds = None if outage is None else round(outage, 3)
            log.warning(
                "store %s is back%s: breaker closed, %d counters written back",
                self.url,
                "" if outage is None else f" after {outage:.1f} s",
                self.stats.written_back,
            )
            if self._unsynced:  # the last round's stragglers: write them back too
                leftover = self._take_unsynced()
                if not await self._write_back(leftover):
                    log.warning(
                        "store %s: could not write back %d counters", self.url, len(leftover)
                    )
            return True
        finally:
            self._recovering = False
