"""The guarded store's counters: :class:`GuardStats`, read by ``/readyz`` and ``/metrics``.

Plain integers bumped by :class:`~tokenguard.store.guarded.GuardedStore` as calls fail,
the breaker opens and the failure policy answers; the scrapers read them whole when
asked, so keeping them costs the request path an addition each.
"""

from __future__ import annotations

import attrs

from tokenguard.store.call_durations import CallDurations


@attrs.define
class GuardStats:
    """Counters for ``/readyz`` and ``/metrics`` (read when scraped)."""

    failures: int = 0  # store calls that failed or missed their deadline
    timeouts: int = 0  # ... of which missed the deadline
    stalled_out: int = 0  # calls cut at the hard cap while the node was stalled (not failures)
    breaker_opened: int = 0
    local_admissions: int = 0  # admitted by the local windows (policy local)
    local_refusals: int = 0
    fail_open_admissions: int = 0  # admitted unchecked (policy open)
    refused_unavailable: int = 0  # calls answered with StoreError (policy closed)
    written_back: int = 0  # counter buckets written back to the store after an outage
    settlements_dropped: int = 0  # settlements of store reservations while it was down
    last_error: str | None = None
    last_outage_seconds: float | None = None
    # How long the store took to answer the calls it answered, per operation.
    call_seconds: CallDurations = attrs.field(factory=CallDurations)
