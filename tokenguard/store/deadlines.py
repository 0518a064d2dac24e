"""The deadline on every store call (:class:`_Deadlines`, mixed into
:class:`~tokenguard.store.guarded.GuardedStore`), judged by one watchdog task.

Guarantees: a call is cut only once the store had ``timeout`` of this node's *running*
time since the call was made or since the store last showed progress (answered, was
written to, was heard from), this node's own stalls left out; and never later than
``MAX_WAIT_FACTOR`` times the timeout of wall time. A call cut at that cap while the
node itself was stalled raises :class:`NodeStalled` (not the store's fault); any other
cut raises :class:`~tokenguard.store.window_store.StoreError`. Replies already in are
read before anything is cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

from tokenguard.store.window_store import (
    StoreError,
)

# However busy the store or stalled the node, no call waits more than this many times
# the timeout (wall time, from when it was made).
MAX_WAIT_FACTOR = 10
# Before judging a call late, the watchdog lets this many scheduling rounds pass: a
# reply already in a socket reaches the driver's reader within two (the I/O poll, then
# the reader's step), and one more is margin. As long as the store is heard from in
# them (a long pipeline's replies, read a buffer at a time), as many again, up to
# MAX_READ_TURNS in all.
READ_TURNS = 3
MAX_READ_TURNS = 30


class NodeStalled(StoreError):
    """A store call reached the hard cap (``MAX_WAIT_FACTOR`` times the timeout) before
    the store had the timeout of this node's running time to answer it: the node itself
    was stalled. The caller gets the failure policy's answer, as for any
    :class:`StoreError`, but the store is not blamed (the breaker does not count it)."""


@attrs.define(eq=False)
class _Wait:
    """A store call the watchdog judges: made at ``start``, given ``timeout`` of this
    node's running time without news from the store, and never more than ``cap``
    (a ``trio.current_time()``). ``verdict`` is set when it is cut: ``"store"`` (the
    store had the time and did not answer) or ``"stalled"`` (the node did not run)."""

    start: float
    timeout: float
    cap: float
    verdict: str | None = None


class _Deadlines:
    """The guard's deadlines: its calls' waits and the watchdog that judges them."""

    @contextmanager
    def _deadline(self, seconds: float | None = None) -> Iterator[None]:
        """Run the body (a store call) under the watchdog's judgement; a call it cuts
        raises :class:`StoreError` (:class:`NodeStalled` if the store is not to blame).

        ``seconds`` (default: ``timeout``) of this node's running time without news from
        the store, counted from when the call was made or the store last showed
        progress (see :meth:`_watchdog`), and never more than ``MAX_WAIT_FACTOR`` times
        ``timeout`` (or ``seconds``, if longer) of wall time.
        """
        timeout = self.timeout if seconds is None else seconds
        start = trio.current_time()
        wait = _Wait(start, timeout, start + max(timeout, MAX_WAIT_FACTOR * self.timeout))
        with trio.CancelScope() as scope:
            self._waiting[scope] = wait
            if timeout < self._watchdog_shortest:
                self._rejudge.set()
            try:
                yield
            finally:
                del self._waiting[scope]
        if not scope.cancelled_caught:
            return
        if wait.verdict == "stalled":
            self.stats.stalled_out += 1
            raise NodeStalled(
                f"store {self.url}: no answer within {(wait.cap - start) * 1000:g} ms, "
                "this node stalled meanwhile (not counted against the store)"
            )
        self.stats.timeouts += 1
        raise StoreError(f"store {self.url}: no answer within {timeout * 1000:g} ms")

    def _progress(self) -> float:
        """When the store last showed progress: answered a call of this node, was
        written calls, or was heard from (its replies read, their callers not yet run)."""
        primary = self.primary
        return max(self._last_answer, primary.last_sent, primary.last_heard)

    def _due(self, wait: _Wait, progress: float, now: float) -> tuple[float, float]:
        """When ``wait`` is due for the store's lack of answer, and when at the latest.

        The first: ``timeout`` after its start or the store's last progress, whichever
        is later, plus the node's own stalls since then (as far as measured by
        ``now``). The second: its hard cap.
        """
        origin = max(wait.start, progress)
        return origin + wait.timeout + self.stalls.stalled(origin, now), wait.cap

    def _verdict(self, wait: _Wait, progress: float, now: float) -> str | None:
        """``None`` while ``wait`` may wait on; else whom its end is blamed on."""
        store_due, cap = self._due(wait, progress, now)
        if store_due <= now:
            return "store"
        if cap > now:
            return None
        # The hard cap: the store is to blame only if it had the timeout of this node's
        # running time since the call was made.
        running = now - wait.start - self.stalls.stalled(wait.start, now)
        return "store" if running >= wait.timeout else "stalled"

    async def _watchdog(self) -> None:
        """Cut the calls that waited long enough for the store (one task for all calls).

        A call is due ``timeout`` after it was made or after the store last showed
        progress (:meth:`_progress`: it answered, was written calls, or was heard
        from), whichever is later, not counting the time this node itself was stalled
        meanwhile (:class:`~tokenguard.store.stalls.StallMeter`: a GC pass, a starved CPU, a
        loop held by its own tasks); and in any case at its hard cap. So a dead or hung
        store costs each call ``timeout`` after its send, plus the node's own stalls;
        a queue behind a store that keeps answering is no failure, nor a pipeline sent
        late by a stalled node, nor a reply that came in while the node did not run.

        The watchdog sleeps until the earliest due time and reports its own lateness
        as a stall. Before cutting anything it lets the replies already in be read
        (:meth:`_read_turns`): they answer their calls, and move the progress on.
        """
        while True:
            live = [wait for scope, wait in self._waiting.items() if not scope.cancel_called]
            now = trio.current_time()
            progress = self._progress()
            due = min((min(self._due(wait, progress, now)) for wait in live), default=math.inf)
            if due > now:
                self._watchdog_shortest = min((w.timeout for w in live), default=math.inf)
                self._rejudge = trio.Event()
                with trio.move_on_at(due) as timer:
                    await self._rejudge.wait()
                self._watchdog_shortest = -math.inf  # awake: it sees new calls itself
                if timer.cancelled_caught:
                    self.stalls.woke(due, trio.current_time())
                continue
            await self._read_turns()
            now = trio.current_time()
            progress = self._progress()
            for scope, wait in list(self._waiting.items()):
                if not scope.cancel_called:
                    wait.verdict = self._verdict(wait, progress, now)
                    if wait.verdict is not None:
                        scope.cancel()

    async def _read_turns(self) -> None:
        """Let the replies already in be read: ``READ_TURNS`` scheduling rounds, then as
        many again while the store was heard from since the last ones began (at most
        ``MAX_READ_TURNS`` in all)."""
        for _ in range(MAX_READ_TURNS // READ_TURNS):
            began = trio.current_time()
            for _ in range(READ_TURNS):
                await trio.lowlevel.checkpoint()
            if self._progress() < began:
                return
