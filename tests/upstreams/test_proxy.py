"""Proxy mode with real processes: tokenguard in front of an OpenAI-compatible upstream.

The upstream is either a second tokenguard node in mock mode (a real OpenAI-shaped
server: plain, streamed, slow) or a scripted trio HTTP server in the test
(tests/proxy_upstreams.py) for what a mock node never does: dropping a stream, fixed 500
and 429 answers, a usage block that disagrees with tokenguard's count. Clients are the
official openai SDK and raw httpx (for headers and bytes).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.metrics_samples import node_metric
from tests.support.processes import free_ports, running_tokenguard, wait_healthy, write_config
from tests.support.proxy_upstreams import (
    content_chunk,
    dropping,
    fixed,
    scripted_upstream,
    sse_event,
)
from tokenguard.api.app import create_app
from tokenguard.api.responses import RELAYED_STREAM, close_relayed_stream
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError
from tokenguard.counting import count_chat_prompt, count_text

UPSTREAM_SECRET = "sk-upstream-credential-4242"
SECRET_ENV = "TG_TEST_UPSTREAM_KEY"
PROXY_KEY = "sk-proxy-client"
DEFAULT_MAX_TOKENS = 50
MESSAGES = [{"role": "user", "content": "Tell me about rate limits, through a proxy"}]


def upstream_config(token_delay_ms: float = 0) -> str:
    return f"""
[mock]
token_delay_ms = {token_delay_ms}

[[keys]]
key = "{UPSTREAM_SECRET}"
name = "proxy-node"
rpm = 100000
"""


def proxy_config(
    base_url: str,
    *,
    read_timeout: float = 10,
    extra: str = "",
    default: bool = True,
    route_extra: str = "",
) -> str:
    """A proxy node's config: three exact models routed to ``base_url`` (through the
    default route, or each on its own with ``default=False``: other models get 404);
    ``route_extra``: more fields of that route."""
    route = f"""base_url = "{base_url}"
api_key_env = "{SECRET_ENV}"
connect_timeout = 2
read_timeout = {read_timeout}
{route_extra}
"""
    models = ("gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
    tables = "".join(f'[upstream.models."{m}"]\n' + ("" if default else route) for m in models)
    return f"""
[upstream]
{route if default else ""}
{tables}
{extra}

[[keys]]
key = "{PROXY_KEY}"
name = "client"
rpm = 50
input_tpm = 100000
output_tpm = 100000
default_max_tokens = {DEFAULT_MAX_TOKENS}
"""


@contextlib.asynccontextmanager
async def node(
    workdir: Path, name: str, config: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """A real ``tokenguard serve`` node; yields its URL and process."""
    path = write_config(workdir / f"{name}.toml", config)
    port = free_ports()
    args = ["serve", "--config", str(path), "--port", str(port)]
    async with running_tokenguard(args, output_path=workdir / f"{name}.out", env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(20):
            await wait_healthy(url)
        yield url, proc


def proxy_node(workdir: Path, base_url: str, **kwargs: Any) -> Any:
    return node(workdir, "proxy", proxy_config(base_url, **kwargs), {SECRET_ENV: UPSTREAM_SECRET})


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)


async def used(url: str) -> dict[str, int]:
    """The proxy key's used amount per dimension, from the proxy's /v1/usage."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            f"{url}/v1/usage", headers={"Authorization": f"Bearer {PROXY_KEY}"}
        )
    assert response.status_code == 200
    return {name: d["used"] for name, d in response.json()["dimensions"].items() if d}


async def texts_counted(client: httpx.AsyncClient, url: str) -> float:
    """How many long texts the node has counted with tiktoken (its token-count cache's
    misses, from /metrics)."""
    return await node_metric(client, url, "tokenguard_token_count_cache_misses_total")


def in_thread(fn: Any) -> Any:
    return trio.to_thread.run_sync(fn)


# --- a tokenguard mock node as the upstream -------------------------------------------------


