"""The admission queue's rules, without I/O: who may wait, on which line, whose turn.

A request refused for room that frees within its wait bound is held instead of
answered 429 (:mod:`tokenguard.limiting.admission_queue` holds it; this module decides).
Everything here is plain state and arithmetic on times the caller passes in, so it is
tested with no clock and no store.

* **Policy** (:func:`wait_policy`): a request's wait bound is the smallest
  ``max_wait_seconds`` set on its key (or tier), its team, and the per-model rules that
  match its model (none set: 0, refused at once as before); ``x-tokenguard-max-wait``
  may only lower it. Its priority is ``batch`` when any of them says so, else
  ``interactive``; ``x-tokenguard-priority`` may only lower it. ``max_waiting`` is the
  smallest set, else :data:`DEFAULT_MAX_WAITING`.
* **Lines**: a waiter waits on the line of the counter whose row refused it (a
  :attr:`~tokenguard.store.rows.Row.counter`: a scope, dimension and window).
  A line's waiters are ordered by priority (interactive first), then by arrival; only
  its head may try the store, and only once the line is due (the refusal's exact
  ``retry_after`` has passed, or a settlement freed room in its counter). A key's
  lines are not another key's, so one key's waiters never delay another key's
  admissions (a team line is shared by the team's keys, as the team's limit is).
* **Batch share**: on a line where both wait, a batch waiter gets the turn after every
  ``interactive_run`` interactive admissions in a row (``batch_share`` 0.1: one in
  ten), so batch is never starved below its share; ``batch_share`` 0 is strict priority.
* **Bounded**: at most ``max_waiting`` waiters per key on this node; past it,
  :meth:`WaitLines.join` refuses and the request is answered as without a queue (the
  same bound across nodes is the store's: its tickets, see
  :mod:`tokenguard.limiting.admission_queue`).
* **No overtaking**: a new request for which some waiter of the same or a higher
  priority already waits in the line of one of its counters joins behind it instead
  of trying the store (:meth:`WaitLines.line_ahead`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fnmatch import fnmatchcase

import attrs

from tokenguard.model import PRIORITIES, ApiKey, Limits

DEFAULT_MAX_WAITING = 100
"""Waiters per key (over all nodes, and on each) when no ``max_waiting`` is set."""

INTERACTIVE, BATCH = 0, 1
"""Priorities as ranks (lower goes first), the indexes of :data:`PRIORITIES`."""


@attrs.frozen
class WaitPolicy:
    """How one request may wait: ``bound`` seconds at most (0: never), at ``priority``
    (a rank: :data:`INTERACTIVE` or :data:`BATCH`) for each refusal's room (see
    :mod:`tokenguard.limiting.admission_queue`), with at most ``max_waiting``
    waiters of its key (on this node, and holding tickets in the store).
    ``waited_on``: some scope of the request lets requests wait (its own bound may
    still be 0), so others may wait on the lines of its counters: a node announces
    the room its settlements give back in them (:meth:`AdmissionQueue.announce_freed`)."""

    bound: float = 0.0
    priority: int = INTERACTIVE
    max_waiting: int = DEFAULT_MAX_WAITING
    waited_on: bool = False

    @property
    def priority_name(self) -> str:
        return PRIORITIES[self.priority]


def _scopes_limits(key: ApiKey, model: str | None) -> list[Limits]:
    """The limits of every scope a request of ``key`` for ``model`` is checked in: the
    key's (over its tier), its matching model rules', its team's and theirs."""
    scopes = [key.limits] + ([key.team.limits] if key.team is not None else [])
    out: list[Limits] = []
    for limits in scopes:
        out.append(limits)
        if model is not None:
            out += [r.limits for r in limits.models if fnmatchcase(model, r.pattern)]
    return out


def wait_policy(
    key: ApiKey,
    model: str | None,
    *,
    asked_wait: float | None = None,
    asked_priority: str | None = None,
) -> WaitPolicy:
    """The :class:`WaitPolicy` of a request (see the module docstring). ``asked_wait``
    and ``asked_priority`` are the request's headers, already validated: they only
    ever lower the bound and the priority."""
    every = _scopes_limits(key, model)
    waits = [w for limits in every if (w := limits.max_wait_seconds) is not None]
    bound = min(waits, default=0.0)
    if asked_wait is not None:
        bound = min(bound, asked_wait)
    named = {p for limits in every if (p := limits.priority) is not None}
    if asked_priority is not None:
        named.add(asked_priority)
    priority = max((PRIORITIES.index(p) for p in named), default=INTERACTIVE)
    counts = [n for limits in every if (n := limits.max_waiting) is not None]
    waited_on = any(w > 0 for w in waits)
    return WaitPolicy(bound, priority, min(counts, default=DEFAULT_MAX_WAITING), waited_on)


