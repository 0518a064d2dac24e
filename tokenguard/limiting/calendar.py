"""Calendar months in the operator's time zone: the window of ``spend_per_month``.

A monthly budget resets on the 1st at midnight in ``[limits] timezone`` (UTC by
default), whatever the month's length: it is not a sliding window. tokenguard counts it
as a row whose counter is named by the month (``...:month:2026-12``: a new month is a
new, empty counter) and whose sliding window (:data:`MONTH_COUNTER`: 32 days in day
buckets) is longer than any month, so the counter holds everything admitted in its
month; it expires, like any counter, once its newest bucket leaves that window. The
limiter (:class:`MonthClock`) names the month from its node's clock and reports a
month row's ``reset_after`` and ``retry_after`` as the time left to the month's end.

Clock skew: the month is named by the node's clock, not the store's. A node whose clock
is off by ``d`` counts what it admits within ``d`` of a month's boundary in the
neighbouring month's counter: each month's counter never exceeds its budget, and at
most what skewed nodes admit within ``d`` of the boundary lands in the adjacent month
(docs/design.md, "Spend limits"). With NTP-synchronised nodes ``d`` is milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import attrs

DAY_MS = 86_400_000
MONTH_COUNTER = (32 * DAY_MS, DAY_MS)
"""(window_ms, bucket_ms) of a month row: longer than the longest month (31 days)."""


@attrs.frozen
class Month:
    """One calendar month: its ``label`` (``2026-12``) and its bounds, POSIX seconds."""

    label: str
    start: float
    end: float


def month_of(now: float, timezone: ZoneInfo) -> Month:
    """The calendar month in ``timezone`` that POSIX time ``now`` falls in."""
    local = datetime.fromtimestamp(now, UTC).astimezone(timezone)
    start = datetime(local.year, local.month, 1, tzinfo=timezone)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime(year, month, 1, tzinfo=timezone)
    return Month(f"{local.year:04d}-{local.month:02d}", start.timestamp(), end.timestamp())


class MonthClock:
    """The current month in ``timezone`` by ``clock`` (POSIX seconds), recomputed only
    when the clock leaves the month last computed."""

    def __init__(self, timezone: ZoneInfo, clock: Callable[[], float]) -> None:
        self.timezone = timezone
        self.clock = clock
        self._month = Month("", 0.0, 0.0)

    def current(self) -> tuple[Month, float]:
        """The month now, and the seconds left in it."""
        now = self.clock()
        month = self._month
        if not month.start <= now < month.end:
            month = self._month = month_of(now, self.timezone)
        return month, month.end - now
