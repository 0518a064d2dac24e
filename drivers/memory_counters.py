"""The in-memory store's counters: one row's buckets, or one scope's leases.

:class:`BucketCounter` keeps a row's sliding window as absolute bucket index -> amount,
with its sum and bounds kept on every change so a decision is O(1) per row;
:class:`LeaseCounter` keeps a ``max_concurrent`` scope's leases and their expiries.
Neither awaits: :class:`~drivers.memory.MemoryStore` checks and consumes them in one
step, which is what makes its admissions atomic.
"""

from __future__ import annotations

from tokenguard.store.rows import LEASE_RETRY_SECONDS, Row, RowState


class BucketCounter:
    """The buckets of one row: absolute bucket index -> amount (zeros are not kept).

    ``total`` is their sum and ``low``/``high`` the oldest and newest bucket kept
    (:data:`NO_LOW`/:data:`NO_HIGH` when there is none), maintained on every change
    so that a decision costs O(1) per row, not O(buckets). ``alerted``: the bucket in which the
    row last crossed its ``alert_at`` (see :attr:`tokenguard.store.rows.Row.alert_at`).
    ``row``: the row it was made for (its counter, window and buckets are every such
    row's; its limit and amount mean nothing here).
    """

    __slots__ = ("row", "buckets", "bucket_ms", "span", "total", "low", "high", "alerted")

    def __init__(self, row: Row) -> None:
        self.row = row
        self.buckets: dict[int, int] = {}
        self.bucket_ms = row.bucket_ms
        self.span = row.span
        self.total = 0
        self.low, self.high = NO_LOW, NO_HIGH
        self.alerted = NO_HIGH

    def current(self, now_ms: int) -> tuple[int, int]:
        """Drop buckets that left the window; return (current bucket, amount in window)."""
        current = now_ms // self.bucket_ms
        if self.low < current - self.span:
            oldest = current - self.span
            buckets = self.buckets
            for b in [b for b in buckets if b < oldest]:
                self.total -= buckets.pop(b)
            self.bounds()
        return current, self.total

    def bounds(self) -> None:
        """Set ``low`` and ``high`` from the buckets kept."""
        buckets = self.buckets
        self.low = min(buckets) if buckets else NO_LOW
        self.high = max(buckets) if buckets else NO_HIGH

    def add(self, bucket: int, delta: int) -> None:
        """Add ``delta`` to ``bucket`` (never below 0; a bucket at 0 is dropped)."""
        buckets = self.buckets
        before = buckets.get(bucket, 0)
        after = before + delta
        if after > 0:
            buckets[bucket] = after
            self.total += after - before
            if bucket < self.low:
                self.low = bucket
            if bucket > self.high:
                self.high = bucket
        elif before:
            del buckets[bucket]
            self.total -= before
            if bucket in (self.low, self.high):
                self.bounds()

    def alert(self, bucket: int) -> bool:
        """True once per window: when no crossing was reported in the window yet."""
        if self.alerted >= bucket - self.span:
            return False
        self.alerted = bucket
        return True

    def leaves_at(self, bucket: int) -> int:
        """The time (ms) at which ``bucket`` leaves the window."""
        return (bucket + self.span + 1) * self.bucket_ms

    def consumed(self, row: Row, now_ms: int, near: bool) -> RowState:
        """The row's state right after an admission consumed it."""
        reset_ms = self.leaves_at(self.high) - now_ms if self.buckets else 0
        return RowState(row, self.total, reset_ms / 1000, True, None, near)

    def state(self, row: Row, now_ms: int, used: int, amount: int) -> RowState:
        """The row's state given its ``used`` amount, if ``amount`` were asked."""
        fits = used + amount <= row.limit
        retry_ms: int | None = None
        if not fits and amount <= row.limit:
            # The oldest buckets leave first: wait until enough of them have gone.
            freed = 0
            for b in sorted(self.buckets):
                freed += self.buckets[b]
                if used - freed + amount <= row.limit:
                    retry_ms = self.leaves_at(b) - now_ms
                    break
        reset_ms = self.leaves_at(self.high) - now_ms if self.buckets else 0
        return RowState(
            row,
            used,
            reset_ms / 1000,
            fits,
            None if retry_ms is None else retry_ms / 1000,
        )


class LeaseCounter:
    """The leases of one lease row: lease id -> expiry (ms); expired ones are dropped
    on every touch."""

    __slots__ = ("expiries",)

    def __init__(self) -> None:
        self.expiries: dict[str, int] = {}

    def current(self, now_ms: int) -> tuple[int, int]:
        """Drop expired leases; return (0, leases held): the lease row's "bucket" and
        usage, shaped as :meth:`BucketCounter.current`."""
        expiries = self.expiries
        if expiries and min(expiries.values()) <= now_ms:
            for lease in [k for k, t in expiries.items() if t <= now_ms]:
                del expiries[lease]
        return 0, len(expiries)

    def state(self, row: Row, now_ms: int, used: int, amount: int) -> RowState:
        fits = used + amount <= row.limit
        reset_ms = max(self.expiries.values()) - now_ms if self.expiries else 0
        retry = LEASE_RETRY_SECONDS if not fits and amount <= row.limit else None
        return RowState(row, used, reset_ms / 1000, fits, retry)


# The bounds of a counter without buckets: above and below every bucket index.
NO_LOW = 2**62
NO_HIGH = -(2**62)


def new_counter(row: Row) -> BucketCounter | LeaseCounter:
    """An empty counter of ``row``'s kind."""
    return LeaseCounter() if row.is_lease else BucketCounter(row)
