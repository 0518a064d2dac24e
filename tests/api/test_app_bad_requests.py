"""The HTTP surface through the app: bad requests get their status and OpenAI's error body.

Bad credentials (401), the table of bad bodies (400 naming the field, nothing
consumed), an oversized body (413), unknown paths and methods (404, 405), a model name
too long refused before anything keeps it, and the error handlers on websockets too.
Over raw sockets against a node process: tests/api/test_hostile_requests.py.
"""

from __future__ import annotations

import json

import pytest

from tests.support.chat_app import MESSAGES, auth, used
from tokenguard.counting.encodings import _encoding_name_of
from tokenguard.counting.media import vision_cost
from tokenguard.errors import APIError
from tokenguard.store.window_store import StoreError


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


async def test_a_model_name_too_long_is_refused_before_anything_keeps_it(  # type: ignore[no-untyped-def]
    app, client, caplog
) -> None:
    gateway = app.extensions["tokenguard"]
    model = "m" * 3000  # (the app's body cap is 4 KiB; tests/api/test_hostile_requests.py: 200 kB)
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