def interactive_run(batch_share: float) -> int:
    """Interactive admissions in a row on a line after which a waiting batch request
    goes next: a share ``s`` of the turns is ``ceil((1 - s) / s)`` interactive turns per
    batch one; ``s`` 0: never (strict priority)."""
    if batch_share <= 0:
        return math.inf  # type: ignore[return-value]
    return max(0, math.ceil(round((1 - batch_share) / batch_share, 9)))


@attrs.define(eq=False)
class Waiter:
    """One held request: its ``line`` (a counter), its key's id, its priority rank, its
    arrival order on this node (``ticket``), when it arrived (the caller's clock) and
    the longest a refusal's wait may be for it to go on waiting (``bound``)."""

    line: str
    key_id: str
    priority: int
    ticket: int
    arrived: float
    bound: float


@attrs.define
class Line:
    """The waiters of one scope, and when its head may next try the store (``due``)."""

    waiters: list[Waiter] = attrs.field(factory=list)
    due: float = -math.inf
    interactive_in_a_row: int = 0


class WaitLines:
    """Every line of one node (see the module docstring). Not thread-safe; one trio
    run's tasks share it without awaiting inside its calls."""

    def __init__(self, *, batch_share: float) -> None:
        self.interactive_run = interactive_run(batch_share)
        self._lines: dict[str, Line] = {}
        self._per_key: dict[str, int] = {}
        self._tickets = 0

    def join(
        self, line: str, key_id: str, policy: WaitPolicy, now: float, due: float
    ) -> Waiter | None:
        """A new waiter at the back of ``line`` (of its priority), which may try the
        store at ``due`` (the refusal's retry moment; a line already due later keeps
        its time); ``None`` when its key has ``policy.max_waiting`` waiters already."""
        if self._per_key.get(key_id, 0) >= policy.max_waiting:
            return None
        self._tickets += 1
        waiter = Waiter(line, key_id, policy.priority, self._tickets, now, policy.bound)
        entry = self._lines.setdefault(line, Line())
        entry.waiters.append(waiter)
        entry.waiters.sort(key=lambda w: (w.priority, w.ticket))
        entry.due = max(entry.due, due)
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        return waiter

    def leave(self, waiter: Waiter, *, admitted: bool = False) -> None:
        """Take ``waiter`` out of its line (admitted, refused, gone); an admission counts
        towards the line's batch share, and leaves the line due at once (the next
        waiter may fit too)."""
        entry = self._lines.get(waiter.line)
        if entry is None or waiter not in entry.waiters:
            return
        entry.waiters.remove(waiter)
        left = self._per_key[waiter.key_id] - 1
        if left:
            self._per_key[waiter.key_id] = left
        else:
            del self._per_key[waiter.key_id]
        if admitted:
            entry.interactive_in_a_row = (
                entry.interactive_in_a_row + 1 if waiter.priority == INTERACTIVE else 0
            )
            entry.due = -math.inf
        if not entry.waiters:
            del self._lines[waiter.line]

    def head(self, line: str) -> Waiter | None:
        """Whose turn it is on ``line``: its first waiter, unless a batch waiter is owed
        its share (:func:`interactive_run` interactive admissions in a row)."""
        entry = self._lines.get(line)
        if entry is None:
            return None
        first = entry.waiters[0]
        if first.priority == INTERACTIVE and entry.interactive_in_a_row >= self.interactive_run:
            for waiter in entry.waiters:
                if waiter.priority != INTERACTIVE:
                    return waiter
        return first

    def due(self, line: str) -> float:
        """When ``line``'s head may next try the store (``-inf``: now)."""
        entry = self._lines.get(line)
        return entry.due if entry is not None else -math.inf

    def retry_at(self, line: str, when: float) -> None:
        """``line``'s head was refused again: its room frees at ``when``."""
        entry = self._lines.get(line)
        if entry is not None:
            entry.due = when

    def freed(self, counters: Iterable[str]) -> bool:
        """Room was given back in ``counters`` (a settlement): their lines are due now.
        True when some line was waiting on one of them."""
        woke = False
        for counter in counters:
            entry = self._lines.get(counter)
            if entry is not None:
                entry.due = -math.inf
                woke = True
        return woke

    def line_ahead(self, counters: Iterable[str], priority: int) -> str | None:
        """The first of ``counters`` whose line holds a waiter of ``priority`` or a
        higher one: a new request of that priority must wait behind it, not overtake."""
        for counter in counters:
            entry = self._lines.get(counter)
            if entry is not None and entry.waiters[0].priority <= priority:
                return counter
        return None

    def any_waiting(self) -> bool:
        return bool(self._lines)

    def waiting(self) -> dict[str, int]:
        """Waiters per key id on this node, now (the metrics' queue length)."""
        return dict(self._per_key)

    def waiters(self) -> list[Waiter]:
        """Every waiter of this node, line by line in turn order."""
        return [w for entry in self._lines.values() for w in entry.waiters]
