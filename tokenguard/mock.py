"""The built-in mock upstream: deterministic OpenAI-shaped replies, no model, no network.

A reply's length depends only on the prompt and never exceeds the output reservation
(``max_tokens`` per choice). Replies are made of words that are each exactly one token in
both shipped encodings (``cl100k_base`` and ``o200k_base``; a test checks it), so the
``usage`` block is exact without running the tokenizer on the reply.
"""

from __future__ import annotations

import json
import secrets
import time
import zlib
from collections.abc import Iterator
from typing import Any

import attrs

# "OK" opens every reply; each further word carries its leading space, so each word is its
# own pre-token and one token: a reply of k words is k tokens.
FIRST_WORD = "OK"
WORDS = (
    " the",
    " rate",
    " limit",
    " token",
    " window",
    " request",
    " minute",
    " key",
    " model",
    " reply",
    " is",
    " and",
    " of",
    " to",
    " a",
    " in",
    " for",
    " with",
    " every",
    " node",
    " time",
    " fair",
    " share",
    " within",
    " under",
    " count",
    " each",
    " safe",
    " fast",
    " exact",
    " per",
    " one",
)


@attrs.frozen
class Choice:
    index: int
    words: tuple[str, ...]
    finish_reason: str  # "stop", or "length" when cut by max_tokens

    @property
    def text(self) -> str:
        return "".join(self.words)


@attrs.frozen
class MockReply:
    id: str
    created: int
    model: str
    choices: tuple[Choice, ...]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.words) for c in self.choices)


def reply_length(prompt_digest: int, index: int) -> int:
    """The natural length of a reply, 8..47 tokens, fixed by the prompt and choice index."""
    return 8 + (prompt_digest + 7 * index) % 40


def mock_reply(model: str, messages: list[dict[str, Any]], n: int, max_tokens: int) -> MockReply:
    """Build ``n`` deterministic choices, each at most ``max_tokens`` tokens long."""
    digest = zlib.crc32(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode())
    choices = []
    for index in range(n):
        natural = reply_length(digest, index)
        length = min(natural, max_tokens)
        words = [FIRST_WORD] + [WORDS[(digest + index + i) % len(WORDS)] for i in range(length - 1)]
        choices.append(
            Choice(
                index=index,
                words=tuple(words[:length]),
                finish_reason="length" if natural > max_tokens else "stop",
            )
        )
    return MockReply(
        id=f"chatcmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=model,
        choices=tuple(choices),
    )


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(reply: MockReply, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object for a whole (non-streamed) reply."""
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "tokenguard-mock",
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in reply.choices
        ],
        "usage": usage_block(prompt_tokens, reply.completion_tokens),
    }


def _chunk(reply: MockReply, choices: list[dict[str, Any]], usage: Any = attrs.NOTHING) -> bytes:
    """One SSE event; ``usage`` is included only when given (``None`` included too)."""
    chunk: dict[str, Any] = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "tokenguard-mock",
        "choices": choices,
    }
    if usage is not attrs.NOTHING:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def stream_events(reply: MockReply, include_usage: bool) -> Iterator[tuple[bytes, int]]:
    """Server-sent events of a streamed reply, each with how many tokens it carries.

    The order is OpenAI's: a role chunk per choice, one content chunk per token, a
    finish chunk per choice; then, if asked, a usage chunk (empty ``choices``); then
    ``data: [DONE]``. The caller fills in the usage chunk's prompt tokens.
    """
    usage = None if include_usage else attrs.NOTHING
    for c in reply.choices:
        delta = {"role": "assistant", "content": "", "refusal": None}
        yield _chunk(reply, [_choice(c.index, delta, None)], usage), 0
    for c in reply.choices:
        for word in c.words:
            yield _chunk(reply, [_choice(c.index, {"content": word}, None)], usage), 1
        yield _chunk(reply, [_choice(c.index, {}, c.finish_reason)], usage), 0


def _choice(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def usage_chunk(reply: MockReply, prompt_tokens: int) -> bytes:
    return _chunk(reply, [], usage_block(prompt_tokens, reply.completion_tokens))


DONE = b"data: [DONE]\n\n"
