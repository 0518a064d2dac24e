"""The Responses API (``/v1/responses``) through the app, on the mock: answers, counting, limits.

Every answer is validated against OpenAI's spec (:mod:`tests.support.openai_spec`): its
shape and usage charged, ``max_output_tokens`` and the default reservation; the input
counted as chat counts it (strings, images, tools, function calls and reasoning items);
the table of bad bodies (400 naming the field, nothing consumed); OpenAI's 429 past
the ``rpm``, per-user limits, and one budget shared with chat completions.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import pytest

from tests.support.openai_spec import check
from tests.support.responses_app import (
    auth,
    chat_prompt_tokens,
    create,
    responses_client,
    used,
)
from tokenguard.counting import count_text, tool_json


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    return responses_client()


def png(width: int, height: int) -> str:
    """A data URL of a PNG header of that size (all the counter reads)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    data = b"\x89PNG\r\n\x1a\n" + chunk
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --- the answer ---------------------------------------------------------------------------


async def test_a_response_has_the_specs_shape_and_is_charged_its_usage(client) -> None:  # type: ignore[no-untyped-def]
    response = await create(client, max_output_tokens=100)
    assert response.status_code == 200
    body = await response.get_json()
    check("Response", body)
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["id"].startswith("resp_")
    text = body["output"][0]["content"][0]["text"]
    usage = body["usage"]
    assert usage["output_tokens"] == count_text("gpt-4o", text)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert await used(client, "sk-big") == {
        "requests": 1,
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
    }
    assert response.headers["x-ratelimit-remaining-requests"] == "999"
    assert response.headers["x-request-id"].startswith("req_")


async def test_max_output_tokens_cuts_the_reply_as_incomplete(client) -> None:  # type: ignore[no-untyped-def]
    body = await (await create(client, max_output_tokens=3)).get_json()
    check("Response", body)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 3


async def test_with_no_max_output_tokens_the_keys_default_is_reserved(client) -> None:  # type: ignore[no-untyped-def]
    response = await create(client, "sk-small")
    body = await response.get_json()
    # default_max_tokens = 20 reserved: the reply is at most that long
    assert body["usage"]["output_tokens"] <= 20
    assert int(response.headers["x-ratelimit-remaining-output-tokens"]) == 200 - 20


# --- counting -----------------------------------------------------------------------------


async def test_a_string_input_counts_as_the_same_chat_prompt(client) -> None:  # type: ignore[no-untyped-def]
    text = "Count me the way chat counts me."
    body = await (await create(client, input=text, instructions="Be brief.")).get_json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert body["usage"]["input_tokens"] == await chat_prompt_tokens(client, messages)


async def test_an_image_part_costs_what_it_costs_in_chat(client) -> None:  # type: ignore[no-untyped-def]
    url = png(1024, 2048)
    parts = [
        {"type": "input_text", "text": "What is in it?"},
        {"type": "input_image", "image_url": url, "detail": "high"},
    ]
    body = await (await create(client, input=[{"role": "user", "content": parts}])).get_json()
    chat_parts = [
        {"type": "text", "text": "What is in it?"},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
    ]
    chat_tokens = await chat_prompt_tokens(client, [{"role": "user", "content": chat_parts}])
    assert body["usage"]["input_tokens"] == chat_tokens
    assert chat_tokens > 700  # high detail, 1024x2048: tiles, not text


async def test_tools_cost_at_least_their_json(client) -> None:  # type: ignore[no-untyped-def]
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"type": "web_search"},
    ]
    plain = (await (await create(client)).get_json())["usage"]["input_tokens"]
    with_tools = (await (await create(client, tools=tools)).get_json())["usage"]["input_tokens"]
    assert with_tools - plain >= sum(count_text("gpt-4o", tool_json(t)) for t in tools)


async def test_function_calls_outputs_and_reasoning_items_are_counted(client) -> None:  # type: ignore[no-untyped-def]
    arguments = json.dumps({"city": "Paris, " * 50})
    output = "sunny " * 80
    items = [
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "x"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": "c1", "output": output},
    ]
    plain = (await (await create(client, input=items[:1])).get_json())["usage"]["input_tokens"]
    body = await (await create(client, input=items)).get_json()
    added = body["usage"]["input_tokens"] - plain
    assert added >= count_text("gpt-4o", arguments) + count_text("gpt-4o", output)


# --- bad bodies ---------------------------------------------------------------------------

