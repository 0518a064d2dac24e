"""Proxy accounting: a key is charged what the upstream really spends, whatever its client does.

Each scenario runs a real proxy node process in front of an honest fake upstream
(``bench/fake_upstream/``, in its own process, llama.cpp-like and vLLM-like: it
generates and bills every token it is asked for, whatever the client does), plays a
hostile client, and then compares, per key, what the upstream's ledger billed with what
tokenguard charged (``/v1/usage``). Issue #15's holes:

* 3: a stream the client abandons, or stops reading, is paid in full;
* 4: one key's stalled streams cannot take the upstream pool from the other keys, and
  a full pool is said to be full;
* 1 and 2 (fixed elsewhere): a length field the upstream reads instead of
  ``max_tokens``, and a tool schema's ``$defs``, never spend past the limits.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.stalled_client import read_to_end, stalled_request
from tests.cluster.test_cluster import usage
from tests.support.honest_upstreams import (
    Billed,
    FakeUpstreamProcess,
    key_message,
    running_fake_upstream,
    take_events,
)
from tests.support.metrics_samples import node_metric
from tests.support.proxy_nodes import node

FLAVOURS = ("llama", "vllm")
MODEL = "gpt-4o"
SECRETS = {
    "alice": "sk-accounting-alice",
    "bob": "sk-accounting-bob",
    "carol": "sk-accounting-carol",
}
# carol's limits are small enough to hit; alice's and bob's far above any scenario.
TIGHT = {"input_tpm": 2_000, "output_tpm": 10_000}
LONG = 30_000  # tokens: a stream far larger than any socket buffer
QUESTION = {"role": "user", "content": "Tell me everything about rate limits."}


def accounting_config(base_url: str, *, route: str = "", pool: str = "") -> str:
    """A proxy node in front of ``base_url`` with three keys: alice and bob, whose limits
    are far above the scenario (so only the accounting shows), and carol, whose are
    :data:`TIGHT`; ``route``: more fields of the route, ``pool``: ``max_connections`` and
    ``key_share``."""
    keys = "".join(
        f'[[keys]]\nkey = "{secret}"\nname = "{name}"\nrpm = 1000\n'
        f"input_tpm = {TIGHT['input_tpm'] if name == 'carol' else 1_000_000}\n"
        f"output_tpm = {TIGHT['output_tpm'] if name == 'carol' else 1_000_000}\n\n"
        for name, secret in SECRETS.items()
    )
    return f"""
[upstream]
base_url = "{base_url}"
connect_timeout = 2
read_timeout = 30
{route}
{pool}

