"""The admission queue on trio: hold a refused request until its room frees, then admit.

:class:`AdmissionQueue` drives the rules of :mod:`tokenguard.limiting.wait_lines` with
trio's clock: a request refused with a ``retry_after`` within its wait bound waits on
its line, and its line's head tries the store again exactly when the refusal said room
frees (or when a settlement freed room in the line's counter: one of this node's, or
another node's that it announced, :meth:`AdmissionQueue.announce_freed`).

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
  the bound, or while the node shuts down: the usual 429, with no wait. A request that
  would wait while its key already has ``max_waiting`` waiters, on the node or (with
  ticket lines) holding live tickets in the store, across every node, is answered as
  without a queue: its one admission (the 429 it got, or, when it had joined behind a
  waiter without trying, one try now).
* **Bounded per wait**: ``max_wait_seconds`` bounds each wait for room. A request is
  held while every refusal it gets (on arrival, and each time its turn comes) names
  room within its bound; the first that does not is its answer (429). Waiting behind
  requests that arrived first adds their turns: with a key's limit of ``L`` per window,
  the ``k``-th waiter of its line is answered within about ``ceil(k / L)`` windows
  (``max_waiting`` bounds ``k``).
* **Leaving**: a waiter cancelled (its client disconnected) leaves its line at once;
  it had consumed nothing. :meth:`AdmissionQueue.close` (the node shutting down)
  answers every waiter :class:`QueueClosed`.

* **Arrival order across nodes** (a store with ticket lines,
  :meth:`~tokenguard.store.window_store.WindowStore.tickets`): every waiter takes a
  ticket (of its priority) in its line's store line, and a node's head tries the
  store only when the line's turn is its node's; else it waits until the node that
  drops a ticket announces the line's new turn (``PUBLISH`` on :data:`CHANNEL`: only
  the node holding that ticket wakes its line), or :data:`RECHECK_SECONDS` (an
  announcement lost, a ticket expired). A ticket nobody checked for its bound plus
  :data:`TICKET_GRACE_SECONDS` expires (a node that died with waiters). A request
  that holds no ticket is admitted in turn
  (:meth:`~tokenguard.store.window_store.WindowStore.admit_in_turn`, ``behind`` its
  priority): refused, consuming nothing, while a line of its rows holds a ticket of
  its priority or a higher one, it takes one and waits; so a request that arrived at
  another node first is not overtaken by it. A request with no wait bound never comes
  here. A store that cannot answer leaves the order (and ``max_waiting``) per node.
* **Priorities across nodes**: the store's line gives the turn to its first
  interactive ticket, or to its first batch one when it holds no interactive one or
  after ``interactive_run`` admissions of interactive waiters in a row (counted in the
  store as tickets leave admitted: ``share``). A node lets its head try whenever the
  store's turn is one of its waiters' tickets, whichever of its waiters is its head,
  so the node's order and the store's never wait on each other.

See docs/design.md, "The admission queue".
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from tokenguard.limiting.limiter import Decision
from tokenguard.limiting.wait_lines import Waiter, WaitLines, WaitPolicy
from tokenguard.store.window_store import StoreError, TicketHolder, TicketOp, WindowStore

CHANNEL = "tokenguard.queue"
"""Where nodes announce that a waiter left a line, ``<line> <ticket whose turn it is>``,
and that a settlement gave room back in a line's counter, ``<line> freed:<node>``."""
ANNOUNCE_LIMIT = 10_000
"""Counters a node holds to announce as freed at most (more while a publish is slow are
dropped: their waiters still try at their refusal's ``retry_after``)."""
RECHECK_SECONDS = 5.0
"""A head behind another node's waiter checks its turn again at least this often (an
announcement lost, or the waiter ahead died: its ticket expired unannounced)."""
TICKET_GRACE_SECONDS = 5.0
"""A ticket lives its waiter's bound plus this since it was last checked."""


