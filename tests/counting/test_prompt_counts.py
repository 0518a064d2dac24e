"""Chat prompts counted as OpenAI counts them: messages, tools, content parts, odd values.

The cookbook's examples (checked there against the API): messages exactly, tools at
least the API's count and their JSON, every part of a tool schema charged; text and
media parts, tool calls and results; odd values and deep or circular ones never raise.

Expected figures marked "cookbook" are printed in OpenAI's cookbook notebook
"How to count tokens with tiktoken" (examples/How_to_count_tokens_with_tiktoken.ipynb),
where the prompt counts were checked against the live API's usage.prompt_tokens. Figures
marked "derived" were computed with the verified encodings and pin behaviour against
regressions.
"""

from __future__ import annotations

import copy
import math

import pytest

from tokenguard.counting import (
    count_chat_prompt,
    count_text,
    encoding_for_model,
    tool_json,
)

# Verbatim from the cookbook, section 6.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]

# Verbatim from the cookbook, section 7.
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


# --- cookbook prompt counts (checked there against the API) -------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),  # cookbook
        ("gpt-4-0613", 129),  # cookbook
        ("gpt-4", 129),  # cookbook
        ("gpt-4o", 124),  # cookbook
        ("gpt-4o-mini", 124),  # cookbook
        # Same encoding and per-message rules as the above (derived, not in the notebook).
        ("gpt-3.5-turbo-0613", 129),
        ("gpt-4o-2024-08-06", 124),
    ],
)
def test_cookbook_example_messages(model: str, expected: int) -> None:
    assert count_chat_prompt(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize(
    ("model", "api"),
    [
        ("gpt-3.5-turbo", 105),  # cookbook
        ("gpt-4", 105),  # cookbook
        ("gpt-4o", 101),  # cookbook
        ("gpt-4o-mini", 101),  # cookbook
    ],
)
def test_cookbook_tools_example_costs_at_least_the_api_and_the_json(model: str, api: int) -> None:
    # A definition costs the larger of the cookbook's scheme and its JSON's tokens, so
    # never less than the API's own count, and never less than its JSON.
    counted = count_chat_prompt(model, COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)
    messages = count_chat_prompt(model, COOKBOOK_TOOL_MESSAGES)
    func_end = 12  # the cookbook's closing overhead
    json_tokens = count_text(model, tool_json(COOKBOOK_TOOLS[0]))
    assert counted == messages + json_tokens + func_end
    assert counted >= api


def test_every_part_of_a_schema_counts() -> None:
    # $defs, items, anyOf, default and the parameters' own description cost nothing
    # in the cookbook's scheme; 100k tokens of text there counted as 29.
    text = " ".join(f"word{i}" for i in range(50_000))
    for where in ("$defs", "items", "anyOf", "default", "description"):
        tool = copy.deepcopy(COOKBOOK_TOOLS[0])
        tool["function"]["parameters"][where] = {"def": {"description": text}}
        counted = count_chat_prompt("gpt-4o", [], tools=[tool])
        assert counted >= count_text("gpt-4o", text), where
        assert counted >= count_text("gpt-4o", tool_json(tool)), where


def test_the_validators_tool_texts_count_the_same() -> None:
    texts = [tool_json(t) for t in COOKBOOK_TOOLS]
    assert count_chat_prompt(
        "gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS, tool_texts=texts
    ) == count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)


def test_legacy_functions_count_like_tools() -> None:
    functions = [tool["function"] for tool in COOKBOOK_TOOLS]
    for model in ("gpt-4", "gpt-4o"):
        assert count_chat_prompt(
            model, COOKBOOK_TOOL_MESSAGES, functions=functions
        ) == count_chat_prompt(model, COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)


def test_tools_add_tokens_monotonically() -> None:
    base = count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES)
    assert count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=[]) == base
    one = count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)
    two = count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS * 2)
    assert base < one < two


def test_nested_schema_properties_are_charged() -> None:
    # Beyond the cookbook (which ignores nesting): nested object and array-item
    # properties are charged, so a bigger nested schema never counts as cheaper.
    def with_location(schema: dict) -> int:
        tools = copy.deepcopy(COOKBOOK_TOOLS)
        tools[0]["function"]["parameters"]["properties"]["location"] = schema
        return count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=tools)

    city = {"city": {"type": "string"}}
    flat = with_location({"type": "object"})
    nested = with_location({"type": "object", "properties": city})
    deeper = with_location({"type": "object", "properties": {**city, "zip": {"type": "string"}}})
    items = with_location({"type": "array", "items": {"type": "object", "properties": city}})
    assert flat < nested < deeper
    assert flat < items


