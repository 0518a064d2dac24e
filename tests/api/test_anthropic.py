"""Anthropic's Messages API through the app (mock mode): shapes, errors, headers, counts.

Every answer and event is parsed with the ``anthropic`` SDK's own types, unknown fields
forbidden (tests/support/anthropic_types.py). The SDK itself, over real HTTP, is in
tests/api/test_anthropic_sdk.py; proxy mode in tests/upstreams/test_proxy_anthropic.py.
"""

from __future__ import annotations

import base64
import calendar
import json
import struct
import time
import zlib
from typing import Any

import pytest

from drivers.memory import MemoryStore
from tests.support.anthropic_types import (
    ErrorResponse,
    Message,
    MessageTokensCount,
    RawMessageStreamEvent,
    strictly,
)
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.counting.claude import (
    DEFAULT_INPUT_FACTOR,
    IMAGE_MOST_TOKENS,
    estimate_claude_prompt,
    estimate_claude_text,
)
from tokenguard.upstreams.mock import FIRST_WORD

MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Say hello to the rate limiter."}]
CONFIG = {
    "server": {"max_body_bytes": 8192},
    "keys": [
        {"key": "sk-big", "name": "big", "rpm": 1000, "input_tpm": 100000, "output_tpm": 100000},
        {"key": "sk-two", "name": "two", "rpm": 2, "input_tpm": 100000, "output_tpm": 100000},
        {"key": "sk-one", "name": "one", "rpm": 100, "max_concurrent": 1},
        {"key": "sk-tpm", "name": "tpm", "rpm": 100, "input_tpm": 60, "output_tpm": 100000},
        # A budget of 2,000 micro-units at 1 micro-unit a token (the prices below).
        {"key": "sk-budget", "name": "budget", "rpm": 100, "spend_per_day": 0.002},
        {"key": "sk-users", "name": "users", "rpm": 100, "per_user": {"rpm": 1}},
    ],
    "prices": {MODEL: {"input": 1.0, "cached_input": 0.1, "output": 1.0}},
}


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    return create_app(parse_settings(CONFIG, "<test>"), MemoryStore()).test_client()


def headers(key: str = "sk-big", **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", **extra}


async def messages(client, key: str = "sk-big", **body: Any):  # type: ignore[no-untyped-def]
    payload = {"model": MODEL, "max_tokens": 30, "messages": MESSAGES, **body}
    return await client.post("/v1/messages", json=payload, headers=headers(key))


async def used(client, key: str = "sk-big") -> dict[str, int]:  # type: ignore[no-untyped-def]
    response = await client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    return {n: d["used"] for n, d in (await response.get_json())["dimensions"].items() if d}


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each event of an Anthropic stream."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: ")
            events.append((name[len("event: ") :], json.loads(data[len("data: ") :])))
    return events


async def test_a_message_answer_parses_strictly_and_is_settled_to_its_usage(client) -> None:  # type: ignore[no-untyped-def]
    response = await messages(client, max_tokens=30)
    assert response.status_code == 200
    message = strictly(Message, await response.get_json())
    assert message.role == "assistant" and message.model == MODEL
    assert message.content[0].text.startswith(FIRST_WORD)
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == estimate_claude_prompt(None, MESSAGES, None)
    assert message.usage.cache_read_input_tokens == 0
    assert 0 < message.usage.output_tokens <= 30
    assert await used(client) == {
        "requests": 1,
        "input_tokens": message.usage.input_tokens,
        "output_tokens": message.usage.output_tokens,
    }


async def test_a_reply_cut_by_max_tokens_says_max_tokens(client) -> None:  # type: ignore[no-untyped-def]
    message = strictly(Message, await (await messages(client, max_tokens=2)).get_json())
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2


