"""The circuit breaker's state (:class:`Breaker`): how many store calls failed in a row
and since when it is open. A pure value: the guard decides what a failure is."""

from __future__ import annotations

import attrs

BREAKER_THRESHOLD = 3


@attrs.frozen
class Breaker:
    """A circuit breaker's state: consecutive failures, and since when it is open.

    ``opened_at`` is a ``time.monotonic()`` value, or ``None`` while closed. Only
    :meth:`close` closes an open breaker (a successful probe): a success of some call
    that was already on its way does not.
    """

    threshold: int = BREAKER_THRESHOLD
    failures: int = 0
    opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def state(self) -> str:
        return "open" if self.is_open else "closed"

    def failed(self, now: float) -> Breaker:
        failures = self.failures + 1
        opened_at = self.opened_at
        if opened_at is None and failures >= self.threshold:
            opened_at = now
        return attrs.evolve(self, failures=failures, opened_at=opened_at)

    def succeeded(self) -> Breaker:
        if self.is_open or not self.failures:
            return self
        return attrs.evolve(self, failures=0)

    def open(self, now: float) -> Breaker:
        if self.is_open:
            return self
        return attrs.evolve(self, failures=max(self.failures, self.threshold), opened_at=now)

    def close(self) -> Breaker:
        return attrs.evolve(self, failures=0, opened_at=None)
