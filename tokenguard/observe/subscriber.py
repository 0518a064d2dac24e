"""One local subscriber of the usage feed: who it is, and its bounded backlog.

A :class:`Viewer` is who a subscriber is: a key, which sees only its own events, or
the admin, who sees every key's (or one key's). A :class:`Subscriber` holds the events
the :class:`~tokenguard.observe.feed.Feed` hands it until its session sends them: at
most ``backlog`` of them, the oldest dropped beyond it and counted, so a slow
subscriber costs a bounded amount of memory and never slows anyone else.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import attrs
import trio

# Events a default-mode session takes from its backlog at once (what a stuck sender
# holds beyond the backlog).
SEND_MOST = 64


@attrs.frozen
class Viewer:
    """Who a subscriber is. ``role="key"``: the key named ``key``, which sees only its
    own events. ``role="admin"``: sees every key, or only ``key`` when it is set."""

    role: Literal["key", "admin"]
    key: str | None = None

    def sees(self, key_name: str) -> bool:
        return self.key is None or self.key == key_name


class Subscriber:
    """One local subscriber: a backlog of encoded events (without their stream ``id``),
    at most ``limit`` long, or one delivered batch long when it had kept up (see
    :meth:`offer_all`); the oldest are dropped beyond it and counted until taken."""

    def __init__(self, viewer: Viewer, limit: int) -> None:
        self.viewer = viewer
        self.limit = limit
        self.dropped = 0
        self.dropped_total = 0  # never reset: the node's metrics
        self._backlog: deque[str] = deque()
        self._wakeup = trio.Event()

    @property
    def pending(self) -> int:
        """Events waiting to be sent."""
        return len(self._backlog)

    def offer_all(self, bodies: list[str]) -> None:
        """Queue the events of one delivered batch; never blocks. A subscriber that had
        kept up (nothing pending) takes the batch whole even past ``limit``: a node's
        events arrive in batches of up to PUBLISH_SECONDS (at most PUBLISH_BATCH), and
        such a burst is not a lag. Otherwise the oldest beyond ``limit`` are dropped."""
        if not bodies:
            return
        backlog = self._backlog
        limit = self.limit if backlog else max(self.limit, len(bodies))
        backlog.extend(bodies)
        excess = len(backlog) - limit
        if excess > 0:
            for _ in range(excess):
                backlog.popleft()
            self.dropped += excess
            self.dropped_total += excess
        self._wakeup.set()

    def offer(self, body: str) -> None:
        """Queue one event (a snapshot); never blocks."""
        self.offer_all([body])

    async def take(self, most: int = SEND_MOST) -> tuple[int, list[str]]:
        """Wait for events; return (events dropped since the last take, up to ``most``
        events, oldest first). Taking a bounded number at a time keeps what a stuck
        sender holds small: the backlog stays the bound."""
        while not self._backlog and not self.dropped:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        dropped, self.dropped = self.dropped, 0
        backlog = self._backlog
        if len(backlog) <= most:
            taken = list(backlog)
            backlog.clear()
        else:
            taken = [backlog.popleft() for _ in range(most)]
        return dropped, taken