async def test_every_streamed_event_parses_strictly_in_anthropics_order(client) -> None:  # type: ignore[no-untyped-def]
    # quart-trio's test client buffers ~10 chunks: a short stream (long ones: the SDK tests).
    response = await messages(client, max_tokens=3, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(await response.get_data())
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for name, data in events:
        assert data["type"] == name
        if name == "ping":
            assert data == {"type": "ping"}  # not in the SDK's union: it skips pings
        else:
            strictly(RawMessageStreamEvent, data)
    start, delta = events[0][1], events[-2][1]
    prompt = estimate_claude_prompt(None, MESSAGES, None)
    assert start["message"]["usage"]["input_tokens"] == prompt
    assert delta["usage"]["output_tokens"] == 3 and delta["delta"]["stop_reason"] == "max_tokens"
    assert (await used(client))["output_tokens"] == 3


async def test_answers_carry_anthropics_ratelimit_headers_with_rfc3339_resets(client) -> None:  # type: ignore[no-untyped-def]
    before = time.time()
    response = await messages(client, "sk-two", max_tokens=10)
    h = response.headers
    assert h["anthropic-ratelimit-requests-limit"] == "2"
    assert h["anthropic-ratelimit-requests-remaining"] == "1"
    assert h["anthropic-ratelimit-input-tokens-limit"] == "100000"
    prompt = estimate_claude_prompt(None, MESSAGES, None)
    assert h["anthropic-ratelimit-input-tokens-remaining"] == str(100000 - prompt)
    assert h["anthropic-ratelimit-output-tokens-remaining"] == str(100000 - 10)
    assert h["anthropic-ratelimit-tokens-limit"] == "100000"
    for family in ("requests", "input-tokens", "output-tokens", "tokens"):
        reset = h[f"anthropic-ratelimit-{family}-reset"]
        moment = calendar.timegm(time.strptime(reset, "%Y-%m-%dT%H:%M:%SZ"))
        assert before <= moment <= before + 3600
    assert not any(name.lower().startswith("x-ratelimit-") for name in h.keys())


async def test_a_refusal_is_anthropics_429_with_retry_after(client) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):
        assert (await messages(client, "sk-two", max_tokens=5)).status_code == 200
    response = await messages(client, "sk-two", max_tokens=5)
    assert response.status_code == 429
    error = strictly(ErrorResponse, await response.get_json())
    assert error.error.type == "rate_limit_error"
    assert "requests per min" in error.error.message
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert (await used(client, "sk-two"))["requests"] == 2


async def test_a_spent_budget_is_anthropics_429_naming_the_budget(client) -> None:  # type: ignore[no-untyped-def]
    admitted = 0
    while (response := await messages(client, "sk-budget", max_tokens=100)).status_code == 200:
        admitted += 1
        assert admitted < 200, "the budget never ran out"
    assert admitted >= 1 and response.status_code == 429
    error = strictly(ErrorResponse, await response.get_json())
    assert error.error.type == "rate_limit_error"
    assert "budget of key 'budget'" in error.error.message and "spend" in error.error.message
    assert int(response.headers["retry-after"]) >= 1
    spent = (await used(client, "sk-budget"))["spend"]
    assert spent <= 2000
    assert (await messages(client, "sk-budget", max_tokens=100)).status_code == 429
    assert (await used(client, "sk-budget"))["spend"] == spent  # refusals cost nothing


async def test_metadata_user_id_names_the_end_user_of_per_user_limits(client) -> None:  # type: ignore[no-untyped-def]
    def as_user(user: str) -> dict[str, Any]:
        return {"metadata": {"user_id": user}, "max_tokens": 5}

    assert (await messages(client, "sk-users", **as_user("alice"))).status_code == 200
    refused = await messages(client, "sk-users", **as_user("alice"))
    assert refused.status_code == 429
    assert strictly(ErrorResponse, await refused.get_json()).error.type == "rate_limit_error"
    assert (await messages(client, "sk-users", **as_user("bob"))).status_code == 200


async def test_a_token_refusal_names_the_input_dimension(client) -> None:  # type: ignore[no-untyped-def]
    long = [{"role": "user", "content": "word " * 100}]
    response = await messages(client, "sk-tpm", messages=long)
    assert response.status_code == 429
    error = strictly(ErrorResponse, await response.get_json())
    assert error.error.type == "rate_limit_error" and "input tokens" in error.error.message


