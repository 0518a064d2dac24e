"""Concurrency leases and near-limit signals across real node processes sharing one
Redis (``tokenguard serve --nodes 3`` with the embedded redis-server).

* 50 slow streams at once, spread over the nodes, against ``max_concurrent = 5``: never
  more than 5 in flight as the client sees them, the rest refused with 429
  ``type: "concurrency"``; once those end, the slots are free again.
* A node holding leases is killed with SIGKILL: its requests' slots stay taken until
  their leases expire (``lease_seconds = 2``), then the key is usable again.
* The near-limit mark of a key's limit is crossed through several nodes: a feed
  subscriber sees exactly one ``near_limit`` event for that window and dimension.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.processes import START_TIMEOUT, running_cluster
from tests.support.usage_feed import collect, next_event, of_type, subscriber

pytestmark = pytest.mark.slow

LEASE_SECONDS = 2
TOKEN_DELAY_MS = 500  # a stream of 8 tokens lasts 4 s
CONFIG = f"""\
[limits]
lease_seconds = {LEASE_SECONDS}
near_limit_ratio = 0.8

[mock]
token_delay_ms = {{token_delay_ms}}

[[keys]]
key = "sk-busy"
name = "busy"
max_concurrent = 5

[[keys]]
key = "sk-near"
name = "near"
rpm = 10
"""
MESSAGES = [{"role": "user", "content": "hello"}]


def body(stream: bool) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 8, "stream": stream}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class InFlight:
    """Streams the client has an admitted answer for and has not finished reading."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.statuses: list[int] = []
        self.refusals: list[httpx.Response] = []

    async def stream(self, client: httpx.AsyncClient, url: str, key: str) -> None:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", headers=auth(key), json=body(True)
        ) as response:
            self.statuses.append(response.status_code)
            if response.status_code != 200:
                await response.aread()
                self.refusals.append(response)
                return
            self.now += 1  # admitted: the server took a lease before the headers
            self.most = max(self.most, self.now)
            try:
                text = "".join([chunk async for chunk in response.aiter_text()])
            finally:
                self.now -= 1
            assert text.rstrip().endswith("data: [DONE]")


def assert_concurrency_429(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "concurrency"
    assert error["code"] == "rate_limit_exceeded"
    assert "key 'busy'" in error["message"]
    assert "requests in flight (max_concurrent)" in error["message"]
    assert "Limit 5, In flight 5" in error["message"]
    assert response.headers["retry-after"] == "1"


async def test_streams_in_flight_never_exceed_max_concurrent_across_nodes(
    workdir: Path,
) -> None:
    config = workdir / "c.toml"
    config.write_text(CONFIG.format(token_delay_ms=TOKEN_DELAY_MS))
    with trio.fail_after(START_TIMEOUT + 120):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                flight = InFlight()
                async with trio.open_nursery() as nursery:
                    for i in range(50):
                        url = cluster.urls[i % 3]
                        nursery.start_soon(flight.stream, client, url, "sk-busy")
                assert flight.most <= 5
                assert sorted(flight.statuses) == [200] * 5 + [429] * 45
                for refused in flight.refusals:
                    assert_concurrency_429(refused)

                # Every stream ended and settled: all five slots are free again.
                again = InFlight()
                async with trio.open_nursery() as nursery:
                    for i in range(5):
                        nursery.start_soon(again.stream, client, cluster.urls[i % 3], "sk-busy")
                assert again.statuses == [200] * 5

                # A node dies with five streams in flight: their leases hold the key
                # at its cap until they expire (nobody renews them), then it is free.
                held = InFlight()
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(_until_killed, held, client, cluster.urls[1])
                    while held.now < 5:  # noqa: ASYNC110 (polled: the streams are the subject)
                        await trio.sleep(0.02)
                    os.kill(cluster.node_pid(1), signal.SIGKILL)
                    killed_at = trio.current_time()
                assert held.statuses == [200] * 5
                refused = await client.post(
                    f"{cluster.urls[0]}/v1/chat/completions",
                    headers=auth("sk-busy"),
                    json=body(False),
                )
                if trio.current_time() - killed_at < LEASE_SECONDS * 2 / 3:
                    # (renewed at most a third of a lease before the kill: still held)
                    assert_concurrency_429(refused)
                while True:
                    sent_at = trio.current_time()  # (admitted, if at all, right after)
                    response = await client.post(
                        f"{cluster.urls[0]}/v1/chat/completions",
                        headers=auth("sk-busy"),
                        json=body(False),
                    )
                    if response.status_code == 200:
                        break
                    assert_concurrency_429(response)
                    await trio.sleep(0.1)
                assert sent_at - killed_at <= LEASE_SECONDS + 1.0


async def _until_killed(flight: InFlight, client: httpx.AsyncClient, url: str) -> None:
    """A stream through a node that is killed mid-stream: it ends with a broken
    connection (counted in flight until then)."""
    try:
        await flight.stream(client, url, "sk-busy")
    except (httpx.TransportError, AssertionError):
        pass


async def test_near_limit_is_seen_once_per_window_across_nodes(workdir: Path) -> None:
    config = workdir / "c.toml"
    config.write_text(CONFIG.format(token_delay_ms=0))
    with trio.fail_after(START_TIMEOUT + 120):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            ws_url = cluster.urls[2].replace("http://", "ws://") + "/v1/usage/stream"
            async with (
                subscriber(ws_url, "sk-near") as ws,
                httpx.AsyncClient(timeout=30) as client,
            ):
                ready = json.loads(await ws.get_message())
                assert ready["type"] == "ready"
                await trio.sleep(0.5)  # every node hears that someone watches
                statuses = []
                for i in range(12):  # rpm 10: the mark (8) is crossed by the 8th
                    response = await client.post(
                        f"{cluster.urls[i % 3]}/v1/chat/completions",
                        headers=auth("sk-near"),
                        json=body(False),
                    )
                    statuses.append(response.status_code)
                assert statuses == [200] * 10 + [429] * 2
                events = await collect(ws, lambda e: len(of_type(e, "rejected")) == 2)
                with trio.move_on_after(1.0):  # anything late would be in by now
                    while True:
                        events.append(await next_event(ws))
                near = of_type(events, "near_limit")
                assert len(near) == 1, near
                (event,) = near
                assert event["key"] == "near"
                assert event["dimension"] == "requests"
                assert event["scope"] == "key"
                assert event["window_seconds"] == 60
                assert (event["limit"], event["used"], event["alert_at"]) == (10, 8, 8)
                assert event["ratio"] == 0.8
                assert len(of_type(events, "admitted")) == 10
