"""Answering from an upstream (proxy mode), and settling to what it spent.

The dialect says what is sent (no length field above the reservation) and how to read
what comes back; :class:`~tokenguard.upstreams.proxy.Upstream` sends it, relays a stream
as it arrives and keeps each key within its share of the pool.

Settlement, per answer:

* a whole 2xx answer: to the upstream's reported usage (input too, where its count
  differs from tokenguard's: logged and counted per model), else to the tokens of its
  text counted here (only then: counting every answer would cost ~0.2 us per token for
  nothing); an answer that is not JSON keeps the reservation; an error answer (not
  billed) refunds the output;
* a stream: the same from the usage the stream reported, else what
  :func:`stream_output` says the upstream may have spent (the whole reservation when it
  did not end normally: the client left, was cut, or the upstream broke);
* a 502/504 of tokenguard's own: the output refunded when the request never reached the
  upstream, else as the route's ``on_upstream_error`` says (``keep`` by default).

An answer with an id and usage (a Responses API response) is handed to the dialect
(:meth:`~tokenguard.api.dialect.Dialect.answered`) once it is over, so a later request
that refers to it is charged its totals on any node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response

from tokenguard.api.admission import Admissions
from tokenguard.api.dialect import Dialect, Exchange
from tokenguard.api.responses import event_stream, keep_relayed_stream
from tokenguard.api.send_deadline import limit_sends
from tokenguard.config.settings import UpstreamRoute
from tokenguard.limiting.limiter import Decision
from tokenguard.observe.metrics import Metrics
from tokenguard.upstreams.proxy import Upstream, UpstreamFailure, UpstreamReply
from tokenguard.upstreams.relay import RelayedStream, StreamTally
from tokenguard.upstreams.usage import ReportedUsage


def stream_output(tally: StreamTally, model: str, reserved: int, route: UpstreamRoute) -> int:
    """The output tokens a stream costs when the upstream reported no usage: the tokens
    of the text it generated, when its body ended normally; otherwise at least the whole
    reservation ``reserved`` (the upstream may have generated, and billed, all of it):
    when the client left or stalled and the stream was cancelled (or its drain did not
    finish), and when the upstream broke mid-way, unless the route's
    ``on_upstream_error`` is ``"refund"`` (then the text generated until then)."""
    counted = tally.meter.output_tokens(model)
    if tally.complete:
        return counted
    if tally.failure is not None and route.on_upstream_error == "refund":
        return counted
    return max(reserved, counted)


class ProxyAnswers:
    """Answers relayed from the upstream servers (see the module docstring)."""

    def __init__(self, admissions: Admissions, upstream: Upstream, metrics: Metrics) -> None:
        self.admissions = admissions
        self.upstream = upstream
        self.metrics = metrics

    async def answer(
        self,
        dialect: Dialect,
        route: UpstreamRoute,
        exchange: Exchange,
        *,
        key_id: str,
        input_tokens: int,
        decision: Decision | None,
        client_headers: Any,
    ) -> Response:
        """Forward an admitted request and answer with the upstream's reply (any status,
        with ``decision``'s rate-limit headers); settle it when it is over. A stream is
        sent under the route's ``client_idle_timeout``
        (:mod:`tokenguard.api.send_deadline`). ``key_id``: whose share of the pool the
        request takes."""
        reserved = decision.cost.output_tokens if decision is not None else 0
        per_choice = reserved // exchange.choices if decision and exchange.choices else None
        body = dialect.forward(exchange, per_choice, route)
        upstream_headers = dialect.upstream_headers(route, client_headers)
        model = exchange.model
        try:
            if exchange.stream:
                reply = await self.upstream.stream(
                    route,
                    dialect.upstream_path,
                    dialect.asking_usage(body),
                    model,
                    key=key_id,
                    headers=upstream_headers,
                    meter=dialect.meter(exchange),
                    finish=self._stream_finish(
                        dialect, route, exchange, key_id, input_tokens, decision, reserved
                    ),
                )
            else:
                reply = await self.upstream.post(
                    route, dialect.upstream_path, body, model, key=key_id, headers=upstream_headers
                )
        except UpstreamFailure as failure:
            if decision is not None:
                kept = failure.sent and route.on_upstream_error == "keep"
                await self.admissions.settle(decision, reserved if kept else 0)
            raise
        headers = {}
        if decision is not None:
            headers = dialect.conventions.ratelimit_headers(decision.admission.states)
        if isinstance(reply, RelayedStream):
            keep_relayed_stream(reply)
            limit_sends(route.client_idle_timeout)
            return event_stream(reply, headers)
        if decision is not None:
            await self._settle_reply(dialect, decision, route, reply, model, input_tokens)
        await self._keep_totals(dialect, exchange, key_id, reply)
        return self._reply_response(reply, headers)

    def _stream_finish(
        self,
        dialect: Dialect,
        route: UpstreamRoute,
        exchange: Exchange,
        key_id: str,
        input_tokens: int,
        decision: Decision | None,
        reserved: int,
    ) -> Callable[[StreamTally], Awaitable[None]]:
        """What runs once a relayed stream is over (whatever ended it): settle
        ``decision`` to what the stream spent, and hand its totals to the dialect."""
        model = exchange.model

        async def finish(tally: StreamTally) -> None:
            if decision is not None:
                output = stream_output(tally, model, reserved, route)
                await self._settle_to(decision, route, model, tally.usage, output, input_tokens)
            totals = dialect.stream_totals(exchange, tally.meter)
            if totals is not None:
                await dialect.answered(key_id, exchange, totals)

        return finish

    async def _keep_totals(
        self, dialect: Dialect, exchange: Exchange, key_id: str, reply: UpstreamReply
    ) -> None:
        """Keep what a whole 2xx answer with an id spent, for requests that refer to it."""
        if reply.ok:
            totals = dialect.answer_totals(exchange, reply.json())
            if totals is not None:
                await dialect.answered(key_id, exchange, totals)

    async def pass_through(
        self,
        dialect: Dialect,
        route: UpstreamRoute,
        exchange: Exchange,
        key_id: str,
        client_headers: Any,
        headers: dict[str, str],
    ) -> Response:
        """Forward a request that generates nothing (a token count) to the dialect's
        ``count_upstream_path`` and answer with the upstream's reply as it is (any
        status), with ``headers`` (the rate-limit headers). Raises as :meth:`answer`."""
        assert dialect.count_upstream_path is not None
        reply = await self.upstream.post(
            route,
            dialect.count_upstream_path,
            dialect.forward(exchange, None, route),
            exchange.model,
            key=key_id,
            headers=dialect.upstream_headers(route, client_headers),
        )
        return self._reply_response(reply, headers)

    def _reply_response(self, reply: UpstreamReply, headers: dict[str, str]) -> Response:
        """A whole upstream reply as the client's answer, with ``headers`` added."""
        reply_headers = dict(reply.headers)
        content_type = reply_headers.pop("content-type")
        return Response(
            reply.content,
            status=reply.status,
            headers={**reply_headers, **headers},
            content_type=content_type,
        )

    async def _settle_reply(
        self,
        dialect: Dialect,
        decision: Decision,
        route: UpstreamRoute,
        reply: UpstreamReply,
        model: str,
        input_tokens: int,
    ) -> None:
        """Settle to a whole reply (see the module docstring)."""
        if not reply.ok:
            await self.admissions.settle(decision, 0)
            return
        body = reply.json()
        if not isinstance(body, dict):
            await self.admissions.settle(decision, decision.cost.output_tokens)
            return
        usage = dialect.usage_of(body)
        await self._settle_to(
            decision, route, model, usage, lambda: dialect.reply_output(model, body), input_tokens
        )

    async def _settle_to(
        self,
        decision: Decision,
        route: UpstreamRoute,
        model: str,
        usage: ReportedUsage | None,
        counted_output: int | Callable[[], int],
        input_tokens: int,
    ) -> None:
        """Settle to the output the upstream reported, else to ``counted_output`` (a
        count, or what counts it: called only then); the prompt is corrected to the
        upstream's count of what counts against input limits (the route's
        ``cached_input_counts`` says whether cache reads do) where that differs from
        ``input_tokens``."""
        if usage is not None and usage.output_tokens is not None:
            output = usage.output_tokens
        elif callable(counted_output):
            output = counted_output()
        else:
            output = counted_output
        corrected = self._upstream_input(route, model, input_tokens, usage)
        hits = usage.cached_input_tokens if usage is not None else 0
        reads = usage.cache_read_tokens if usage is not None else 0
        if route.cached_input_counts:  # the reads are in the input counted: hits of it
            hits, reads = hits + reads, 0
        await self.admissions.settle(decision, output, corrected, hits, reads)

    def _upstream_input(
        self, route: UpstreamRoute, model: str, counted: int, usage: ReportedUsage | None
    ) -> int | None:
        """The input tokens the upstream says count against input limits, when they
        differ from our count, else ``None``: nothing to correct. How our count compares
        with the whole prompt the upstream read (cached or not) is logged per model and
        counted in the metrics: the counting error."""
        limited = None if usage is None else usage.limited_input(route.cached_input_counts)
        if usage is None or limited is None or usage.prompt_tokens is None:
            return None
        self.upstream.drift.record(model, counted, usage.prompt_tokens)
        self.metrics.input_counted(model, counted, usage.prompt_tokens)
        return None if limited == counted else limited