async def test_sdk_through_proxy_gets_the_upstreams_answers(workdir: Path) -> None:
    with trio.fail_after(60):
        async with (
            node(workdir, "upstream", upstream_config()) as (upstream_url, _),
            proxy_node(workdir, f"{upstream_url}/v1") as (proxy_url, proxy),
        ):
            direct, via = sdk(upstream_url, UPSTREAM_SECRET), sdk(proxy_url, PROXY_KEY)

            async def via_and_direct(call: Callable[[openai.OpenAI], Any]) -> tuple[Any, Any]:
                """``call``'s answer through tokenguard, then straight from the upstream."""
                return await in_thread(lambda: call(via)), await in_thread(lambda: call(direct))

            def chat(client: openai.OpenAI) -> Any:
                return client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, max_tokens=7
                )

            plain, expected = await via_and_direct(chat)
            assert plain.choices[0].message.content == expected.choices[0].message.content
            assert plain.usage.completion_tokens == expected.usage.completion_tokens == 7
            prompt = count_chat_prompt("gpt-4o", MESSAGES)
            assert plain.usage.prompt_tokens == prompt

            def stream(client: openai.OpenAI, **options: Any) -> tuple[str, list[Any]]:
                chunks = list(
                    client.chat.completions.create(
                        model="gpt-4o", messages=MESSAGES, max_tokens=9, stream=True, **options
                    )
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                return text, [c.usage for c in chunks if c.usage is not None]

            text, usages = await in_thread(lambda: stream(via))
            direct_text, _ = await in_thread(lambda: stream(direct))
            assert text == direct_text and count_text("gpt-4o", text) == 9
            assert usages == []  # tokenguard asked the upstream for usage; the client did not
            asked_text, asked = await in_thread(
                lambda: stream(via, stream_options={"include_usage": True})
            )
            assert asked_text == text
            assert [(u.prompt_tokens, u.completion_tokens) for u in asked] == [(prompt, 9)]

            def legacy(client: openai.OpenAI) -> Any:
                return client.completions.create(
                    model="gpt-3.5-turbo-instruct", prompt=["Say hi", "Say bye"], max_tokens=4
                )

            completion, expected_completion = await via_and_direct(legacy)
            assert [c.text for c in completion.choices] == [
                c.text for c in expected_completion.choices
            ]
            assert completion.usage.completion_tokens == 8
            legacy_prompt = count_text("gpt-3.5-turbo-instruct", "Say hi") + count_text(
                "gpt-3.5-turbo-instruct", "Say bye"
            )
            assert completion.usage.prompt_tokens == legacy_prompt

            def embed(client: openai.OpenAI) -> Any:
                # The SDK asks for base64 and decodes it.
                return client.embeddings.create(
                    model="text-embedding-3-small", input=["alpha beta", "gamma"], dimensions=8
                )

            vectors, expected_vectors = await via_and_direct(embed)
            assert [d.embedding for d in vectors.data] == [
                d.embedding for d in expected_vectors.data
            ]
            assert len(vectors.data[0].embedding) == 8
            embed_prompt = vectors.usage.prompt_tokens
            assert embed_prompt == count_text("text-embedding-3-small", "alpha beta") + count_text(
                "text-embedding-3-small", "gamma"
            )

            models = await in_thread(lambda: [m.id for m in via.models.list()])
            assert models == ["gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small"]

            # Settled exactly: 4 completions' and 1 embedding's real usage, no reservation left.
            assert await used(proxy_url) == {
                "requests": 5,
                "input_tokens": 3 * prompt + legacy_prompt + embed_prompt,
                "output_tokens": 7 + 9 + 9 + 8,
            }
            # The upstream saw tokenguard's credential, never the client's key.
            assert UPSTREAM_SECRET not in proxy.output() and PROXY_KEY not in proxy.output()


async def test_a_slow_upstreams_stream_is_relayed_as_it_arrives(workdir: Path) -> None:
    # 150 ms per token: a stream's events are never 1 s apart.
    async with (
        node(workdir, "upstream", upstream_config(token_delay_ms=150)) as (upstream_url, _),
        proxy_node(workdir, f"{upstream_url}/v1", read_timeout=1.0) as (proxy_url, _),
    ):
        headers = {"Authorization": f"Bearer {PROXY_KEY}"}
        body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10, "stream": True}
        arrivals: list[float] = []
        with trio.fail_after(20):
            async with (
                httpx.AsyncClient(timeout=10) as client,
                client.stream(
                    "POST", f"{proxy_url}/v1/chat/completions", json=body, headers=headers
                ) as response,
            ):
                assert response.status_code == 200
                assert response.headers["x-ratelimit-remaining-output-tokens"] == str(100000 - 10)
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0][
                        "delta"
                    ].get("content"):
                        arrivals.append(time.monotonic())
        # Relayed as they arrived, not buffered until the end.
        assert len(arrivals) == 10
        assert arrivals[-1] - arrivals[0] > 1.0
        assert min(b - a for a, b in zip(arrivals, arrivals[1:], strict=False)) > 0.05
        assert (await used(proxy_url))["output_tokens"] == 10


