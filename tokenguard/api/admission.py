"""A request's admission and settlement, as the node's request path sees them.

:class:`Admissions` is the limiter with what a node does around each decision: the
request log's record, the usage feed's events, the metrics, the shadow-mode log line,
the 429 in the request's dialect, and settlement (at once on a store that never waits,
else refunds through the background :class:`~tokenguard.limiting.settler.Settler`).

Guarantees:

* An admission is shielded from cancellation on a store that may wait: once the store
  may have admitted, the node learns the outcome, so it can settle it.
* A settlement is never lost to a cancelled request (it is settled shielded, or handed
  to the settler, which drains on shutdown); a failed one leaves the reservation at its
  worst case until its bucket leaves the window (fewer admissions, never more).
* :meth:`Admissions.refuse_if_out` refuses, before any tokenizing, a key certain to be
  refused (one store read: its requests and concurrency rows).
* A request whose rules set ``max_wait_seconds`` goes through the node's
  :class:`~tokenguard.limiting.admission_queue.AdmissionQueue`: refused with room freeing
  within its bound, it waits (consuming nothing) and is admitted then; its answer, 200
  or 429, carries ``x-tokenguard-queued-ms``; a node shutting down answers it 503. A
  request with no wait bound takes exactly the path it took before the queue existed.
"""

from __future__ import annotations

import logging

import attrs
import trio

from tokenguard.api.dialect import Conventions
from tokenguard.api.ratelimit import rate_limit_error, retry_headers
from tokenguard.config.settings import DEFAULT_BATCH_SHARE
from tokenguard.errors import APIError
from tokenguard.limiting.admission_queue import AdmissionQueue, QueueClosed
from tokenguard.limiting.limiter import Cost, Decision, Limiter
from tokenguard.limiting.rules import describe_limit, describe_scope
from tokenguard.limiting.settler import Settler
from tokenguard.limiting.wait_lines import WaitPolicy, wait_policy
from tokenguard.log_throttle import LogThrottle
from tokenguard.model import SPEND, ApiKey, partition_of
from tokenguard.observe.feed import Feed, now_ms
from tokenguard.observe.logs import RequestLog, decision_label
from tokenguard.observe.metrics import Metrics
from tokenguard.store.window_store import StoreError, WindowStore

log = logging.getLogger("tokenguard.api.admission")

QUEUED_MS_HEADER = "x-tokenguard-queued-ms"
"""On every answer of a request that may wait: how long it waited, in milliseconds,
before the store call that decided it (its admission came at least that long after it
arrived)."""
# (key object id, model) -> (key, its wait policy before the headers); cleared past this.
POLICY_CACHE = 4096


