"""The built-in mock upstream: deterministic replies, no model, no network.

A reply's length depends only on the prompt and never exceeds the output reservation
(``max_tokens`` per choice). Replies are made of words that are each exactly one token in
both shipped encodings (``cl100k_base`` and ``o200k_base``; a test checks it), so a
reply's usage is exact without running the tokenizer on it. Each API dialect writes a
:class:`MockReply` in its own shape (tokenguard/api/dialects/).
"""

from __future__ import annotations

import json
import math
import secrets
import time
import zlib
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
    """A reply of ``choices``; ``id`` is random hex, which a dialect prefixes
    (``chatcmpl-``, ``msg_`` ...)."""

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
        id=secrets.token_hex(12),
        created=int(time.time()),
        model=model,
        choices=tuple(choices),
    )


def embedding_vector(model: str, item: Any, dimensions: int) -> list[float]:
    """A deterministic unit vector for one input (the same input, the same vector)."""
    seed = zlib.crc32(json.dumps([model, item], ensure_ascii=False).encode())
    raw = [((seed * (i + 1) * 2654435761) % 2001) / 1000 - 1 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]
