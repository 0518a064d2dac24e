"""Legacy completions and embeddings in mock mode, in process: limited like chat.

Their requests and tokens count against the key's limits, and bad prompts are a 400
naming the field that costs nothing.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from drivers.memory import MemoryStore
from tests.support.proxy_nodes import (
    PROXY_KEY,
)
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.counting import count_text

# --- legacy completions and embeddings in mock mode (in-process) --------------------------

MOCK_CONFIG: dict[str, Any] = {
    "keys": [{"key": PROXY_KEY, "name": "client", "rpm": 3, "input_tpm": 1000, "output_tpm": 1000}]
}
AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}


def mock_app() -> Any:
    return create_app(parse_settings(MOCK_CONFIG, "<test>", environ={}), MemoryStore())


async def test_completions_and_embeddings_are_limited_in_mock_mode() -> None:
    client = mock_app().test_client()
    plain = await client.post(
        "/v1/completions",
        json={"model": "gpt-3.5-turbo-instruct", "prompt": ["a b", [1, 2, 3]], "n": 2},
        headers=AUTH,
    )
    assert plain.status_code == 200
    body = await plain.get_json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 4
    prompt = count_text("gpt-3.5-turbo-instruct", "a b") + 3
    # max_tokens defaults to 16, as OpenAI's: 4 choices of at most 16 reserved.
    assert plain.headers["x-ratelimit-remaining-output-tokens"] == str(1000 - 64)
    assert body["usage"]["prompt_tokens"] == prompt
    output = body["usage"]["completion_tokens"]
    assert output == sum(count_text("gpt-4o", c["text"]) for c in body["choices"]) <= 64

    streamed = await client.post(
        "/v1/completions",
        json={
            "model": "gpt-3.5-turbo-instruct",
            "prompt": "hi",
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=AUTH,
    )
    events = (await streamed.get_data()).decode().split("\n\n")
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert events[-2] == "data: [DONE]"
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == count_text("gpt-4o", text) == 5

    embedded = await client.post(
        "/v1/embeddings",
        json={
            "model": "text-embedding-3-small",
            "input": ["x y", "z"],
            "encoding_format": "base64",
        },
        headers=AUTH,
    )
    data = (await embedded.get_json())["data"]
    assert [len(base64.b64decode(d["embedding"])) for d in data] == [256 * 4, 256 * 4]
    assert embedded.headers["x-ratelimit-remaining-requests"] == "0"

    refused = await client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers=AUTH
    )
    assert refused.status_code == 429
    usage = await (await client.get("/v1/usage", headers=AUTH)).get_json()
    embed_prompt = count_text("text-embedding-3-small", "x y") + count_text(
        "text-embedding-3-small", "z"
    )
    assert usage["dimensions"]["input_tokens"]["used"] == prompt + 1 + embed_prompt
    assert usage["dimensions"]["output_tokens"]["used"] == output + 5


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": [1, -2]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": ["a", 3.5]}, "prompt[1]"),
        ("/v1/completions", {"model": "m", "prompt": [[1], []]}, "prompt[1]"),
        ("/v1/completions", {"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "m", "prompt": "a", "n": 3, "best_of": 2}, "best_of"),
        ("/v1/completions", {"model": "m", "prompt": "a", "stream_options": {}}, "stream_options"),
        ("/v1/completions", {"prompt": "a"}, "model"),
        ("/v1/embeddings", {"model": "m", "input": ""}, "input"),
        ("/v1/embeddings", {"model": "m", "input": ["a", ""]}, "input[1]"),
        ("/v1/embeddings", {"model": "m", "input": [True]}, "input[0]"),
        (
            "/v1/embeddings",
            {"model": "m", "input": "a", "encoding_format": "hex"},
            "encoding_format",
        ),
        ("/v1/embeddings", {"model": "m", "input": "a", "dimensions": "8"}, "dimensions"),
    ],
)
async def test_bad_prompts_are_400_naming_the_field_and_cost_nothing(
    path: str, body: dict[str, Any], param: str
) -> None:
    client = mock_app().test_client()
    answer = await client.post(path, json=body, headers=AUTH)
    assert answer.status_code == 400
    assert (await answer.get_json())["error"]["param"] == param
    usage = await (await client.get("/v1/usage", headers=AUTH)).get_json()
    assert usage["dimensions"]["requests"]["used"] == 0
