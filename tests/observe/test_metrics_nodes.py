"""Prometheus metrics of real nodes: a node's ``GET /metrics`` and the supervisor's metrics.

A real node reads the feed's subscribers and dropped events when scraped and counts
upstream failures by model and outcome; model labels are bounded; the raw scrape
endpoint answers only ``GET /metrics``; each node of ``serve --nodes 2`` and the
supervisor serve their metrics, and a node killed with SIGKILL shows up as a restart
and is up again.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from drivers.memory import MemoryStore
from tests.support.metrics_samples import (
    CHAT,
    CONFIG,
    MESSAGES,
    TEST_TIMEOUT,
    Samples,
    auth,
    parse,
    value,
)
from tests.support.processes import START_TIMEOUT, free_ports, running_cluster, write_config
from tests.support.usage_feed import running_node, subscriber
from tokenguard.cli import main as cli
from tokenguard.cluster.metrics_server import scrape_response, supervisor_registry
from tokenguard.config.loading import parse_settings
from tokenguard.model import digest_of
from tokenguard.observe.metrics import BoundedLabel, Metrics
from tokenguard.observe.subscriber import Viewer

# --- a real node (hypercorn, websockets) ---------------------------------------------------


async def test_feed_subscribers_and_dropped_events_are_read_when_scraped() -> None:
    admin = "admin-token-for-the-metrics-tests"
    config = {**CONFIG, "feed": {"admin_token": admin, "backlog": 2}}
    settings = parse_settings(config, "<test>", environ={})
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings) as node, httpx.AsyncClient(base_url=node.url) as http:

            async def metrics() -> Samples:
                answer = await http.get("/metrics")
                assert answer.status_code == 200
                return parse(answer.text)

            assert value(await metrics(), "tokenguard_feed_subscribers") == 0
            async with subscriber(node.ws_url, "sk-bob") as ws:
                await ws.get_message()  # "ready": the subscription is registered
                assert value(await metrics(), "tokenguard_feed_subscribers") == 1
            # The server notices the close (a scrape is the only thing to wait on).
            while value(await metrics(), "tokenguard_feed_subscribers") != 0:  # noqa: ASYNC110
                await trio.sleep(0.02)
            # A subscriber that takes nothing: its backlog of 2 overflows.
            with node.feed.subscription(Viewer("admin")) as stuck:
                for _ in range(4):
                    answer = await http.post(
                        CHAT,
                        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5},
                        headers=auth("sk-bob"),
                    )
                    assert answer.status_code == 200
                # 8 events (admitted + settled per request), 2 kept: a counter to watch.
                while stuck.dropped_total < 6:  # noqa: ASYNC110
                    await trio.sleep(0.02)
                live = stuck.dropped_total
                dropped = value(
                    await metrics(), "tokenguard_feed_dropped_events_total", stage="subscriber"
                )
                assert dropped == stuck.dropped_total
            # Counted still once the subscriber is gone.
            samples = await metrics()
            assert (
                value(samples, "tokenguard_feed_dropped_events_total", stage="subscriber") >= live
            )
            assert value(samples, "tokenguard_feed_dropped_events_total", stage="publish") == 0


async def test_upstream_failures_are_counted_by_model_and_outcome() -> None:
    port = free_ports()  # nothing listens there: every forward is a connection error
    config = {**CONFIG, "upstream": {"base_url": f"http://127.0.0.1:{port}/v1"}}
    settings = parse_settings(config, "<test>", environ={})
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings) as node, httpx.AsyncClient(base_url=node.url) as http:
            body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
            for _ in range(2):
                answer = await http.post(CHAT, json=body, headers=auth("sk-bob"))
                assert answer.status_code == 502
            samples = parse((await http.get("/metrics")).text)
    errors = "tokenguard_upstream_errors_total"
    assert value(samples, errors, model="gpt-4o", outcome="connect_error") == 2
    seconds = "tokenguard_upstream_request_seconds_count"
    assert value(samples, seconds, model="gpt-4o", outcome="connect_error") == 2
    assert value(samples, "tokenguard_requests_total", path=CHAT, status="502", key="bob") == 2


# --- values and the raw scrape endpoint -----------------------------------------------------


def test_model_labels_are_bounded() -> None:
    label = BoundedLabel(limit=2)
    assert [label(m) for m in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
        "b",
    ]
    metrics = Metrics(node_id=3, store=MemoryStore())
    for i in range(100):
        metrics.upstream_result(f"model-{i}", 0.01, "timeout")
    samples = parse(metrics.exposition().decode())
    models = {
        dict(labels)["model"]
        for name, labels in samples
        if name == "tokenguard_upstream_errors_total"
    }
    assert len(models) == 51 and "other" in models


def test_the_raw_scrape_endpoint_answers_only_get_metrics() -> None:
    class Nodes:
        nodes = 2
        node_children: list[Any] = []
        redis_child = None

    registry = supervisor_registry(Nodes())  # type: ignore[arg-type]

    def status(head: bytes, digest: str | None = None) -> bytes:
        return scrape_response(head, registry, digest).split(b"\r\n", 1)[0]

    assert status(b"GET /metrics HTTP/1.1\r\nHost: x") == b"HTTP/1.1 200 OK"
    assert status(b"GET /metrics?x=1 HTTP/1.0") == b"HTTP/1.1 200 OK"
    assert status(b"GET / HTTP/1.1") == b"HTTP/1.1 404 Not Found"
    assert status(b"POST /metrics HTTP/1.1") == b"HTTP/1.1 405 Method Not Allowed"
    assert status(b"garbage") == b"HTTP/1.1 400 Bad Request"
    digest = digest_of("the-supervisor-token")
    assert status(b"GET /metrics HTTP/1.1", digest) == b"HTTP/1.1 401 Unauthorized"
    good = b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer the-supervisor-token"
    assert status(good, digest) == b"HTTP/1.1 200 OK"
    head = scrape_response(b"HEAD /metrics HTTP/1.1", registry, None)
    assert head.endswith(b"\r\n\r\n")  # no body


# --- real processes: serve --nodes 2 --metrics-port -----------------------------------------


async def poll(url: str, until: Any, client: httpx.AsyncClient) -> Samples:
    """Scrape ``url`` until ``until(samples)`` holds (the caller bounds the time)."""
    while True:
        try:
            answer = await client.get(url)
            if answer.status_code == 200:
                samples = parse(answer.text)
                if until(samples):
                    return samples
        except httpx.TransportError:
            pass
        await trio.sleep(0.1)


@pytest.mark.slow
async def test_a_cluster_serves_node_and_supervisor_metrics_and_counts_restarts(
    workdir: Path,
) -> None:
    config = write_config(
        workdir / "tokenguard.toml",
        '[[keys]]\nkey = "sk-cluster"\nname = "cluster"\nrpm = 1000\n',
    )
    metrics_port = free_ports()
    with trio.fail_after(START_TIMEOUT + 90):
        async with (
            running_cluster(
                workdir / "state",
                nodes=2,
                config=config,
                args=["--metrics-port", str(metrics_port)],
            ) as cluster,
            httpx.AsyncClient(timeout=5) as http,
        ):
            supervisor_url = f"http://127.0.0.1:{metrics_port}/metrics"
            assert f"127.0.0.1:{metrics_port}/metrics" in cluster.supervisor.output()
            for i, url in enumerate(cluster.urls):
                answer = await http.post(
                    url + CHAT,
                    json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5},
                    headers=auth("sk-cluster"),
                )
                assert answer.status_code == 200
                samples = parse((await http.get(url + "/metrics")).text)
                assert value(samples, "tokenguard_node_info", node=str(i)) == 1
                requests = "tokenguard_requests_total"
                assert value(samples, requests, path=CHAT, status="200", key="cluster") == 1
                # The nodes share the embedded Redis through a GuardedStore: timed.
                count = "tokenguard_store_call_seconds_count"
                assert value(samples, count, operation="admit") == 1
                assert value(samples, "tokenguard_store_breaker_open") == 0

            up, restarts = (
                "tokenguard_supervisor_node_up",
                "tokenguard_supervisor_node_restarts_total",
            )
            samples = await poll(
                supervisor_url,
                lambda s: all(value(s, up, node=n) == 1 for n in ("0", "1")),
                http,
            )
            assert value(samples, restarts, node="1") == 0
            assert value(samples, "tokenguard_supervisor_redis_up") == 1
            assert value(samples, "tokenguard_supervisor_nodes") == 2
            assert (await http.get(supervisor_url.replace("/metrics", "/"))).status_code == 404

            os.kill(cluster.node_pid(1), signal.SIGKILL)
            samples = await poll(
                supervisor_url,
                lambda s: value(s, restarts, node="1") == 1 and value(s, up, node="1") == 1,
                http,
            )
            assert value(samples, restarts, node="0") == 0
            assert value(samples, up, node="0") == 1
            # The new node 1 counts from zero.
            fresh = parse((await http.get(cluster.urls[1] + "/metrics")).text)
            requests = "tokenguard_requests_total"
            assert value(fresh, requests, path=CHAT, status="200", key="cluster") == 0


def test_metrics_port_needs_a_supervisor(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--metrics-port", "9100"])
    assert exit_info.value.code == 2
    assert "--metrics-port needs --nodes > 1" in capsys.readouterr().err
