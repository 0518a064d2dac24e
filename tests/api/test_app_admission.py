"""The HTTP surface through the app: what a key is admitted, refused, reserved and charged.

A chat completion's shape and usage, the ``x-ratelimit-*`` headers (each once, on every
answer), OpenAI's 429 naming the dimension, a request that can never fit, the default
reservation, every length field and choice reserved, streams with and without usage,
``/v1/usage``, ``/v1/models`` and ``/healthz``.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support.chat_app import MESSAGES, auth, chat, used
from tokenguard.counting import count_chat_prompt, count_text
from tokenguard.upstreams.mock import FIRST_WORD


async def test_chat_completion_shape_and_usage(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, max_tokens=30)
    assert response.status_code == 200
    body = await response.get_json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith(FIRST_WORD)
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_chat_prompt("gpt-4o", MESSAGES)
    assert usage["completion_tokens"] == count_text("gpt-4o", choice["message"]["content"])
    assert usage["completion_tokens"] <= 30
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_reply_bounded_by_max_tokens_and_settled(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, max_tokens=3, n=2)
    body = await response.get_json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 6
    dims = await used(client, "sk-big")
    # Reserved 3 x 2, settled to the 6 produced; input counted exactly.
    assert dims["output_tokens"]["used"] == 6
    assert dims["input_tokens"]["used"] == body["usage"]["prompt_tokens"]
    assert dims["requests"]["used"] == 1


async def test_ratelimit_headers_on_success(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, "sk-small", max_tokens=10)
    assert response.status_code == 200
    h = response.headers
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "2"
    assert h["x-ratelimit-limit-input-tokens"] == "200"
    prompt = count_chat_prompt("gpt-4o", MESSAGES)
    assert h["x-ratelimit-remaining-input-tokens"] == str(200 - prompt)
    assert h["x-ratelimit-limit-output-tokens"] == "100"
    assert h["x-ratelimit-remaining-output-tokens"] == "90"  # the reservation, before settling
    assert h["x-ratelimit-limit-tokens"] == "100"  # output (90%) is tighter than input
    for name in ("requests", "tokens", "input-tokens", "output-tokens"):
        assert h[f"x-ratelimit-reset-{name}"].endswith("s")


async def test_every_answer_carries_each_ratelimit_header_once(client) -> None:  # type: ignore[no-untyped-def]
    # The headers of admitted answers bypass werkzeug (added to the ASGI start message):
    # whole, streamed and embedding answers each carry all twelve, once; an error
    # answer after an admission carries its own (the refusal's), not the stashed ones.
    names = [
        f"x-ratelimit-{kind}-{family}"
        for family in ("requests", "tokens", "input-tokens", "output-tokens")
        for kind in ("limit", "remaining", "reset")
    ]
    answers = [
        await chat(client, "sk-small", max_tokens=10),
        await chat(client, "sk-small", max_tokens=3, stream=True),  # (short: test client)
        await client.post(
            "/v1/embeddings",
            json={"model": "text-embedding-3-small", "input": "hi"},
            headers=auth("sk-small"),
        ),
    ]
    for response in answers:
        assert response.status_code == 200
        for name in names:
            assert len(response.headers.getlist(name)) == 1, name
    remaining = [r.headers["x-ratelimit-remaining-requests"] for r in answers]
    assert remaining == ["2", "1", "0"]
    refused = await chat(client, "sk-small", max_tokens=10)
    assert refused.status_code == 429
    assert refused.headers.getlist("x-ratelimit-remaining-requests") == ["0"]


async def test_rpm_exhausted_gives_openai_429(client, clock) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        assert (await chat(client, "sk-small", max_tokens=1)).status_code == 200
    clock.now += 7.5
    response = await chat(client, "sk-small", max_tokens=1)
    assert response.status_code == 429
    body = await response.get_json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    message = body["error"]["message"]
    assert "requests per min (RPM)" in message
    assert "Limit 3, Used 3, Requested 1" in message
    # Admitted at t = 0 (bucket 0, which leaves at 65 s): 57.5 s from now.
    assert "try again in 57.5s" in message
    assert response.headers["retry-after"] == "58"
    assert response.headers["retry-after-ms"] == "57500"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 57.5
    assert (await chat(client, "sk-small", max_tokens=1)).status_code == 200


async def test_token_limit_429_names_dimension(client) -> None:  # type: ignore[no-untyped-def]
    first = await chat(client, "sk-small", max_tokens=60)
    assert first.status_code == 200
    spent = (await first.get_json())["usage"]["completion_tokens"]
    # Settled to what the reply used: exactly the rest of the 100 still fits, one more not.
    response = await chat(client, "sk-small", max_tokens=100 - spent + 1)
    assert response.status_code == 429
    body = await response.get_json()
    assert body["error"]["type"] == "tokens"
    assert "output tokens per min (output TPM)" in body["error"]["message"]
    assert f"Limit 100, Used {spent}, Requested {101 - spent}" in body["error"]["message"]
    assert (await chat(client, "sk-small", max_tokens=100 - spent)).status_code == 200


async def test_request_that_can_never_fit_says_so(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, "sk-small", max_tokens=101)
    assert response.status_code == 429
    body = await response.get_json()
    assert "can never fit" in body["error"]["message"]
    assert "retry-after" not in response.headers
    dims = await used(client, "sk-small")
    assert dims["requests"]["used"] == 0


async def test_default_reservation_when_no_max_tokens(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, "sk-small")
    assert response.status_code == 200
    # The tier's default_max_tokens (20) was reserved and bounds the reply.
    assert response.headers["x-ratelimit-remaining-output-tokens"] == "80"
    body = await response.get_json()
    assert body["usage"]["completion_tokens"] <= 20


async def test_unlimited_key_has_no_limit_headers(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, "sk-open")
    assert response.status_code == 200
    assert not [h for h in response.headers.keys() if h.lower().startswith("x-ratelimit")]


async def test_models_and_healthz(client) -> None:  # type: ignore[no-untyped-def]
    response = await client.get("/v1/models", headers=auth())
    assert response.status_code == 200
    body = await response.get_json()
    assert body["object"] == "list"
    assert "gpt-4o" in {m["id"] for m in body["data"]}
    assert (await client.get("/v1/models")).status_code == 401
    health = await client.get("/healthz")
    assert health.status_code == 200
    assert (await health.get_json())["status"] == "ok"


async def test_usage_endpoint(client) -> None:  # type: ignore[no-untyped-def]
    await chat(client, "sk-small", max_tokens=5)
    response = await client.get("/v1/usage", headers=auth("sk-small"))
    body = await response.get_json()
    assert body["key"] == "small"
    assert body["window_seconds"] == 60
    assert body["dimensions"]["requests"] == {
        "limit": 3,
        "used": 1,
        "remaining": 2,
        "reset_seconds": 65.0,
    }
    assert response.headers["x-ratelimit-remaining-requests"] == "2"


def sse_events(raw: bytes) -> list[Any]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: ")
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_streaming_with_usage(client) -> None:  # type: ignore[no-untyped-def]
    # quart-trio's test client buffers at most ~10 chunks before the body is read, so
    # streams here stay short; long and interrupted streams are tested over real HTTP.
    response = await chat(client, max_tokens=4, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(await response.get_data())
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == []
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e["choices"]
    )
    assert usage_event["usage"]["completion_tokens"] == count_text("gpt-4o", text)
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert all("usage" in e for e in events[:-1])
    dims = await used(client, "sk-big")
    assert dims["output_tokens"]["used"] == usage_event["usage"]["completion_tokens"]


async def test_streaming_without_usage_has_no_usage_field(client) -> None:  # type: ignore[no-untyped-def]
    response = await chat(client, max_tokens=4, stream=True)
    events = sse_events(await response.get_data())
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_every_length_field_and_choice_is_reserved(client) -> None:  # type: ignore[no-untyped-def]
    # The reservation is the longest reply named in any field an upstream reads, times
    # every choice generated (the mock answers n of them, at most that long).
    limit = 100_000
    cases = [
        ({"max_tokens": 1, "n_predict": 500}, 500),
        ({"max_new_tokens": 40}, 40),
        ({"max_output_tokens": 7, "max_completion_tokens": 9}, 9),
        ({"max_tokens": 5, "n": 2, "best_of": 3}, 15),
        ({"max_tokens": 5, "n_cmpl": 4}, 20),
    ]
    for fields, expected in cases:
        before = (await used(client, "sk-big"))["output_tokens"]["used"]
        response = await chat(client, **fields)
        assert response.status_code == 200, fields
        remaining = int(response.headers["x-ratelimit-remaining-output-tokens"])
        assert limit - before - remaining == expected, fields
