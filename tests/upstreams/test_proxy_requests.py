"""Proxy mode, the request side: what an upstream is asked to generate never exceeds
what tokenguard reserved, and what it reports is what is charged.

A real proxy node (a ``tokenguard serve`` process) in front of a scripted upstream
(tests/proxy_upstreams.py) that generates like llama.cpp's server: ``n_predict`` first,
then ``max_completion_tokens``, then ``max_tokens`` (4,096 when none), times ``n_cmpl``
or ``n``, and bills all of it in its usage block. Clients: raw httpx (headers, bytes).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.metrics_samples import parse, value
from tests.support.proxy_nodes import MESSAGES, PROXY_KEY, proxy_node, settings_of, used
from tests.support.proxy_upstreams import (
    Answer,
    ReceivedRequest,
    ScriptedUpstream,
    fixed,
    scripted_upstream,
)
from tokenguard.config.settings import ConfigError
from tokenguard.counting import count_chat_prompt
from tokenguard.upstreams.forwarding import OUTPUT_LENGTH_FIELDS

HEADERS = {"Authorization": f"Bearer {PROXY_KEY}"}
OUTPUT_LIMIT = 100_000  # the proxy key's output_tpm (tests/support/proxy_nodes.py)
UNBOUNDED = 4096  # what the upstream generates when no length field is sent


def generated_by(body: dict[str, Any]) -> int:
    """What a llama.cpp-like server generates for ``body``."""
    for name in ("n_predict", "max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            per_choice = body[name]
            break
    else:
        per_choice = UNBOUNDED
    return per_choice * (body.get("n_cmpl") or body.get("n") or 1)


def reply_of(model: str, usage: dict[str, int]) -> dict[str, Any]:
    """A whole chat completion saying "ok", with ``usage``."""
    message = {"role": "assistant", "content": "ok"}
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
        "usage": usage,
    }


async def llama_like(stream: trio.SocketStream, request: ReceivedRequest) -> None:
    """Generate (and bill) what the request asks for, as llama.cpp's server reads it."""
    usage = {"completion_tokens": generated_by(request.body)}
    await fixed(200, reply_of(request.body["model"], usage))(stream, request)


@asynccontextmanager
async def proxy_in_front_of(
    workdir: Path, answer: Answer = llama_like, extra: str = ""
) -> AsyncIterator[tuple[ScriptedUpstream, str, httpx.AsyncClient]]:
    """A proxy node (with ``extra`` config) in front of an upstream answering ``answer``,
    and an HTTP client; bounded by a minute."""
    with trio.fail_after(60):
        async with (
            scripted_upstream(answer) as upstream,
            proxy_node(workdir, upstream.base_url, extra=extra) as (proxy_url, _),
            httpx.AsyncClient(timeout=20) as client,
        ):
            yield upstream, proxy_url, client