@pytest.mark.parametrize(("policy", "kept"), [(None, 20), ("keep", 20), ("refund", 0)])
async def test_a_read_timeout_after_the_request_went_out_keeps_the_reservation_unless_refunded(
    workdir: Path, policy: str | None, kept: int
) -> None:
    """The upstream got the request and may bill it: a 504 keeps the output reservation
    (by default), or refunds it on a route whose ``on_upstream_error`` says so."""
    route_extra = f'on_upstream_error = "{policy}"' if policy else ""
    # 150 ms per token: a whole 20-token reply takes 3 s, past the 1 s read timeout.
    async with (
        node(workdir, "upstream", upstream_config(token_delay_ms=150)) as (upstream_url, _),
        proxy_node(workdir, f"{upstream_url}/v1", read_timeout=1.0, route_extra=route_extra) as (
            proxy_url,
            _,
        ),
        httpx.AsyncClient(timeout=10) as client,
    ):
        with trio.fail_after(20):
            response = await client.post(
                f"{proxy_url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20},
                headers={"Authorization": f"Bearer {PROXY_KEY}"},
            )
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "upstream_timeout" and error["type"] == "server_error"
        assert "did not answer within 1 s" in error["message"]
        assert response.headers["x-ratelimit-limit-requests"] == "50"
        assert await used(proxy_url) == {
            "requests": 1,
            "input_tokens": count_chat_prompt("gpt-4o", MESSAGES),
            "output_tokens": kept,
        }


# --- a scripted upstream --------------------------------------------------------------------


async def test_a_model_no_route_serves_is_a_404_that_costs_nothing(workdir: Path) -> None:
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(200, {})) as upstream,
            proxy_node(workdir, upstream.base_url, default=False) as (proxy_url, _),
        ):
            via = sdk(proxy_url, PROXY_KEY)
            with pytest.raises(openai.NotFoundError) as caught:
                await in_thread(
                    lambda: via.chat.completions.create(model="gpt-9", messages=MESSAGES)
                )
            assert caught.value.code == "model_not_found"
            assert upstream.received == []
            assert await used(proxy_url) == {"requests": 0, "input_tokens": 0, "output_tokens": 0}


DROPPED_TEXT = ("OK", " the", " rate")


