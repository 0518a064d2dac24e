"""The live usage feed across real node processes sharing one Redis (standalone, and a
3-master Redis Cluster): events cross nodes in order (one per message, or batched with
``?batch=1``), keys never see each other's, bad
tokens get 1008, and a stalled subscriber does not slow the request path.

Nodes are ``tokenguard serve --store URL --node-id I`` processes on free ports of
127.0.0.1 (:mod:`tests.support.processes` always stops them); the admin token comes from the
environment. Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.support.processes import (
    START_TIMEOUT,
    TokenguardProcess,
    free_ports,
    running_tokenguard,
    wait_healthy,
)
from tests.support.usage_feed import collect, next_events, of_type, refused_code, subscriber
from tokenguard.config.settings import ADMIN_TOKEN_ENV

pytestmark = pytest.mark.slow

ADMIN = "admin-token-for-the-cluster-feed-tests"
CONFIG = """\
[window]
seconds = 60
bucket_seconds = 5

[feed]
backlog = {backlog}

[[keys]]
key = "sk-alpha"
name = "alpha"
rpm = 1000000
input_tpm = 1000000000
output_tpm = 1000000000

[[keys]]
key = "sk-beta"
name = "beta"
rpm = 1000000
input_tpm = 1000000000
output_tpm = 1000000000
"""
MESSAGES = [{"role": "user", "content": "hello across nodes"}]


@asynccontextmanager
async def running_nodes(
    directory: Path,
    store_url: str,
    count: int,
    backlog: int = 1000,
    processes: list[TokenguardProcess] | None = None,
) -> AsyncIterator[list[str]]:
    """``count`` node processes on ``store_url``; yields their URLs once all are healthy
    (and appends the processes to ``processes``, if given)."""
    config = directory / "feed.toml"
    config.write_text(CONFIG.format(backlog=backlog))
    port = free_ports(count)
    async with AsyncExitStack() as stack:
        urls = []
        for node_id in range(count):
            args = ["serve", "--store", store_url, "--config", str(config)]
            args += ["--port", str(port + node_id), "--node-id", str(node_id)]
            process = await stack.enter_async_context(
                running_tokenguard(
                    args, output_path=directory / f"node{node_id}.out", env={ADMIN_TOKEN_ENV: ADMIN}
                )
            )
            if processes is not None:
                processes.append(process)
            urls.append(f"http://127.0.0.1:{port + node_id}")
        with trio.fail_after(START_TIMEOUT):
            for node_id, url in enumerate(urls):
                await wait_healthy(url, node_id=node_id)
        yield urls


def ws_url(url: str, query: str = "") -> str:
    return url.replace("http://", "ws://") + "/v1/usage/stream" + query


async def chat(client: httpx.AsyncClient, url: str, key: str, max_tokens: int) -> int:
    response = await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": max_tokens},
    )
    return response.status_code


async def ready(ws: WebSocketConnection) -> dict[str, Any]:
    event = json.loads(await ws.get_message())
    assert event["type"] == "ready", event
    return event


@pytest.mark.parametrize(
    ("store", "query"),
    [("redis", ""), ("redis-cluster", ""), ("redis", "?batch=1")],
    ids=["redis", "redis-cluster", "redis-batched"],
)
async def test_events_cross_nodes_in_order_and_keys_stay_apart(
    store: str, query: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Traffic sent to node 2 reaches an admin subscriber on node 0 in order; a key's
    subscriber on node 1 sees its own events only. In batched mode too, where a message
    carries the events pending at that moment."""
    store_url = request.getfixturevalue("redis_url" if store == "redis" else "redis_cluster_url")
    batched = query == "?batch=1"
    with trio.fail_after(START_TIMEOUT + 90):
        async with running_nodes(tmp_path, store_url, 3) as urls:
            admin_headers = [(b"Authorization", f"Bearer {ADMIN}".encode())]
            alpha_headers = [(b"Authorization", b"Bearer sk-alpha")]
            async with (
                open_websocket_url(ws_url(urls[0], query), extra_headers=admin_headers) as admin,
                open_websocket_url(ws_url(urls[1], query), extra_headers=alpha_headers) as alpha,
                httpx.AsyncClient(timeout=10) as client,
            ):
                assert (await ready(admin))["node"] == 0
                assert (await ready(alpha))["batch"] is batched
                sent = []
                for i in range(20):
                    key = ("sk-alpha", "sk-beta")[i % 2]
                    assert await chat(client, urls[2], key, max_tokens=10 + i) == 200
                    sent.append((key.removeprefix("sk-"), 10 + i))
                admin_messages: list[list[dict[str, Any]]] = []
                while sum(len(of_type(m, "admitted", "settled")) for m in admin_messages) < 40:
                    admin_messages.append(await next_events(admin))
                admin_events = [e for message in admin_messages for e in message]
                alpha_events = await collect(
                    alpha, lambda ev: len(of_type(ev, "admitted", "settled")) == 20
                )
        traffic = of_type(admin_events, "admitted", "settled")
        assert {e["node"] for e in traffic} == {2}
        assert [e["type"] for e in traffic] == ["admitted", "settled"] * 20
        admitted = of_type(traffic, "admitted")
        assert [(e["key"], e["reserved"]["output_tokens"]) for e in admitted] == sent
        seqs = [e["seq"] for e in traffic]
        assert seqs == sorted(seqs)
        assert [e["id"] for e in admin_events] == list(range(2, 2 + len(admin_events)))
        # One event per message by default; several in some message when batched (a
        # node publishes the events of 20 ms at once; a request's two come ms apart).
        assert (len(admin_messages) < len(admin_events)) is batched
        # Snapshots are the serving node's own.
        assert {e["node"] for e in of_type(admin_events, "snapshot")} <= {0}

        assert {e["key"] for e in alpha_events} == {"alpha"}
        alpha_admitted = of_type(alpha_events, "admitted")
        assert [e["reserved"]["output_tokens"] for e in alpha_admitted] == [
            tokens for key, tokens in sent if key == "alpha"
        ]


