"""The quart-trio app: OpenAI's HTTP surface, with every completion admitted by the limiter.

:func:`create_app` wires one :class:`~tokenguard.config.settings.Settings` and one
:class:`~tokenguard.store.window_store.WindowStore` into an app; there are no module globals.
A request's path: authenticate the bearer key, read the body (capped), validate it,
count its input tokens, admit its cost (all dimensions or none), answer from the mock
upstream, then settle the output reservation to what was really produced.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from importlib import resources
from typing import Any

import trio
from quart import Response, g, has_request_context, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tokenguard.api.chat import ChatRequest, parse_json, validate_chat
from tokenguard.api.errors import APIError, http_error, invalid
from tokenguard.api.hardening import check_request_framing, drain_request_body
from tokenguard.api.prompts import prompt_tokens, validate_completion, validate_embedding
from tokenguard.api.send_deadline import SEND_DEADLINE, SendDeadlines
from tokenguard.config.settings import ApiKey, Settings, UpstreamRoute, digest_of
from tokenguard.counting.tokens import count_chat_prompt
from tokenguard.limiting.keyring import Keyring
from tokenguard.limiting.limiter import (
    Cost,
    Decision,
    Limiter,
    ratelimit_header_fields,
    ratelimit_headers,
    retry_headers,
    tightest_by_dimension,
)
from tokenguard.limiting.rules import describe_limit, describe_scope
from tokenguard.limiting.settler import Settler
from tokenguard.observe.feed import Feed, serve_websocket
from tokenguard.observe.logs import (
    ASGIApp,
    Message,
    Receive,
    RequestLog,
    Scope,
    Send,
    decision_label,
)
from tokenguard.observe.metrics import CONTENT_TYPE, Metrics, bearer_matches
from tokenguard.store.guarded import GuardedStore, LogThrottle
from tokenguard.store.window_store import LEASE_RETRY_SECONDS, RowState, StoreError, WindowStore
from tokenguard.upstreams import mock
from tokenguard.upstreams.forwarding import forwarded_body
from tokenguard.upstreams.proxy import (
    RelayedStream,
    ReportedUsage,
    StreamTally,
    Upstream,
    UpstreamFailure,
    UpstreamReply,
    reply_tokens,
    stream_output,
)

log = logging.getLogger("tokenguard.api.app")


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status=status,
        headers=dict(headers or {}),
        content_type="application/json",
    )


# A request body at least this large has its prompt counted in a worker thread: tiktoken
# releases the GIL while it encodes, so the event loop goes on serving the node's other
# requests meanwhile (a 1 MiB prompt takes ~50 ms to count; one prompt after another
# would otherwise hold every other request up that long). Below it, the thread hop
# (~0.1 ms) costs more than counting in place. At most COUNTING_THREADS at once. Such a
# request's key is first checked for room (Limiter.precheck: one store read), so a key
# already at its rpm or max_concurrent is refused before that work; below it, the one
# store call of the admission costs less than the check would.
COUNT_OFF_LOOP_BYTES = 64 * 1024
COUNTING_THREADS = 2

# A mock answer's rate-limit headers skip werkzeug's Headers: validating, storing and
# re-encoding a dozen headers there cost about as much as admitting the request. They
# wait in the ASGI scope, already encoded, and :func:`send_stashed_headers` adds them
# to the response's start message. An error answer drops them (it sends its own).
STASHED_HEADERS = "tokenguard.ratelimit_headers"


def _stash_headers(decision: Decision | None) -> None:
    """Send ``decision``'s rate-limit headers (if any) with this request's response,
    whatever builds it."""
    if decision is not None:
        request.scope[STASHED_HEADERS] = ratelimit_header_fields(decision.admission.states)


def _drop_stashed_headers() -> None:
    if has_request_context():  # (a websocket's handshake has no rate-limit headers)
        request.scope.pop(STASHED_HEADERS, None)


def _where() -> str:
    """What the app is answering, for a log line: ``POST /v1/...`` or
    ``websocket /v1/usage/stream`` (error handlers serve both kinds of request)."""
    if has_request_context():
        return f"{request.method} {request.path}"
    if has_websocket_context():
        return f"websocket {websocket.path}"
    return "(no request)"


def send_stashed_headers(app: ASGIApp) -> ASGIApp:
    """``app`` whose HTTP responses carry the headers :func:`_stash_headers` left."""

    async def sending(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_stashed(message: Message) -> None:
            if message["type"] == "http.response.start":
                stashed = scope.pop(STASHED_HEADERS, None)
                if stashed:
                    message = {**message, "headers": [*message["headers"], *stashed]}
            await send(message)

        await app(scope, receive, send_with_stashed)

    return sending


# A relayed upstream stream waits in the ASGI scope until its response is over, and
# :func:`close_relayed_stream` closes it then: quart closes a response body it iterated,
# but not one it never reached (a client that left while the headers were going out).
RELAYED_STREAM = "tokenguard.relayed_stream"


def close_relayed_stream(app: ASGIApp) -> ASGIApp:
    """``app`` whose relayed stream (if a handler left one in the scope) is closed once
    the app is done with the request, however it ended: the upstream response closed,
    the key's slot of the pool released, the stream settled (idempotent: a stream quart
    closed already is left as it is)."""

    async def closing(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        finally:
            stream = scope.pop(RELAYED_STREAM, None)
            if stream is not None:
                await stream.aclose()  # shielded inside

    return closing


def _seconds_text(seconds: float) -> str:
    return f"{math.ceil(seconds * 1000) / 1000:g}s"


def _event_stream(events: AsyncIterable[bytes], headers: Mapping[str, str]) -> Response:
    """A server-sent-events answer, sent as ``events`` yields (never buffered)."""
    response = Response(
        events, headers={**headers, "cache-control": "no-cache"}, content_type="text/event-stream"
    )
    response.timeout = None  # an LLM stream may run for minutes
    return response


def _with_usage_asked(body: dict[str, Any]) -> dict[str, Any]:
    """A streamed body that asks the upstream for its final usage chunk (to settle to it;
    :class:`~tokenguard.upstreams.proxy.RelayedStream` drops it if the client did not ask)."""
    options = body.get("stream_options")
    return {**body, "stream_options": {**(options or {}), "include_usage": True}}


def rate_limit_error(decision: Decision, window_seconds: int = 60) -> APIError:
    """OpenAI's 429 for a refused admission: names whose limit (key or team, per-model
    rule), dimension and window, limit, used, asked, wait. (``window_seconds`` is
    unused: each row knows its window.)"""
    state = decision.refusal
    assert state is not None
    kind = "requests" if state.row.dimension == "requests" else "tokens"
    words = describe_limit(state.row)
    who = describe_scope(state.row, decision.key.name)
    asked = state.row.amount
    headers = ratelimit_headers(decision.admission.states)
    if state.row.is_lease and not state.never_fits:
        # max_concurrent: no OpenAI header says it; the body does (type "concurrency").
        # When a slot frees is unknown (a request ends): retry after a second or so.
        wait = max(decision.admission.retry_after or 0.0, LEASE_RETRY_SECONDS)
        message = (
            f"Concurrency limit reached for {who} on {words}: Limit {state.limit}, "
            f"In flight {state.used}. Please try again in {_seconds_text(wait)}."
        )
        headers.update(retry_headers(wait))
        return APIError(429, message, "concurrency", None, "rate_limit_exceeded", headers)
    if state.never_fits:
        message = (
            f"Request too large for {who} on {words}: Limit {state.limit}, "
            f"Requested {asked}. This request can never fit within the limit; "
            f"reduce the prompt or max_tokens."
        )
        return APIError(429, message, kind, None, "rate_limit_exceeded", headers)
    wait = decision.admission.retry_after or 0.0
    message = (
        f"Rate limit reached for {who} on {words}: Limit {state.limit}, "
        f"Used {state.used}, Requested {asked}. Please try again in {_seconds_text(wait)}."
    )
    headers.update(retry_headers(wait))
    return APIError(429, message, kind, None, "rate_limit_exceeded", headers)


class Gateway:
    """The request handlers' shared state for one app: keys, limiter, settings."""

    def __init__(
        self,
        settings: Settings,
        store: WindowStore,
        closing: trio.Event | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # The live keys and tiers (the store's registry, seeded from the config).
        self.keyring = keyring if keyring is not None else Keyring(settings, store)
        self.limiter = Limiter(
            store,
            window_seconds=settings.window_seconds,
            bucket_seconds=settings.bucket_seconds,
            lease_seconds=settings.lease_seconds,
            near_limit_ratio=settings.near_limit_ratio,
        )
        self._shadow_log = LogThrottle()
        # The live usage feed; `closing` (the node's shutdown) ends its websockets.
        self.feed = Feed(settings, store, self.limiter, closing=closing, keyring=self.keyring)
        # GET /metrics, and the request log (one line per request, counted there too).
        self.metrics = Metrics(
            node_id=settings.node_id, store=store, feed=self.feed, limiter=self.limiter
        )
        self.request_log = RequestLog(on_finish=self.metrics.request_finished)
        # A streamed answer whose client takes no bytes for its deadline is cut.
        self.send_deadlines = SendDeadlines(on_stall=self.metrics.client_stalled)
        # Refunds are settled in the background, off the reply's latency (settler.py).
        self.settler = Settler(self._settle_now)
        self._counting = trio.CapacityLimiter(COUNTING_THREADS)  # see COUNT_OFF_LOOP_BYTES
        # Proxy mode (an [upstream] is configured); the built-in mock answers otherwise.
        self.upstream = (
            Upstream(settings.upstream, on_result=self.metrics.upstream_result)
            if settings.upstream.enabled
            else None
        )

    async def count_tokens(
        self, key: ApiKey, model: str, body_size: int, count: Callable[..., int], *args: Any
    ) -> int:
        """``count(*args)``, the prompt's token count of a request of ``key`` for
        ``model``: in place, or, when its body is ``COUNT_OFF_LOOP_BYTES`` or more (see
        there), in a worker thread once the key is known to have room for the request:
        a key that is already out gets its 429 (``rate_limit_error``) uncounted."""
        if body_size < COUNT_OFF_LOOP_BYTES:
            return count(*args)
        await self.refuse_if_out(key, model)
        return await trio.to_thread.run_sync(count, *args, limiter=self._counting)

    async def refuse_if_out(self, key: ApiKey, model: str) -> None:
        """Raise the 429 an admission of ``key`` for ``model`` is certain to get, if it is
        (``Limiter.precheck``), logged and fed like any refusal."""
        decision = await self.limiter.precheck(key, model)
        if decision is not None:
            record = self.request_log.current()
            record.model, record.decision = model, decision_label(decision)
            raise self._refused(decision, model)

    def _refused(self, decision: Decision, model: str) -> APIError:
        """A refusal's feed event and metric; the 429 to raise."""
        self.feed.rejected(decision, model)  # queued, never awaited
        self.metrics.rejected(decision)
        return rate_limit_error(decision, self.settings.window_seconds)

    def authenticate(self) -> ApiKey:
        """The key named by the request's bearer token, or a 401/400 APIError.

        Unknown keys and keys that were never valid answer identically.
        """
        values = request.headers.getlist("Authorization")
        if len(values) > 1:
            raise invalid("send exactly one Authorization header", code="invalid_authorization")
        if not values or not values[0].strip():
            raise APIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        # RFC 7235: the auth scheme is case-insensitive.
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "Malformed Authorization header: expected 'Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        # A revoked key is simply not in the keyring: the same 401 as an unknown one.
        key = self.keyring.by_digest(digest_of(token))
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        g.key = key
        self.request_log.current().key = key.name
        return key

    def output_reservation(self, key: ApiKey, chat: ChatRequest, input_tokens: int = 0) -> int:
        """Output tokens to reserve: the longest reply the request names (in any length
        field an upstream reads) times the choices it generates, else the key's default.

        The default is clamped to what the tightest enforced output (or total-tokens)
        limit allows per choice, so a request that names no max_tokens is never refused
        just for the default being large.
        """
        if chat.max_tokens is not None:
            return chat.max_tokens * chat.choices
        per_choice = key.limits.default_max_tokens
        cap = self.limiter.output_cap(key, chat.model, input_tokens)
        if cap is not None:
            per_choice = max(1, min(per_choice, cap // chat.choices))
        return per_choice * chat.choices

    async def settle(
        self, decision: Decision, output_tokens: int, input_tokens: int | None = None
    ) -> None:
        """Settle a reservation. ``input_tokens``, when given, corrects the counted
        prompt (the upstream's count). On a store that never waits (memory) it is
        settled here and now. Otherwise a refund (nothing above what was admitted) goes
        to the background settler and is not waited for; anything else (or when the
        settler cannot take it) is settled here, shielded, so a cancelled request still
        settles."""
        if self.store.never_waits:  # in-process: as cheap here as queueing it
            await self._settle_now(decision, output_tokens, input_tokens)
            return
        if self.settler.defer(decision, output_tokens, input_tokens):
            self.request_log.current().output_settled = output_tokens
            return
        with trio.CancelScope(shield=True):
            await self._settle_now(decision, output_tokens, input_tokens)

    async def _settle_now(
        self, decision: Decision, output_tokens: int, input_tokens: int | None = None
    ) -> None:
        try:
            await self.limiter.settle(
                decision, output_tokens=output_tokens, input_tokens=input_tokens
            )
        except StoreError as exc:
            # The reservation then stays at its worst case until its bucket leaves
            # the window: never an over-admission.
            log.warning("settlement for key %s failed: %s", decision.key.name, exc)
        else:
            self.feed.settled(decision, output_tokens)
            self.metrics.settled(decision, output_tokens, input_tokens)
            self.request_log.current().output_settled = output_tokens  # (in a request)

    def shadow_refused(self, decision: Decision) -> None:
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

    async def chat_completion(self) -> Response:
        key = self.authenticate()
        data = await request.get_data(cache=False)
        chat = validate_chat(parse_json(data))
        route = self.route(chat.model)  # before admission: an unrouted model costs nothing
        if not self.settings.limiting:
            self.request_log.current().decision = "unlimited"
            if route is not None:
                return await self._proxy_chat(route, chat, 0, None, {})
            per_choice = chat.max_tokens or key.limits.default_max_tokens
            reply = mock.mock_reply(chat.model, chat.messages, chat.n, per_choice)
            return await self._answer(mock.CHAT, reply, chat.stream, chat.include_usage, 0, None)
        input_tokens = await self.count_tokens(
            key, chat.model, len(data), count_chat_prompt,
            chat.model, chat.messages, chat.tools, chat.functions, chat.tool_texts,
        )  # fmt: skip
        output_tokens = self.output_reservation(key, chat, input_tokens)
        cost = Cost(requests=1, input_tokens=input_tokens, output_tokens=output_tokens)
        decision = await self.admit(key, cost, chat.model)
        if route is not None:
            headers = ratelimit_headers(decision.admission.states)
            return await self._proxy_chat(route, chat, input_tokens, decision, headers)
        reply = mock.mock_reply(chat.model, chat.messages, chat.n, output_tokens // chat.choices)
        return await self._answer(
            mock.CHAT, reply, chat.stream, chat.include_usage, input_tokens, decision
        )

    async def admit(self, key: ApiKey, cost: Cost, model: str) -> Decision:
        """Admit a request's cost, or raise its 429; log and feed the outcome."""
        # Shielded: once the store has admitted, we must know it, to settle (a store
        # that never waits cannot be cancelled halfway: no scope to pay for).
        if self.store.never_waits:
            decision = await self.limiter.admit(key, cost, model)
        else:
            with trio.CancelScope(shield=True):
                decision = await self.limiter.admit(key, cost, model)
        record = self.request_log.current()
        record.model, record.decision = model, decision_label(decision)
        record.input_tokens, record.output_reserved = cost.input_tokens, cost.output_tokens
        if decision.would_refuse:
            self.shadow_refused(decision)
        if not decision.admitted:
            raise self._refused(decision, model)
        self.feed.admitted(decision, model)
        if decision.near_limits:
            self.feed.near_limit(decision, model)
        self.metrics.admitted(decision)
        return decision

    async def _answer(
        self,
        form: mock.ReplyFormat,
        reply: mock.MockReply,
        stream: bool,
        include_usage: bool,
        input_tokens: int,
        decision: Decision | None,
    ) -> Response:
        """Answer with a mock reply in ``form``, whole or streamed, paced by the mock's
        token delay, with ``decision``'s rate-limit headers; ``decision`` (if any) is
        settled to the tokens the client got."""
        delay = self.settings.mock.token_delay_ms / 1000
        if stream:
            events = self._stream(form, reply, include_usage, input_tokens, decision, delay)
            _stash_headers(decision)
            return _event_stream(events, {})
        try:
            if delay:
                await trio.sleep(delay * reply.completion_tokens)
        finally:
            if decision is not None:
                await self.settle(decision, reply.completion_tokens)
        _stash_headers(decision)
        return _json(form.body(reply, input_tokens))

    async def _stream(
        self,
        form: mock.ReplyFormat,
        reply: mock.MockReply,
        include_usage: bool,
        input_tokens: int,
        decision: Decision | None,
        delay: float,
    ) -> AsyncIterator[bytes]:
        sent = 0
        try:
            for event, tokens in form.events(reply, include_usage):
                if delay and tokens:
                    await trio.sleep(delay)
                yield event
                # Counted only once the chunk was taken: a client that left mid-stream
                # is charged for what it was sent, not for what it would have been.
                sent += tokens
            if include_usage:
                yield form.usage_chunk(reply, input_tokens)
            yield mock.DONE
        finally:
            if decision is not None:
                await self.settle(decision, sent)

    # --- legacy completions and embeddings (limited in both modes) -----------------------

    async def completion(self) -> Response:
        """``POST /v1/completions``: input = the prompt(s); output reserved at
        ``max_tokens`` (16 by default, as OpenAI) per generated choice."""
        key = self.authenticate()
        data = await request.get_data(cache=False)
        req = validate_completion(parse_json(data))
        route = self.route(req.model)
        body, decision, input_tokens = req.body, None, 0
        if self.settings.limiting:
            input_tokens = await self.count_tokens(
                key, req.model, len(data), prompt_tokens, req.model, req.prompt, req.suffix
            )
            output_tokens = req.max_tokens * req.choices
            decision = await self.admit(key, Cost(1, input_tokens, output_tokens), req.model)
        if route is not None:
            # The length named explicitly (OpenAI's default of 16 when the request names
            # none): upstreams differ in their default (llama.cpp: unbounded).
            body = forwarded_body(
                body,
                per_choice=req.max_tokens if decision is not None else None,
                allowed=route.forward_fields,
            )
            headers = ratelimit_headers(decision.admission.states) if decision else {}
            return await self._proxy(
                route, "/completions", body, req.model, req.stream, req.include_usage,
                input_tokens, decision, headers,
            )  # fmt: skip
        prompt = [item if isinstance(item, str) else list(item) for item in req.prompt]
        reply = mock.mock_reply(
            req.model, [{"prompt": prompt}], len(req.prompt) * req.n, req.max_tokens
        )
        return await self._answer(
            mock.TEXT_COMPLETION, reply, req.stream, req.include_usage, input_tokens, decision
        )

    async def embedding(self) -> Response:
        """``POST /v1/embeddings``: one request and its input tokens; no output."""
        key = self.authenticate()
        data = await request.get_data(cache=False)
        req = validate_embedding(parse_json(data))
        route = self.route(req.model)
        decision, input_tokens = None, 0
        if self.settings.limiting:
            input_tokens = await self.count_tokens(
                key, req.model, len(data), prompt_tokens, req.model, req.input
            )
            decision = await self.admit(key, Cost(1, input_tokens, 0), req.model)
        if route is not None:
            body = forwarded_body(req.body, per_choice=None, allowed=route.forward_fields)
            headers = ratelimit_headers(decision.admission.states) if decision else {}
            return await self._proxy(
                route, "/embeddings", body, req.model, False, False,
                input_tokens, decision, headers,
            )  # fmt: skip
        body = mock.embedding_body(
            req.model, req.input, input_tokens, req.dimensions, req.encoding_format
        )
        if decision is not None:
            await self.settle(decision, 0)
        _stash_headers(decision)
        return _json(body)

    # --- proxy mode (tokenguard/upstream.py) ---------------------------------------------

    def route(self, model: str) -> UpstreamRoute | None:
        """The upstream route of ``model`` in proxy mode (``None`` in mock mode); a 404
        when no route matches it."""
        if self.upstream is None:
            return None
        route = self.upstream.route(model)
        if route is None:
            raise APIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return route

    async def _proxy_chat(
        self,
        route: UpstreamRoute,
        chat: ChatRequest,
        input_tokens: int,
        decision: Decision | None,
        headers: dict[str, str],
    ) -> Response:
        # The upstream must stop where the reservation does, or output could exceed the
        # limit: no length field above the reservation per choice, and one named
        # explicitly (in the field the route's models accept).
        body = forwarded_body(
            chat.body,
            per_choice=None if decision is None else decision.cost.output_tokens // chat.choices,
            limit_field=route.output_limit_field,
            allowed=route.forward_fields,
        )
        return await self._proxy(
            route, "/chat/completions", body, chat.model, chat.stream, chat.include_usage,
            input_tokens, decision, headers,
        )  # fmt: skip

    async def _proxy(
        self,
        route: UpstreamRoute,
        path: str,
        body: dict[str, Any],
        model: str,
        stream: bool,
        include_usage: bool,
        input_tokens: int,
        decision: Decision | None,
        headers: dict[str, str],
    ) -> Response:
        """Forward an admitted request and answer with the upstream's reply (any status,
        with tokenguard's ``x-ratelimit-*`` headers); settle it when it is over. A 502 or
        504 refunds the output reservation when the request never reached the upstream,
        else as the route's ``on_upstream_error`` says. A streamed request always asks
        the upstream for its usage chunk, and is sent under the route's
        ``client_idle_timeout`` (:mod:`tokenguard.api.send_deadline`)."""
        assert self.upstream is not None
        key = g.key.key_id  # whose share of the upstream pool the request takes

        async def finish(tally: StreamTally) -> None:
            if decision is None:
                return
            await self._settle_to_usage(
                decision,
                model,
                lambda: stream_output(tally, model, decision.cost.output_tokens, route),
                tally.usage,
                input_tokens,
            )

        try:
            if stream:
                asked = _with_usage_asked(body)
                reply = await self.upstream.stream(
                    route, path, asked, model, key=key, include_usage=include_usage, finish=finish
                )
            else:
                reply = await self.upstream.post(route, path, body, model, key=key)
        except UpstreamFailure as failure:
            if decision is not None:
                kept = failure.sent and route.on_upstream_error == "keep"
                await self.settle(decision, decision.cost.output_tokens if kept else 0)
            raise
        if isinstance(reply, RelayedStream):
            request.scope[RELAYED_STREAM] = reply
            request.scope[SEND_DEADLINE] = route.client_idle_timeout
            return _event_stream(reply, headers)
        if decision is not None:
            await self._settle_reply(decision, reply, model, input_tokens)
        reply_headers = dict(reply.headers)
        content_type = reply_headers.pop("content-type")
        return Response(
            reply.content,
            status=reply.status,
            headers={**reply_headers, **headers},
            content_type=content_type,
        )

    async def _settle_reply(
        self, decision: Decision, reply: UpstreamReply, model: str, input_tokens: int
    ) -> None:
        """Settle to a whole reply: the upstream's usage, else its counted text; an
        error (not billed) refunds the output; an unreadable 2xx keeps the reservation."""
        if not reply.ok:
            await self.settle(decision, 0)
            return
        body = reply.json()
        if not isinstance(body, dict):
            await self.settle(decision, decision.cost.output_tokens)
            return
        usage = ReportedUsage.of(body.get("usage"))
        await self._settle_to_usage(
            decision, model, lambda: reply_tokens(model, body), usage, input_tokens
        )

    async def _settle_to_usage(
        self,
        decision: Decision,
        model: str,
        count_output: Callable[[], int],
        usage: ReportedUsage | None,
        input_tokens: int,
    ) -> None:
        """Settle to the completion tokens the upstream reported, else to
        ``count_output()`` (its text, counted here only then: counting every reply
        would cost a proxied request ~0.2 us per token of its answer for nothing, and
        fill the token-count cache with texts never seen again); the prompt is
        corrected to the upstream's count where that differs from ``input_tokens``."""
        if usage is not None and usage.completion_tokens is not None:
            output = usage.completion_tokens
        else:
            output = count_output()
        await self.settle(decision, output, self._upstream_input(model, input_tokens, usage))

    def _upstream_input(self, model: str, counted: int, usage: ReportedUsage | None) -> int | None:
        """The upstream's prompt_tokens when it differs from our count (the difference
        is logged per model, and counted in the metrics), else ``None``: nothing to
        correct."""
        if usage is None or usage.prompt_tokens is None or self.upstream is None:
            return None
        self.upstream.drift.record(model, counted, usage.prompt_tokens)
        self.metrics.input_counted(model, counted, usage.prompt_tokens)
        return None if usage.prompt_tokens == counted else usage.prompt_tokens

    async def usage(self) -> Response:
        key = self.authenticate()
        states = await self.limiter.usage(key)
        # Per dimension the tightest enforced row over every window and scope; every
        # row (shadow ones too) under "limits".
        by_dimension = tightest_by_dimension(states)
        dimensions: dict[str, Any] = {}
        for dimension in ("requests", "input_tokens", "output_tokens", "total_tokens"):
            state = by_dimension.get(dimension)
            if state is not None or dimension != "total_tokens":
                dimensions[dimension] = None if state is None else _usage_entry(state)
        body = {
            "object": "usage",
            "key": key.name,
            "window_seconds": self.settings.window_seconds,
            "bucket_seconds": self.settings.bucket_seconds,
            "dimensions": dimensions,
            "limits": [
                {
                    "scope": "team" if s.row.scope.startswith("team:") else "key",
                    "dimension": s.row.dimension,
                    "window_seconds": s.row.window_ms / 1000,
                    "mode": "enforce" if s.row.enforce else "shadow",
                    **_usage_entry(s),
                }
                for s in states
            ],
        }
        return _json(body, headers=ratelimit_headers(states))

    async def models(self) -> Response:
        key = self.authenticate()
        states = await self.limiter.usage(key)
        # Proxy mode: the exact model names of [upstream.models]; the mock's otherwise.
        if self.upstream is not None:
            models, owner = self.upstream.settings.model_ids(), "tokenguard-upstream"
        else:
            models, owner = MOCK_MODELS, "tokenguard-mock"
        body = {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": owner}
                for model in models
            ],
        }
        return _json(body, headers=ratelimit_headers(states))

    async def error_response(self, error: APIError) -> Response:
        _drop_stashed_headers()  # a failure after the answer was built: this one instead
        headers = dict(error.headers)
        key = getattr(g, "key", None)
        if key is not None and not any(h.startswith("x-ratelimit-") for h in headers):
            # Every answer to an authenticated request carries the rate-limit headers.
            try:
                headers.update(ratelimit_headers(await self.limiter.usage(key)))
            except StoreError:
                pass
        return _json(error.body(), error.status, headers)


MOCK_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4", "gpt-3.5-turbo")

# The live dashboard: static files shipped in the package (tokenguard/static), served
# as they are. The page loads nothing from elsewhere, and may only talk to this node.
DASHBOARD_FILES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
DASHBOARD_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _usage_entry(state: RowState) -> dict[str, Any]:
    return {
        "limit": state.limit,
        "used": state.used,
        "remaining": state.remaining,
        "reset_seconds": state.reset_after,
    }


def create_app(
    settings: Settings,
    store: WindowStore,
    *,
    shutdown: trio.Event | None = None,
    keyring: Keyring | None = None,
) -> QuartTrio:
    """Build the app for one node: its settings, and the store its limiter uses.

    ``shutdown``, the node's own, closes the usage feed's websockets as soon as it is
    set (otherwise they would hold a graceful shutdown for its whole grace period).
    ``keyring``, when given, is run by the caller (a node shares it with its admin
    API); otherwise the app makes one and runs it while it serves.
    """
    app = QuartTrio("tokenguard")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=30,
    )
    # `//v1/chat/completions` must not be redirected around the limiter: it is a 404.
    app.url_map.merge_slashes = False
    gateway = Gateway(settings, store, closing=shutdown, keyring=keyring)
    app.extensions["tokenguard"] = gateway
    # Every HTTP request is recorded, logged once its response ended, and counted; the
    # send deadlines hold the server's own send, so they wrap everything else.
    app.asgi_app = gateway.send_deadlines.wrap(  # type: ignore[method-assign]
        gateway.request_log.wrap(close_relayed_stream(send_stashed_headers(app.asgi_app)))
    )
    if isinstance(store, GuardedStore):
        store.observe_call = gateway.metrics.store_call
    # The app's routes (read at the first request, when all exist) are the metrics'
    # path labels; any other path is "other".
    gateway.metrics.path_source = lambda: [rule.rule for rule in app.url_map.iter_rules()]
    # Ambiguous framing (Content-Length and Transfer-Encoding) and oversized headers
    # are refused first, before the body is read or the key looked up.
    app.before_request(check_request_framing)
    # Every answer, an early error included, leaves the connection reusable.
    app.after_request(drain_request_body)

    app.add_url_rule("/v1/chat/completions", view_func=gateway.chat_completion, methods=["POST"])
    app.add_url_rule("/v1/usage", view_func=gateway.usage, methods=["GET"])
    app.add_url_rule("/v1/models", view_func=gateway.models, methods=["GET"])
    app.add_url_rule("/v1/completions", view_func=gateway.completion, methods=["POST"])
    app.add_url_rule("/v1/embeddings", view_func=gateway.embedding, methods=["POST"])

    # Proxy mode: one connection pool to the upstreams, open while the app serves.
    if gateway.upstream is not None:
        upstream = gateway.upstream

        @app.before_serving
        async def open_upstream() -> None:
            await app.nursery.start(upstream.run)
            await app.nursery.start(gateway.send_deadlines.run)

        @app.after_serving
        async def close_upstream() -> None:
            gateway.send_deadlines.stop()
            upstream.stop()

    # The live usage feed: its tasks live as long as the app serves (quart-trio's
    # lifespan nursery), and stop as soon as serving ends.
    @app.before_serving
    async def start_feed() -> None:
        if keyring is None:  # ours: kept up to date while the app serves
            await app.nursery.start(gateway.keyring.run)
        await app.nursery.start(gateway.feed.run)

    @app.after_serving
    async def stop_feed() -> None:
        gateway.feed.stop()
        if keyring is None:
            gateway.keyring.stop()

    # The background settler: drained (shielded) when serving ends, so no refund that
    # was accepted is lost. A store that never waits settles in the request: no settler.
    @app.before_serving
    async def start_settler() -> None:
        if not store.never_waits:
            await app.nursery.start(gateway.settler.run)

    @app.after_serving
    async def stop_settler() -> None:
        gateway.settler.stop()

    @app.websocket("/v1/usage/stream")
    async def usage_stream() -> Response | None:
        # A Response here (a refused Origin) is sent as an HTTP answer to the handshake.
        return await serve_websocket(gateway.feed, websocket._get_current_object())

    dashboard = {
        name: (resources.files("tokenguard").joinpath("static", name).read_bytes(), kind)
        for name, kind in DASHBOARD_FILES.items()
    }

    @app.get("/dashboard")
    @app.get("/dashboard/<name>")
    async def dashboard_file(name: str = "dashboard.html") -> Response:
        if name not in dashboard:
            raise APIError(404, f"Unknown dashboard file {name!r}.", code="unknown_url")
        body, kind = dashboard[name]
        return Response(body, content_type=kind, headers=DASHBOARD_HEADERS)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok", "node": settings.node_id})

    @app.get("/readyz")
    async def readyz() -> Response:
        # The store's state (a GuardedStore's breaker); /healthz stays a liveness check.
        status = getattr(store, "status", None)
        body = {"status": "ready", "node": settings.node_id, "store": "ok"}
        if status is not None:
            body.update(status())
        ready = body["store"] == "ok"
        if not ready:
            body["status"] = "degraded"
        return _json(body, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # Open unless [metrics] token is set: key names are operator data, not secrets
        # (a node on a non-loopback address without a token says so at start).
        if not bearer_matches(request.headers.get("Authorization"), settings.metrics.token_digest):
            raise APIError(
                401,
                "GET /metrics needs the metrics token: Authorization: Bearer <[metrics] token>.",
                code="invalid_metrics_token",
            )
        return Response(gateway.metrics.exposition(), content_type=CONTENT_TYPE)

    store_error_log = LogThrottle()

    @app.errorhandler(APIError)
    async def on_api_error(error: APIError) -> Response:
        return await gateway.error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        unknown_url = f"Unknown request URL: {_where()}. Please check the URL for typos."
        answer = http_error(error, unknown_url=unknown_url, max_body_bytes=settings.max_body_bytes)
        return await gateway.error_response(answer)

    @app.errorhandler(StoreError)
    async def on_store_error(error: StoreError) -> Response:
        _drop_stashed_headers()
        held = store_error_log.ready()  # at most a line a second, however many 503s
        if held is not None:
            log.error("store unavailable: %s (%d more 503s since the last line)", error, held)
        return _json(
            APIError(
                503,
                "The rate-limit store is unavailable; please retry shortly.",
                "server_error",
                code="store_unavailable",
            ).body(),
            503,
            {"retry-after": "1"},
        )

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        _drop_stashed_headers()
        log.exception("unexpected error on %s", _where())
        return _json(
            APIError(
                500, "The server had an error processing your request.", "server_error"
            ).body(),
            500,
        )

    return app
