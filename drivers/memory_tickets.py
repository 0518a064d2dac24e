"""The in-memory store's lines of waiting tickets (the admission queue's order across
tasks sharing one :class:`~drivers.memory.MemoryStore`), with the same rules as the Redis
driver's ``tickets.lua``: see :meth:`tokenguard.store.window_store.WindowStore.tickets`.
"""

from __future__ import annotations

import attrs

from tokenguard.store.window_store import TicketHolder, TicketOp


@attrs.define
class TicketLine:
    """One line of waiting tickets: the last ticket given, each held one's rank and
    expiry (ms, the store's clock), and the admissions of rank 0 in a row (``run``)."""

    last: int = 0
    held: dict[int, tuple[int, int]] = attrs.field(factory=dict)
    run: int = 0
    touched_ms: int = 0

    def drop_expired(self, now_ms: int) -> None:
        for old in [t for t, (_, expiry) in self.held.items() if expiry <= now_ms]:
            del self.held[old]

    def holds(self, rank: int) -> bool:
        """Whether a ticket of ``rank`` or a lower one is held (expired ones dropped)."""
        return any(r <= rank for r, _ in self.held.values())

    def turn(self, share: int) -> int:
        """The ticket whose turn it is (see :meth:`WindowStore.tickets`); 0: none."""
        first = [min((t for t, (r, _) in self.held.items() if r == k), default=0) for k in (0, 1)]
        if first[1] and (not first[0] or 0 <= share <= self.run):
            return first[1]
        return first[0]

    def step(self, op: TicketOp, ticket: int, now_ms: int, by: TicketHolder) -> tuple[int, int]:
        self.drop_expired(now_ms)
        if op == "take":
            self.last += 1
            ticket = self.last
        if op in ("drop", "admitted"):
            self.held.pop(ticket, None)
            if op == "admitted":
                self.run = self.run + 1 if by.rank == 0 else 0
        else:
            self.held[ticket] = (by.rank, now_ms + by.ttl_ms)
        self.touched_ms = now_ms
        return ticket, self.turn(by.share)