TEXT = {"type": "input_text", "text": "hi"}
BAD_BODIES = [
    ({"input": "hi"}, "model"),
    ({"model": "gpt-4o"}, "input"),
    ({"model": "gpt-4o", "input": 3}, "input"),
    ({"model": "gpt-4o", "input": [3]}, "input[0]"),
    ({"model": "gpt-4o", "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"model": "gpt-4o", "input": [{"role": "user", "content": 3}]}, "input[0].content"),
    ({"model": "gpt-4o", "input": [{"role": "user", "content": [3]}]}, "input[0].content[0]"),
    (
        {"model": "gpt-4o", "input": [{"role": "user", "content": [{"type": "input_video"}]}]},
        "input[0].content[0]",
    ),
    (
        {"model": "gpt-4o", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "input[0].content[0].text",
    ),
    (
        {"model": "gpt-4o", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        "input[0].content[0].image_url",
    ),
    (
        {
            "model": "gpt-4o",
            "input": [
                {"role": "user", "content": [{**TEXT, "type": "input_image", "image_url": 5}]}
            ],
        },
        "input[0].content[0].image_url",
    ),
    (
        {"model": "gpt-4o", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
        "input[0].arguments",
    ),
    (
        {"model": "gpt-4o", "input": [{"type": "function_call_output", "call_id": "c"}]},
        "input[0].output",
    ),
    ({"model": "gpt-4o", "input": [{"type": "reasoning", "summary": "x"}]}, "input[0].summary"),
    ({"model": "gpt-4o", "input": "hi", "instructions": 3}, "instructions"),
    ({"model": "gpt-4o", "input": "hi", "tools": {}}, "tools"),
    ({"model": "gpt-4o", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "gpt-4o", "input": "hi", "tools": [{"name": "f"}]}, "tools[0]"),
    ({"model": "gpt-4o", "input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "gpt-4o", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "gpt-4o", "input": "hi", "max_output_tokens": "9"}, "max_output_tokens"),
    ({"model": "gpt-4o", "input": "hi", "max_output_tokens": 2**31}, "max_output_tokens"),
    ({"model": "gpt-4o", "input": "hi", "reasoning": []}, "reasoning"),
    ({"model": "gpt-4o", "input": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"model": "gpt-4o", "input": "hi", "text": {"format": "json"}}, "text.format"),
    ({"model": "gpt-4o", "input": "hi", "store": "yes"}, "store"),
    ({"model": "gpt-4o", "input": "hi", "stream": 1}, "stream"),
    ({"model": "gpt-4o", "input": "hi", "metadata": {"k": 1}}, "metadata"),
    ({"model": "gpt-4o", "input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"model": "gpt-4o", "input": "hi", "previous_response_id": 7}, "previous_response_id"),
    (
        {"model": "gpt-4o", "input": "hi", "previous_response_id": "r" * 129},
        "previous_response_id",
    ),
    ({"model": "gpt-4o", "input": "\ud800"}, "input"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
async def test_bad_bodies_are_400_naming_the_field_and_consume_nothing(
    client: Any, body: dict[str, Any], param: str
) -> None:
    response = await client.post("/v1/responses", json=body, headers=auth("sk-small"))
    assert response.status_code == 400, await response.get_data()
    error = await response.get_json()
    check("ErrorResponse", error)
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param
    assert response.headers["x-ratelimit-remaining-requests"] == "3"
    assert set((await used(client, "sk-small")).values()) == {0}


async def test_unknown_fields_are_ignored_by_the_mock(client) -> None:  # type: ignore[no-untyped-def]
    response = await create(client, some_future_field={"x": 1}, temperature=0.2)
    assert response.status_code == 200


# --- limits -------------------------------------------------------------------------------


async def test_past_the_rpm_it_is_openais_429_with_retry_after(client) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        assert (await create(client, "sk-small", max_output_tokens=5)).status_code == 200
    refused = await create(client, "sk-small", max_output_tokens=5)
    assert refused.status_code == 429
    error = await refused.get_json()
    check("ErrorResponse", error)
    assert error["error"]["type"] == "requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await used(client, "sk-small"))["requests"] == 3


@pytest.mark.parametrize("field", ["user", "safety_identifier"])
async def test_the_body_names_the_end_user_of_per_user_limits(client: Any, field: str) -> None:
    assert (await create(client, "sk-users", **{field: "alice"})).status_code == 200
    refused = await create(client, "sk-users", **{field: "alice"})
    assert refused.status_code == 429
    check("ErrorResponse", await refused.get_json())
    assert (await create(client, "sk-users", **{field: "bob"})).status_code == 200


async def test_chat_and_responses_share_one_budget(client) -> None:  # type: ignore[no-untyped-def]
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for _ in range(2):
        answer = await client.post("/v1/chat/completions", json=chat, headers=auth("sk-small"))
        assert answer.status_code == 200
    assert (await create(client, "sk-small", max_output_tokens=5)).status_code == 200
    assert (await create(client, "sk-small", max_output_tokens=5)).status_code == 429