def test_unknown_model_counts_like_o200k() -> None:
    assert count_chat_prompt("acme-chat-9000", COOKBOOK_MESSAGES) == 124
    assert encoding_for_model("acme-chat-9000") is encoding_for_model("gpt-4o")  # cached


# --- content parts, tool calls, odd values ------------------------------------------


def _user(content: object) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_text_parts_count_like_plain_content() -> None:
    parts = [{"type": "text", "text": "tiktoken is "}, {"type": "text", "text": "great!"}]
    plain = count_chat_prompt("gpt-4o", _user("tiktoken is great!"))
    assert count_chat_prompt("gpt-4o", _user(parts)) >= plain
    assert count_chat_prompt("gpt-4o", _user([{"type": "text", "text": "hi"}])) == (
        count_chat_prompt("gpt-4o", _user("hi"))
    )


def test_media_parts_cost_what_tokenguard_media_prices() -> None:
    # (Each kind in detail: tests/test_media.py.)
    empty = count_chat_prompt("gpt-4o", _user([]))
    remote = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA" * 250, "format": "mp3"}}
    file = {"type": "file", "file": {"file_id": "file-abc"}}
    video = {"type": "video_url", "video_url": {"url": "https://x/y.mp4"}}
    assert count_chat_prompt("gpt-4o", _user([remote])) == empty + 85 + 8 * 170
    assert count_chat_prompt("gpt-4.1-mini", _user([remote])) - count_chat_prompt(
        "gpt-4.1-mini", _user([])
    ) == math.ceil(1536 * 1.62)
    assert count_chat_prompt("gpt-4o", _user([audio])) == empty + math.ceil(750 * 10 / 1000)
    assert count_chat_prompt("gpt-4o", _user([file, video])) == empty + 2 * 1000


def test_none_content_and_minimal_message() -> None:
    # 3 per message + "assistant" (1 token) + 3 reply priming.
    assert count_chat_prompt("gpt-4o", [{"role": "assistant", "content": None}]) == 7
    assert count_chat_prompt("gpt-4o", []) == 3


def test_tool_calls_tool_results_and_function_call_are_counted() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
            }
        ],
    }
    enc = encoding_for_model("gpt-4o")
    expected = (
        3 + 1 + len(enc.encode("get_current_weather")) + len(enc.encode('{"location":"Paris"}'))
    )
    assert count_chat_prompt("gpt-4o", [call]) == 3 + expected

    result = {"role": "tool", "tool_call_id": "call_1", "content": "22C"}
    expected_result = 3 + 1 + len(enc.encode("call_1")) + len(enc.encode("22C"))
    assert count_chat_prompt("gpt-4o", [result]) == 3 + expected_result

    legacy = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
    }
    assert count_chat_prompt("gpt-4o", [legacy]) == count_chat_prompt("gpt-4o", [call])


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "not a list",
        [None, 3, "text", ["nested"]],
        [{"role": 5, "content": {"weird": [1, 2.5, True, None]}, "name": ["x"]}],
        [{"role": "user", "content": [None, 7, "bare string", {"type": "text", "text": 9}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "not-a-dict"}]}],
        [{"role": "assistant", "tool_calls": "oops", "function_call": 3}],
        [{"role": "assistant", "tool_calls": [None, {"function": None}, {"custom": {}}]}],
        [{"role": "user", "content": b"bytes"}],
    ],
)
def test_odd_message_values_do_not_raise(messages: object) -> None:
    assert count_chat_prompt("gpt-4o", messages) >= 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tools",
    [
        [None],
        ["string tool"],
        [{"type": "function"}],
        [{"type": "function", "function": {"name": 3, "parameters": "nope"}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": "str", "b": None}}}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": {"enum": "x"}}}}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": {"type": ["a", 1]}}}}}],
        [{"type": "custom", "custom": {"name": "grep", "description": "search"}}],
    ],
)
def test_odd_tool_definitions_do_not_raise(tools: list[dict]) -> None:
    assert count_chat_prompt("gpt-4", [], tools=tools) > 3


def test_deep_and_circular_values_do_not_raise() -> None:
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["properties"] = {"k": {"type": "object"}}
        node = node["properties"]["k"]
    tools = [{"function": {"name": "f", "parameters": deep}}]
    assert count_chat_prompt("gpt-4o", [], tools=tools) > 3
    loop: list = []
    loop.append(loop)
    assert count_chat_prompt("gpt-4o", _user(loop)) > 3
    assert count_text("gpt-4o", loop) > 0  # type: ignore[arg-type]