{keys}"""


@contextlib.asynccontextmanager
async def proxied(
    workdir: Path, flavour: str, *, tokens_per_second: float = 0.0, route: str = "", pool: str = ""
) -> AsyncIterator[tuple[str, FakeUpstreamProcess]]:
    """A fake ``flavour`` upstream and a proxy node in front of it: yields the node's URL
    and the upstream."""
    async with running_fake_upstream(
        workdir, flavour, tokens_per_second=tokens_per_second
    ) as upstream:
        config = accounting_config(upstream.base_url, route=route, pool=pool)
        async with node(workdir, "proxy", config) as (url, _):
            yield url, upstream


def chat(key_name: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "messages": [key_message(key_name), QUESTION],
        "max_tokens": max_tokens,
    }
    return {**body, "stream": True} if stream else body


def auth(key_name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[key_name]}"}


async def charged(url: str, key_name: str) -> Billed:
    """What tokenguard charged ``key_name``: its used amounts, from ``/v1/usage``."""
    async with httpx.AsyncClient(timeout=10) as client:
        dimensions = await usage(client, url, SECRETS[key_name])
    return Billed(
        requests=dimensions["requests"]["used"],
        input_tokens=dimensions["input_tokens"]["used"],
        output_tokens=dimensions["output_tokens"]["used"],
    )


async def charged_once_settled(url: str, key_name: str, expected: Billed) -> Billed:
    """``key_name``'s charge, once it equals ``expected`` or has had a few seconds to
    (settlement follows the end of a stream, in another process)."""
    with trio.move_on_after(10):
        while await charged(url, key_name) != expected:  # noqa: ASYNC110 (another process)
            await trio.sleep(0.1)
    return await charged(url, key_name)


async def assert_charged_as_billed(url: str, upstream: FakeUpstreamProcess, key_name: str) -> None:
    billed = await upstream.billed(key_name)
    assert billed.output_tokens > 0
    assert await charged_once_settled(url, key_name, billed) == billed


def stalled_stream(url: str, key_name: str, body: dict[str, Any]) -> Any:
    """A streamed request whose client reads nothing (:mod:`bench.stalled_client`)."""
    return stalled_request(url, SECRETS[key_name], body)


async def wait_for_ledger(upstream: FakeUpstreamProcess, key_name: str, requests: int) -> None:
    """Until the upstream has received ``requests`` requests for ``key_name``."""
    # Another process: polled.
    while len([e for e in await upstream.ledger() if e["key"] == key_name]) < requests:  # noqa: ASYNC110
        await trio.sleep(0.05)


# --- hole 3: a stream the client abandons is still paid for ------------------------------


@pytest.mark.parametrize("policy", ["cancel", "drain"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_stream_abandoned_mid_way_is_charged_what_the_upstream_billed(
    workdir: Path, flavour: str, policy: str
) -> None:
    """The client takes a few events of a 30,000-token stream and hangs up; the upstream
    generates (and bills) all of it. ``cancel`` keeps the whole reservation, ``drain``
    reads the upstream on to its usage: either way the key pays what was billed."""
    route = f'on_client_gone = "{policy}"'
    with trio.fail_after(90):
        async with (
            proxied(workdir, flavour, tokens_per_second=10_000, route=route) as (url, upstream),
            httpx.AsyncClient(timeout=30) as client,
        ):
            body = chat("alice", LONG, stream=True)
            await take_events(client, f"{url}/v1/chat/completions", body, 5, auth("alice"))
            billed = await upstream.billed("alice")
            assert billed.output_tokens == LONG
            assert await charged_once_settled(url, "alice", billed) == billed


@pytest.mark.parametrize("policy", ["cancel", "drain"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_stalled_reader_is_cut_after_client_idle_timeout_and_pays_what_was_billed(
    workdir: Path, flavour: str, policy: str
) -> None:
    """A client that reads nothing: once the node's send has waited ``client_idle_timeout``
    the node closes the connection mid-stream (the client then finds the stream cut,
    without ``[DONE]``), and the key pays what the upstream billed."""
    route = f'client_idle_timeout = 1\non_client_gone = "{policy}"'
    with trio.fail_after(90):
        async with (
            proxied(workdir, flavour, route=route) as (url, upstream),
            httpx.AsyncClient(timeout=30) as client,
        ):
            async with stalled_stream(url, "alice", chat("alice", LONG, stream=True)) as stream:
                stalls = "tokenguard_client_stalls_total"
                while await node_metric(client, url, stalls) < 1:  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.1)
                received = await read_to_end(stream)
            assert received.startswith(b"HTTP/1.1 200 ")
            assert b"data: {" in received and b"data: [DONE]" not in received
            await assert_charged_as_billed(url, upstream, "alice")
            assert await node_metric(client, url, "tokenguard_client_stalls_total") == 1


# --- hole 4: tenants are isolated on the upstream pool -----------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_one_keys_stalled_streams_leave_the_pool_to_the_other_keys(
    workdir: Path, flavour: str
) -> None:
    """A pool of 2 connections; alice stalls a stream, then tries a second one: with the
    default share (a quarter of the pool, at least one connection) alice holds one
    connection and waits for her own, then gets a 429, while bob's request is answered.
    Each key is then charged what the upstream billed it (alice's refused request counts,
    as a request and its input, but reached no upstream)."""
    with trio.fail_after(90):
        async with (
            proxied(workdir, flavour, tokens_per_second=5_000, pool="max_connections = 2") as (
                url,
                upstream,
            ),
            httpx.AsyncClient(timeout=30) as client,
        ):
            # alice's first stream stalls, and holds its upstream connection.
            async with stalled_stream(url, "alice", chat("alice", LONG, stream=True)):
                await wait_for_ledger(upstream, "alice", 1)
                async with stalled_stream(url, "alice", chat("alice", LONG, stream=True)) as second:
                    answer = await client.post(
                        f"{url}/v1/chat/completions",
                        json=chat("bob", 20, stream=False),
                        headers=auth("bob"),
                    )
                    assert answer.status_code == 200, answer.text
                    refused = await read_to_end(second)
                assert refused.startswith(b"HTTP/1.1 429 ")
                error = json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]
                assert error["type"] == "concurrency" and error["code"] == "rate_limit_exceeded"
                assert "share of this node's upstream connections (1 at once)" in error["message"]
            await assert_charged_as_billed(url, upstream, "bob")
            billed = await upstream.billed("alice")
            assert billed == Billed(1, billed.input_tokens, LONG)
            expected = Billed(2, 2 * billed.input_tokens, LONG)
            assert await charged_once_settled(url, "alice", expected) == expected


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_full_pool_is_said_to_be_full_not_a_read_timeout(
    workdir: Path, flavour: str
) -> None:
    """A pool of 2 connections that alice may take whole (``key_share = 1``): with both
    held by her stalled streams, bob waits ``connect_timeout`` for a connection and gets
    a 503 ``upstream_busy`` saying so, not a 504 about a read timeout; nothing reached
    the upstream for him, and his output reservation is refunded."""
    pool = "max_connections = 2\nkey_share = 1"
    with trio.fail_after(90):
        async with (
            proxied(workdir, flavour, tokens_per_second=5_000, pool=pool) as (url, upstream),
            httpx.AsyncClient(timeout=30) as client,
        ):
            body = chat("alice", LONG, stream=True)
            async with stalled_stream(url, "alice", body), stalled_stream(url, "alice", body):
                await wait_for_ledger(upstream, "alice", 2)
                answer = await client.post(
                    f"{url}/v1/chat/completions",
                    json=chat("bob", 20, stream=False),
                    headers=auth("bob"),
                )
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "upstream_busy" and error["type"] == "server_error"
            assert error["message"] == (
                "All 2 connections of this node to the upstream servers are in use; none "
                "freed within 2 s. Please retry shortly."
            )
            assert answer.headers["retry-after"] == "1"
            await assert_charged_as_billed(url, upstream, "alice")
            assert await upstream.billed("bob") == Billed()
            bob = await charged(url, "bob")
            assert (bob.requests, bob.output_tokens) == (1, 0)


# --- holes 1 and 2: what the upstream reads beyond max_tokens and the messages -----------

# A field each upstream reads for its output length that tokenguard did not: llama.cpp
# reads n_predict before max_tokens; vLLM generates best_of sequences (neither server
# reads max_new_tokens, which is Hugging Face TGI's).
BYPASSES = {
    "llama": {"max_tokens": 1, "n_predict": 5_000},
    "vllm": {"max_tokens": 100, "best_of": 50},
}


async def send_at_once(url: str, bodies: list[dict[str, Any]]) -> list[int]:
    """POST every body for carol at the same time; their statuses."""
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(body: dict[str, Any]) -> None:
            answer = await client.post(
                f"{url}/v1/chat/completions", json=body, headers=auth("carol")
            )
            statuses.append(answer.status_code)

        async with trio.open_nursery() as nursery:
            for body in bodies:
                nursery.start_soon(one, body)
    return statuses


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_length_field_the_upstream_reads_never_spends_past_the_output_limit(
    workdir: Path, flavour: str
) -> None:
    """Ten requests at once, each naming a tiny max_tokens and a length field the
    upstream reads instead: whatever is admitted, the upstream must not generate past
    carol's output limit, and she pays what it billed."""
    body = {**chat("carol", 1, stream=False), **BYPASSES[flavour]}
    with trio.fail_after(120):
        # Slow enough that all ten are admitted before any is settled.
        async with proxied(workdir, flavour, tokens_per_second=1_000) as (url, upstream):
            await send_at_once(url, [body] * 10)
            billed = await upstream.billed("carol")
            assert billed.output_tokens <= TIGHT["output_tpm"], billed
            assert await charged_once_settled(url, "carol", billed) == billed


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_tool_schemas_defs_are_paid_for_and_never_spend_past_the_input_limit(
    workdir: Path, flavour: str
) -> None:
    """Five requests whose tool schema holds ~20,000 tokens of text in ``$defs``: the
    upstream reads all of it, so it must not read more than carol's input limit in a
    window, and she pays at least what it billed."""
    defs = {"Note": {"type": "string", "description": " ".join(["schema"] * 20_000)}}
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "$defs": defs}},
    }
    body = {**chat("carol", 10, stream=False), "tools": [tool]}
    with trio.fail_after(120):
        async with proxied(workdir, flavour) as (url, upstream):
            await send_at_once(url, [body] * 5)
            billed = await upstream.billed("carol")
            assert billed.input_tokens <= TIGHT["input_tpm"], billed
            assert (await charged(url, "carol")).input_tokens >= billed.input_tokens