@pytest.mark.parametrize(
    ("request_headers", "status", "kind", "words"),
    [
        ({"anthropic-version": "2023-06-01"}, 401, "authentication_error", "x-api-key"),
        (headers("sk-nope"), 401, "authentication_error", "Incorrect API key"),
        ({"x-api-key": "sk-big"}, 400, "invalid_request_error", "anthropic-version"),
        (headers(**{"anthropic-version": "latest"}), 400, "invalid_request_error", "version"),
        (headers(**{"anthropic-beta": "a b\tc"}), 400, "invalid_request_error", "anthropic-beta"),
        (
            {**headers(), "Authorization": "Bearer sk-big"},
            400,
            "invalid_request_error",
            "exactly one credential",
        ),
    ],
)
async def test_bad_credentials_and_versions_are_refused_in_anthropics_shape(  # type: ignore[no-untyped-def]
    client, request_headers: dict[str, str], status: int, kind: str, words: str
) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
    response = await client.post("/v1/messages", json=body, headers=request_headers)
    assert response.status_code == status
    error = strictly(ErrorResponse, await response.get_json())
    assert error.type == "error" and error.error.type == kind
    assert words in error.error.message
    assert (await used(client)) == {"requests": 0, "input_tokens": 0, "output_tokens": 0}


async def test_a_bearer_token_is_accepted_as_the_key(client) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
    auth = {"Authorization": "Bearer sk-big", "anthropic-version": "2023-06-01"}
    response = await client.post("/v1/messages", json=body, headers=auth)
    assert response.status_code == 200