async def post(client: httpx.AsyncClient, url: str, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-4o", "messages": MESSAGES, **body}
    return await client.post(f"{url}/v1/chat/completions", json=payload, headers=HEADERS)


def reserved(response: httpx.Response, used_before: int) -> int:
    """The output tokens a response's admission reserved (from its headers)."""
    remaining = int(response.headers["x-ratelimit-remaining-output-tokens"])
    return OUTPUT_LIMIT - used_before - remaining


async def test_n_predict_cannot_make_the_upstream_spend_past_the_output_limit(
    workdir: Path,
) -> None:
    # The scenario: 10 at once, each asking llama.cpp for 50,000 tokens while
    # naming max_tokens 1. Each reserves 50,000, so at most 2 fit in 100,000.
    async with proxy_in_front_of(workdir) as (upstream, proxy_url, client):
        statuses: list[int] = []

        async def one() -> None:
            response = await post(client, proxy_url, max_tokens=1, n_predict=50_000)
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
        billed = sum(generated_by(r.body) for r in upstream.received)
        assert statuses.count(200) == len(upstream.received) == 2
        assert statuses.count(429) == 8
        assert billed == (await used(proxy_url))["output_tokens"] == OUTPUT_LIMIT


async def test_every_length_field_is_reserved_and_forwarded_within_the_reservation(
    workdir: Path,
) -> None:
    async with proxy_in_front_of(workdir) as (upstream, proxy_url, client):
        spent = 0
        for i, name in enumerate(OUTPUT_LENGTH_FIELDS):
            length = 30 + i
            response = await post(client, proxy_url, **{name: length})
            assert response.status_code == 200, response.text
            assert reserved(response, spent) == length, name
            sent = upstream.received[-1].body
            assert sent[name] == length
            # A server that reads only max_tokens / max_completion_tokens stops there too.
            if name != "max_completion_tokens":
                assert sent["max_tokens"] == length, name
            spent += length
            assert (await used(proxy_url))["output_tokens"] == spent

        # A floor above the reservation is lowered to it; the largest length counts.
        response = await post(client, proxy_url, max_tokens=10, max_new_tokens=12, min_tokens=500)
        assert reserved(response, spent) == 12
        sent = upstream.received[-1].body
        assert (sent["min_tokens"], sent["max_tokens"], sent["max_new_tokens"]) == (12, 10, 12)


async def test_every_generated_choice_is_reserved(workdir: Path) -> None:
    async with proxy_in_front_of(workdir) as (upstream, proxy_url, client):
        spent = 0
        for fields, choices in (
            ({"n": 2}, 2),
            ({"n_cmpl": 4}, 4),  # llama.cpp's own name for n, which wins there
            ({"n": 2, "best_of": 3}, 3),  # vLLM generates best_of, returns n
        ):
            response = await post(client, proxy_url, max_tokens=5, **fields)
            assert response.status_code == 200, response.text
            assert reserved(response, spent) == 5 * choices, fields
            assert {k: upstream.received[-1].body[k] for k in fields} == fields
            spent += generated_by(upstream.received[-1].body)
        assert (await used(proxy_url))["output_tokens"] == spent

        refused = await post(client, proxy_url, max_tokens=5, n=3, best_of=2)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_of"


async def test_a_route_with_forward_fields_forwards_only_those(workdir: Path) -> None:
    strict = """
[upstream.models."strict-*"]
forward_fields = ["temperature", "n_predict"]
"""
    async with proxy_in_front_of(workdir, extra=strict) as (upstream, proxy_url, client):
        extras = {"temperature": 0.5, "top_p": 0.9, "user": "u", "logit_bias": {"1": 5}}
        response = await post(client, proxy_url, model="strict-1", n_predict=40, **extras)
        assert response.status_code == 200, response.text
        assert upstream.received[-1].body == {
            "model": "strict-1",
            "messages": MESSAGES,
            "temperature": 0.5,
            "n_predict": 40,
            "max_tokens": 40,  # tokenguard's own cap, always
        }
        # Other routes forward every field.
        await post(client, proxy_url, max_tokens=3, **extras)
        assert upstream.received[-1].body["top_p"] == 0.9


async def test_the_counting_error_per_model_is_a_metric(workdir: Path) -> None:
    prompt = count_chat_prompt("gpt-4o", MESSAGES)
    reply = reply_of("gpt-4o", {"prompt_tokens": prompt + 100, "completion_tokens": 1})
    async with proxy_in_front_of(workdir, fixed(200, reply)) as (_, proxy_url, client):
        for _ in range(2):
            assert (await post(client, proxy_url, max_tokens=5)).status_code == 200
        samples = parse((await client.get(f"{proxy_url}/metrics")).text)
    gpt = {"model": "gpt-4o"}
    assert value(samples, "tokenguard_upstream_prompt_reports_total", **gpt) == 2
    assert value(samples, "tokenguard_upstream_prompt_miscounts_total", **gpt) == 2
    counted = value(samples, "tokenguard_upstream_prompt_tokens_total", source="counted", **gpt)
    reported = value(samples, "tokenguard_upstream_prompt_tokens_total", source="upstream", **gpt)
    assert (counted, reported) == (2 * prompt, 2 * (prompt + 100))
    assert math.isclose(reported / counted - 1, 100 / prompt)


# --- forward_fields in the config ----------------------------------------------------------


def test_forward_fields_is_inherited_like_the_other_route_fields() -> None:
    upstream = settings_of(
        """
[upstream]
base_url = "https://api.example.com/v1"
forward_fields = ["temperature", "top_p"]

[upstream.models."gpt-*"]

[upstream.models."llama-*"]
base_url = "http://127.0.0.1:8080/v1"
forward_fields = []

[upstream.models."open"]
"""
    ).upstream
    assert upstream.route("gpt-4o").forward_fields == frozenset({"temperature", "top_p"})
    assert upstream.route("llama-3").forward_fields == frozenset()
    assert upstream.route("anything").forward_fields == frozenset({"temperature", "top_p"})
    assert (
        settings_of('[upstream]\nbase_url = "https://x/v1"').upstream.route("m").forward_fields
        is None
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('"temperature"', "must be a list of body field names"),
        ("[1]", "1 is not a field name"),
        ('["top p"]', "'top p' is not a field name"),
        ('[""]', "'' is not a field name"),
        ('["temperature", "top_p", "temperature"]', "names temperature more than once"),
    ],
)
def test_forward_fields_errors_name_file_and_key(fields: str, message: str) -> None:
    text = (
        f'[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\nforward_fields = {fields}'
    )
    with pytest.raises(ConfigError) as caught:
        settings_of(text)
    assert str(caught.value).startswith("proxy.toml: upstream.models.m.forward_fields: ")
    assert message in str(caught.value)
