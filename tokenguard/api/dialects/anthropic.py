"""Anthropic's Messages API, ``POST /v1/messages`` (and ``/v1/messages/count_tokens``), as
a dialect of the one pipeline.

* The request is checked by :mod:`tokenguard.api.dialects.anthropic_request`; the key,
  the version headers, the error body and the rate-limit headers are Anthropic's
  (:mod:`tokenguard.api.dialects.anthropic_conventions`).
* Its input is an estimate (Claude's tokenizer is not public):
  :func:`tokenguard.counting.claude.estimate_claude_prompt`, with the factor of the
  model's upstream route (``input_factor``) or the built-in one. ``count_tokens`` answers
  that same estimate, admitted in the requests dimension only.
* Its output is reserved at ``max_tokens`` (thinking included: it is billed within it).
* The mock answers with a ``message`` (``stop_reason`` ``end_turn``, or ``max_tokens``
  when cut), whole or as Anthropic's event stream: ``message_start`` (with usage),
  ``content_block_start``, ``ping``, a ``content_block_delta`` per token,
  ``content_block_stop``, ``message_delta`` (the cumulative usage), ``message_stop``.
* In proxy mode (a route whose ``dialect = "anthropic"``) the upstream is sent the
  route's key in ``x-api-key`` and the client's ``anthropic-version`` and
  ``anthropic-beta``; an answer settles to its ``usage``, uncached input and cache
  writes counting as input, cache reads only where the route's ``cached_input_counts``
  says so (:meth:`ReportedUsage.of_anthropic`). A relayed stream is read by an
  :class:`AnthropicMeter`: every ``message_delta`` carries the usage SO FAR, so the last
  one is the answer's, never a sum.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Self

from tokenguard.api.dialect import Dialect, Exchange, MockAnswer
from tokenguard.api.dialects.anthropic_conventions import ANTHROPIC, anthropic_upstream_headers
from tokenguard.api.dialects.anthropic_request import MessagesRequest, validate_messages
from tokenguard.api.end_user import end_user_of
from tokenguard.config.settings import Settings, UpstreamRoute, UpstreamSettings
from tokenguard.counting.claude import (
    DEFAULT_INPUT_FACTOR,
    claude_texts,
    estimate_claude_prompt,
    estimate_claude_text,
)
from tokenguard.errors import APIError
from tokenguard.store.window_store import WindowStore
from tokenguard.upstreams.mock import MockReply, mock_reply
from tokenguard.upstreams.relay import StreamMeter, event_object
from tokenguard.upstreams.usage import ReportedUsage, token_count

# The usage fields of Anthropic's answers, each cumulative in a stream.
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def sse_event(data: dict[str, Any]) -> bytes:
    """One event of Anthropic's streams: ``event: <type>`` and its JSON ``data:``."""
    kind = str(data.get("type", "message")).encode()
    return (
        b"event: " + kind + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
    )


