"""At most one log line per interval, however often the thing it reports happens.

A node that logs every refused request, store failure or miscount would drown its own
log (and spend its CPU on it) exactly when something goes wrong at scale. A
:class:`LogThrottle` says when a line may be written and how many were held back since
the last one, so the line can say so.
"""

from __future__ import annotations

import math
import time


class LogThrottle:
    """At most one log line per ``interval`` seconds; counts the lines it held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = -math.inf
        self.suppressed = 0

    def ready(self) -> int | None:
        """``None``: stay quiet. Otherwise log now; the number held back since the last."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return None
        self._last = now
        held, self.suppressed = self.suppressed, 0
        return held
