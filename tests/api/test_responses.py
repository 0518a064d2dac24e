"""The Responses API (``/v1/responses`` and its routes) through the app, on the mock.

Every answer is validated against OpenAI's spec (:mod:`tests.support.openai_spec`).
Streams are checked event by event from the dialect itself here (quart's test client
buffers few chunks) and over real HTTP with the SDK in ``test_responses_sdk.py``.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import jsonschema
import pytest

from drivers.memory import MemoryStore
from tests.support.chat_app import FakeClock
from tests.support.openai_spec import check, stream_event_schema
from tokenguard.api.app import create_app
from tokenguard.api.dialects.response_objects import ResponsesMeter, response_events
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError
from tokenguard.counting import count_text, tool_json
from tokenguard.errors import APIError
from tokenguard.upstreams.mock import mock_reply

CONFIG: dict[str, Any] = {
    "tiers": {"small": {"rpm": 3, "input_tpm": 400, "output_tpm": 200, "default_max_tokens": 20}},
    "keys": [
        {"key": "sk-small", "name": "small", "tier": "small"},
        {"key": "sk-big", "name": "big", "rpm": 1000, "input_tpm": 100000, "output_tpm": 100000},
        {"key": "sk-other", "name": "other", "rpm": 1000, "input_tpm": 100000},
        {"key": "sk-users", "name": "users", "rpm": 1000, "per_user": {"rpm": 1}},
    ],
}
SERVED = ["gpt-4o", "gpt-4o-mini"]


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    settings = parse_settings(CONFIG, "<test>")
    return create_app(settings, MemoryStore(clock=FakeClock())).test_client()


@pytest.fixture
def served_client():  # type: ignore[no-untyped-def]
    settings = parse_settings({**CONFIG, "mock": {"models": SERVED}}, "<test>")
    return create_app(settings, MemoryStore(clock=FakeClock())).test_client()


def auth(key: str = "sk-big") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(client: Any, key: str = "sk-big", **body: Any) -> Any:
    payload = {"model": "gpt-4o", "input": "Say hello to the rate limiter.", **body}
    return await client.post("/v1/responses", json=payload, headers=auth(key))


async def used(client: Any, key: str) -> dict[str, int]:
    response = await client.get("/v1/usage", headers=auth(key))
    dims = (await response.get_json())["dimensions"]
    return {name: dim["used"] for name, dim in dims.items() if dim is not None}


async def chat_prompt_tokens(client: Any, messages: list[dict[str, Any]], **body: Any) -> int:
    payload = {"model": "gpt-4o", "messages": messages, "max_tokens": 5, **body}
    response = await client.post("/v1/chat/completions", json=payload, headers=auth())
    assert response.status_code == 200, await response.get_data()
    return (await response.get_json())["usage"]["prompt_tokens"]


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


# --- previous_response_id -----------------------------------------------------------------


async def test_a_follow_up_is_charged_the_previous_input_and_output_as_input(client) -> None:  # type: ignore[no-untyped-def]
    first = await (await create(client, max_output_tokens=50)).get_json()
    alone = await (await create(client, input="And then?", max_output_tokens=5)).get_json()
    follow = await create(
        client, input="And then?", max_output_tokens=5, previous_response_id=first["id"]
    )
    assert follow.status_code == 200
    body = await follow.get_json()
    check("Response", body)
    assert body["previous_response_id"] == first["id"]
    prior = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert body["usage"]["input_tokens"] == alone["usage"]["input_tokens"] + prior


@pytest.mark.parametrize("key", ["sk-big", "sk-other"])
async def test_an_unknown_previous_response_is_a_400_and_costs_nothing(client, key) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, "sk-big", max_output_tokens=5)).get_json()
    before = await used(client, key)
    # sk-big: an id nobody made; sk-other: sk-big's own, which another key may not use
    previous = "resp_nobody_made_this" if key == "sk-big" else made["id"]
    response = await create(client, key, previous_response_id=previous)
    assert response.status_code == 400
    error = (await response.get_json())["error"]
    assert (error["param"], error["code"]) == (
        "previous_response_id",
        "previous_response_not_found",
    )
    assert await used(client, key) == before


async def test_a_response_not_stored_cannot_be_continued_or_retrieved(client) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, store=False, max_output_tokens=5)).get_json()
    assert made["store"] is False
    assert (await create(client, previous_response_id=made["id"])).status_code == 400
    assert (await client.get(f"/v1/responses/{made['id']}", headers=auth())).status_code == 404


# --- the stored responses -----------------------------------------------------------------


async def test_a_response_is_retrieved_listed_and_deleted_by_its_key_only(client) -> None:  # type: ignore[no-untyped-def]
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
    ]
    made = await (await create(client, input=items, max_output_tokens=5)).get_json()
    path = f"/v1/responses/{made['id']}"
    got = await client.get(path, headers=auth())
    assert got.status_code == 200
    assert await got.get_json() == made
    assert "x-ratelimit-remaining-requests" in got.headers
    listed = await (await client.get(f"{path}/input_items", headers=auth())).get_json()
    check("ResponseItemList", listed)
    assert [item["role"] for item in listed["data"]] == ["user", "developer"]
    assert (await client.get(path, headers=auth("sk-other"))).status_code == 404
    assert (await client.delete(path, headers=auth("sk-other"))).status_code == 404
    deleted = await client.delete(path, headers=auth())
    assert await deleted.get_json() == {
        "id": made["id"],
        "object": "response.deleted",
        "deleted": True,
    }
    missing = await client.get(path, headers=auth())
    assert missing.status_code == 404
    check("ErrorResponse", await missing.get_json())
    assert (await client.get(f"{path}/input_items", headers=auth())).status_code == 404


async def test_retrieving_consumes_nothing(client) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, max_output_tokens=5)).get_json()
    before = await used(client, "sk-big")
    await client.get(f"/v1/responses/{made['id']}", headers=auth())
    await client.get(f"/v1/responses/{made['id']}/input_items", headers=auth())
    assert await used(client, "sk-big") == before


# --- input_tokens -------------------------------------------------------------------------


async def test_input_tokens_is_the_count_admission_uses_and_costs_one_request(client) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "gpt-4o", "input": "How many tokens am I?", "instructions": "Count."}
    counted = await client.post("/v1/responses/input_tokens", json=body, headers=auth("sk-small"))
    assert counted.status_code == 200
    answer = await counted.get_json()
    assert answer["object"] == "response.input_tokens"
    assert await used(client, "sk-small") == {
        "requests": 1,
        "input_tokens": 0,
        "output_tokens": 0,
    }
    assert counted.headers["x-ratelimit-remaining-requests"] == "2"
    made = await (await create(client, "sk-small", **body)).get_json()
    assert answer["input_tokens"] == made["usage"]["input_tokens"]


async def test_input_tokens_counts_a_previous_response_and_is_refused_past_the_rpm(client) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, "sk-small", max_output_tokens=5)).get_json()
    body = {"model": "gpt-4o", "input": "hi", "previous_response_id": made["id"]}
    counted = await client.post("/v1/responses/input_tokens", json=body, headers=auth("sk-small"))
    alone = await client.post(
        "/v1/responses/input_tokens",
        json={**body, "previous_response_id": None},
        headers=auth("sk-small"),
    )
    prior = made["usage"]["input_tokens"] + made["usage"]["output_tokens"]
    tokens = (await counted.get_json())["input_tokens"]
    assert tokens == (await alone.get_json())["input_tokens"] + prior
    refused = await client.post("/v1/responses/input_tokens", json=body, headers=auth("sk-small"))
    assert refused.status_code == 429


# --- models -------------------------------------------------------------------------------


async def test_models_are_listed_and_retrieved_in_the_specs_shape(served_client) -> None:  # type: ignore[no-untyped-def]
    listed = await (await served_client.get("/v1/models", headers=auth())).get_json()
    check("ListModelsResponse", listed)
    assert [m["id"] for m in listed["data"]] == SERVED
    one = await served_client.get("/v1/models/gpt-4o-mini", headers=auth())
    assert one.status_code == 200
    check("Model", await one.get_json())
    missing = await served_client.get("/v1/models/gpt-5-ultra", headers=auth())
    assert missing.status_code == 404
    error = await missing.get_json()
    check("ErrorResponse", error)
    assert error["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
async def test_a_model_the_mock_does_not_serve_is_404_and_costs_nothing(
    served_client: Any, path: str
) -> None:
    body = {"model": "gpt-5-ultra", "input": "hi", "messages": [{"role": "user", "content": "hi"}]}
    response = await served_client.post(path, json=body, headers=auth())
    assert response.status_code == 404
    assert (await response.get_json())["error"]["code"] == "model_not_found"
    assert set((await used(served_client, "sk-big")).values()) == {0}


async def test_without_mock_models_every_model_is_answered(client) -> None:  # type: ignore[no-untyped-def]
    assert (await create(client, model="any-model-at-all")).status_code == 200


# --- the stream, from the dialect ---------------------------------------------------------


def parsed(raw: bytes) -> tuple[str, dict[str, Any]]:
    name, data = raw.decode().removesuffix("\n\n").split("\n")
    return name.removeprefix("event: "), json.loads(data.removeprefix("data: "))


@pytest.mark.parametrize(("max_tokens", "terminal"), [(100, "completed"), (3, "incomplete")])
def test_every_streamed_event_matches_the_spec_in_order(max_tokens: int, terminal: str) -> None:
    reply = mock_reply("gpt-4o", [{"role": "user", "content": "hi"}], 1, max_tokens)
    request = {"model": "gpt-4o", "input": "hi", "max_output_tokens": max_tokens}
    events = list(response_events(reply, request, 9))
    types = []
    for number, (raw, tokens) in enumerate(events):
        name, event = parsed(raw)
        assert name == event["type"] and event["sequence_number"] == number
        check(stream_event_schema(event["type"]), event)
        assert tokens == (1 if event["type"] == "response.output_text.delta" else 0)
        types.append(event["type"])
    words = len(reply.choices[0].words)
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * words,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{terminal}",
    ]
    final = parsed(events[-1][0])[1]["response"]
    assert final["usage"]["output_tokens"] == words and final["usage"]["input_tokens"] == 9
    if terminal == "incomplete":
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_the_spec_check_refuses_what_is_not_a_response() -> None:
    reply = mock_reply("gpt-4o", [], 1, 5)
    raw, _ = next(iter(response_events(reply, {"model": "gpt-4o"}, 1)))
    event = parsed(raw)[1]
    del event["response"]["output"]
    with pytest.raises(jsonschema.ValidationError):
        check("ResponseCreatedEvent", event)


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed"]
)
def test_the_meter_settles_to_whichever_terminal_event_arrives(terminal: str) -> None:
    meter = ResponsesMeter()
    delta = {"type": "response.output_text.delta", "delta": "Hello there", "sequence_number": 4}
    assert meter.read(json.dumps(delta).encode())
    assert meter.usage is None
    usage = {
        "input_tokens": 40,
        "input_tokens_details": {"cached_tokens": 32},
        "output_tokens": 25,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 65,
    }
    final = {"type": terminal, "sequence_number": 5, "response": {"id": "resp_1", "usage": usage}}
    assert meter.read(json.dumps(final).encode())  # the client gets it too
    assert meter.usage is not None
    # cached tokens are input, reasoning tokens output: both as reported
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (40, 25)
    assert meter.output_tokens("gpt-4o") == count_text("gpt-4o", "Hello there")
    error = APIError(502, "The upstream broke.", "server_error", code="upstream_unavailable")
    name, event = parsed(meter.error_event(error))
    check("ResponseErrorEvent", event)
    assert (name, event["sequence_number"]) == ("error", 6)


@pytest.mark.parametrize("models", [[], "gpt-4o", [""], [1], ["gpt-4o", "gpt-4o"]])
def test_mock_models_must_be_distinct_names(models: Any) -> None:
    with pytest.raises(ConfigError, match=r"<test>: mock.models: must be a list of distinct"):
        parse_settings({**CONFIG, "mock": {"models": models}}, "<test>")
