"""Test support: a fake Anthropic Messages API that bills honestly, for proxy mode.

:func:`anthropic_upstream` is an answer for :func:`tests.support.proxy_upstreams.scripted_upstream`
(a real HTTP/1.1 server on loopback, in the test's trio run). It answers
``POST /v1/messages`` (whole, or streamed as Anthropic streams) and
``POST /v1/messages/count_tokens``, and bills each answer in its :class:`Bills`:

* only a request with its ``x-api-key`` and an ``anthropic-version`` is answered (a 401
  or 400 in Anthropic's shape otherwise);
* **input**: its own tokenizer, a stand-in for Claude's that tokenguard does not know:
  the ``o200k_base`` count of every text times 1.1, rounded up, plus 5 per message.
  When the ``system`` prompt's last block has ``cache_control`` the cache is warm: the
  system prompt's tokens are reported as ``cache_read_input_tokens``, the rest as
  ``input_tokens``;
* **output**: ``max_tokens`` words (:data:`tokenguard.upstreams.mock.WORDS`), all of
  them generated, ``stop_reason`` ``max_tokens``;
* a stream reports its usage cumulatively: ``message_start`` (input, 1 output token),
  then ``deltas`` ``message_delta`` events (each with the output so far, the last with
  all of it), then ``message_stop``.

``overloaded`` makes every answer Anthropic's 529 ``overloaded_error``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import trio

from tests.support.proxy_upstreams import Answer, ReceivedRequest, _head
from tokenguard.counting.claude import claude_texts
from tokenguard.counting.encodings import get_encoding
from tokenguard.upstreams.mock import FIRST_WORD, WORDS


@attrs.define
class Bill:
    input_tokens: int
    cache_read: int
    output_tokens: int


@attrs.define
class Bills:
    entries: list[Bill] = attrs.field(factory=list)


def _tokens(texts: list[str]) -> int:
    encoding = get_encoding("o200k_base")
    return math.ceil(sum(len(encoding.encode_ordinary(t)) for t in texts) * 1.1)


def billed(body: dict[str, Any]) -> tuple[int, int]:
    """``(input_tokens, cache_read_input_tokens)`` of a request (the module docstring)."""
    system = body.get("system")
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else system or []
    system_tokens = _tokens(claude_texts(blocks))
    rest = [t for m in body["messages"] for t in claude_texts(_as_blocks(m["content"]))]
    rest_tokens = _tokens(rest) + 5 * len(body["messages"])
    warm = bool(blocks) and isinstance(blocks[-1], dict) and "cache_control" in blocks[-1]
    if warm:
        return rest_tokens, system_tokens
    return rest_tokens + system_tokens, 0


def _as_blocks(content: Any) -> list[Any]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


async def _send_json(stream: trio.SocketStream, status: int, body: Any) -> None:
    content = json.dumps(body).encode()
    head = {"content-type": "application/json", "content-length": str(len(content))}
    await stream.send_all(_head(status, {**head, "connection": "close", "request-id": "req_1"}))
    await stream.send_all(content)


def _event(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def _usage(input_tokens: int, cache_read: int, output: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output,
    }


def stream_events(body: dict[str, Any], bill: Bill, deltas: int) -> list[bytes]:
    """The events of a streamed answer (the module docstring)."""
    words = [FIRST_WORD, *(WORDS[i % len(WORDS)] for i in range(1, bill.output_tokens))]
    message = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(bill.input_tokens, bill.cache_read, 1),
    }
    events = [
        _event({"type": "message_start", "message": message}),
        _event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        _event({"type": "ping"}),
    ]
    events += [
        _event(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        )
        for w in words
    ]
    events.append(_event({"type": "content_block_stop", "index": 0}))
    for i in range(1, deltas + 1):
        so_far = bill.output_tokens * i // deltas
        delta = {"stop_reason": "max_tokens" if i == deltas else None, "stop_sequence": None}
        usage = _usage(bill.input_tokens, bill.cache_read, so_far)
        events.append(_event({"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(_event({"type": "message_stop"}))
    return events


def anthropic_upstream(
    api_key: str, bills: Bills, *, deltas: int = 1, overloaded: bool = False
) -> Answer:
    """The fake's answer to every request (the module docstring)."""

    async def answer(stream: trio.SocketStream, request: ReceivedRequest) -> None:
        if request.headers.get("x-api-key") != api_key:
            await _send_json(stream, 401, _error("authentication_error", "invalid x-api-key"))
            return
        if not request.headers.get("anthropic-version"):
            await _send_json(stream, 400, _error("invalid_request_error", "anthropic-version"))
            return
        if overloaded:
            await _send_json(stream, 529, _error("overloaded_error", "Overloaded"))
            return
        body = request.body
        input_tokens, cache_read = billed(body)
        if request.path == "/v1/messages/count_tokens":
            await _send_json(stream, 200, {"input_tokens": input_tokens + cache_read})
            return
        bill = Bill(input_tokens, cache_read, body["max_tokens"])
        bills.entries.append(bill)
        if not body.get("stream"):
            text = "".join(
                [FIRST_WORD, *(WORDS[i % len(WORDS)] for i in range(1, bill.output_tokens))]
            )
            message = {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": _usage(input_tokens, cache_read, bill.output_tokens),
            }
            await _send_json(stream, 200, message)
            return
        head = {"content-type": "text/event-stream", "transfer-encoding": "chunked"}
        await stream.send_all(_head(200, {**head, "connection": "close"}))
        for event in stream_events(body, bill, deltas):
            await stream.send_all(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        await stream.send_all(b"0\r\n\r\n")

    return answer
