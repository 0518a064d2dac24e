"""The HTTP surface through the app: every status, body and header a client relies on."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import trio

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.api.pipeline import COUNT_OFF_LOOP_BYTES
from tokenguard.config.loading import parse_settings
from tokenguard.counting import COUNT_CACHE, count_chat_prompt, count_text
from tokenguard.counting.encodings import _encoding_name_of
from tokenguard.counting.media import vision_cost
from tokenguard.errors import APIError
from tokenguard.limiting.limiter import Cost
from tokenguard.model import digest_of
from tokenguard.store.window_store import StoreError
from tokenguard.upstreams.mock import FIRST_WORD

CONFIG = {
    "server": {"max_body_bytes": 4096},
    "tiers": {"small": {"rpm": 3, "input_tpm": 200, "output_tpm": 100, "default_max_tokens": 20}},
    "keys": [
        {"key": "sk-small", "name": "small", "tier": "small"},
        {"key": "sk-big", "name": "big", "rpm": 1000, "input_tpm": 100000, "output_tpm": 100000},
        {"key": "sk-open", "name": "open"},
    ],
}
MESSAGES = [{"role": "user", "content": "Say hello to the rate limiter."}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock):  # type: ignore[no-untyped-def]
    settings = parse_settings(CONFIG, "<test>")
    return create_app(settings, MemoryStore(clock=clock))


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


def auth(key: str = "sk-big") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def chat(client, key: str = "sk-big", **body: Any):  # type: ignore[no-untyped-def]
    payload = {"model": "gpt-4o", "messages": MESSAGES, **body}
    return await client.post("/v1/chat/completions", json=payload, headers=auth(key))


async def used(client, key: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    response = await client.get("/v1/usage", headers=auth(key))
    assert response.status_code == 200
    return (await response.get_json())["dimensions"]


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


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "You didn't provide an API key"),
        ({"Authorization": ""}, "You didn't provide an API key"),
        ({"Authorization": "sk-big"}, "Malformed Authorization header"),
        ({"Authorization": "Basic c2stYmln"}, "Malformed Authorization header"),
        ({"Authorization": "Bearer "}, "Malformed Authorization header"),
        ({"Authorization": "Bearer sk-nope"}, "Incorrect API key provided"),
    ],
)
async def test_bad_credentials_are_401(client, headers, message) -> None:  # type: ignore[no-untyped-def]
    response = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}, headers=headers
    )
    assert response.status_code == 401
    body = await response.get_json()
    assert body["error"]["code"] == "invalid_api_key"
    assert message in body["error"]["message"]
    assert not [h for h in response.headers.keys() if h.lower().startswith("x-ratelimit")]


async def test_bearer_scheme_is_case_insensitive(client) -> None:  # type: ignore[no-untyped-def]
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"Authorization": "bearer sk-big"},
    )
    assert response.status_code == 200


BAD_BODIES = [
    (b"{not json", None, "could not parse the JSON body"),
    (b'{"model": "gpt-4o", "messages": []} trailing', None, "could not parse"),
    (b"[1, 2]", None, "must be a JSON object"),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": NaN}',
        None,
        "numbers must be finite",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], '
        b'"max_tokens": 1, "max_tokens": 1000}',
        "max_tokens",
        "duplicate key",
    ),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "model"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model", "model"),
    (b'{"model": "gpt-4o"}', "messages", "messages is required"),
    (b'{"model": "gpt-4o", "messages": []}', "messages", "at least one message"),
    (b'{"model": "gpt-4o", "messages": "hi"}', "messages", "array"),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "wizard", "content": "x"}]}',
        "messages[0].role",
        "role must be one of",
    ),
    (b'{"model": "gpt-4o", "messages": [{"content": "x"}]}', "messages[0].role", "role"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user"}]}', "messages[0].content", "required"),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}',
        "messages[0].content",
        "string or an array",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        "max_tokens",
        "at least 1",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
        "max_tokens",
        "at least 1",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": "100"}',
        "max_tokens",
        "integer",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}',
        "max_tokens",
        "integer",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}',
        "max_tokens",
        "integer",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], '
        b'"max_tokens": 4294967296}',
        "max_tokens",
        "at most",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": 100000}',
        "n",
        "at most",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        "stream",
        "boolean",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], '
        b'"stream_options": {"include_usage": true}}',
        "stream_options",
        "only allowed",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages[0].content",
        "surrogate",
    ),
    (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        None,
        "not valid UTF-8",
    ),
    (b"[" * 100_000 + b"]" * 100_000, None, None),
    # every field an upstream reads as a reply's length or choice count is checked
    *[
        (
            json.dumps({"model": "gpt-4o", "messages": MESSAGES, name: bad}).encode(),
            name,
            message,
        )
        for name, bad, message in (
            ("n_predict", -1, "at least 1"),
            ("n_predict", "50000", "integer"),
            ("max_new_tokens", 0, "at least 1"),
            ("max_output_tokens", 1.5, "integer"),
            ("max_completion_tokens", 2**31, "at most"),
            ("min_tokens", -1, "from 0"),
            ("min_tokens", "5", "from 0"),
            ("n_cmpl", 0, "at least 1"),
            ("best_of", 21, "at most"),
        )
    ],
    (
        json.dumps({"model": "gpt-4o", "messages": MESSAGES, "n": 3, "best_of": 2}).encode(),
        "best_of",
        "at least n",
    ),
    (
        json.dumps({"model": "m" * 257, "messages": MESSAGES}).encode(),
        "model",
        "at most 256 characters",
    ),
]


@pytest.mark.parametrize(("data", "param", "message"), BAD_BODIES)
async def test_bad_bodies_are_400_and_consume_nothing(  # type: ignore[no-untyped-def]
    app, data, param, message
) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # the deep-nesting body is 200 kB
    client = app.test_client()
    response = await client.post(
        "/v1/chat/completions",
        data=data,
        headers={**auth("sk-small"), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, await response.get_data()
    body = await response.get_json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    if message:
        assert message in body["error"]["message"]
    # An authenticated error still carries the key's rate-limit headers.
    assert response.headers["x-ratelimit-remaining-requests"] == "3"
    dims = await used(client, "sk-small")
    assert all(d["used"] == 0 for d in dims.values())


async def test_oversized_body_is_413(client) -> None:  # type: ignore[no-untyped-def]
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]})
    response = await client.post(
        "/v1/chat/completions",
        data=big.encode(),
        headers={**auth("sk-small"), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    body = await response.get_json()
    assert body["error"]["code"] == "request_too_large"
    assert "4096 bytes" in body["error"]["message"]
    dims = await used(client, "sk-small")
    assert dims["requests"]["used"] == 0


async def test_unknown_path_and_wrong_method(client) -> None:  # type: ignore[no-untyped-def]
    # `//v1/chat/completions` is checked over real HTTP in test_node_process.py: the test
    # client reads `//v1` as a host.
    for path in ("/v1/nope", "/v1/chat/completions/", "/v1/chat/completions/x"):
        response = await client.post(path, json={}, headers=auth())
        assert response.status_code == 404, path
        body = await response.get_json()
        assert body["error"]["code"] == "unknown_url"
    response = await client.get("/v1/chat/completions", headers=auth())
    assert response.status_code == 405
    assert "error" in await response.get_json()
    assert (await used(client, "sk-big"))["requests"]["used"] == 0


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


async def test_a_model_name_too_long_is_refused_before_anything_keeps_it(  # type: ignore[no-untyped-def]
    app, client, caplog
) -> None:
    gateway = app.extensions["tokenguard"]
    model = "m" * 3000  # (the app's body cap is 4 KiB; tests/test_hostile_input.py: 200 kB)
    await used(client, "sk-big")  # (the key's rows without a model: every answer's headers)
    caches = (_encoding_name_of.cache_info().currsize, vision_cost.cache_info().currsize)
    templates = len(gateway.limiter._templates)  # (the limiter's row cache, by model)
    for path, body in (
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
    ):
        response = await client.post(path, json={**body, "model": model}, headers=auth("sk-big"))
        assert response.status_code == 400, path
        error = (await response.get_json())["error"]
        assert error["param"] == "model" and model not in error["message"]
    assert (_encoding_name_of.cache_info().currsize, vision_cost.cache_info().currsize) == caches
    assert len(gateway.limiter._templates) == templates
    assert model not in gateway.metrics.exposition().decode()
    assert gateway.feed.queued == 0
    assert all(model not in r.getMessage() for r in caplog.records)


class CountingStore(MemoryStore):
    """The memory store, counting the calls the app makes to it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.calls: list[str] = []

    async def admit(self, partition, rows):  # type: ignore[no-untyped-def]
        self.calls.append("admit")
        return await super().admit(partition, rows)

    async def usage(self, partition, rows):  # type: ignore[no-untyped-def]
        self.calls.append("usage")
        return await super().usage(partition, rows)