TEXT = {"type": "text", "text": "hi"}
HOSTILE_BODIES = [
    ({"messages": MESSAGES, "max_tokens": 5}, "model"),
    ({"model": MODEL, "messages": MESSAGES}, "max_tokens"),
    ({"model": MODEL, "max_tokens": 0, "messages": MESSAGES}, "max_tokens"),
    ({"model": MODEL, "max_tokens": "9", "messages": MESSAGES}, "max_tokens"),
    ({"model": MODEL, "max_tokens": 5}, "messages"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user"}]}, "content"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": 7}]}, "content"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{}]}]}, "type"),
    (
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text"}]}],
        },
        "messages.0.content.0.text",
    ),
    (
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "x"}}]}],
        },
        "source.type",
    ),
    (
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}
            ],
        },
        "input",
    ),
    (
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}],
        },
        "tool_use_id",
    ),
    (
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{**TEXT, "cache_control": {"type": "x"}}]}],
        },
        "cache_control",
    ),
    ({"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "system": 5}, "system"),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "system": [{"type": "image"}]},
        "system",
    ),
    ({"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "tools": {}}, "tools"),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "tools": [{"name": "f"}]},
        "input_schema",
    ),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "tool_choice": {"type": "x"}},
        "tool_choice",
    ),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "tool_choice": {"type": "tool"}},
        "name",
    ),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "stop_sequences": "x"},
        "stop_sequences",
    ),
    ({"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "temperature": 2}, "temperature"),
    ({"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "top_p": -1}, "top_p"),
    ({"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "top_k": 1.5}, "top_k"),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "metadata": {"user_id": 1}},
        "user_id",
    ),
    (
        {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "thinking": {"type": "on"}},
        "thinking",
    ),
    (
        {"model": MODEL, "max_tokens": 5000, "messages": MESSAGES, "thinking": {"type": "enabled"}},
        "budget_tokens",
    ),
    (
        {
            "model": MODEL,
            "max_tokens": 5000,
            "messages": MESSAGES,
            "thinking": {"type": "enabled", "budget_tokens": 10},
        },
        "budget_tokens",
    ),
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize(("body", "words"), HOSTILE_BODIES)
async def test_invalid_bodies_are_anthropics_400_and_consume_nothing(  # type: ignore[no-untyped-def]
    client, body: Any, words: str
) -> None:
    response = await client.post("/v1/messages", json=body, headers=headers())
    assert response.status_code == 400
    error = strictly(ErrorResponse, await response.get_json())
    assert error.error.type == "invalid_request_error"
    assert words in error.error.message
    assert (await used(client)) == {"requests": 0, "input_tokens": 0, "output_tokens": 0}


async def test_an_unknown_path_and_a_large_body_answer_in_anthropics_shape(client) -> None:  # type: ignore[no-untyped-def]
    big = [{"role": "user", "content": "x" * 9000}]
    response = await messages(client, messages=big)
    assert response.status_code == 413
    body = await response.get_json()
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}


def png(width: int, height: int) -> str:
    """A base64 PNG whose header says ``width`` x ``height`` (the pixels are not read)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
    return base64.b64encode(head + struct.pack(">I", zlib.crc32(chunk))).decode()


def image(data: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((200, 200), 54),  # 40,000 px / 750, rounded up
        ((1000, 1000), 1334),
        ((4000, 1000), 820),  # scaled to 1568 px on its long edge: 1568 x 392
        ((1500, 1500), 1533),  # scaled to 1.15 megapixels: 1072 x 1072
    ],
)
async def test_an_image_costs_its_pixels_over_750(
    client, size: tuple[int, int], tokens: int
) -> None:  # type: ignore[no-untyped-def]
    content = [image(png(*size)), {"type": "text", "text": "What is it?"}]
    with_image = [{"role": "user", "content": content}]
    text_only = [{"role": "user", "content": "What is it?"}]
    response = await client.post(
        "/v1/messages/count_tokens",
        json={"model": MODEL, "messages": with_image},
        headers=headers(),
    )
    counted = strictly(MessageTokensCount, await response.get_json()).input_tokens
    assert counted == estimate_claude_prompt(None, text_only, None) + tokens


async def test_an_image_by_url_costs_the_most_an_image_can(client) -> None:  # type: ignore[no-untyped-def]
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    counted = estimate_claude_prompt(None, [{"role": "user", "content": [url]}], None)
    assert counted == estimate_claude_prompt(None, [{"role": "user", "content": []}], None) + (
        IMAGE_MOST_TOKENS
    )


async def test_the_estimate_scales_every_text_the_model_reads(client) -> None:  # type: ignore[no-untyped-def]
    tool = {"name": "lookup", "description": "Find a word", "input_schema": {"type": "object"}}
    history = [
        {"role": "user", "content": "Define limiter"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "The user wants a definition", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"word": "limiter"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "one that limits"}],
        },
    ]
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    texts = [
        "Be brief.",
        "Define limiter",
        "The user wants a definition",
        "lookup",
        '{"word":"limiter"}',
        "one that limits",
        "lookup",
        "Find a word",
        '{"type":"object"}',
    ]
    expected = estimate_claude_text(texts, DEFAULT_INPUT_FACTOR) + 3 + 3 * len(history)
    body = {"model": MODEL, "system": system, "messages": history, "tools": [tool]}
    response = await client.post("/v1/messages/count_tokens", json=body, headers=headers())
    assert (await response.get_json()) == {"input_tokens": expected}
    answer = await messages(
        client, system=system, messages=history, tools=[tool], tool_choice={"type": "auto"}
    )
    assert strictly(Message, await answer.get_json()).usage.input_tokens == expected


async def test_count_tokens_is_admitted_as_one_request_and_no_tokens(client) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "messages": MESSAGES}
    response = await client.post("/v1/messages/count_tokens", json=body, headers=headers("sk-two"))
    assert response.status_code == 200
    count = strictly(MessageTokensCount, await response.get_json())
    assert count.input_tokens == estimate_claude_prompt(None, MESSAGES, None)
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert await used(client, "sk-two") == {"requests": 1, "input_tokens": 0, "output_tokens": 0}


async def test_count_tokens_refuses_bad_bodies_and_spent_keys_in_anthropics_shape(client) -> None:  # type: ignore[no-untyped-def]
    bad = await client.post("/v1/messages/count_tokens", json={"model": MODEL}, headers=headers())
    assert bad.status_code == 400
    assert strictly(ErrorResponse, await bad.get_json()).error.type == "invalid_request_error"
    body = {"model": MODEL, "messages": MESSAGES}
    for _ in range(2):
        await client.post("/v1/messages/count_tokens", json=body, headers=headers("sk-two"))
    refused = await client.post("/v1/messages/count_tokens", json=body, headers=headers("sk-two"))
    assert refused.status_code == 429
    assert strictly(ErrorResponse, await refused.get_json()).error.type == "rate_limit_error"


async def test_one_key_spends_one_budget_through_chat_and_messages(client) -> None:  # type: ignore[no-untyped-def]
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4},
        headers={"Authorization": "Bearer sk-two"},
    )
    assert chat.status_code == 200
    assert (await messages(client, "sk-two", max_tokens=4)).status_code == 200
    refused = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4},
        headers={"Authorization": "Bearer sk-two"},
    )
    assert refused.status_code == 429
    assert (await refused.get_json())["error"]["code"] == "rate_limit_exceeded"  # OpenAI's shape
    chat_body, spent = await chat.get_json(), await used(client, "sk-two")
    assert spent["requests"] == 2
    assert spent["output_tokens"] == chat_body["usage"]["completion_tokens"] + 4
