"""What OpenAI's chat and legacy completions APIs share on the wire.

Both answer with ``choices`` and a ``usage`` block (``prompt_tokens``,
``completion_tokens``), and both stream ``data: {chunk}`` events ending in
``data: [DONE]``, the usage in a last chunk with no choices when the request asked for
it (``stream_options.include_usage``). Here: the mock's chunks and usage block, the
meter of a relayed stream (:class:`ChoicesMeter`), and the generated text of a whole
answer (:func:`reply_output`), for settling when an upstream reports no usage.
"""

from __future__ import annotations

import json
from typing import Any

from tokenguard.counting import count_text
from tokenguard.errors import APIError
from tokenguard.upstreams.relay import StreamMeter, event_object
from tokenguard.upstreams.usage import ReportedUsage

DONE = b"data: [DONE]\n\n"


def sse_event(data: dict[str, Any]) -> bytes:
    """One ``data:`` event of OpenAI's streams, compact JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice_texts(choice: Any, key: str) -> list[str]:
    """The generated text in one choice (``key``: ``"message"`` whole, ``"delta"``
    streamed): content, refusal, reasoning, tool and function call names and
    arguments, or a legacy completion's ``text``."""
    if not isinstance(choice, dict):
        return []
    texts: list[str] = []
    if isinstance(choice.get("text"), str):
        texts.append(choice["text"])
    part = choice.get(key)
    if not isinstance(part, dict):
        return texts
    for name in ("content", "refusal", "reasoning_content"):
        if isinstance(part.get(name), str):
            texts.append(part[name])
    calls = part.get("tool_calls")
    functions = (
        [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    )
    functions.append(part.get("function_call"))
    for fn in functions:
        if isinstance(fn, dict):
            texts.extend(fn[k] for k in ("name", "arguments") if isinstance(fn.get(k), str))
    return texts


def reply_output(model: str, body: Any) -> int:
    """The output tokens of a whole answer counted by tokenguard (when the upstream
    reports no usage): each choice's generated text in the model's encoding."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        return 0
    return sum(count_text(model, "".join(choice_texts(c, "message"))) for c in choices)


def error_event(error: APIError) -> bytes:
    """A stream event the SDKs raise an APIError for: one carrying ``error``."""
    return sse_event(error.body())


class ChoicesMeter(StreamMeter):
    """Reads a chat or legacy completions stream: the text each choice generated, and
    the usage chunk, which the client gets only if it asked (``include_usage``:
    tokenguard always asks the upstream for it, to settle exactly)."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.usage: ReportedUsage | None = None
        self._texts: dict[int, list[str]] = {}

    def read(self, data: bytes) -> bool:
        if data == b"[DONE]":
            return True
        chunk = event_object(data)
        if chunk is None:
            return True
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            index = choice.get("index", 0) if isinstance(choice, dict) else 0
            texts = self._texts.setdefault(index if isinstance(index, int) else 0, [])
            texts += choice_texts(choice, "delta")
        usage = ReportedUsage.of_openai(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
            if not self.include_usage and not choices:
                return False  # the usage chunk tokenguard asked for, not the client
        return True

    def output_tokens(self, model: str) -> int:
        return sum(count_text(model, "".join(parts)) for parts in self._texts.values())

    def error_event(self, error: APIError) -> bytes:
        return error_event(error)