class Admissions:
    """Admit and settle the requests of one node (see the module docstring). Owns the
    node's :class:`Settler` (``settler``), which the app runs while it serves."""

    def __init__(
        self,
        store: WindowStore,
        limiter: Limiter,
        *,
        feed: Feed,
        metrics: Metrics,
        request_log: RequestLog,
        queue: AdmissionQueue | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.feed = feed
        self.metrics = metrics
        self.request_log = request_log
        self.settler = Settler(self.settle_now)
        self.queue = queue or AdmissionQueue(batch_share=DEFAULT_BATCH_SHARE)
        self._shadow_log = LogThrottle()
        self._policies: dict[tuple[int, str], tuple[ApiKey, WaitPolicy]] = {}

    async def admit(
        self,
        key: ApiKey,
        cost: Cost,
        model: str,
        conventions: Conventions,
        *,
        user: str | None = None,
        end_user: str | None = None,
        asked_wait: float | None = None,
        asked_priority: str | None = None,
    ) -> Decision:
        """Admit ``cost`` for ``key`` and ``model`` (and end user ``user``, a digest: its
        per-user rows), or raise its 429 in ``conventions``' shape; log, feed and count
        the outcome. ``end_user``: the id the request named, for its feed events.
        ``asked_wait`` and ``asked_priority`` (the request's ``x-tokenguard-max-wait``
        and ``x-tokenguard-priority``) may lower its wait bound and priority; with a
        bound, a refusal may wait (see the module docstring) or, when the node shuts down
        meanwhile, raise a 503."""
        policy = self._policy(key, model)
        if asked_wait is not None or asked_priority is not None:
            policy = wait_policy(key, model, asked_wait=asked_wait, asked_priority=asked_priority)
        record = self.request_log.current()
        record.input_tokens, record.output_reserved = cost.input_tokens, cost.output_tokens
        if policy.bound <= 0:
            decision = await self._attempt(key, cost, model, user, end_user)
            return self._outcome(decision, model, conventions)
        return await self._admit_queued(key, cost, model, conventions, policy, user, end_user)

    def _room_given_back(
        self, decision: Decision, output_tokens: int, input_tokens: int | None
    ) -> None:
        """Wake the waiters on the counters a settlement gave room back in: this node's
        now, other nodes' through an announcement when some scope of the request lets
        requests wait (others may wait on those counters' lines)."""
        waiting_here = self.queue.lines.any_waiting()
        waited_on = self._policy(decision.key, decision.model).waited_on
        if not (waiting_here or waited_on):
            return
        counters = _freed_counters(decision, output_tokens, input_tokens)
        if waiting_here:
            self.queue.freed(counters)
        if waited_on:
            self.queue.announce_freed(counters)

    def _policy(self, key: ApiKey, model: str | None) -> WaitPolicy:
        """The wait policy of ``key``'s requests for ``model`` (before any header), cached
        per key object and model."""
        cached = self._policies.get((id(key), model))
        if cached is not None and cached[0] is key:
            return cached[1]
        if len(self._policies) >= POLICY_CACHE:
            self._policies.clear()
        policy = wait_policy(key, model)
        self._policies[(id(key), model)] = (key, policy)
        return policy

    async def _attempt(
        self,
        key: ApiKey,
        cost: Cost,
        model: str,
        user: str | None,
        end_user: str | None,
        behind: int | None = None,
    ) -> Decision:
        """One admission in the store (in turn ``behind`` waiters of that priority rank,
        see :meth:`Limiter.admit`), shielded once the store may have admitted."""
        if self.store.never_waits:  # no checkpoint: it cannot be cancelled halfway
            return await self.limiter.admit(key, cost, model, user, end_user, behind)
        with trio.CancelScope(shield=True):
            return await self.limiter.admit(key, cost, model, user, end_user, behind)

    async def _admit_queued(
        self,
        key: ApiKey,
        cost: Cost,
        model: str,
        conventions: Conventions,
        policy: WaitPolicy,
        user: str | None,
        end_user: str | None,
    ) -> Decision:
        """:meth:`admit` through the queue: wait for room when refused within the bound."""
        counters = tuple(row.counter for row in self.limiter.rows(key, cost, model, user))

        # When the store admitted it: its feed event's time. The queue gives the line's
        # turn to the next waiter (maybe on another node) before this request's answer
        # is made, so a time taken later could order two admissions wrongly.
        admitted_ms: int | None = None

        async def attempt(behind: int | None) -> Decision:
            nonlocal admitted_ms
            decision = await self._attempt(key, cost, model, user, end_user, behind)
            if decision.admitted:
                admitted_ms = now_ms()
            return decision

        start = trio.current_time()
        held = False

        def on_queued(refusal: Decision | None) -> None:
            nonlocal held
            held = True
            self.feed.waiting(refusal, key, model, policy.priority_name, policy.bound)
            self.metrics.queued(key.name)

        def left(outcome: str) -> None:
            if held:
                waited = trio.current_time() - start
                self.feed.waited(key, model, outcome, round(waited * 1000))
                self.metrics.dequeued(key.name, outcome, waited)

        try:
            queued = await self.queue.admit(
                partition_of(key), key.key_id, policy, counters, attempt, on_queued
            )
        except trio.Cancelled:
            left("gone")
            raise
        except QueueClosed as closed:
            left("closed")
            self.request_log.current().decision = "closed"
            raise shutting_down(closed) from None
        left("admitted" if queued.decision.admitted else "rejected")
        queued_ms = round(queued.waited * 1000)
        self.request_log.current().queued_ms = queued_ms
        try:
            return self._outcome(queued.decision, model, conventions, admitted_ms)
        except APIError as refused:
            raise attrs.evolve(
                refused, headers={**refused.headers, QUEUED_MS_HEADER: str(queued_ms)}
            ) from None

    def _outcome(
        self,
        decision: Decision,
        model: str,
        conventions: Conventions,
        admitted_ms: int | None = None,
    ) -> Decision:
        """Log, feed and count a final decision; raise its 429 when it is a refusal.
        ``admitted_ms``: when the store admitted it, if not just now."""
        record = self.request_log.current()
        record.model, record.decision = model, decision_label(decision)
        if decision.would_refuse:
            self._shadow_refused(decision)
        if not decision.admitted:
            raise self._refused(decision, model, conventions)
        self.feed.admitted(decision, model, record.surface, admitted_ms)
        if decision.near_limits:
            self.feed.near_limit(decision, model, record.surface)
        self.metrics.admitted(decision)
        return decision

    async def refuse_if_out(
        self,
        key: ApiKey,
        model: str,
        conventions: Conventions,
        *,
        user: str | None = None,
        end_user: str | None = None,
    ) -> None:
        """Raise the 429 an admission of ``key`` for ``model`` (and end user ``user``) is
        certain to get, if it is (``Limiter.precheck``), logged and fed like any refusal."""
        decision = await self.limiter.precheck(key, model, user, end_user)
        if decision is not None:
            record = self.request_log.current()
            record.model, record.decision = model, decision_label(decision)
            raise self._refused(decision, model, conventions)

    def _refused(self, decision: Decision, model: str, conventions: Conventions) -> APIError:
        """A refusal's feed event and metric; the 429 to raise."""
        surface = self.request_log.current().surface
        self.feed.rejected(decision, model, surface)  # queued, never awaited
        self.metrics.rejected(decision)
        return rate_limit_error(decision, conventions)

    def _shadow_refused(self, decision: Decision) -> None:
        """Shadow mode let a request through that enforcing would have refused: log it
        (at most a line a second; ``Limiter.shadow_refusals`` counts every one)."""
        held = self._shadow_log.ready()
        state = decision.shadow_refusal
        if held is not None and state is not None:
            log.info(
                "shadow mode: would have refused key %s on %s (%s): limit %d, used %d, "
                "requested %d (%d more since the last line)",
                decision.key.name,
                describe_limit(state.row),
                describe_scope(state.row, decision.key.name),
                state.limit,
                state.used,
                state.row.amount,
                held,
            )

    async def settle(
        self,
        decision: Decision,
        output_tokens: int,
        input_tokens: int | None = None,
        cached_input_tokens: int = 0,
        cache_reads: int = 0,
    ) -> None:
        """Settle a reservation to what the request used. ``input_tokens``, when given,
        corrects the counted prompt (the upstream's count), of which ``cached_input_tokens``
        were prompt-cache hits; ``cache_reads``: prompt-cache reads outside it (Anthropic's).
        Both are priced as cached input in spend rows, and shown together in the feed's
        ``settled`` event. On a store that never waits (memory) it is settled here and
        now. Otherwise a refund (nothing above what was admitted) goes to the background
        settler and is not waited for; anything else (or when the settler cannot take it,
        or the settlement has cache reads) is settled here, shielded, so a cancelled
        request still settles."""
        cached = cached_input_tokens
        if self.store.never_waits:  # in-process: as cheap here as queueing it
            await self.settle_now(decision, output_tokens, input_tokens, cached, cache_reads)
            return
        if not cache_reads and self.settler.defer(decision, output_tokens, input_tokens, cached):
            self.request_log.current().output_settled = output_tokens
            return
        with trio.CancelScope(shield=True):
            await self.settle_now(decision, output_tokens, input_tokens, cached, cache_reads)

    async def settle_now(
        self,
        decision: Decision,
        output_tokens: int,
        input_tokens: int | None = None,
        cached_input_tokens: int = 0,
        cache_reads: int = 0,
    ) -> None:
        """Settle in the store now (the settler's own call); a store failure is logged."""
        try:
            await self.limiter.settle(
                decision,
                output_tokens=output_tokens,
                input_tokens=input_tokens,
                cached_input_tokens=cached_input_tokens,
                cache_reads=cache_reads,
            )
        except StoreError as exc:
            log.warning("settlement for key %s failed: %s", decision.key.name, exc)
        else:
            self._room_given_back(decision, output_tokens, input_tokens)
            spent = decision.cost.spent(
                output_tokens, input_tokens, cached_input_tokens, cache_reads
            )
            self.feed.settled(decision, output_tokens, cached_input_tokens + cache_reads, spent)
            self.metrics.settled(decision, output_tokens, input_tokens, spent)
            self.request_log.current().output_settled = output_tokens  # (in a request)


def _freed_counters(
    decision: Decision, output_tokens: int, input_tokens: int | None
) -> tuple[str, ...]:
    """The counters a settlement of ``decision`` gave room back in: its lease rows (the
    lease is released), its output and total-tokens rows when it refunded output, its
    input and total-tokens rows when the prompt was counted high."""
    reservation = decision.reservation
    if reservation is None:
        return ()
    freed: set[str] = set()
    if output_tokens < decision.cost.output_tokens:
        freed |= {"output_tokens", "total_tokens"}
    if input_tokens is not None and input_tokens < decision.cost.input_tokens:
        freed |= {"input_tokens", "total_tokens"}
    if freed:  # a token refund refunds the money those tokens were reserved at
        freed.add(SPEND)
    return tuple(
        row.counter
        for row in reservation.rows
        if row.dimension in freed or (row.is_lease and reservation.lease is not None)
    )


def shutting_down(closed: QueueClosed) -> APIError:
    """The 503 a waiter gets when its node shuts down: retry when its room would have
    freed (at least a second), on another node."""
    return APIError(
        503,
        "The node is shutting down; please retry shortly.",
        "server_error",
        code="shutting_down",
        headers=retry_headers(closed.retry_after),
    )
