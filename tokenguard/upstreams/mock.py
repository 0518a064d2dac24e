"""The built-in mock upstream: deterministic OpenAI-shaped replies, no model, no network.

A reply's length depends only on the prompt and never exceeds the output reservation
(``max_tokens`` per choice). Replies are made of words that are each exactly one token in
both shipped encodings (``cl100k_base`` and ``o200k_base``; a test checks it), so the
``usage`` block is exact without running the tokenizer on the reply.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
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


def _text_id(reply: MockReply) -> str:
    return "cmpl-" + reply.id.removeprefix("chatcmpl-")


def _chunk(
    reply: MockReply,
    choices: list[dict[str, Any]],
    usage: Any = attrs.NOTHING,
    *,
    text: bool = False,
) -> bytes:
    """One SSE event of a chat stream (of a legacy completion's when ``text``: its id and
    object are ``text_completion``'s); ``usage`` is included only when given (``None``
    included too)."""
    chunk: dict[str, Any] = {
        "id": _text_id(reply) if text else reply.id,
        "object": "text_completion" if text else "chat.completion.chunk",
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


# --- legacy completions and embeddings --------------------------------------------------

DEFAULT_EMBEDDING_DIMENSIONS = 256


def text_completion_body(reply: MockReply, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's legacy ``text_completion`` object for a whole (non-streamed) reply."""
    return {
        "id": _text_id(reply),
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


def text_stream_events(reply: MockReply, include_usage: bool) -> Iterator[tuple[bytes, int]]:
    """Server-sent events of a streamed legacy completion, each with its token count:
    one chunk per token, then a finish chunk per choice (the caller adds the usage
    chunk, if asked, and ``[DONE]``)."""
    usage = None if include_usage else attrs.NOTHING
    for c in reply.choices:
        for word in c.words:
            choice = {"text": word, "index": c.index, "logprobs": None, "finish_reason": None}
            yield _chunk(reply, [choice], usage, text=True), 1
        finish = {"text": "", "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
        yield _chunk(reply, [finish], usage, text=True), 0


def text_usage_chunk(reply: MockReply, prompt_tokens: int) -> bytes:
    return _chunk(reply, [], usage_block(prompt_tokens, reply.completion_tokens), text=True)


@attrs.frozen
class ReplyFormat:
    """How one endpoint writes a mock reply: whole (``body``, given the prompt tokens),
    or streamed (``events``, each with its token count, then ``usage_chunk`` when the
    client asked for usage; the caller adds ``[DONE]``)."""

    body: Callable[[MockReply, int], dict[str, Any]]
    events: Callable[[MockReply, bool], Iterator[tuple[bytes, int]]]
    usage_chunk: Callable[[MockReply, int], bytes]


CHAT = ReplyFormat(completion_body, stream_events, usage_chunk)
TEXT_COMPLETION = ReplyFormat(text_completion_body, text_stream_events, text_usage_chunk)


def embedding_vector(model: str, item: Any, dimensions: int) -> list[float]:
    """A deterministic unit vector for one input (the same input, the same vector)."""
    seed = zlib.crc32(json.dumps([model, item], ensure_ascii=False).encode())
    raw = [((seed * (i + 1) * 2654435761) % 2001) / 1000 - 1 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def embedding_body(
    model: str,
    inputs: Sequence[Any],
    prompt_tokens: int,
    dimensions: int | None = None,
    encoding_format: str = "float",
) -> dict[str, Any]:
    """OpenAI's embeddings ``list``: one vector per input, float or base64 (little-endian
    float32, as the API sends it)."""
    size = dimensions or DEFAULT_EMBEDDING_DIMENSIONS
    data = []
    for index, item in enumerate(inputs):
        vector: Any = embedding_vector(model, item, size)
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
