"""The admission queue on trio: hold a refused request until its room frees, then admit.

:class:`AdmissionQueue` drives the rules of :mod:`tokenguard.limiting.wait_lines` with
trio's clock: a request refused with a ``retry_after`` within its wait bound waits on
its line, and its line's head tries the store again exactly when the refusal said room
frees (or when a settlement of this node freed room in the line's counter).

Guarantees:

* **Nothing is consumed while waiting.** A waiter holds no row, lease or amount: the
  only consuming call is the admission itself, the same atomic all-or-nothing call as
  without a queue. So limits hold exactly as without it.
* **No polling.** A waiter calls the store when it is the head of its line and the
  line is due: once for the refusal that made it wait, once when its room frees; more
  only when another node's request took that room first (each such call returns the
  new exact wait), or, for a ``max_concurrent`` row, whose slot frees when some request
  ends (nobody can foresee when: every ``LEASE_RETRY_SECONDS``, earlier on a local
  settlement). Waiters behind the head make no store call.
* **Refused at once** when the refusal can never fit, when its ``retry_after`` is beyond
  the bound, when the key's ``max_waiting`` is reached, or while the node shuts down:
  the usual 429, with no wait.
* **Bounded per wait**: ``max_wait_seconds`` bounds each wait for room. A request is
  held while every refusal it gets (on arrival, and each time its turn comes) names
  room within its bound; the first that does not is its answer (429). Waiting behind
  requests that arrived first adds their turns: with a key's limit of ``L`` per window,
  the ``k``-th waiter of its line is answered within about ``ceil(k / L)`` windows
  (``max_waiting`` bounds ``k``).
* **Leaving**: a waiter cancelled (its client disconnected) leaves its line at once;
  it had consumed nothing. :meth:`AdmissionQueue.close` (the node shutting down)
  answers every waiter :class:`QueueClosed`.

Fairness holds within a node (arrival order per line, by priority); across nodes,
whichever node's head reaches the store first when room frees is admitted: see
docs/design.md, "The admission queue".
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from tokenguard.limiting.limiter import Decision
from tokenguard.limiting.wait_lines import Waiter, WaitLines, WaitPolicy


class QueueClosed(Exception):
    """The node is shutting down: a waiting request is answered 503, to retry after
    ``retry_after`` seconds (when its room would have freed, at least a second)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the node is shutting down; retry after {retry_after:g}s")
        self.retry_after = retry_after


@attrs.frozen
class Queued:
    """The outcome of :meth:`AdmissionQueue.admit`: the last decision (admitted or the
    refusal to answer) and the seconds it waited in the queue (0.0: not at all)."""

    decision: Decision
    waited: float


Attempt = Callable[[], Awaitable[Decision]]
# A refusal's wait is at least this (a store's retry_after is whole milliseconds, and
# a line is never due again at once after a refusal).
MIN_RETRY_SECONDS = 0.001


class AdmissionQueue:
    """One node's waiting requests (see the module docstring)."""

    def __init__(self, *, batch_share: float, closing: trio.Event | None = None) -> None:
        self.lines = WaitLines(batch_share=batch_share)
        self._closing = closing
        self._closed = False
        self._changed: dict[str, trio.Event] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close the queue once the node's ``closing`` event is set (run in the app's
        nursery)."""
        task_status.started()
        if self._closing is None:
            await trio.sleep_forever()
        else:
            await self._closing.wait()
            self.close()

    def close(self) -> None:
        """Answer every waiter :class:`QueueClosed`, and hold no new request."""
        self._closed = True
        for line in list(self._changed):
            self._wake(line)

    def freed(self, counters: Iterable[str]) -> None:
        """Room was given back in ``counters`` (a settlement on this node): the lines
        waiting on them try again now."""
        counters = tuple(counters)
        if self.lines.freed(counters):
            for counter in counters:
                self._wake(counter)

    def _wake(self, line: str) -> None:
        event = self._changed.pop(line, None)
        if event is not None:
            event.set()

    def _may_wait(self, decision: Decision, bound: float) -> bool:
        retry = decision.admission.retry_after
        return not self._closed and retry is not None and retry <= bound

    async def admit(
        self,
        key_id: str,
        policy: WaitPolicy,
        counters: tuple[str, ...],
        attempt: Attempt,
        on_queued: Callable[[Decision | None], None] | None = None,
    ) -> Queued:
        """Admit a request of ``key_id`` whose rows count in ``counters`` with ``attempt``
        (the store's admission), waiting per ``policy`` when refused (see the module
        docstring). Returns the admission, or the refusal to answer with its 429;
        raises :class:`QueueClosed` when the node shuts down while it waits.
        ``on_queued`` is called when it starts to wait, with the refusal that made it
        (``None``: it joined behind a waiter without trying the store)."""
        start = trio.current_time()
        line = self.lines.line_ahead(counters, policy.priority)
        due = -math.inf
        decision: Decision | None = None
        if line is None:  # nobody to overtake: try now
            decision = await attempt()
            if decision.admitted or not self._may_wait(decision, policy.bound):
                return Queued(decision, 0.0)
            refusal = decision.refusal
            assert refusal is not None
            line = refusal.row.counter
            due = trio.current_time() + (decision.admission.retry_after or 0.0)
        waiter = None if self._closed else self.lines.join(line, key_id, policy, start, due)
        if waiter is None:  # full (or closing): refused at once, as without a queue
            return Queued(await attempt(), 0.0)
        if on_queued is not None:
            on_queued(decision)
        try:
            decision = await self._wait(waiter, attempt)
        finally:
            self.lines.leave(waiter)  # (a no-op once admitted)
            self._wake(waiter.line)
        return Queued(decision, trio.current_time() - start)

    async def _wait(self, waiter: Waiter, attempt: Attempt) -> Decision:
        """Hold ``waiter`` until it is admitted or must be refused (a refusal whose wait
        is beyond its bound); raise :class:`QueueClosed` when the queue closes."""
        line = waiter.line
        while True:
            now = trio.current_time()
            if self._closed:
                raise QueueClosed(max(1.0, self.lines.due(line) - now))
            is_head = self.lines.head(line) is waiter
            if is_head and now >= self.lines.due(line):
                decision = await attempt()
                now = trio.current_time()
                if decision.admitted:
                    self.lines.leave(waiter, admitted=True)
                    return decision
                retry = decision.admission.retry_after
                if retry is None or retry > waiter.bound:
                    return decision
                self.lines.retry_at(line, now + max(retry, MIN_RETRY_SECONDS))
                continue
            event = self._changed.setdefault(line, trio.Event())
            with trio.move_on_at(self.lines.due(line) if is_head else math.inf):
                await event.wait()
