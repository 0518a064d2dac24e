"""OpenAI's chat completions, ``POST /v1/chat/completions``, as a dialect.

Validation covers the fields the limiter relies on (the messages, their roles and
content, tool definitions, every length and choice field); the rest of a body passes as
it is. Input is counted as OpenAI's cookbook counts chat prompts, tools included
(:func:`tokenguard.counting.tokens.count_chat_prompt`); the output reserved is the
longest reply any length field names (else the key's ``default_max_tokens``) times the
choices the upstream generates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from tokenguard.api.dialect import Dialect, Exchange, MockAnswer
from tokenguard.api.dialects.openai import (
    DONE,
    ChoicesMeter,
    reply_output,
    sse_event,
    usage_block,
)
from tokenguard.api.end_user import end_user_of
from tokenguard.api.request_body import (
    check_text,
    generated_choices,
    output_length,
    request_model,
    stream_flags,
)
from tokenguard.counting import count_chat_prompt, tool_json
from tokenguard.errors import invalid
from tokenguard.upstreams.mock import MockReply, mock_reply
from tokenguard.upstreams.relay import StreamMeter

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@attrs.frozen
class ChatRequest:
    """A validated chat-completion request; ``body`` is the parsed JSON, untouched."""

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    # Per choice: the largest of the request's OUTPUT_LENGTH_FIELDS; None when it names
    # none of them.
    max_tokens: int | None
    n: int  # choices returned
    choices: int  # choices the upstream generates (and bills): see generated_choices
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None
    functions: list[dict[str, Any]] | None
    # The compact JSON of each tool definition, then of each legacy function, as the
    # validator serialised them (the tokenizer counts them, and need not serialise again).
    tool_texts: tuple[str, ...] = ()


def _check_content(content: Any, param: str, *, required: bool) -> None:
    if content is None:
        if required:
            raise invalid(f"{param} is required", param)
        return
    if isinstance(content, str):
        check_text(content, param)
        return
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or an array of content parts", param)
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{where} must be an object with a string `type`", where)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.text must be a string", f"{where}.text")
            check_text(part["text"], f"{where}.text")


def _check_message(i: int, message: Any) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object", param)
    role = message.get("role")
    if not isinstance(role, str):
        raise invalid(f"{param}.role is required and must be a string", f"{param}.role")
    if role not in ROLES:
        raise invalid(
            f"{param}.role must be one of {', '.join(sorted(ROLES))}; got {role!r}",
            f"{param}.role",
        )
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise invalid(f"{param}.name must be a string", f"{param}.name")
        check_text(name, f"{param}.name")
    # Only an assistant turn may have no content (it made tool or function calls).
    _check_content(message.get("content"), f"{param}.content", required=role != "assistant")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise invalid(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
    for j, call in enumerate(tool_calls or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            where = f"{param}.tool_calls[{j}]"
            raise invalid(f"{where}.function.name must be a string", where)
        if not isinstance(fn.get("arguments", ""), str):
            where = f"{param}.tool_calls[{j}].function.arguments"
            raise invalid(f"{where} must be a string", where)


def _check_tools(body: dict[str, Any], name: str, texts: list[str]) -> list[dict[str, Any]] | None:
    """``body[name]`` (``tools`` or ``functions``), checked; appends each definition's
    compact JSON (what :func:`tokenguard.counting.tokens.tool_json` makes) to ``texts``."""
    tools = body.get(name)
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid(f"{name} must be an array", name)
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"{name}[{j}] must be an object", f"{name}[{j}]")
        fn = tool.get("function", tool) if name == "tools" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{name}[{j}] needs a function name", f"{name}[{j}]")
        text = tool_json(tool)
        check_text(text, f"{name}[{j}]")
        texts.append(text)
    return tools


def validate_chat(body: Any) -> ChatRequest:
    """Check a parsed body against the chat-completions schema (the parts we rely on)."""
    model = request_model(body)
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages is required", "messages")
    if not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", "messages")
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    for i, message in enumerate(messages):
        _check_message(i, message)
    max_tokens = output_length(body)
    n, choices = generated_choices(body)
    stream, include_usage = stream_flags(body)
    tool_texts: list[str] = []
    tools = _check_tools(body, "tools", tool_texts)
    functions = _check_tools(body, "functions", tool_texts)
    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        n=n,
        choices=choices,
        stream=stream,
        include_usage=include_usage,
        tools=tools,
        functions=functions,
        tool_texts=tuple(tool_texts),
    )


class ChatDialect(Dialect):
    """``POST /v1/chat/completions`` (see the module docstring)."""

    surface = "chat"
    path = "/v1/chat/completions"
    upstream_path = "/chat/completions"

    def parse(self, body: Any) -> Exchange:
        chat = validate_chat(body)
        return Exchange(
            body=chat.body,
            model=chat.model,
            stream=chat.stream,
            per_choice=chat.max_tokens,
            choices=chat.choices,
            request=chat,
            end_user=end_user_of(chat.body),
        )

    def count_input(self, exchange: Exchange) -> int:
        chat: ChatRequest = exchange.request
        return count_chat_prompt(
            chat.model, chat.messages, chat.tools, chat.functions, chat.tool_texts
        )

    def mock_answer(self, exchange: Exchange, per_choice: int, input_tokens: int) -> MockAnswer:
        chat: ChatRequest = exchange.request
        reply = mock_reply(chat.model, chat.messages, chat.n, per_choice)
        if not chat.stream:
            return MockAnswer(reply.completion_tokens, body=completion_body(reply, input_tokens))
        events = stream_events(reply, chat.include_usage, input_tokens)
        return MockAnswer(reply.completion_tokens, events=events)

    def meter(self, exchange: Exchange) -> StreamMeter:
        return ChoicesMeter(exchange.request.include_usage)

    def reply_output(self, model: str, body: Any) -> int:
        return reply_output(model, body)


def completion_body(reply: MockReply, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object for a whole (non-streamed) reply."""
    return {
        "id": f"chatcmpl-{reply.id}",
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
    """One ``chat.completion.chunk`` event; ``usage`` is included only when given (``None``
    included too: a client that asked for usage gets ``usage: null`` on every chunk)."""
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{reply.id}",
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "tokenguard-mock",
        "choices": choices,
    }
    if usage is not attrs.NOTHING:
        chunk["usage"] = usage
    return sse_event(chunk)


def _choice(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def stream_events(
    reply: MockReply, include_usage: bool, prompt_tokens: int
) -> Iterator[tuple[bytes, int]]:
    """Server-sent events of a streamed reply, each with how many tokens it carries.

    The order is OpenAI's: a role chunk per choice, one content chunk per token, a
    finish chunk per choice; then, if asked, a usage chunk (empty ``choices``); then
    ``data: [DONE]``.
    """
    usage = None if include_usage else attrs.NOTHING
    for c in reply.choices:
        delta = {"role": "assistant", "content": "", "refusal": None}
        yield _chunk(reply, [_choice(c.index, delta, None)], usage), 0
    for c in reply.choices:
        for word in c.words:
            yield _chunk(reply, [_choice(c.index, {"content": word}, None)], usage), 1
        yield _chunk(reply, [_choice(c.index, {}, c.finish_reason)], usage), 0
    if include_usage:
        yield _chunk(reply, [], usage_block(prompt_tokens, reply.completion_tokens)), 0
    yield DONE, 0