PRECHECK_CONFIG = {
    "server": {"max_body_bytes": 2 * 1024 * 1024},
    "keys": [
        {"key": "sk-rpm", "name": "rpm", "rpm": 1, "input_tpm": 10**9},
        {"key": "sk-conc", "name": "conc", "max_concurrent": 1, "input_tpm": 10**9},
    ],
}


def large_text() -> str:
    """~900 KiB of text never seen before (so counting it would be a cache miss)."""
    seed = time.perf_counter_ns()
    return " ".join(f"w{seed}x{i}" for i in range(900 * 1024 // 24))[: 900 * 1024]


async def test_a_key_at_its_rpm_is_refused_before_its_large_prompt_is_counted() -> None:
    store = CountingStore(FakeClock())
    client = create_app(parse_settings(PRECHECK_CONFIG, "<test>"), store).test_client()
    # An ordinary body: one store call (the admission), no pre-check.
    assert (await chat(client, "sk-rpm", max_tokens=1)).status_code == 200
    assert store.calls == ["admit"]
    misses = COUNT_CACHE.misses
    text = large_text()
    big = {"messages": [{"role": "user", "content": text}], "max_tokens": 1}
    refused = await chat(client, "sk-rpm", **big)
    assert refused.status_code == 429
    error = (await refused.get_json())["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "Limit 1, Used 1, Requested 1" in error["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert COUNT_CACHE.misses == misses  # the prompt was never counted
    assert store.calls == ["admit", "usage"]  # and nothing was admitted
    # The very 429 an admission gives: same message, same retry-after to the ms.
    small = await chat(client, "sk-rpm", max_tokens=1)
    assert small.status_code == 429
    assert (await small.get_json())["error"] == error
    for header in ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests"):
        assert refused.headers[header] == small.headers[header], header


async def test_a_key_at_its_max_concurrent_is_refused_before_its_large_prompt_is_counted() -> None:
    store = CountingStore(FakeClock())
    app = create_app(parse_settings(PRECHECK_CONFIG, "<test>"), store)
    gateway = app.extensions["tokenguard"]
    in_flight = await gateway.limiter.admit(
        gateway.keyring.by_digest(digest_of("sk-conc")), Cost(1, 1, 1)
    )
    assert in_flight.admitted
    misses = COUNT_CACHE.misses
    big = {"messages": [{"role": "user", "content": large_text()}], "max_tokens": 1}
    refused = await chat(app.test_client(), "sk-conc", **big)
    assert refused.status_code == 429
    assert (await refused.get_json())["error"]["type"] == "concurrency"
    assert refused.headers["retry-after"] == "1"
    assert COUNT_CACHE.misses == misses
    # Once the request in flight ends, the same prompt is counted and admitted.
    await gateway.limiter.settle(in_flight, output_tokens=1)
    admitted = await chat(app.test_client(), "sk-conc", **big)
    assert admitted.status_code == 200
    assert COUNT_CACHE.misses == misses + 1


@pytest.mark.parametrize(
    ("raised", "status", "logged"),
    [
        (ValueError("a bug"), 500, "unexpected error on websocket /boom"),
        (StoreError("down"), 503, "store unavailable: down"),
        (APIError(400, "nope"), 400, None),
    ],
)
async def test_error_handlers_answer_websocket_requests_too(  # type: ignore[no-untyped-def]
    app, caplog, raised, status, logged
) -> None:
    @app.websocket("/boom")
    async def boom() -> None:
        raise raised

    with pytest.raises(BaseException) as caught:  # noqa: PT011 (the test client wraps it)
        async with app.test_client().websocket("/boom") as ws:
            await ws.receive()
    (rejected,) = [
        e for e in getattr(caught.value, "exceptions", [caught.value]) if hasattr(e, "response")
    ]
    assert rejected.response.status_code == status
    assert set(json.loads(await rejected.response.get_data())["error"]) == {
        "message", "type", "param", "code"
    }  # fmt: skip
    # One line of the handler's own (none for a client's error), and no second failure
    # of the handler itself ("Not within a request context").
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == (logged is not None)
    assert all(e.startswith(logged) for e in errors if logged)
    assert not any("context" in r.getMessage() for r in caplog.records)


# --- large prompts ---------------------------------------------------------------------


LARGE_PROMPT_CONFIG = {
    "server": {"max_body_bytes": 2 * 1024 * 1024},
    "keys": [{"key": "sk-large", "name": "large", "input_tpm": 10**9}],
}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_a_large_prompt_is_counted_off_the_event_loop(
    route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt of a large body is counted in a worker thread (tiktoken releases the
    GIL), so the node's event loop keeps serving meanwhile. Shown without a clock: the
    count of the large text waits until a task on the event loop has run; counted on
    the loop, it would wait for nothing (the hang guard ends it). The count is the
    same as in place. (Remembered counts are off: the prompt is counted.)"""
    text = " ".join(f"w{i * 7919 % 100_003}" for i in range(130_000))  # ~1 MB, ~400k tokens
    assert len(text) > COUNT_OFF_LOOP_BYTES
    body: dict[str, Any]
    if route == "/v1/chat/completions":
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
        expected = count_chat_prompt("gpt-4o", body["messages"])
    elif route == "/v1/completions":
        body = {"model": "gpt-4o", "prompt": text, "max_tokens": 1}
        expected = count_text("gpt-4o", text)
    else:
        body = {"model": "text-embedding-3-small", "input": text}
        expected = count_text("text-embedding-3-small", text)
    loop_thread = threading.get_ident()
    counting = threading.Event()
    loop_ran = threading.Event()
    counted_on: list[tuple[int, bool]] = []  # (thread, the loop ran meanwhile)
    count = COUNT_CACHE.count

    def count_waiting_for_the_loop(encoding: Any, value: str) -> int:
        if len(value) >= COUNT_OFF_LOOP_BYTES:
            counting.set()
            counted_on.append((threading.get_ident(), loop_ran.wait(timeout=10)))
        return count(encoding, value)

    monkeypatch.setattr(COUNT_CACHE, "enabled", False)
    monkeypatch.setattr(COUNT_CACHE, "count", count_waiting_for_the_loop)
    client = create_app(
        parse_settings(LARGE_PROMPT_CONFIG, "<test>"), MemoryStore(clock=FakeClock())
    ).test_client()

    async def run_on_the_loop_while_counting() -> None:
        while not counting.is_set():  # noqa: ASYNC110 (set by a worker thread)
            await trio.sleep(0.001)
        loop_ran.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_on_the_loop_while_counting)
            response = await client.post(route, json=body, headers=auth("sk-large"))
    assert response.status_code == 200, await response.get_data()
    assert (await response.get_json())["usage"]["prompt_tokens"] == expected
    assert counted_on and all(thread != loop_thread for thread, _ in counted_on), counted_on
    assert all(ran for _, ran in counted_on), "the event loop was held while counting"
