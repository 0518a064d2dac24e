"""OpenAI's Responses API, ``POST /v1/responses``, as a dialect.

Validation covers what the limiter relies on: ``input`` (a string, or items: messages
with ``input_text``/``input_image``/``input_file`` parts, ``function_call``,
``function_call_output``, ``reasoning`` and other typed items), ``instructions``,
``tools`` (function tools and built-in tool definitions), ``tool_choice``,
``max_output_tokens``, ``reasoning``, ``text``, ``store``, ``metadata``,
``previous_response_id`` and ``stream``; a 400 names the field. Other fields pass
through to an upstream as they are, and the mock ignores them.

Input is counted with chat's rules (:func:`tokenguard.counting.count_chat_prompt`):
``instructions`` is a system message, each message item a message of its parts (images
by the model's tile formula, files by their decoded size), every other item a message
whose every field is counted as text (an over-count, never an under-count: a
``function_call``'s name and arguments, an output, a reasoning item's summary and
encrypted content), each tool at least its JSON. A ``previous_response_id`` brings the
earlier conversation in: its input and output, as OpenAI bills it
(:meth:`ResponsesDialect.carried_input`, from the store's records, so on any node).
The output reserved is ``max_output_tokens`` (or the key's ``default_max_tokens``);
reasoning tokens are output.
"""

from __future__ import annotations

from typing import Any

import attrs

from tokenguard.api.dialect import AnswerTotals, Dialect, Exchange, MockAnswer
from tokenguard.api.dialects.response_objects import (
    ResponsesMeter,
    final_status,
    reply_output,
    response_events,
    response_object,
)
from tokenguard.api.end_user import end_user_of
from tokenguard.api.request_body import check_text, output_length, request_model
from tokenguard.api.response_store import (
    MAX_RESPONSE_ID_CHARS,
    ResponseRecords,
    StoredResponses,
)
from tokenguard.config.settings import Settings, UpstreamRoute
from tokenguard.counting import count_chat_prompt, tool_json
from tokenguard.errors import APIError, invalid
from tokenguard.store.window_store import WindowStore
from tokenguard.upstreams.forwarding import forwarded_body
from tokenguard.upstreams.mock import mock_reply
from tokenguard.upstreams.relay import StreamMeter
from tokenguard.upstreams.usage import ReportedUsage

MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
INPUT_PARTS = frozenset(
    {"input_text", "input_image", "input_file", "input_audio", "output_text", "refusal"}
)
TOOL_CHOICES = frozenset({"none", "auto", "required"})
REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
IMAGE_DETAILS = frozenset({"low", "high", "auto"})
# OpenAI's own bounds on ``metadata``.
METADATA_PAIRS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512


@attrs.frozen
class ResponsesRequest:
    """A validated Responses request; ``body`` is the parsed JSON, untouched.
    ``messages``: the input as chat messages, for counting; ``items``: the input as
    items (a string input is one user message)."""

    body: dict[str, Any]
    model: str
    items: tuple[Any, ...]
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_texts: tuple[str, ...]
    max_output_tokens: int | None
    stream: bool
    store: bool
    previous_response_id: str | None