class QueueClosed(Exception):
    """The node is shutting down: a waiting request is answered 503, to retry after
    ``retry_after`` seconds (when its room would have freed, at least a second)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the node is shutting down; retry after {retry_after:g}s")
        self.retry_after = retry_after


@attrs.frozen
class Queued:
    """The outcome of :meth:`AdmissionQueue.admit`: the last decision (admitted or the
    refusal to answer) and the seconds it waited in the queue (0.0: not at all): from
    its arrival to the start of the store call that decided it, so its admission came
    at least that long after it arrived."""

    decision: Decision
    waited: float


Attempt = Callable[[int | None], Awaitable[Decision]]
# The store's admission; its argument (``behind``): ``None``, or a priority rank to
# admit in turn behind (see :meth:`tokenguard.limiting.limiter.Limiter.admit`).
# A refusal's wait is at least this (a store's retry_after is whole milliseconds, and
# a line is never due again at once after a refusal).
MIN_RETRY_SECONDS = 0.001


class AdmissionQueue:
    """One node's waiting requests (see the module docstring)."""

    def __init__(
        self,
        *,
        batch_share: float,
        closing: trio.Event | None = None,
        store: WindowStore | None = None,
    ) -> None:
        self.lines = WaitLines(batch_share=batch_share)
        self.store = store
        self._closing = closing
        self._closed = False
        self._changed: dict[str, trio.Event] = {}
        # Line -> the ticket numbers this node's waiters hold in its store line.
        self.held: dict[str, set[int]] = {}
        run = self.lines.interactive_run
        self.share = run if run < math.inf else -1  # (the store's `share`)
        self._identity = secrets.token_hex(6)  # tells this node's announcements apart
        self._to_announce: set[str] = set()
        self._announce_ready = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hear other nodes' announcements (with a store), and close the queue once the
        node's ``closing`` event is set (run in the app's nursery)."""
        async with trio.open_nursery() as nursery:
            if self.store is not None:
                nursery.start_soon(self._hear_announcements)
                nursery.start_soon(self._announce_freed_forever)
            task_status.started()
            if self._closing is None:
                await trio.sleep_forever()
            await self._closing.wait()
            self.close()
            nursery.cancel_scope.cancel()

    async def _hear_announcements(self) -> None:
        """Wake the local line whose waiter holds the first ticket a node announces; a
        lost subscription is taken again (meanwhile heads recheck every
        :data:`RECHECK_SECONDS`)."""
        assert self.store is not None
        while True:
            try:
                async with self.store.subscribe(CHANNEL) as messages:
                    async for message in messages:
                        self._announced(message)
            except StoreError:
                await trio.sleep(RECHECK_SECONDS)

    def _announced(self, message: bytes) -> None:
        line, _, first = message.decode(errors="replace").rpartition(" ")
        if first.startswith("freed:"):  # another node's settlement gave room back
            if first[6:] != self._identity:
                self.freed((line,))
            return
        held = self.held.get(line)
        if held is not None and first.isdigit() and int(first) in held:
            self.freed((line,))

    def announce_freed(self, counters: Iterable[str]) -> None:
        """Tell the other nodes that a settlement here gave room back in ``counters``,
        so their waiters on those lines try now rather than at their refusal's
        ``retry_after`` (:meth:`freed` is this node's own). Never waits: the counters
        are published together by one task, a ``PUBLISH`` per counter in one batch."""
        if self.store is None or len(self._to_announce) >= ANNOUNCE_LIMIT:
            return
        self._to_announce.update(counters)
        if self._to_announce:
            self._announce_ready.set()

    async def _announce_freed_forever(self) -> None:
        assert self.store is not None
        while True:
            await self._announce_ready.wait()
            self._announce_ready = trio.Event()
            counters, self._to_announce = self._to_announce, set()
            tag = f" freed:{self._identity}"
            try:
                await self.store.publish(CHANNEL, [(c + tag).encode() for c in sorted(counters)])
            except StoreError:
                pass  # their waiters try at their refusals' retry_after, as without it

    def close(self) -> None:
        """Answer every waiter :class:`QueueClosed`, and hold no new request."""
        self._closed = True
        for line in list(self._changed):
            self._wake(line)

    def freed(self, counters: Iterable[str]) -> None:
        """Room was given back in ``counters`` (a settlement on this node, or announced
        by another): the lines waiting on them try again now."""
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
        partition: str,
        key_id: str,
        policy: WaitPolicy,
        counters: tuple[str, ...],
        attempt: Attempt,
        on_queued: Callable[[Decision | None], None] | None = None,
    ) -> Queued:
        """Admit a request of ``key_id`` (in ``partition``) whose rows count in
        ``counters`` with ``attempt`` (the store's admission), waiting per ``policy``
        when refused (see the module docstring). Returns the admission, or the refusal
        to answer with its 429; raises :class:`QueueClosed` when the node shuts down
        while it waits.
        ``on_queued`` is called when it starts to wait, with the refusal that made it
        (``None``: it joined behind a waiter without trying the store)."""
        start = trio.current_time()
        line = self.lines.line_ahead(counters, policy.priority)
        due = -math.inf
        decision: Decision | None = None
        # Holding no ticket, it goes behind every other node's waiter of its lines.
        behind = policy.priority if self.store is not None else None
        if line is None:  # nobody to overtake on this node: try now
            decision = await attempt(behind)
            if decision.admitted or not self._may_wait(decision, policy.bound):
                return Queued(decision, 0.0)
            refusal = decision.refusal
            assert refusal is not None
            line = refusal.row.counter
            due = trio.current_time() + (decision.admission.retry_after or 0.0)
        waiter = None if self._closed else self.lines.join(line, key_id, policy, start, due)
        if waiter is None:  # full (or closing): refused at once, as without a queue
            return Queued(await attempt(behind), 0.0)
        ticket = _Ticket(self, partition, waiter, policy.max_waiting)
        tried = start

        async def timed(_: int | None) -> Decision:
            nonlocal tried
            tried = trio.current_time()
            return await attempt(None)  # its turn: its ticket was first

        try:
            if not await ticket.take():  # its key's waiters: full
                return Queued(decision if decision is not None else await attempt(behind), 0.0)
            if on_queued is not None:
                on_queued(decision)
            decision = await self._wait(waiter, timed, ticket)
        finally:
            self.lines.leave(waiter)  # (a no-op once admitted)
            self._wake(waiter.line)
            with trio.CancelScope(shield=True):
                await ticket.drop(admitted=decision is not None and decision.admitted)
        return Queued(decision, tried - start)

    async def _wait(self, waiter: Waiter, attempt: Attempt, ticket: _Ticket) -> Decision:
        """Hold ``waiter`` until it is admitted or must be refused (a refusal whose wait
        is beyond its bound); raise :class:`QueueClosed` when the queue closes."""
        line = waiter.line
        while True:
            now = trio.current_time()
            if self._closed:
                raise QueueClosed(max(1.0, self.lines.due(line) - now))
            is_head = self.lines.head(line) is waiter
            if is_head and now >= self.lines.due(line):
                if not await ticket.first():  # another node's waiter came first
                    self.lines.retry_at(line, trio.current_time() + RECHECK_SECONDS)
                    continue
                decision = await attempt(None)
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


class _Ticket:
    """A waiter's place in its line's store line (see the module docstring); every
    step is a no-op without a store, and a store failure leaves the order per node."""

    def __init__(self, queue: AdmissionQueue, partition: str, waiter: Waiter, most: int) -> None:
        self.queue = queue
        self.partition = partition
        self.line = waiter.line
        ttl_ms = round((waiter.bound + TICKET_GRACE_SECONDS) * 1000)
        # Named for its key, at most `most` of the key's tickets when taken.
        self.holder = TicketHolder(ttl_ms, waiter.key_id, most, waiter.priority, queue.share)
        self.number = 0  # 0: none held

    async def _step(self, op: TicketOp, number: int = 0) -> tuple[int, int] | None:
        store = self.queue.store
        if store is None:
            return None
        try:
            return await store.tickets(self.partition, self.line, op, number, self.holder)
        except StoreError:
            return None

    async def take(self) -> bool:
        """Take a ticket; False when its key already holds ``most`` live tickets in the
        store (its waiters on every node). A store that cannot answer: True, no ticket
        (the order, and the bound, per node)."""
        taken = await self._step("take")
        if taken is not None and not taken[0]:
            return False
        if taken is not None:
            self.number = taken[0]
            self.queue.held.setdefault(self.line, set()).add(self.number)
        return True

    async def first(self) -> bool:
        """Whether the store line's turn (see
        :meth:`~tokenguard.store.window_store.WindowStore.tickets`: interactive first,
        batch's share, then by ticket) is a ticket of this node (holding this one
        ``ttl`` more). That is this node's turn: its own line orders its waiters (their
        tickets were taken in parallel, so their numbers need not follow their
        arrival)."""
        if not self.number:
            return True
        checked = await self._step("check", self.number)
        if checked is None or not checked[1]:
            return True
        return checked[1] in self.queue.held.get(self.line, ())

    async def drop(self, *, admitted: bool) -> None:
        """Leave the store line (``admitted``: counted towards the batch share), and
        tell every node whose turn it is now."""
        if not self.number:
            return
        number, self.number = self.number, 0
        held = self.queue.held.get(self.line)
        if held is not None:
            held.discard(number)
            if not held:
                del self.queue.held[self.line]
        dropped = await self._step("admitted" if admitted else "drop", number)
        if dropped is None or not dropped[1]:
            return
        store = self.queue.store
        assert store is not None
        try:
            await store.publish(CHANNEL, [f"{self.line} {dropped[1]}".encode()])
        except StoreError:
            pass  # its head rechecks within RECHECK_SECONDS
