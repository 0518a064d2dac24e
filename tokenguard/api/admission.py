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
"""

from __future__ import annotations

import logging

import trio

from tokenguard.api.dialect import Conventions
from tokenguard.api.ratelimit import rate_limit_error
from tokenguard.errors import APIError
from tokenguard.limiting.limiter import Cost, Decision, Limiter
from tokenguard.limiting.rules import describe_limit, describe_scope
from tokenguard.limiting.settler import Settler
from tokenguard.log_throttle import LogThrottle
from tokenguard.model import ApiKey
from tokenguard.observe.feed import Feed
from tokenguard.observe.logs import RequestLog, decision_label
from tokenguard.observe.metrics import Metrics
from tokenguard.store.window_store import StoreError, WindowStore

log = logging.getLogger("tokenguard.api.admission")


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
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.feed = feed
        self.metrics = metrics
        self.request_log = request_log
        self.settler = Settler(self.settle_now)
        self._shadow_log = LogThrottle()

    async def admit(
        self,
        key: ApiKey,
        cost: Cost,
        model: str,
        conventions: Conventions,
        *,
        user: str | None = None,
        end_user: str | None = None,
    ) -> Decision:
        """Admit ``cost`` for ``key`` and ``model`` (and end user ``user``, a digest: its
        per-user rows), or raise its 429 in ``conventions``' shape; log, feed and count
        the outcome. ``end_user``: the id the request named, for its feed events."""
        if self.store.never_waits:  # no checkpoint: it cannot be cancelled halfway
            decision = await self.limiter.admit(key, cost, model, user, end_user)
        else:
            with trio.CancelScope(shield=True):
                decision = await self.limiter.admit(key, cost, model, user, end_user)
        record = self.request_log.current()
        record.model, record.decision = model, decision_label(decision)
        record.input_tokens, record.output_reserved = cost.input_tokens, cost.output_tokens
        if decision.would_refuse:
            self._shadow_refused(decision)
        if not decision.admitted:
            raise self._refused(decision, model, conventions)
        self.feed.admitted(decision, model, record.surface)
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
            spent = decision.cost.spent(
                output_tokens, input_tokens, cached_input_tokens, cache_reads
            )
            self.feed.settled(decision, output_tokens, cached_input_tokens + cache_reads, spent)
            self.metrics.settled(decision, output_tokens, input_tokens, spent)
            self.request_log.current().output_settled = output_tokens  # (in a request)