@pytest.mark.parametrize(
    ("policy", "output"),
    [(None, DEFAULT_MAX_TOKENS), ("refund", count_text("gpt-4o", "".join(DROPPED_TEXT)))],
)
async def test_a_stream_dropped_mid_way_keeps_the_reservation_unless_refunded(
    workdir: Path, policy: str | None, output: int
) -> None:
    """The upstream broke its stream after the request went out: it may bill the whole
    reply, so the reservation is kept, unless the route refunds upstream failures (then
    the key pays the tokens the upstream sent)."""
    role = {
        **content_chunk(""),
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
    }
    events = [sse_event(role)] + [sse_event(content_chunk(w)) for w in DROPPED_TEXT]
    route_extra = f'on_upstream_error = "{policy}"' if policy else ""
    with trio.fail_after(40):
        async with (
            scripted_upstream(dropping(events)) as upstream,
            proxy_node(workdir, upstream.base_url, route_extra=route_extra) as (proxy_url, _),
        ):
            via = sdk(proxy_url, PROXY_KEY)
            received: list[str] = []

            def stream() -> None:
                for chunk in via.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, stream=True
                ):
                    received.append(chunk.choices[0].delta.content or "")

            with pytest.raises(openai.APIError) as caught:
                await in_thread(stream)
            assert "closed the connection in the middle of the stream" in caught.value.message
            assert "".join(received) == "".join(DROPPED_TEXT)

            # What the upstream was sent: the validated body, tokenguard's credential, the
            # reservation as max_tokens, and a request for the usage chunk.
            (sent,) = upstream.received
            assert sent.path == "/v1/chat/completions"
            assert sent.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
            assert sent.body == {
                "model": "gpt-4o",
                "messages": MESSAGES,
                "stream": True,
                "max_tokens": DEFAULT_MAX_TOKENS,
                "stream_options": {"include_usage": True},
            }
            # No usage came: settled once the proxy has seen the drop (another process:
            # poll).
            with trio.fail_after(5):
                while (await used(proxy_url))["output_tokens"] != output:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert await used(proxy_url) == {
                "requests": 1,
                "input_tokens": count_chat_prompt("gpt-4o", MESSAGES),
                "output_tokens": output,
            }


async def test_upstream_errors_pass_through_with_ratelimit_headers(workdir: Path) -> None:
    server_error = {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    too_many = {
        "error": {
            "message": "Rate limit reached for gpt-4o (upstream)",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    dead_port = free_ports()
    dead_route = f"""
[upstream.models."gpt-dead"]
base_url = "http://127.0.0.1:{dead_port}/v1"
"""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    request = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 30}
    prompt = count_chat_prompt("gpt-4o", MESSAGES)
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(500, server_error)) as upstream,
            proxy_node(workdir, upstream.base_url, extra=dead_route) as (proxy_url, proxy),
            httpx.AsyncClient(timeout=10) as client,
        ):
            url = f"{proxy_url}/v1/chat/completions"
            response = await client.post(url, json=request, headers=headers)
            assert response.status_code == 500
            assert response.json() == server_error
            assert response.headers["x-ratelimit-remaining-requests"] == "49"
            assert response.headers["x-ratelimit-limit-output-tokens"] == "100000"

            upstream.answer = fixed(
                429,
                too_many,
                {"retry-after": "7", "retry-after-ms": "7000", "x-ratelimit-limit-requests": "3"},
            )
            with pytest.raises(openai.RateLimitError) as caught:
                await in_thread(
                    lambda: sdk(proxy_url, PROXY_KEY).chat.completions.create(**request)
                )
            limited = caught.value.response
            assert limited.status_code == 429 and limited.json() == too_many
            assert limited.headers["retry-after"] == "7"
            assert limited.headers["retry-after-ms"] == "7000"
            # tokenguard's own limits, not the upstream's.
            assert limited.headers["x-ratelimit-limit-requests"] == "50"
            assert limited.headers["x-ratelimit-remaining-requests"] == "48"

            # Unreachable: a 502 in OpenAI's shape, with the headers.
            response = await client.post(
                url, json={**request, "model": "gpt-dead"}, headers=headers
            )
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_unavailable"
            assert "x-ratelimit-remaining-requests" in response.headers

            # Errors are not billed: every output reservation was refunded.
            assert await used(proxy_url) == {
                "requests": 3,
                "input_tokens": 3 * prompt,
                "output_tokens": 0,
            }

            # The upstream counts the prompt differently: settled to its count, logged.
            # Its reply's text is not counted: the usage says how long it was (the
            # token-count cache saw no new text; the prompt is too short for it).
            content = "Fine, and a long answer too. " * 20
            reply = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt + 100,
                    "completion_tokens": 12,
                    "total_tokens": 0,
                },
            }
            upstream.answer = fixed(200, reply)
            counted_before = await texts_counted(client, proxy_url)
            response = await client.post(url, json=request, headers=headers)
            assert response.status_code == 200 and response.json() == reply
            assert await used(proxy_url) == {
                "requests": 4,
                "input_tokens": 4 * prompt + 100,
                "output_tokens": 12,
            }
            assert f"counted {prompt}, the upstream reported {prompt + 100} (+100)" in (
                proxy.output()
            )
            assert await texts_counted(client, proxy_url) == counted_before

            # No usage: the reply's text is counted, and settled to.
            upstream.answer = fixed(200, {**reply, "usage": None})
            response = await client.post(url, json=request, headers=headers)
            assert response.status_code == 200
            assert await used(proxy_url) == {
                "requests": 5,
                "input_tokens": 5 * prompt + 100,
                "output_tokens": 12 + count_text("gpt-4o", content),
            }
            assert await texts_counted(client, proxy_url) == counted_before + 1


