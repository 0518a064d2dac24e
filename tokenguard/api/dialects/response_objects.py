"""What OpenAI's Responses API says on the wire: the Response object, its stream events,
and how an upstream's answer says what it spent.

* The mock's Response object (:func:`response_object`) and its stream
  (:func:`response_events`): ``response.created``, ``response.in_progress``, the output
  item and content part opened, one ``response.output_text.delta`` per token, the text,
  part and item closed, then one terminal event, ``response.completed`` or, when
  ``max_output_tokens`` cut the reply, ``response.incomplete`` with
  ``incomplete_details.reason = "max_output_tokens"``. Every event carries its
  ``event:`` name and a ``sequence_number`` counting from 0.
* The usage block: ``input_tokens`` (``cached_tokens`` among them), ``output_tokens``
  (``reasoning_tokens`` among them: reasoning is output, and billed as output),
  ``total_tokens``.
* :class:`ResponsesMeter` reads a relayed stream: whichever terminal event arrives
  (``response.completed``, ``response.incomplete``, ``response.failed``) carries the
  usage a stream settles to, and the response's id; the deltas give the text generated
  when none arrives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from tokenguard.counting import count_text
from tokenguard.errors import APIError
from tokenguard.upstreams.mock import MockReply
from tokenguard.upstreams.relay import StreamMeter
from tokenguard.upstreams.usage import ReportedUsage

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
INCOMPLETE_REASON = "max_output_tokens"


def usage_block(input_tokens: int, output_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    """A Responses ``usage`` block; ``reasoning_tokens`` are part of ``output_tokens``."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def sse_named(event: dict[str, Any]) -> bytes:
    """One event of a Responses stream: ``event: <type>`` then its ``data:`` line."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _message_item(reply: MockReply, status: str, text: str | None) -> dict[str, Any]:
    """The reply's one output item: an assistant message, its text so far (``None``:
    no content part opened yet)."""
    content = [] if text is None else [_text_part(text)]
    return {
        "type": "message",
        "id": f"msg_{reply.id}",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(
    reply: MockReply,
    request: dict[str, Any],
    *,
    status: str,
    input_tokens: int,
    text: str | None = None,
) -> dict[str, Any]:
    """The Response object of the mock's ``reply`` to ``request`` (the validated body):
    ``status`` ``in_progress`` (no output, no usage yet), ``completed`` or
    ``incomplete``; ``text``, when given, is the reply's text so far."""
    done = status != "in_progress"
    choice = reply.choices[0]
    output = [_message_item(reply, status, choice.text if text is None else text)] if done else []
    tools = request.get("tools")
    response = {
        "id": f"resp_{reply.id}",
        "object": "response",
        "created_at": reply.created,
        "status": status,
        "completed_at": reply.created if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": INCOMPLETE_REASON} if status == "incomplete" else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": reply.model,
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True) is not False,
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "store": request.get("store", True) is not False,
        "temperature": 1.0,
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": tools if isinstance(tools, list) else [],
        "top_p": 1.0,
        "truncation": "disabled",
        "metadata": request.get("metadata") or {},
    }
    if done:  # (a response in progress has no usage yet: the field is absent)
        response["usage"] = usage_block(input_tokens, len(choice.words))
    return response


def final_status(reply: MockReply) -> str:
    """``incomplete`` when ``max_output_tokens`` cut the reply, else ``completed``."""
    return "incomplete" if reply.choices[0].finish_reason == "length" else "completed"


def response_events(
    reply: MockReply, request: dict[str, Any], input_tokens: int
) -> Iterator[tuple[bytes, int]]:
    """The stream of the mock's ``reply`` (see the module docstring), each event with the
    output tokens it carries (one per delta)."""
    choice = reply.choices[0]
    item_id = f"msg_{reply.id}"
    status = final_status(reply)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[tuple[dict[str, Any], int]] = []

    def add(event: dict[str, Any], tokens: int = 0) -> None:
        events.append((event, tokens))

    started = response_object(reply, request, status="in_progress", input_tokens=input_tokens)
    add({"type": "response.created", "response": started})
    add({"type": "response.in_progress", "response": started})
    opened = _message_item(reply, "in_progress", None)
    add({"type": "response.output_item.added", "output_index": 0, "item": opened})
    add({"type": "response.content_part.added", **where, "part": _text_part("")})
    for word in choice.words:
        add({"type": "response.output_text.delta", **where, "delta": word, "logprobs": []}, 1)
    add({"type": "response.output_text.done", **where, "text": choice.text, "logprobs": []})
    add({"type": "response.content_part.done", **where, "part": _text_part(choice.text)})
    item = _message_item(reply, status, choice.text)
    add({"type": "response.output_item.done", "output_index": 0, "item": item})
    final = response_object(reply, request, status=status, input_tokens=input_tokens)
    add({"type": f"response.{status}", "response": final})
    for number, (event, tokens) in enumerate(events):
        yield sse_named({**event, "sequence_number": number}), tokens


def error_event(error: APIError, sequence_number: int) -> bytes:
    """A Responses stream's ``error`` event (the SDKs raise an APIError for it)."""
    return sse_named(
        {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "sequence_number": sequence_number,
        }
    )


def output_texts(output: Any) -> list[str]:
    """The generated text of a Response's ``output`` items: message text and refusals,
    function calls' names and arguments, reasoning summaries and text, and any other
    item as its JSON (a built-in tool call: counted rather than ignored)."""
    texts: list[str] = []
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message" or kind == "reasoning":
            for part in [*_list(item.get("content")), *_list(item.get("summary"))]:
                if isinstance(part, dict):
                    texts += [part[k] for k in ("text", "refusal") if isinstance(part.get(k), str)]
        elif kind == "function_call":
            texts += [item[k] for k in ("name", "arguments") if isinstance(item.get(k), str)]
        else:
            texts.append(json.dumps(item, separators=(",", ":")))
    return texts


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def reply_output(model: str, body: Any) -> int:
    """The output tokens of a whole Response counted by tokenguard (the upstream
    reported no usage)."""
    output = body.get("output") if isinstance(body, dict) else None
    return count_text(model, "".join(output_texts(output)))


class ResponsesMeter(StreamMeter):
    """Reads a relayed Responses stream (see the module docstring). Every event reaches
    the client: the usage is in the terminal event, which the client gets anyway."""

    def __init__(self) -> None:
        self.usage: ReportedUsage | None = None
        self.response: dict[str, Any] | None = None  # the terminal event's Response
        self._texts: list[str] = []
        self._sequence = -1

    def read(self, data: bytes) -> bool:
        try:
            event = json.loads(data)
        except ValueError:
            return True
        if not isinstance(event, dict):
            return True
        number = event.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self._sequence = max(self._sequence, number)
        kind = event.get("type")
        if not isinstance(kind, str):
            return True
        if kind.endswith(".delta") and isinstance(event.get("delta"), str):
            self._texts.append(event["delta"])
        elif kind in TERMINAL_EVENTS and isinstance(event.get("response"), dict):
            self.response = event["response"]
            self.usage = ReportedUsage.of_responses(self.response.get("usage"))
        return True

    def output_tokens(self, model: str) -> int:
        return count_text(model, "".join(self._texts))

    def error_event(self, error: APIError) -> bytes:
        return error_event(error, self._sequence + 1)
