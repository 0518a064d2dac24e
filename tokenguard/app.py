"""The quart-trio app: OpenAI's HTTP surface, with every completion admitted by the limiter.

:func:`create_app` wires one :class:`~tokenguard.settings.Settings` and one
:class:`~tokenguard.windows.WindowStore` into an app; there are no module globals.
A request's path: authenticate the bearer key, read the body (capped), validate it,
count its input tokens, admit its cost (all dimensions or none), answer from the mock
upstream, then settle the output reservation to what was really produced.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tokenguard import mock
from tokenguard.chat import ChatRequest, parse_json, validate_chat
from tokenguard.errors import APIError, invalid
from tokenguard.limiter import Cost, Decision, Limiter, ratelimit_headers, retry_headers
from tokenguard.settings import ApiKey, Settings, digest_of
from tokenguard.tokens import count_chat_prompt
from tokenguard.windows import RowState, StoreError, WindowStore

log = logging.getLogger("tokenguard.app")

DIMENSION_WORDS = {
    "requests": ("requests", "requests per min (RPM)"),
    "input_tokens": ("tokens", "input tokens per min (input TPM)"),
    "output_tokens": ("tokens", "output tokens per min (output TPM)"),
}


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status=status,
        headers=dict(headers or {}),
        content_type="application/json",
    )


def _seconds_text(seconds: float) -> str:
    return f"{math.ceil(seconds * 1000) / 1000:g}s"


def rate_limit_error(decision: Decision, window_seconds: int) -> APIError:
    """OpenAI's 429 for a refused admission: names dimension, limit, used, asked, wait."""
    state = decision.refusal
    assert state is not None
    kind, words = DIMENSION_WORDS.get(state.row.dimension, ("tokens", state.row.dimension))
    if window_seconds != 60:
        words = f"{words.split(' per min')[0]} per {window_seconds}s window"
    who = f"key '{decision.key.name}'"
    asked = state.row.amount
    headers = ratelimit_headers(decision.admission.states)
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

    def __init__(self, settings: Settings, store: WindowStore) -> None:
        self.settings = settings
        self.store = store
        self.keys = settings.key_by_digest()
        self.limiter = Limiter(
            store,
            window_seconds=settings.window_seconds,
            bucket_seconds=settings.bucket_seconds,
        )

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
        key = self.keys.get(digest_of(token))
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        g.key = key
        return key

    def output_reservation(self, key: ApiKey, chat: ChatRequest) -> int:
        """Output tokens to reserve: the named max_tokens x n, else the key's default.

        The default is clamped to what the output limit allows per choice, so a request
        that names no max_tokens is never refused just for the default being large.
        """
        if chat.max_tokens is not None:
            return chat.max_tokens * chat.n
        per_choice = key.limits.default_max_tokens
        if key.limits.output_tpm is not None:
            per_choice = max(1, min(per_choice, key.limits.output_tpm // chat.n))
        return per_choice * chat.n

    async def settle(self, decision: Decision, output_tokens: int) -> None:
        """Settle a reservation; shielded, so a cancelled request still settles."""
        with trio.CancelScope(shield=True):
            try:
                await self.limiter.settle(decision, output_tokens=output_tokens)
            except StoreError as exc:
                # The reservation then stays at its worst case until its bucket leaves
                # the window: never an over-admission.
                log.warning("settlement for key %s failed: %s", decision.key.name, exc)

    async def chat_completion(self) -> Response:
        key = self.authenticate()
        data = await request.get_data(cache=False)
        chat = validate_chat(parse_json(data))
        if not self.settings.limiting:
            per_choice = chat.max_tokens or key.limits.default_max_tokens
            reply = mock.mock_reply(chat.model, chat.messages, chat.n, per_choice)
            return await self._answer(chat, reply, 0, None, {})
        input_tokens = count_chat_prompt(chat.model, chat.messages, chat.tools, chat.functions)
        output_tokens = self.output_reservation(key, chat)
        cost = Cost(requests=1, input_tokens=input_tokens, output_tokens=output_tokens)
        # Shielded: once the store has admitted, we must know it, to settle.
        with trio.CancelScope(shield=True):
            decision = await self.limiter.admit(key, cost)
        if not decision.admitted:
            raise rate_limit_error(decision, self.settings.window_seconds)
        headers = ratelimit_headers(decision.admission.states)
        reply = mock.mock_reply(chat.model, chat.messages, chat.n, output_tokens // chat.n)
        return await self._answer(chat, reply, input_tokens, decision, headers)

    async def _answer(
        self,
        chat: ChatRequest,
        reply: mock.MockReply,
        input_tokens: int,
        decision: Decision | None,
        headers: dict[str, str],
    ) -> Response:
        delay = self.settings.mock.token_delay_ms / 1000
        if chat.stream:
            body = self._stream(chat, reply, input_tokens, decision, delay)
            headers = {**headers, "cache-control": "no-cache"}
            response = Response(body, headers=headers, content_type="text/event-stream")
            response.timeout = None  # an LLM stream may run for minutes
            return response
        try:
            if delay:
                await trio.sleep(delay * reply.completion_tokens)
        finally:
            if decision is not None:
                await self.settle(decision, reply.completion_tokens)
        return _json(mock.completion_body(reply, input_tokens), headers=headers)

    async def _stream(
        self,
        chat: ChatRequest,
        reply: mock.MockReply,
        input_tokens: int,
        decision: Decision | None,
        delay: float,
    ) -> AsyncIterator[bytes]:
        sent = 0
        try:
            for event, tokens in mock.stream_events(reply, chat.include_usage):
                if delay and tokens:
                    await trio.sleep(delay)
                yield event
                # Counted only once the chunk was taken: a client that left mid-stream
                # is charged for what it was sent, not for what it would have been.
                sent += tokens
            if chat.include_usage:
                yield mock.usage_chunk(reply, input_tokens)
            yield mock.DONE
        finally:
            if decision is not None:
                await self.settle(decision, sent)

    async def usage(self) -> Response:
        key = self.authenticate()
        states = await self.limiter.usage(key)
        by_dimension = {s.row.dimension: s for s in states}
        dimensions: dict[str, Any] = {}
        for dimension in ("requests", "input_tokens", "output_tokens"):
            state = by_dimension.get(dimension)
            dimensions[dimension] = None if state is None else _usage_entry(state)
        body = {
            "object": "usage",
            "key": key.name,
            "window_seconds": self.settings.window_seconds,
            "bucket_seconds": self.settings.bucket_seconds,
            "dimensions": dimensions,
        }
        return _json(body, headers=ratelimit_headers(states))

    async def models(self) -> Response:
        key = self.authenticate()
        states = await self.limiter.usage(key)
        body = {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": "tokenguard-mock"}
                for model in MOCK_MODELS
            ],
        }
        return _json(body, headers=ratelimit_headers(states))

    async def error_response(self, error: APIError) -> Response:
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


def _usage_entry(state: RowState) -> dict[str, Any]:
    return {
        "limit": state.limit,
        "used": state.used,
        "remaining": state.remaining,
        "reset_seconds": state.reset_after,
    }


def _http_error(exc: HTTPException, max_body_bytes: int) -> APIError:
    status = exc.code or 500
    if status == 404:
        return APIError(
            404,
            f"Unknown request URL: {request.method} {request.path}. Please check the URL "
            "for typos.",
            code="unknown_url",
        )
    if status == 405:
        return APIError(405, f"Method {request.method} is not allowed on {request.path}.")
    if status == 413:
        return APIError(
            413,
            f"The request body is larger than the limit of {max_body_bytes} bytes.",
            code="request_too_large",
        )
    return APIError(status, exc.description or exc.name, code=None)


def create_app(settings: Settings, store: WindowStore) -> QuartTrio:
    """Build the app for one node: its settings, and the store its limiter uses."""
    app = QuartTrio("tokenguard")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=30,
    )
    # `//v1/chat/completions` must not be redirected around the limiter: it is a 404.
    app.url_map.merge_slashes = False
    gateway = Gateway(settings, store)
    app.extensions["tokenguard"] = gateway

    app.add_url_rule("/v1/chat/completions", view_func=gateway.chat_completion, methods=["POST"])
    app.add_url_rule("/v1/usage", view_func=gateway.usage, methods=["GET"])
    app.add_url_rule("/v1/models", view_func=gateway.models, methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok", "node": settings.node_id})

    @app.errorhandler(APIError)
    async def on_api_error(error: APIError) -> Response:
        return await gateway.error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        return await gateway.error_response(_http_error(error, settings.max_body_bytes))

    @app.errorhandler(StoreError)
    async def on_store_error(error: StoreError) -> Response:
        log.error("store unavailable: %s", error)
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
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _json(
            APIError(
                500, "The server had an error processing your request.", "server_error"
            ).body(),
            500,
        )

    return app