async def test_the_reply_is_capped_in_the_field_the_route_names(workdir: Path) -> None:
    """A request naming no max_tokens is capped at its reservation for the upstream:
    as ``max_tokens`` by default, as ``max_completion_tokens`` on a route that says so
    (OpenAI's reasoning models refuse ``max_tokens``), never both."""
    reply = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    reasoning_route = """
[upstream.models."o3*"]
output_limit_field = "max_completion_tokens"
"""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(200, reply)) as upstream,
            proxy_node(workdir, upstream.base_url, extra=reasoning_route) as (proxy_url, _),
            httpx.AsyncClient(timeout=10) as client,
        ):
            for model in ("gpt-4o", "o3-mini"):
                response = await client.post(
                    f"{proxy_url}/v1/chat/completions",
                    json={"model": model, "messages": MESSAGES},
                    headers=headers,
                )
                assert response.status_code == 200, response.text
    default_body, reasoning_body = (r.body for r in upstream.received)
    assert default_body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert "max_completion_tokens" not in default_body
    assert reasoning_body["max_completion_tokens"] == DEFAULT_MAX_TOKENS
    assert "max_tokens" not in reasoning_body


class ClosingRecorder:
    """Stands for a relayed stream: counts its closes."""

    def __init__(self) -> None:
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1


@pytest.mark.parametrize("fails", [False, True])
async def test_a_relayed_stream_the_response_never_iterated_is_closed_when_the_request_ends(
    fails: bool,
) -> None:
    """A client that leaves while the answer's headers go out: quart never iterates (so
    never closes) the body; the stream is closed all the same (its upstream response,
    its key's slot, its settlement)."""
    stream = ClosingRecorder()
    scope: dict[str, Any] = {"type": "http"}

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        scope[RELAYED_STREAM] = stream
        if fails:
            raise trio.BrokenResourceError("the client left")

    app = close_relayed_stream(handler)
    if fails:
        with pytest.raises(trio.BrokenResourceError):
            await app(scope, None, None)  # type: ignore[arg-type]
    else:
        await app(scope, None, None)  # type: ignore[arg-type]
    assert stream.closes == 1 and RELAYED_STREAM not in scope


# --- configuration ----------------------------------------------------------------------


def settings_of(text: str, environ: dict[str, str] | None = None) -> Any:
    return parse_settings(tomllib.loads(text), "proxy.toml", environ or {})


def test_upstream_routes_and_inheritance() -> None:
    settings = settings_of(
        """
[upstream]
base_url = "https://api.example.com/v1/"
api_key_env = "MAIN_KEY"
read_timeout = 30

[upstream.models."gpt-4o*"]
connect_timeout = 1

[upstream.models."llama-3"]
base_url = "http://127.0.0.1:8080/v1"
""",
        {"MAIN_KEY": "sk-main-secret"},
    )
    upstream = settings.upstream
    assert upstream.enabled
    mini = upstream.route("gpt-4o-mini")
    assert (mini.pattern, mini.base_url, mini.connect_timeout, mini.read_timeout) == (
        "gpt-4o*",
        "https://api.example.com/v1",
        1.0,
        30.0,
    )
    assert mini.api_key == "sk-main-secret"
    # Another server: the default's credential is not sent there.
    llama = upstream.route("llama-3")
    assert (llama.base_url, llama.api_key) == ("http://127.0.0.1:8080/v1", None)
    assert upstream.route("anything-else").pattern is None
    assert upstream.model_ids() == ("llama-3",)
    assert "sk-main-secret" not in repr(settings)
    assert not settings_of("").upstream.enabled


