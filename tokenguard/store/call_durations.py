"""How long the shared store took to answer, per operation: a histogram of plain counts.

The guarded store records every call its store answered (:meth:`CallDurations.observe`,
a bisect and two additions); ``/metrics`` reads the counts when it is scraped, as it
reads the store's other statistics, so the store needs no callback into the metrics and
the metrics no hook into the store.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds (seconds) of the buckets: sub-millisecond calls on a local Redis up to
# the slowest a call may be before its deadline fails it.
BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class CallDurations:
    """Per operation (``admit``, ``settle``, ``usage`` ...): how many calls took at most
    each bucket's bound (not cumulative: see :meth:`cumulative`), and their sum."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, operation: str, seconds: float) -> None:
        counts = self.counts.get(operation)
        if counts is None:
            counts = self.counts[operation] = [0] * (len(self.buckets) + 1)
            self.sums[operation] = 0.0
        counts[bisect_left(self.buckets, seconds)] += 1
        self.sums[operation] += seconds

    def cumulative(self, operation: str) -> list[tuple[str, int]]:
        """Prometheus' ``(le, count)`` pairs of ``operation``, ``+Inf`` last."""
        total = 0
        pairs = []
        bounds = (*map(str, self.buckets), "+Inf")
        for bound, count in zip(bounds, self.counts[operation], strict=True):
            total += count
            pairs.append((bound, total))
        return pairs