async def test_bad_tokens_are_refused_with_1008(redis_url: str, tmp_path: Path) -> None:
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_nodes(tmp_path, redis_url, 2) as urls:
            async with subscriber(ws_url(urls[1]), "sk-nobody") as ws:
                assert await refused_code(ws) == 1008
            async with subscriber(ws_url(urls[0])) as ws:
                await ws.send_message(json.dumps({"type": "auth", "token": "not-the-admin"}))
                assert await refused_code(ws) == 1008
            async with subscriber(ws_url(urls[0]), "sk-beta", query="?key=alpha") as ws:
                assert await refused_code(ws) == 1008


# --- a stalled subscriber and the request path --------------------------------------------

STALLED_REQUESTS = 1200
CONCURRENCY = 16


async def test_a_stalled_subscriber_does_not_slow_the_request_path(
    redis_url: str, tmp_path: Path
) -> None:
    """An admin subscriber that reads nothing (a 4 KiB socket buffer, one message
    queued: the node's socket to it fills within the first requests) while 1,200
    requests go through the node, two events each: every request is answered 200 (a
    node that waited for the subscriber would answer none: the hang guard), and once the
    subscriber reads again it is told it lagged, with the events dropped for it: the
    node dropped events past its backlog (100) instead of waiting for it or queueing
    without bound.

    What a live subscriber costs the node's throughput is a benchmark's business
    (`python -m bench feed`, the suite's `feed` section), not a timed test's."""
    answered = 0
    with trio.fail_after(START_TIMEOUT + 120):
        async with running_nodes(tmp_path, redis_url, 1, backlog=100) as (url,):
            pool = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
            async with httpx.AsyncClient(timeout=30, limits=pool) as client:
                assert await chat(client, url, "sk-alpha", max_tokens=16) == 200  # warm
                async with subscriber(ws_url(url), ADMIN, receive_buffer=4096) as stalled:
                    await ready(stalled)
                    left = STALLED_REQUESTS

                    async def worker() -> None:
                        nonlocal left, answered
                        while left > 0:
                            left -= 1
                            assert await chat(client, url, "sk-alpha", max_tokens=16) == 200
                            answered += 1

                    async with trio.open_nursery() as nursery:
                        for _ in range(CONCURRENCY):
                            nursery.start_soon(worker)
                    # Reading again: what was kept, then how much was dropped.
                    events = await collect(stalled, lambda ev: bool(of_type(ev, "lagged")))
    assert answered == STALLED_REQUESTS
    (lagged,) = of_type(events, "lagged")
    kept = len(of_type(events, "admitted")) + len(of_type(events, "settled"))
    assert lagged["dropped"] > 0
    # Nothing made up, nothing counted twice: kept and dropped are the requests' events.
    assert kept + lagged["dropped"] <= 2 * (STALLED_REQUESTS + 1)


async def test_a_stopping_node_closes_its_subscribers_at_once(
    redis_url: str, tmp_path: Path
) -> None:
    """SIGTERM: the node's subscribers are closed with 1001 at once, not after the
    node's grace period (10 s), so a watcher reconnects to the restarted node quickly."""
    processes: list[TokenguardProcess] = []
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_nodes(tmp_path, redis_url, 1, processes=processes) as (url,):
            headers = [(b"Authorization", b"Bearer sk-alpha")]
            async with open_websocket_url(ws_url(url), extra_headers=headers) as ws:
                await ready(ws)
                start = trio.current_time()
                processes[0].send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
                assert trio.current_time() - start < 5
            assert await processes[0].wait() == 0