def test_a_routes_stream_and_failure_policies_default_and_are_inherited() -> None:
    settings = settings_of(
        """
[upstream]
base_url = "https://api.example.com/v1"
client_idle_timeout = 5
on_client_gone = "drain"
key_share = 0.5

[upstream.models."llama-*"]
base_url = "http://127.0.0.1:8080/v1"
on_upstream_error = "refund"
"""
    )
    upstream = settings.upstream
    default, llama = upstream.route("gpt-4o"), upstream.route("llama-3")
    assert (default.client_idle_timeout, default.on_client_gone, default.on_upstream_error) == (
        5.0,
        "drain",
        "keep",
    )
    # Another server, yet the same policies unless it sets its own.
    assert (llama.client_idle_timeout, llama.on_client_gone, llama.on_upstream_error) == (
        5.0,
        "drain",
        "refund",
    )
    assert (upstream.max_connections, upstream.key_share) == (100, 0.5)
    bare = settings_of('[upstream]\nbase_url = "https://x/v1"').upstream
    route = bare.route("m")
    assert (route.client_idle_timeout, route.on_client_gone, route.on_upstream_error) == (
        30.0,
        "cancel",
        "keep",
    )
    assert (bare.key_share, bare.connections_per_key) == (0.25, 25)


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            '[upstream]\nbase_url = "https://x/v1"\napi_key_env = "MISSING_KEY"',
            {},
            "proxy.toml: upstream.api_key_env: the environment variable $MISSING_KEY is not set",
        ),
        (
            '[upstream]\nbase_url = "ftp://x/v1"',
            {},
            "proxy.toml: upstream.base_url: must be an http:// or https:// URL",
        ),
        (
            '[upstream]\nbase_url = "https://user:pw@x/v1"',
            {},
            "proxy.toml: upstream.base_url: must not contain a user or password",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nread_timeout = 0',
            {},
            "proxy.toml: upstream.read_timeout: must be more than 0 seconds",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nread_timout = 3',
            {},
            "proxy.toml: upstream.read_timout: unknown key",
        ),
        (
            '[upstream.models."gpt-4o"]\nread_timeout = 3',
            {},
            "proxy.toml: upstream.models.gpt-4o: needs a base_url",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."o3*"]\n'
            'output_limit_field = "max_output"',
            {},
            "proxy.toml: upstream.models.o3*.output_limit_field: must be one of max_tokens, "
            "max_completion_tokens, got 'max_output'",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\napi_key_env = "not a name"',
            {},
            "proxy.toml: upstream.api_key_env: must be an environment variable name",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\non_client_gone = "ignore"',
            {},
            "proxy.toml: upstream.on_client_gone: must be one of cancel, drain, got 'ignore'",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\n'
            'on_upstream_error = "free"',
            {},
            "proxy.toml: upstream.models.m.on_upstream_error: must be one of keep, refund, "
            "got 'free'",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nclient_idle_timeout = 0',
            {},
            "proxy.toml: upstream.client_idle_timeout: must be more than 0 seconds",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nkey_share = 0',
            {},
            "proxy.toml: upstream.key_share: must be more than 0 and at most 1, got 0",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nkey_share = 1.5',
            {},
            "proxy.toml: upstream.key_share: must be more than 0 and at most 1, got 1.5",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\nkey_share = 0.5',
            {},
            "proxy.toml: upstream.models.m.key_share: unknown key",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\nkey = "sk-inline"',
            {},
            "proxy.toml: upstream.models.m.key: unknown key",
        ),
    ],
)
def test_upstream_config_errors_name_file_and_key(
    text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_of(text, environ)
    assert str(caught.value).startswith(message)


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
