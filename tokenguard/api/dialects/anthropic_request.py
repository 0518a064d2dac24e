"""A Messages API request body (``POST /v1/messages``, and its ``count_tokens``), checked.

Validation covers what the limiter and the estimate rely on, as Anthropic's API
reference describes the body (https://docs.claude.com/en/api/messages): ``model``;
``max_tokens`` (required, except to count tokens); ``messages`` of ``user`` and
``assistant`` turns whose content is a string or blocks (``text``, ``image`` with a
base64, url or file source, ``document``, ``tool_use``, ``tool_result``, ``thinking``,
``redacted_thinking``; other block types pass, counted as their JSON); ``system`` as a
string or text blocks; ``cache_control`` on blocks and tools; ``tools`` (a custom tool
has a ``name`` and an ``input_schema`` object, a server tool a ``type``) and
``tool_choice``; ``stop_sequences``, ``stream``, ``temperature``, ``top_p``, ``top_k``,
``metadata.user_id``, ``thinking`` (``enabled`` with ``budget_tokens`` of at least 1024,
``disabled``, ``adaptive``). Anything else passes as it is.

Every problem is a 400 (Anthropic's ``invalid_request_error``) whose message starts with
the field's path in Anthropic's style (``messages.0.content.1.text: ...``), raised before
the limiter: a refused body consumes nothing. The output reserved is the largest length
field the body names (:func:`tokenguard.api.request_body.output_length`: an upstream may
read any of them), ``max_tokens`` at least. Thinking tokens are output tokens billed
within ``max_tokens`` (``budget_tokens`` is part of it, not added to it), so nothing more
is reserved for them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from tokenguard.api.request_body import (
    MAX_TOKENS_CEILING,
    output_length,
    positive_int,
    request_model,
)
from tokenguard.errors import APIError, invalid
from tokenguard.strict_json import check_text

ROLES = frozenset({"user", "assistant"})
TOOL_CHOICES = frozenset({"auto", "any", "tool", "none"})
THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive"})
MIN_THINKING_BUDGET = 1024
IMAGE_SOURCES = frozenset({"base64", "url", "file"})
DOCUMENT_SOURCES = frozenset({"base64", "text", "url", "content", "file"})
MAX_STOP_SEQUENCES = 1024


@attrs.frozen
class MessagesRequest:
    """A validated Messages request; ``body`` is the parsed JSON, untouched.
    ``max_tokens``: the reply's longest length in any length field (``None`` only for a
    count_tokens body that names none)."""

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    system: Any
    tools: list[dict[str, Any]] | None
    max_tokens: int | None
    stream: bool


def _fail(where: str, problem: str) -> APIError:
    return invalid(f"{where}: {problem}", where)


def _string(value: Any, where: str, *, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise _fail(where, "must be a string")
    check_text(value, where)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "must be an object")
    return value


def _cache_control(block: dict[str, Any], where: str) -> None:
    control = block.get("cache_control")
    if control is None:
        return
    control = _object(control, f"{where}.cache_control")
    if control.get("type") != "ephemeral":
        raise _fail(f"{where}.cache_control.type", "must be 'ephemeral'")
    ttl = control.get("ttl")
    if ttl is not None and ttl not in ("5m", "1h"):
        raise _fail(f"{where}.cache_control.ttl", "must be '5m' or '1h'")


def _source(block: dict[str, Any], where: str, kinds: frozenset[str]) -> None:
    source = _object(block.get("source"), f"{where}.source")
    kind = source.get("type")
    if kind not in kinds:
        raise _fail(f"{where}.source.type", f"must be one of {', '.join(sorted(kinds))}")
    field = {"base64": "data", "text": "data", "url": "url", "file": "file_id"}.get(kind)
    if field is not None:
        _string(source.get(field), f"{where}.source.{field}")
    if kind == "base64":
        _string(source.get("media_type"), f"{where}.source.media_type")
    if kind == "content":
        _blocks(source.get("content"), f"{where}.source.content", _check_block)


def _check_block(block: Any, where: str) -> None:
    """One content block of a message (see the module docstring)."""
    block = _object(block, where)
    kind = block.get("type")
    if not isinstance(kind, str):
        raise _fail(f"{where}.type", "must be a string")
    _cache_control(block, where)
    if kind == "text":
        _string(block.get("text"), f"{where}.text")
    elif kind == "image":
        _source(block, where, IMAGE_SOURCES)
    elif kind == "document":
        _source(block, where, DOCUMENT_SOURCES)
        for name in ("title", "context"):
            _string(block.get(name), f"{where}.{name}", required=False)
    elif kind == "tool_use":
        _string(block.get("id"), f"{where}.id")
        _string(block.get("name"), f"{where}.name")
        _object(block.get("input"), f"{where}.input")
    elif kind == "tool_result":
        _string(block.get("tool_use_id"), f"{where}.tool_use_id")
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            _blocks(content, f"{where}.content", _check_block)
        elif isinstance(content, str):
            check_text(content, f"{where}.content")
        if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
            raise _fail(f"{where}.is_error", "must be a boolean")
    elif kind == "thinking":
        _string(block.get("thinking"), f"{where}.thinking")
        _string(block.get("signature"), f"{where}.signature", required=False)
    elif kind == "redacted_thinking":
        _string(block.get("data"), f"{where}.data")


def _check_text_block(block: Any, where: str) -> None:
    block = _object(block, where)
    if block.get("type") != "text":
        raise _fail(f"{where}.type", "must be 'text'")
    _check_block(block, where)


def _blocks(content: Any, where: str, check: Callable[[Any, str], None]) -> None:
    if not isinstance(content, list):
        raise _fail(where, "must be a string or an array of content blocks")
    for i, block in enumerate(content):
        check(block, f"{where}.{i}")


def _check_message(message: Any, where: str) -> None:
    message = _object(message, where)
    role = message.get("role")
    if role not in ROLES:
        raise _fail(f"{where}.role", "must be 'user' or 'assistant'")
    content = message.get("content")
    if content is None:
        raise _fail(f"{where}.content", "Field required")
    if isinstance(content, str):
        check_text(content, f"{where}.content")
    else:
        _blocks(content, f"{where}.content", _check_block)


def _check_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _fail("tools", "must be an array")
    for i, tool in enumerate(tools or []):
        where = f"tools.{i}"
        tool = _object(tool, where)
        _cache_control(tool, where)
        if "input_schema" in tool or tool.get("type") in (None, "custom"):
            _string(tool.get("name"), f"{where}.name")
            _string(tool.get("description"), f"{where}.description", required=False)
            _object(tool.get("input_schema"), f"{where}.input_schema")
        else:
            _string(tool.get("type"), f"{where}.type")
    choice = body.get("tool_choice")
    if choice is not None:
        choice = _object(choice, "tool_choice")
        if choice.get("type") not in TOOL_CHOICES:
            raise _fail("tool_choice.type", f"must be one of {', '.join(sorted(TOOL_CHOICES))}")
        if choice["type"] == "tool":
            _string(choice.get("name"), "tool_choice.name")
    return tools


def _number(body: dict[str, Any], name: str, low: float, high: float | None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, "must be a number")
    if value < low or (high is not None and value > high):
        limits = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise _fail(name, f"must be {limits}, got {json.dumps(value)}")


def _check_sampling(body: dict[str, Any]) -> bool:
    """The sampling and stopping fields; returns ``stream``."""
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise _fail("top_k", "must be a non-negative integer")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES:
            raise _fail("stop_sequences", f"must be an array of at most {MAX_STOP_SEQUENCES}")
        for i, stop in enumerate(stops):
            _string(stop, f"stop_sequences.{i}")
    metadata = body.get("metadata")
    if metadata is not None:
        _string(_object(metadata, "metadata").get("user_id"), "metadata.user_id", required=False)
    thinking = body.get("thinking")
    if thinking is not None:
        kind = _object(thinking, "thinking").get("type")
        if kind not in THINKING_TYPES:
            raise _fail("thinking.type", f"must be one of {', '.join(sorted(THINKING_TYPES))}")
        if kind == "enabled":
            budget = positive_int(thinking, "budget_tokens", MAX_TOKENS_CEILING)
            if budget is None or budget < MIN_THINKING_BUDGET:
                raise _fail("thinking.budget_tokens", f"must be at least {MIN_THINKING_BUDGET}")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _fail("stream", "must be a boolean")
    return bool(stream)


def validate_messages(body: Any, *, counting: bool = False) -> MessagesRequest:
    """Check a parsed body (see the module docstring); ``counting``: a count_tokens body
    (``max_tokens`` not required, nothing generated)."""
    model = request_model(body)
    messages = body.get("messages")
    if messages is None:
        raise _fail("messages", "Field required")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "must be a non-empty array of messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages.{i}")
    system = body.get("system")
    if isinstance(system, str):
        check_text(system, "system")
    elif system is not None:
        _blocks(system, "system", _check_text_block)
    tools = _check_tools(body)
    stream = _check_sampling(body)
    max_tokens = output_length(body)
    if body.get("max_tokens") is None and not counting:
        raise _fail("max_tokens", "Field required")
    return MessagesRequest(
        body=body,
        model=model,
        messages=messages,
        system=system,
        tools=tools,
        max_tokens=max_tokens,
        stream=stream and not counting,
    )
