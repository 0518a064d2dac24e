"""Answering: a generation as one whole answer, or as server-sent events while it runs.

``usage`` tells the truth: ``prompt_tokens`` is the billed input, ``completion_tokens``
every token generated, of every sequence (vLLM itself would count only the ``n``
returned).
"""

from __future__ import annotations

from typing import Any

from bench.fake_upstream.asks import CHAT_PATH, Ask, compact_json
from bench.fake_upstream.generation import Generation, LedgerEntry, word
from tokenguard.observe.logs import Send


def _chunk_object(ask: Ask) -> str:
    return "chat.completion.chunk" if ask.path == CHAT_PATH else "text_completion"


def _choice_delta(ask: Ask, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
    if ask.path == CHAT_PATH:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}


def usage_of(entry: LedgerEntry) -> dict[str, int]:
    return {
        "prompt_tokens": entry.input_tokens,
        "completion_tokens": entry.output_tokens,
        "total_tokens": entry.input_tokens + entry.output_tokens,
    }


def whole_answer(generation: Generation, created: int) -> dict[str, Any]:
    """A finished generation as one answer: the first ``choices`` sequences."""
    ask = generation.ask
    choices = []
    for index in range(ask.choices):
        text = "".join(word(index, i) for i in range(ask.per_sequence))
        if ask.path == CHAT_PATH:
            body: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            body = {"text": text}
        choices.append({"index": index, **body, "logprobs": None, "finish_reason": "length"})
    kind = "chat.completion" if ask.path == CHAT_PATH else "text_completion"
    return {
        "id": f"fake-{generation.entry.id}",
        "object": kind,
        "created": created,
        "model": ask.model,
        "choices": choices,
        "usage": usage_of(generation.entry),
    }


class _Events:
    """The SSE events of one streamed answer, built as tokens come."""

    def __init__(self, generation: Generation, created: int) -> None:
        self.generation = generation
        self.head = {
            "id": f"fake-{generation.entry.id}",
            "object": _chunk_object(generation.ask),
            "created": created,
            "model": generation.ask.model,
        }

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return (
            b"data: " + compact_json({**self.head, "choices": choices, **extra}).encode() + b"\n\n"
        )

    def opening(self) -> bytes:
        ask = self.generation.ask
        if ask.path != CHAT_PATH:
            return b""
        return b"".join(
            self.event([{"index": i, "delta": {"role": "assistant", "content": ""}}])
            for i in range(ask.choices)
        )

    def tokens(self, start: int, end: int) -> bytes:
        ask = self.generation.ask
        return b"".join(
            self.event([_choice_delta(ask, index, word(index, position), None)])
            for position in range(start, end)
            for index in range(ask.choices)
        )

    def closing(self) -> bytes:
        ask = self.generation.ask
        events = [
            self.event([_choice_delta(ask, index, None, "length")]) for index in range(ask.choices)
        ]
        if ask.include_usage:
            events.append(self.event([], usage=usage_of(self.generation.entry)))
        return b"".join(events) + b"data: [DONE]\n\n"


async def send_json(send: Send, status: int, body: Any) -> None:
    """Send ``body`` as one JSON response of ``status``."""
    content = compact_json(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": False})


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


async def stream_answer(generation: Generation, send: Send, created: int) -> None:
    """Stream ``generation`` as server-sent events, each token as soon as it is made,
    then the closing events (the usage chunk when asked for) and ``[DONE]``."""
    events = _Events(generation, created)
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    sent = 0
    first = events.opening()
    while True:
        produced = generation.produced
        if produced > sent or first:
            body = first + events.tokens(sent, produced)
            first, sent = b"", produced
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if generation.done and sent >= generation.ask.per_sequence:
            break
        if generation.produced == sent:
            await generation.changed.wait()
    generation.answered = True
    await send({"type": "http.response.body", "body": events.closing(), "more_body": False})
