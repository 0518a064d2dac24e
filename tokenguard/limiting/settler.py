"""Settlement off the request path: refunds settled by background tasks.

A reply's settlement (:meth:`~tokenguard.limiting.limiter.Limiter.settle`) used to be awaited
before the reply was sent: a store round trip added to every request's latency. A
settlement that only gives back (no delta above zero: the reply produced at most what
was reserved, and the prompt counted at most what was admitted) can wait a little
without risk: until it lands, the window still counts the reservation's worst case,
which can refuse more, never admit more. So :class:`Settler` takes such settlements
into a bounded queue and ``tasks`` background tasks settle them concurrently; on the
Redis driver they then go out in the same pipelines as the admissions of the moment.

Guarantees:

* :meth:`Settler.defer` never blocks and never raises. It says no (the caller then
  settles at once, in order) for anything that charges more than was admitted or
  releases a ``max_concurrent`` lease, when the queue holds ``limit`` settlements
  already, or when the settler is not running.
* Nothing accepted is dropped by a shutdown: when :meth:`Settler.run` is cancelled or
  :meth:`Settler.stop` is called, it accepts no more, and returns once every accepted
  settlement has been attempted (shielded from the cancellation), or after
  ``drain_seconds`` (a store that hangs; those reservations then stay at their worst
  case until they leave the window, as after any failed settlement).
* A refund shows in the store a little after the reply (usually within a millisecond
  or one store round trip), not before it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from tokenguard.limiting.limiter import Decision

log = logging.getLogger("tokenguard.limiting.settler")

# Settlements waiting at most; past it callers settle at once (backpressure).
SETTLER_QUEUE = 10_000
# Settlements in flight at once (the Redis driver coalesces them into its pipelines).
SETTLER_TASKS = 32
# How long a shutdown waits for the queued settlements, at most.
DRAIN_SECONDS = 10.0

# (decision, output tokens, input tokens or None, cached input tokens): Limiter.settle's.
SettleCall = Callable[[Decision, int, "int | None", int], Awaitable[None]]
_Item = tuple[Decision, int, "int | None", int]


def is_refund(decision: Decision, output_tokens: int, input_tokens: int | None) -> bool:
    """Whether settling to these amounts only gives back (every delta <= 0) and releases
    no lease: a ``max_concurrent`` lease is released at once, so that a client's next
    request, sent as soon as this reply arrived, never finds it still held."""
    reservation = decision.reservation
    if reservation is not None and reservation.lease is not None:
        return False
    cost = decision.cost
    if output_tokens > cost.output_tokens:
        return False
    return input_tokens is None or input_tokens <= cost.input_tokens


class Settler:
    """Background settlement of refunds (see the module docstring). ``settle`` is the
    call that settles one (it must not raise for a store failure: log it)."""

    def __init__(
        self,
        settle: SettleCall,
        *,
        limit: int = SETTLER_QUEUE,
        tasks: int = SETTLER_TASKS,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self._settle = settle
        self.limit = limit
        self.tasks = tasks
        self.drain_seconds = drain_seconds
        self._send: trio.MemorySendChannel[_Item] | None = None
        self._stopped = trio.Event()
        self.deferred = 0  # settlements accepted so far
        self.lost = 0  # accepted but not attempted: the drain ran out of time

    def defer(
        self,
        decision: Decision,
        output_tokens: int,
        input_tokens: int | None,
        cached_input_tokens: int = 0,
    ) -> bool:
        """Queue a refund's settlement; ``False`` (nothing queued) when the caller must
        settle it itself: a charge, a full queue, a settler not running. (Cached input
        only lowers a spend: it never makes a refund a charge.)"""
        send = self._send
        if send is None or not is_refund(decision, output_tokens, input_tokens):
            return False
        try:
            send.send_nowait((decision, output_tokens, input_tokens, cached_input_tokens))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        self.deferred += 1
        return True

    @property
    def queued(self) -> int:
        """Settlements accepted and not yet taken by a task."""
        send = self._send
        return 0 if send is None else send.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Settle what is deferred until cancelled or :meth:`stop`, then drain."""
        send, receive = trio.open_memory_channel[_Item](self.limit)
        async with trio.open_nursery() as nursery:
            drain = trio.CancelScope(shield=True)
            nursery.start_soon(self._work_all, receive, drain)
            self._send = send
            task_status.started()
            try:
                await self._stopped.wait()
            finally:
                # From here callers settle themselves; the tasks finish the queue (they
                # are shielded: a cancellation here must not lose a refund).
                self._send = None
                drain.deadline = trio.current_time() + self.drain_seconds
                send.close()

    def stop(self) -> None:
        """Accept no more; :meth:`run` returns once the queue is drained."""
        self._stopped.set()

    async def _work_all(
        self, receive: trio.MemoryReceiveChannel[_Item], drain: trio.CancelScope
    ) -> None:
        with drain:
            async with trio.open_nursery() as nursery:
                for _ in range(self.tasks):
                    nursery.start_soon(self._work, receive)
        if drain.cancelled_caught:
            self.lost = receive.statistics().current_buffer_used
            log.warning(
                "settler: %d settlement(s) not made within %.0f s of shutdown; their "
                "reservations stay counted until they leave the window",
                self.lost,
                self.drain_seconds,
            )

    async def _work(self, receive: trio.MemoryReceiveChannel[_Item]) -> None:
        async for decision, output_tokens, input_tokens, cached_input_tokens in receive:
            await self._settle(decision, output_tokens, input_tokens, cached_input_tokens)
