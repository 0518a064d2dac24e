"""Counting a chat prompt: what a Chat Completions request is billed for as input.

Chat prompts are counted as in OpenAI's cookbook "How to count tokens with tiktoken"
(checked there against the live API): 3 tokens per message, the encoded value of every
message field (role, content, name, ...), +1 per ``name``, +3 for reply priming. Tool
and function definitions cost the larger of the cookbook's ``num_tokens_for_tools``
scheme and the tokens of their compact JSON (:func:`tool_json`): the scheme reads only
names, descriptions and flat properties, so everything else in a schema (``$defs``,
``items``, ``anyOf``, ``default``, the parameters' own description...) would cost
nothing; the JSON is never less than what reaches the model (which sees a terser
rendering), so a definition is never under-counted (the cookbook's weather tool: 101
tokens by the API, 123 here). Image, audio and file parts are priced by
:mod:`tokenguard.counting.media` (OpenAI's image formulas per model, from the image's header;
estimates from the decoded size for audio and files); assistant
``tool_calls``/``function_call`` are estimates. OpenAI may change its prompt format per
model, so treat counts for models other than the cookbook's (gpt-3.5-turbo, gpt-4,
gpt-4o, gpt-4o-mini) as close estimates. A chat prompt is always at least 3 tokens (the
reply priming); counting never raises on unexpected shapes
(:mod:`tokenguard.counting.text`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tiktoken

from tokenguard.counting.encodings import encoding_name_for, get_encoding
from tokenguard.counting.media import (
    UNSEEN_PART_TOKENS,
    VisionCost,
    audio_tokens,
    file_tokens,
    image_tokens,
    vision_cost,
)
from tokenguard.counting.text import as_text, count_value

# --- chat prompt overheads (OpenAI cookbook, verified there against the API) ---------
TOKENS_PER_MESSAGE = 3  # <|start|>{role/name}\n{content}<|end|>\n
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3  # every reply is primed with <|start|>assistant<|message|>

# Tool schemas nested deeper than this are counted as their JSON text rather than
# walked, so a hostile schema cannot exhaust the stack.
_MAX_SCHEMA_DEPTH = 16


def count_chat_prompt(
    model: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    functions: list[dict] | None = None,
    tool_texts: Sequence[str] | None = None,
) -> int:
    """Return the prompt tokens a chat completion request will be billed for.

    ``messages`` are Chat Completions messages; ``content`` may be a string, ``None`` or
    a list of content parts. ``tools`` (``{"type": "function", "function": {...}}``) and
    the legacy ``functions`` (the function objects themselves) are counted together;
    ``tool_texts``, when the caller has them, are their :func:`tool_json` texts in that
    order (tools first), so they are not serialised again.

    Exact for the cases in OpenAI's cookbook (plain messages with ``name``); tool
    definitions at least their JSON's tokens; media parts as :mod:`tokenguard.counting.media`
    prices them. Never raises on unexpected shapes or types; raises only
    :class:`EncodingDataError` (bad package data). The result is at least
    ``REPLY_PRIMING_TOKENS``.
    """
    name = encoding_name_for(model)
    encoding = get_encoding(name)
    vision = vision_cost(model) if isinstance(model, str) else vision_cost("")
    total = REPLY_PRIMING_TOKENS
    if isinstance(messages, list | tuple):
        for message in messages:
            total += _count_message(encoding, vision, message)
    elif messages is not None:
        total += _count_message(encoding, vision, messages)
    definitions = [*_as_list(tools), *_as_list(functions)]
    if tool_texts is None or len(tool_texts) != len(definitions):
        tool_texts = [tool_json(d) for d in definitions]
    total += _count_tool_definitions(encoding, _TOOL_COSTS[name], definitions, tool_texts)
    return total


def tool_json(definition: Any) -> str:
    """The text a tool definition is counted as, at least: the compact JSON of its
    function object (``{"type": "function", "function": {...}}``), or of the whole
    definition otherwise (a legacy function, another tool type)."""
    if isinstance(definition, Mapping) and isinstance(definition.get("function"), Mapping):
        definition = definition["function"]
    return as_text(definition)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _count_message(encoding: tiktoken.Encoding, vision: VisionCost, message: Any) -> int:
    if not isinstance(message, Mapping):
        return TOKENS_PER_MESSAGE + count_value(encoding, message)
    total = TOKENS_PER_MESSAGE
    # Like the cookbook, every field's value is counted (role, tool_call_id, refusal,
    # and anything new): over-counting an unknown field is safer for a rate limiter
    # than ignoring it.
    for key, value in message.items():
        if key == "content":
            total += _count_content(encoding, vision, value)
        elif key == "tool_calls":
            total += sum(_count_tool_call(encoding, call) for call in _as_list(value))
        elif key == "function_call":
            total += _count_tool_call(encoding, {"function": value})
        elif key == "name":
            total += count_value(encoding, value) + TOKENS_PER_NAME
        else:
            total += count_value(encoding, value)
    return total


def _count_content(encoding: tiktoken.Encoding, vision: VisionCost, content: Any) -> int:
    if content is None or isinstance(content, str):
        return count_value(encoding, content)
    if isinstance(content, list | tuple):
        return sum(_count_part(encoding, vision, part) for part in content)
    return count_value(encoding, content)


def _count_part(encoding: tiktoken.Encoding, vision: VisionCost, part: Any) -> int:
    if not isinstance(part, Mapping):
        return count_value(encoding, part)
    kind = part.get("type")
    if kind == "text":
        return count_value(encoding, part.get("text"))
    if kind == "refusal":
        return count_value(encoding, part.get("refusal"))
    if kind == "image_url":
        return image_tokens(vision, part.get("image_url"))
    if kind == "input_audio":
        return audio_tokens(part.get("input_audio"))
    if kind == "file":
        return file_tokens(vision, part.get("file"))
    # A part type this module does not know (a remote audio or video URL...): its
    # content is not in the request, or is counted as the text it is.
    return max(UNSEEN_PART_TOKENS, count_value(encoding, part))


def _count_tool_call(encoding: tiktoken.Encoding, call: Any) -> int:
    """Count an assistant tool call: its function name and argument string.

    ``{"function": {"name", "arguments"}}``, custom tools' ``{"custom": {"name",
    "input"}}``, and the legacy ``function_call`` (wrapped by the caller) alike.
    """
    if isinstance(call, Mapping):
        payload = call.get("function", call.get("custom"))
        if isinstance(payload, Mapping):
            return sum(count_value(encoding, v) for v in payload.values())
    return count_value(encoding, call)


@dataclass(frozen=True)
class _ToolCosts:
    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


# From the cookbook's num_tokens_for_tools, verified there against the API (105 tokens
# for its weather example on gpt-3.5-turbo/gpt-4, 101 on gpt-4o/gpt-4o-mini). The
# cl100k models pay 10 tokens per function where the o200k models pay 7.
_TOOL_COSTS: dict[str, _ToolCosts] = {
    "cl100k_base": _ToolCosts(10, 3, 3, -3, 3, 12),
    "o200k_base": _ToolCosts(7, 3, 3, -3, 3, 12),
}


def _count_tool_definitions(
    encoding: tiktoken.Encoding,
    costs: _ToolCosts,
    definitions: list[Any],
    texts: Sequence[str],
) -> int:
    """Each definition: the larger of the cookbook's scheme and its JSON's tokens
    (``texts``, one per definition); then the cookbook's closing overhead once."""
    if not definitions:
        return 0
    total = 0
    for definition, text in zip(definitions, texts, strict=True):
        total += max(_cookbook_definition(encoding, costs, definition), count_value(encoding, text))
    return total + costs.func_end