def _string(body: dict[str, Any], name: str, *, chars: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string", name)
    if chars is not None and len(value) > chars:
        raise invalid(f"{name} must be at most {chars} characters long", name)
    check_text(value, name)
    return value


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean", name)
    return value


def _object(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise invalid(f"{name} must be an object", name)
    return value


def _text_field(part: dict[str, Any], field: str, where: str, *, required: bool) -> None:
    value = part.get(field)
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise invalid(f"{where}.{field} must be a string", f"{where}.{field}")
    check_text(value, f"{where}.{field}")


def _chat_part(part: Any, where: str) -> dict[str, Any]:
    """One content part, checked, as chat's counter reads it."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise invalid(f"{where} must be an object with a string `type`", where)
    kind = part["type"]
    if kind not in INPUT_PARTS:
        raise invalid(f"{where}.type must be one of {', '.join(sorted(INPUT_PARTS))}", where)
    if kind in ("input_text", "output_text"):
        _text_field(part, "text", where, required=True)
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        _text_field(part, "refusal", where, required=True)
        return {"type": "refusal", "refusal": part["refusal"]}
    if kind == "input_image":
        for field in ("image_url", "file_id"):
            _text_field(part, field, where, required=False)
        if part.get("image_url") is None and part.get("file_id") is None:
            raise invalid(f"{where} needs an image_url or a file_id", f"{where}.image_url")
        detail = part.get("detail")
        if detail is not None and detail not in IMAGE_DETAILS:
            raise invalid(f"{where}.detail must be low, high or auto", f"{where}.detail")
        return {"type": "image_url", "image_url": {"url": part.get("image_url"), "detail": detail}}
    if kind == "input_file":
        for field in ("file_data", "file_id", "file_url", "filename"):
            _text_field(part, field, where, required=False)
        return {"type": "file", "file": part}
    return {"type": "input_audio", "input_audio": part.get("input_audio")}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A message item, checked, as a chat message."""
    role = item.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        roles = ", ".join(sorted(MESSAGE_ROLES))
        raise invalid(f"{where}.role must be one of {roles}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        check_text(content, f"{where}.content")
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or an array", f"{where}.content")
    parts = [_chat_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    return {"role": role, "content": parts}


def _other_item(item: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """A non-message item, checked where its fields are known, as a chat message whose
    every field is counted as text."""
    if kind == "function_call":
        for field in ("call_id", "name", "arguments"):
            _text_field(item, field, where, required=True)
    elif kind == "function_call_output":
        _text_field(item, "call_id", where, required=True)
        output = item.get("output")
        if not isinstance(output, str | list):
            raise invalid(f"{where}.output must be a string or an array", f"{where}.output")
    elif kind == "reasoning":
        if not isinstance(item.get("summary", []), list):
            raise invalid(f"{where}.summary must be an array", f"{where}.summary")
        _text_field(item, "encrypted_content", where, required=False)
    return {"role": "user", **{k: v for k, v in item.items() if k != "role"}}


def _input(body: dict[str, Any]) -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
    """``input``, checked: its items and their chat messages."""
    value = body.get("input")
    if value is None:
        raise invalid("input is required", "input")
    if isinstance(value, str):
        check_text(value, "input")
        item = {"type": "message", "role": "user", "content": value}
        return (item,), [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise invalid("input must be a string or an array of input items", "input")
    messages = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise invalid(f"{where}.type must be a string", f"{where}.type")
        messages.append(
            _message(item, where) if kind == "message" else _other_item(item, kind, where)
        )
    return tuple(value), messages


def _tools(body: dict[str, Any], texts: list[str]) -> list[dict[str, Any]] | None:
    """``tools``, checked (a function tool needs its ``name``); each definition's JSON
    appended to ``texts``."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("tools must be an array", "tools")
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise invalid(f"{where} must be an object with a string `type`", where)
        if tool["type"] == "function" and not isinstance(tool.get("name"), str):
            raise invalid(f"{where}.name must be a string", f"{where}.name")
        text = tool_json(tool)
        check_text(text, where)
        texts.append(text)
    return tools


def _options(body: dict[str, Any]) -> None:
    """``tool_choice``, ``reasoning``, ``text`` and ``metadata``, checked."""
    choice = body.get("tool_choice")
    if choice is not None and not (
        (isinstance(choice, str) and choice in TOOL_CHOICES)
        or (isinstance(choice, dict) and isinstance(choice.get("type"), str))
    ):
        raise invalid("tool_choice must be none, auto, required or a tool object", "tool_choice")
    reasoning = _object(body, "reasoning")
    effort = reasoning.get("effort") if reasoning else None
    if effort is not None and effort not in REASONING_EFFORTS:
        efforts = ", ".join(sorted(REASONING_EFFORTS))
        raise invalid(f"reasoning.effort must be one of {efforts}", "reasoning.effort")
    text = _object(body, "text")
    if text and text.get("format") is not None:
        fmt = text["format"]
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise invalid("text.format must be an object with a string `type`", "text.format")
    metadata = _object(body, "metadata") or {}
    if len(metadata) > METADATA_PAIRS:
        raise invalid(f"metadata has at most {METADATA_PAIRS} pairs", "metadata")
    for name, value in metadata.items():
        if len(name) > METADATA_KEY_CHARS or not isinstance(value, str):
            raise invalid(
                f"metadata keys are at most {METADATA_KEY_CHARS} characters and values strings",
                "metadata",
            )
        if len(value) > METADATA_VALUE_CHARS:
            raise invalid(
                f"metadata values are at most {METADATA_VALUE_CHARS} characters", "metadata"
            )
        check_text(name, "metadata")
        check_text(value, "metadata")


def validate_responses(body: Any) -> ResponsesRequest:
    """Check a parsed body against the Responses schema (the parts we rely on)."""
    model = request_model(body)
    items, messages = _input(body)
    instructions = _string(body, "instructions")
    if instructions is not None:
        messages.insert(0, {"role": "system", "content": instructions})
    tool_texts: list[str] = []
    tools = _tools(body, tool_texts)
    _options(body)
    return ResponsesRequest(
        body=body,
        model=model,
        items=items,
        messages=messages,
        tools=tools,
        tool_texts=tuple(tool_texts),
        max_output_tokens=output_length(body),
        stream=_flag(body, "stream", False),
        store=_flag(body, "store", True),
        previous_response_id=_string(body, "previous_response_id", chars=MAX_RESPONSE_ID_CHARS),
    )


def previous_not_found(response_id: str) -> APIError:
    return APIError(
        400,
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


class ResponsesDialect(Dialect):
    """``POST /v1/responses`` (see the module docstring). ``records``: every response's
    totals, in the store; ``kept``: the mock's whole responses, on this node; ``mock``:
    no upstream answers (an unknown ``previous_response_id`` is then a 400)."""

    surface = "responses"
    path = "/v1/responses"
    upstream_path = "/responses"
    count_path = "/v1/responses/input_tokens"
    count_upstream_path = "/responses/input_tokens"

    def __init__(self, records: ResponseRecords, kept: StoredResponses, *, mock: bool) -> None:
        self.records = records
        self.kept = kept
        self.mock = mock

    @classmethod
    def build(cls, store: WindowStore, settings: Settings) -> ResponsesDialect:
        return cls(ResponseRecords(store), StoredResponses(), mock=not settings.upstream.enabled)

    def count_answer(self, input_tokens: int) -> dict[str, Any]:
        return {"object": "response.input_tokens", "input_tokens": input_tokens}

    def parse(self, body: Any) -> Exchange:
        request = validate_responses(body)
        return Exchange(
            body=request.body,
            model=request.model,
            stream=request.stream,
            per_choice=request.max_output_tokens,
            choices=1,
            request=request,
            end_user=end_user_of(request.body),
        )

    def count_input(self, exchange: Exchange) -> int:
        request: ResponsesRequest = exchange.request
        return count_chat_prompt(
            request.model, request.messages, request.tools, None, request.tool_texts
        )

    async def carried_input(self, exchange: Exchange, key_id: str) -> int:
        """The previous response's input and output (OpenAI bills the whole conversation
        as the follow-up's input). Unknown to the mock: a 400; in proxy mode the upstream
        decides, and settlement corrects the input to what it reports."""
        request: ResponsesRequest = exchange.request
        if request.previous_response_id is None:
            return 0
        record = await self.records.get(key_id, request.previous_response_id)
        if record is None:
            if self.mock:
                raise previous_not_found(request.previous_response_id)
            return 0
        return record.input_tokens + record.output_tokens

    def mock_answer(self, exchange: Exchange, per_choice: int, input_tokens: int) -> MockAnswer:
        request: ResponsesRequest = exchange.request
        reply = mock_reply(request.model, list(request.items), 1, per_choice)
        output = reply.completion_tokens
        whole = response_object(
            reply, request.body, status=final_status(reply), input_tokens=input_tokens
        )
        totals = None
        if request.store:
            totals = AnswerTotals(
                whole["id"], request.model, input_tokens, output, whole, request.items
            )
        if not request.stream:
            return MockAnswer(output, body=whole, totals=totals)
        events = response_events(reply, request.body, input_tokens)
        return MockAnswer(output, events=events, totals=totals)

    async def answered(self, key_id: str, exchange: Exchange, totals: AnswerTotals) -> None:
        self.kept.put(key_id, totals)
        await self.records.put(key_id, totals)

    def forward(
        self, exchange: Exchange, per_choice: int | None, route: UpstreamRoute
    ) -> dict[str, Any]:
        """The body sent upstream: ``max_output_tokens`` at most the reservation, and set
        to it when the request named none (the field the Responses API reads)."""
        sent = forwarded_body(
            exchange.body,
            per_choice=per_choice,
            limit_field="max_output_tokens",
            allowed=route.forward_fields,
        )
        if per_choice is not None and sent.get("max_output_tokens") is None:
            sent["max_output_tokens"] = per_choice
        for name in ("max_tokens", "max_completion_tokens"):
            if name not in exchange.body:
                sent.pop(name, None)
        return sent

    def asking_usage(self, body: dict[str, Any]) -> dict[str, Any]:
        return body  # every terminal event carries the usage

    def meter(self, exchange: Exchange) -> StreamMeter:
        return ResponsesMeter()

    def usage_of(self, body: Any) -> ReportedUsage | None:
        return ReportedUsage.of_responses(body.get("usage") if isinstance(body, dict) else None)

    def reply_output(self, model: str, body: Any) -> int:
        return reply_output(model, body)

    def answer_totals(self, exchange: Exchange, body: Any) -> AnswerTotals | None:
        return _upstream_totals(exchange, body)

    def stream_totals(self, exchange: Exchange, meter: StreamMeter) -> AnswerTotals | None:
        return _upstream_totals(exchange, getattr(meter, "response", None))


def _upstream_totals(exchange: Exchange, response: Any) -> AnswerTotals | None:
    """An upstream Response's id and usage, when it has both (and was stored)."""
    request: ResponsesRequest = exchange.request
    if not request.store or not isinstance(response, dict):
        return None
    usage = ReportedUsage.of_responses(response.get("usage"))
    response_id = response.get("id")
    if usage is None or usage.input_tokens is None or usage.output_tokens is None:
        return None
    if not isinstance(response_id, str):
        return None
    return AnswerTotals(response_id, request.model, usage.input_tokens, usage.output_tokens)
