"""OpenAI's legacy completions, ``POST /v1/completions``, as a dialect.

Input is the prompt(s) (and the suffix, once per prompt); the output reserved is the
longest reply any length field names, else OpenAI's default of 16 tokens, per generated
choice: every prompt of a batch times the largest of ``n``, ``n_cmpl`` and ``best_of``.
The forwarded body always names the length in ``max_tokens`` (upstreams differ in their
default: llama.cpp's is unbounded; and this API has no other field).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from tokenguard.api.dialect import Dialect, Exchange, MockAnswer
from tokenguard.api.dialects.openai import DONE, ChoicesMeter, reply_output, sse_event, usage_block
from tokenguard.api.dialects.prompt import Prompt, parse_prompt, prompt_tokens
from tokenguard.api.end_user import end_user_of
from tokenguard.api.request_body import (
    check_text,
    generated_choices,
    output_length,
    request_model,
    stream_flags,
)
from tokenguard.config.settings import UpstreamRoute
from tokenguard.errors import invalid
from tokenguard.upstreams.forwarding import forwarded_body
from tokenguard.upstreams.mock import MockReply, mock_reply
from tokenguard.upstreams.relay import StreamMeter

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@attrs.frozen
class CompletionRequest:
    """A validated ``POST /v1/completions`` body; ``body`` is the parsed JSON, untouched.

    ``choices`` is how many completions the upstream generates (and bills): every prompt
    of a batch times ``generated`` (:func:`tokenguard.api.request_body.generated_choices`: the
    largest of ``n``, ``n_cmpl`` and ``best_of``).
    """

    body: dict[str, Any]
    model: str
    prompt: Prompt
    suffix: str | None
    # Per choice: the largest of the request's length fields (tokenguard.upstreams.forwarding.
    # OUTPUT_LENGTH_FIELDS), or OpenAI's default of 16 when it names none.
    max_tokens: int
    n: int
    generated: int  # per prompt
    stream: bool
    include_usage: bool

    @property
    def choices(self) -> int:
        return len(self.prompt) * self.generated


def validate_completion(body: Any) -> CompletionRequest:
    """Check a parsed ``/v1/completions`` body (the parts the limiter relies on)."""
    model = request_model(body)
    prompt = parse_prompt(body.get("prompt"), "prompt")
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise invalid("suffix must be a string", "suffix")
        check_text(suffix, "suffix")
    max_tokens = output_length(body)
    n, generated = generated_choices(body)
    stream, include_usage = stream_flags(body)
    return CompletionRequest(
        body=body,
        model=model,
        prompt=prompt,
        suffix=suffix,
        max_tokens=DEFAULT_COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens,
        n=n,
        generated=generated,
        stream=stream,
        include_usage=include_usage,
    )


class CompletionsDialect(Dialect):
    """``POST /v1/completions`` (see the module docstring)."""

    surface = "completions"
    path = "/v1/completions"
    upstream_path = "/completions"

    def parse(self, body: Any) -> Exchange:
        req = validate_completion(body)
        return Exchange(
            body=req.body,
            model=req.model,
            stream=req.stream,
            per_choice=req.max_tokens,
            choices=req.choices,
            request=req,
            end_user=end_user_of(req.body),
        )

    def count_input(self, exchange: Exchange) -> int:
        req: CompletionRequest = exchange.request
        return prompt_tokens(req.model, req.prompt, req.suffix)

    def forward(
        self, exchange: Exchange, per_choice: int | None, route: UpstreamRoute
    ) -> dict[str, Any]:
        return forwarded_body(exchange.body, per_choice=per_choice, allowed=route.forward_fields)

    def mock_answer(self, exchange: Exchange, per_choice: int, input_tokens: int) -> MockAnswer:
        req: CompletionRequest = exchange.request
        prompt = [item if isinstance(item, str) else list(item) for item in req.prompt]
        reply = mock_reply(req.model, [{"prompt": prompt}], len(req.prompt) * req.n, per_choice)
        if not req.stream:
            body = text_completion_body(reply, input_tokens)
            return MockAnswer(reply.completion_tokens, body=body)
        events = text_stream_events(reply, req.include_usage, input_tokens)
        return MockAnswer(reply.completion_tokens, events=events)

    def meter(self, exchange: Exchange) -> StreamMeter:
        return ChoicesMeter(exchange.request.include_usage)

    def reply_output(self, model: str, body: Any) -> int:
        return reply_output(model, body)


def _text_chunk(reply: MockReply, choices: list[dict[str, Any]], usage: Any) -> bytes:
    chunk: dict[str, Any] = {
        "id": f"cmpl-{reply.id}",
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "tokenguard-mock",
        "choices": choices,
    }
    if usage is not attrs.NOTHING:
        chunk["usage"] = usage
    return sse_event(chunk)


def text_completion_body(reply: MockReply, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's legacy ``text_completion`` object for a whole (non-streamed) reply."""
    return {
        "id": f"cmpl-{reply.id}",
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "tokenguard-mock",
        "choices": [
            {"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
            for c in reply.choices
        ],
        "usage": usage_block(prompt_tokens, reply.completion_tokens),
    }


def text_stream_events(
    reply: MockReply, include_usage: bool, prompt_tokens: int
) -> Iterator[tuple[bytes, int]]:
    """Server-sent events of a streamed legacy completion, each with its token count:
    one chunk per token, a finish chunk per choice, the usage chunk if asked, then
    ``[DONE]``."""
    usage = None if include_usage else attrs.NOTHING
    for c in reply.choices:
        for word in c.words:
            choice = {"text": word, "index": c.index, "logprobs": None, "finish_reason": None}
            yield _text_chunk(reply, [choice], usage), 1
        finish = {"text": "", "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
        yield _text_chunk(reply, [finish], usage), 0
    if include_usage:
        yield _text_chunk(reply, [], usage_block(prompt_tokens, reply.completion_tokens)), 0
    yield DONE, 0