def _cookbook_definition(encoding: tiktoken.Encoding, costs: _ToolCosts, definition: Any) -> int:
    total = costs.func_init
    function = definition
    if isinstance(definition, Mapping) and isinstance(definition.get("function"), Mapping):
        function = definition["function"]  # tools=[{"type": "function", "function": ...}]
    if not isinstance(function, Mapping):
        return total + count_value(encoding, function)
    description = as_text(function.get("description")).removesuffix(".")
    total += count_value(encoding, f"{as_text(function.get('name'))}:{description}")
    parameters = function.get("parameters")
    if isinstance(parameters, Mapping):
        total += _count_properties(encoding, costs, parameters.get("properties"), 0)
    return total


def _count_properties(
    encoding: tiktoken.Encoding, costs: _ToolCosts, properties: Any, depth: int
) -> int:
    if not isinstance(properties, Mapping) or not properties:
        return 0
    if depth >= _MAX_SCHEMA_DEPTH:
        return count_value(encoding, properties)
    total = costs.prop_init
    for key, schema in properties.items():
        total += costs.prop_key
        if not isinstance(schema, Mapping):
            total += count_value(encoding, f"{as_text(key)}:{as_text(schema)}")
            continue
        if "enum" in schema:
            total += costs.enum_init
            for item in _as_list(schema["enum"]):
                total += costs.enum_item + count_value(encoding, item)
        p_type = as_text(schema.get("type"))
        p_desc = as_text(schema.get("description")).removesuffix(".")
        total += count_value(encoding, f"{as_text(key)}:{p_type}:{p_desc}")
        # Beyond the cookbook, which ignores nesting and would undercount: properties of
        # nested objects (and of array items) are charged with the same scheme.
        total += _count_properties(encoding, costs, schema.get("properties"), depth + 1)
        items = schema.get("items")
        if isinstance(items, Mapping):
            total += _count_properties(encoding, costs, items.get("properties"), depth + 1)
    return total