def usage_block(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """The mock's ``usage``: it caches nothing, so no cache reads or writes."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _stop_reason(reply: MockReply) -> str:
    return "max_tokens" if reply.choices[0].finish_reason == "length" else "end_turn"


def _message(reply: MockReply, content: list[dict[str, Any]], stop: str | None, usage: Any) -> Any:
    return {
        "id": f"msg_{reply.id}",
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }


def message_body(reply: MockReply, input_tokens: int) -> dict[str, Any]:
    """Anthropic's ``message`` object for a whole (non-streamed) reply."""
    text = reply.choices[0].text
    usage = usage_block(input_tokens, reply.completion_tokens)
    return _message(reply, [{"type": "text", "text": text}], _stop_reason(reply), usage)


def stream_events(reply: MockReply, input_tokens: int) -> Iterator[tuple[bytes, int]]:
    """The events of a streamed reply, each with the output tokens it carries (see the
    module docstring for the order)."""
    yield (
        sse_event(
            {
                "type": "message_start",
                "message": _message(reply, [], None, usage_block(input_tokens, 0)),
            }
        ),
        0,
    )
    yield (
        sse_event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        0,
    )
    yield sse_event({"type": "ping"}), 0
    for word in reply.choices[0].words:
        delta = {"type": "text_delta", "text": word}
        yield sse_event({"type": "content_block_delta", "index": 0, "delta": delta}), 1
    yield sse_event({"type": "content_block_stop", "index": 0}), 0
    delta = {"stop_reason": _stop_reason(reply), "stop_sequence": None}
    usage = usage_block(input_tokens, reply.completion_tokens)
    yield sse_event({"type": "message_delta", "delta": delta, "usage": usage}), 0
    yield sse_event({"type": "message_stop"}), 0


def error_event(error: APIError) -> bytes:
    """The ``error`` event Anthropic's SDKs raise an APIError for."""
    return sse_event(ANTHROPIC.error_body(error))


def _delta_text(delta: Any) -> str:
    if not isinstance(delta, dict):
        return ""
    for name in ("text", "thinking", "partial_json"):
        if isinstance(delta.get(name), str):
            return delta[name]
    return ""


class AnthropicMeter(StreamMeter):
    """Reads a relayed Messages stream: the text it generated, and its usage.

    Each usage field is cumulative (``message_start`` has the input, each
    ``message_delta`` the usage so far): the last value of each field is the answer's,
    never a sum. The output is taken from the usage only once ``message_stop`` came (a
    stream cut before it may have generated more than its last report): until then
    ``usage.output_tokens`` is ``None`` and the settlement falls back on the text and
    the reservation. Every event reaches the client (``error`` events included)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.usage: ReportedUsage | None = None
        self._fields: dict[str, int] = {}
        self._texts: list[str] = []
        self._stopped = False

    def read(self, data: bytes) -> bool:
        event = event_object(data)
        if event is None:
            return True
        kind = event.get("type")
        usage = None
        if kind == "message_start" and isinstance(event.get("message"), dict):
            usage = event["message"].get("usage")
        elif kind == "message_delta":
            usage = event.get("usage")
        elif kind == "content_block_delta":
            self._texts.append(_delta_text(event.get("delta")))
        elif kind == "content_block_start":
            self._texts.extend(claude_texts([event.get("content_block")]))
        elif kind == "message_stop":
            self._stopped = True
        if isinstance(usage, dict):
            for name in USAGE_FIELDS:
                value = token_count(usage.get(name))
                if value is not None:
                    self._fields[name] = value
        if usage is not None or kind == "message_stop":
            self._report()
        return True

    def _report(self) -> None:
        reported = ReportedUsage.of_anthropic(self._fields)
        if reported is not None and not self._stopped:
            reported = ReportedUsage(
                reported.input_tokens, None, cache_read_tokens=reported.cache_read_tokens
            )
        self.usage = reported

    def output_tokens(self, model: str) -> int:
        return estimate_claude_text(self._texts, self.factor)

    def error_event(self, error: APIError) -> bytes:
        return error_event(error)


class MessagesDialect(Dialect):
    """``POST /v1/messages`` (see the module docstring)."""

    surface = "messages"
    path = "/v1/messages"
    upstream_path = "/messages"
    count_path = "/v1/messages/count_tokens"
    count_upstream_path = "/messages/count_tokens"
    conventions = ANTHROPIC
    family = "anthropic"

    def __init__(self, upstream: UpstreamSettings | None = None) -> None:
        self.upstream = upstream

    @classmethod
    def build(cls, store: WindowStore, settings: Settings) -> Self:
        return cls(settings.upstream if settings.upstream.enabled else None)

    def factor(self, model: str) -> float:
        """The estimate's factor for ``model``: its route's ``input_factor``, else the
        built-in one."""
        route = self.upstream.route(model) if self.upstream is not None else None
        if route is not None and route.input_factor is not None:
            return route.input_factor
        return DEFAULT_INPUT_FACTOR

    def parse(self, body: Any) -> Exchange:
        return self._exchange(validate_messages(body))

    def parse_count(self, body: Any) -> Exchange:
        return self._exchange(validate_messages(body, counting=True))

    def _exchange(self, request: MessagesRequest) -> Exchange:
        return Exchange(
            body=request.body,
            model=request.model,
            stream=request.stream,
            per_choice=request.max_tokens,
            choices=1,
            request=request,
            end_user=end_user_of(request.body),
        )

    def count_input(self, exchange: Exchange) -> int:
        request: MessagesRequest = exchange.request
        return estimate_claude_prompt(
            request.system, request.messages, request.tools, self.factor(request.model)
        )

    def count_answer(self, input_tokens: int) -> dict[str, Any]:
        return {"input_tokens": input_tokens}

    def mock_answer(self, exchange: Exchange, per_choice: int, input_tokens: int) -> MockAnswer:
        request: MessagesRequest = exchange.request
        reply = mock_reply(request.model, request.messages, 1, per_choice)
        if not request.stream:
            return MockAnswer(reply.completion_tokens, body=message_body(reply, input_tokens))
        return MockAnswer(reply.completion_tokens, events=stream_events(reply, input_tokens))

    def upstream_headers(self, route: UpstreamRoute, request_headers: Any) -> dict[str, str]:
        return anthropic_upstream_headers(route, request_headers)

    def asking_usage(self, body: dict[str, Any]) -> dict[str, Any]:
        return body  # Anthropic's streams always report their usage

    def meter(self, exchange: Exchange) -> StreamMeter:
        return AnthropicMeter(self.factor(exchange.model))

    def usage_of(self, body: Any) -> ReportedUsage | None:
        return ReportedUsage.of_anthropic(body.get("usage") if isinstance(body, dict) else None)

    def reply_output(self, model: str, body: Any) -> int:
        content = body.get("content") if isinstance(body, dict) else None
        texts = claude_texts(content if isinstance(content, list) else [])
        return estimate_claude_text(texts, self.factor(model))
