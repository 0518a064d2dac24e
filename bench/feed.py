"""The usage feed's cost and speed: node throughput with live subscribers versus none,
and event delivery latency from one node to a subscriber on another.

``python -m bench feed`` starts its own cluster: a redis-server (unix socket) and
``--nodes`` node processes sharing it, with a generated config (``--keys`` keys, limits
far above the load) and admin token. Then:

* **Throughput**, side by side in one run: ``--rounds`` rounds of each kind, of
  ``--seconds`` each, the kinds taking turns (their order rotating each time), each
  round sending chat load (``bench load``'s client, ``--concurrency`` workers, no
  streams, spread over the keys) to node 0 alone. The kinds: *none* (no subscriber),
  *keys* (``--subscribers`` subscribers on node 0, each with one key's token: each sees
  that key's events) and *admin* (``--subscribers`` admin subscribers on node 0: each
  sees every event), each of the last two in the feed's default mode (one event per
  websocket message) and in its batched mode (``?batch=1``: every pending event in one
  message). The subscribers run in a process of their own (so their work does not slow
  the load client) and read every event. Reported per kind: requests/s of each round
  and their median, node 0's CPU time per request (from ``/proc``: what the feed costs
  the node, whatever else runs on the machine), the ratio of the medians to *none*
  (goal: at least 0.90; the verdict is on it), the same ratio of node 0's requests per
  CPU second (*CPU ratio*: what the node sustains per core, the steadier figure on a
  shared machine, where the load client may be the bottleneck), and the events and
  messages each subscriber received.
* **Latency**: one admin subscriber on node 1, in each mode, while requests go to node
  0 at ``--latency-rate`` per second for ``--latency-seconds``: for every ``admitted``
  event, its arrival time minus its server timestamp ``ts`` (same host, same clock).
  Goal: median at most 50 ms.

``add_arguments`` registers the options on a subparser, ``main`` runs it (exit status
0, or 1 when the run failed), ``run`` is the same from trio, returning the figures.
``python -m bench.feed subscribe URL BATCH TOKEN...`` is the subscribers' process
(internal; ``BATCH`` is ``0`` or ``1``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bench.load.options import KeySpec, LoadOptions, TokenRange
from bench.load.run import run_load
from bench.load.summary import percentiles
from bench.ports import SUITE_PORTS, free_ports
from bench.procfs import cpu_seconds
from tokenguard.cluster.redis_server import RedisServerSpec, run_redis_server, stop_process
from tokenguard.config.settings import ADMIN_TOKEN_ENV

ADMIN_TOKEN = "bench-feed-admin-token-0123456789"
START_TIMEOUT = 30.0
GOAL_RATIO = 0.90
GOAL_LATENCY_MS = 50.0
KINDS = ("none", "keys", "keys-batch", "admin", "admin-batch")


def key_secret(i: int) -> str:
    return f"sk-bench-feed-{i}"


def config_text(keys: int) -> str:
    lines = ["[window]", "seconds = 60", "bucket_seconds = 5", ""]
    for i in range(keys):
        lines += [
            "[[keys]]",
            f'key = "{key_secret(i)}"',
            f'name = "bench-{i}"',
            "rpm = 100000000",
            "input_tpm = 100000000000",
            "output_tpm = 100000000000",
            "",
        ]
    return "\n".join(lines)


@attrs.frozen
class FeedBenchOptions:
    nodes: int = 2
    subscribers: int = 10
    keys: int = 10
    seconds: float = 5.0
    rounds: int = 3
    concurrency: int = 32
    latency_seconds: float = 5.0
    latency_rate: float = 50.0


@attrs.frozen
class Round:
    kind: str
    throughput: float  # requests/s
    node_cpu_ms: float  # node 0's CPU time per request
    received: tuple[int, ...] = ()  # events each subscriber received
    messages: tuple[int, ...] = ()  # websocket messages each subscriber received
    lagged: int = 0


@attrs.frozen
class FeedBenchResult:
    options: FeedBenchOptions
    rounds: tuple[Round, ...]
    latency_ms: dict[str, float]  # node 0 -> subscriber on node 1, default mode
    latency_events: int
    batch_latency_ms: dict[str, float]  # the same in batched mode
    batch_latency_events: int

    def of(self, kind: str) -> list[Round]:
        return [r for r in self.rounds if r.kind == kind]

    def median(self, kind: str, field: str = "throughput") -> float:
        return statistics.median(getattr(r, field) for r in self.of(kind))

    def ratio(self, kind: str) -> float:
        return self.median(kind) / self.median("none")

    def cpu_ratio(self, kind: str) -> float:
        """Node 0's requests per CPU second with ``kind`` versus none: the throughput
        ratio of a node whose core is the bottleneck, whatever the client got."""
        return self.median("none", "node_cpu_ms") / self.median(kind, "node_cpu_ms")

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["ratios"] = {kind: self.ratio(kind) for kind in KINDS[1:]}
        data["cpu_ratios"] = {kind: self.cpu_ratio(kind) for kind in KINDS[1:]}
        return data


# --- processes ------------------------------------------------------------------------


async def _wait_healthy(url: str, process: trio.Process) -> None:
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"node {url} exited with status {process.returncode}")
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


@attrs.frozen
class Nodes:
    urls: list[str]
    pids: list[int]


@asynccontextmanager
async def running_nodes(nodes: int, keys: int, directory: Path) -> AsyncIterator[Nodes]:
    """A redis-server and ``nodes`` node processes on it, until the ``async with`` ends."""
    config = directory / "feed-bench.toml"
    config.write_text(config_text(keys))
    spec = RedisServerSpec(
        state_dir=directory / "redis", unix_socket=directory / "redis.sock", appendonly=False
    )
    env = {**os.environ, ADMIN_TOKEN_ENV: ADMIN_TOKEN}
    async with trio.open_nursery() as nursery:
        await nursery.start(run_redis_server, spec)
        processes: list[trio.Process] = []
        try:
            urls = []
            for node_id in range(nodes):
                port = free_ports(within=SUITE_PORTS)
                argv = [sys.executable, "-m", "tokenguard", "serve", "--config", str(config)]
                argv += ["--store", spec.url, "--port", str(port), "--node-id", str(node_id)]
                # A local file, opened and closed without awaiting anything.
                with open(directory / f"node{node_id}.log", "wb") as log:  # noqa: ASYNC230
                    processes.append(
                        await trio.lowlevel.open_process(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                        )  # fmt: skip
                    )
                urls.append(f"http://127.0.0.1:{port}")
            with trio.fail_after(START_TIMEOUT):
                for url, process in zip(urls, processes, strict=True):
                    await _wait_healthy(url, process)
            yield Nodes(urls=urls, pids=[p.pid for p in processes])
        finally:
            with trio.CancelScope(shield=True):
                for process in processes:
                    await stop_process(process)
            nursery.cancel_scope.cancel()


def _ws_url(url: str, batch: bool = False) -> str:
    return url.replace("http://", "ws://", 1) + "/v1/usage/stream" + ("?batch=1" if batch else "")


# --- the subscribers' process -----------------------------------------------------------


async def subscribe_many(url: str, tokens: Sequence[str], batch: bool = False) -> dict[str, Any]:
    """One websocket subscriber per token (in batched mode with ``batch``), reading
    every event until SIGTERM/SIGINT; prints ``ready`` once all are subscribed; returns
    the events and the messages each received, and the ``lagged`` events."""
    received = [0] * len(tokens)
    messages = [0] * len(tokens)
    lagged = 0

    async def one(i: int, task_status: trio.TaskStatus[None]) -> None:
        nonlocal lagged
        headers = [(b"Authorization", f"Bearer {tokens[i]}".encode())]
        async with open_websocket_url(_ws_url(url, batch), extra_headers=headers) as ws:
            first = json.loads(await ws.get_message())
            if first["type"] != "ready":
                raise RuntimeError(f"not subscribed: {first}")
            task_status.started()
            while True:
                text = await ws.get_message()
                messages[i] += 1
                # Batched: one event per line. Counted, not parsed: this process shares
                # the machine with the nodes, so it does as little as it can.
                for line in text.split("\n"):
                    received[i] += 1
                    if '"type":"lagged"' in line:
                        lagged += 1

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for i in range(len(tokens)):
                await nursery.start(one, i)
            print("ready", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return {"received": received, "messages": messages, "lagged": lagged}


@asynccontextmanager
async def subscriber_process(
    url: str, tokens: Sequence[str], batch: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Run :func:`subscribe_many` in a child process; once the ``async with`` is left,
    its report is in the yielded dict."""
    report: dict[str, Any] = {}
    argv = [sys.executable, "-m", "bench.feed", "subscribe", url, str(int(batch)), *tokens]
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(START_TIMEOUT):
            while b"ready\n" not in output:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError("the subscriber process exited before it was ready")
                output += chunk
        yield report
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(START_TIMEOUT):
            while chunk := await process.stdout.receive_some():
                output += chunk
        report.update(json.loads(output.split(b"ready\n", 1)[1]))
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process)


# --- measurements -----------------------------------------------------------------------


def _load_options(url: str, options: FeedBenchOptions, seconds: float) -> LoadOptions:
    return LoadOptions(
        urls=(url,),
        keys=tuple(
            KeySpec(name=f"bench-{i}", secret=key_secret(i), limits=None)
            for i in range(options.keys)
        ),
        duration=seconds,
        concurrency=options.concurrency,
        prompt_tokens=TokenRange(20, 100),
        max_tokens=TokenRange(16, 64),
        stream_share=0.0,
    )


async def load_round(
    kind: str, nodes: Nodes, options: FeedBenchOptions, seconds: float | None = None
) -> Round:
    """One round of load on node 0, with the subscribers of ``kind`` attached."""
    url, pid = nodes.urls[0], nodes.pids[0]
    load = _load_options(url, options, options.seconds if seconds is None else seconds)
    tokens = {
        "none": [],
        "keys": [key_secret(i % options.keys) for i in range(options.subscribers)],
        "admin": [ADMIN_TOKEN] * options.subscribers,
    }[kind.removesuffix("-batch")]
    batch = kind.endswith("-batch")
    async with AsyncExitStack() as stack:
        # The subscribers' report is filled in when their process is stopped.
        report = (
            await stack.enter_async_context(subscriber_process(url, tokens, batch))
            if tokens
            else {}
        )
        cpu = cpu_seconds(pid)
        result = await run_load(load)
        cpu = cpu_seconds(pid) - cpu
    summary = result.summary
    if summary.statuses.get("200", 0) != summary.requests:
        raise RuntimeError(f"the load got answers other than 200: {summary.statuses}")
    return Round(
        kind=kind,
        throughput=summary.throughput,
        node_cpu_ms=cpu / summary.requests * 1000,
        received=tuple(report.get("received", ())),
        messages=tuple(report.get("messages", ())),
        lagged=report.get("lagged", 0),
    )


async def measure_latency(
    source: str, subscriber: str, seconds: float, rate: float, batch: bool = False
) -> tuple[dict[str, float], int]:
    """Requests to ``source`` at ``rate``/s; delays (ms) of their ``admitted`` events
    as seen by an admin subscriber on ``subscriber`` (in batched mode with ``batch``)."""
    delays: list[float] = []
    headers = [(b"Authorization", f"Bearer {ADMIN_TOKEN}".encode())]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with open_websocket_url(_ws_url(subscriber, batch), extra_headers=headers) as ws:
        if json.loads(await ws.get_message())["type"] != "ready":
            raise RuntimeError("the latency subscriber was not accepted")
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as client:

            async def send() -> None:
                auth = {"Authorization": f"Bearer {key_secret(0)}"}
                start = trio.current_time()
                for i in range(math.ceil(seconds * rate)):
                    await trio.sleep_until(start + i / rate)
                    response = await client.post(
                        f"{source}/v1/chat/completions", json=body, headers=auth
                    )
                    response.raise_for_status()
                await trio.sleep(0.5)  # let the last events arrive
                nursery.cancel_scope.cancel()

            nursery.start_soon(send)
            while True:
                text = await ws.get_message()
                arrived = time.time() * 1000
                for line in text.split("\n"):
                    event = json.loads(line)
                    if event["type"] == "admitted":
                        delays.append(arrived - event["ts"])
    return percentiles(delays), len(delays)


async def run(options: FeedBenchOptions, *, log: Any = None) -> FeedBenchResult:
    """Start the cluster, measure, stop it; return the figures."""

    def say(text: str) -> None:
        if log is not None:
            print(text, file=log, flush=True)

    if options.nodes < 2:
        raise ValueError("--nodes must be at least 2 (latency is measured node to node)")
    if options.keys < 1 or options.subscribers < 1 or options.rounds < 1:
        raise ValueError("--keys, --subscribers and --rounds must be at least 1")
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="tg-bench-feed-") as directory:
        async with running_nodes(options.nodes, options.keys, Path(directory)) as nodes:
            await load_round("none", nodes, options, seconds=1.0)  # warm up
            for i in range(options.rounds):
                # Rotate the order, so a drift of the machine favours no kind.
                turn = i % len(KINDS)
                for kind in KINDS[turn:] + KINDS[:turn]:
                    result = await load_round(kind, nodes, options)
                    rounds.append(result)
                    say(
                        f"round {i + 1} {kind:>11}: {result.throughput:7.1f} requests/s, "
                        f"node 0 {result.node_cpu_ms:.2f} ms CPU/request"
                        + (f", {min(result.received)} events each" if result.received else "")
                    )
            latency, events = await measure_latency(
                nodes.urls[0], nodes.urls[1], options.latency_seconds, options.latency_rate
            )
            batch_latency, batch_events = await measure_latency(
                nodes.urls[0],
                nodes.urls[1],
                options.latency_seconds,
                options.latency_rate,
                batch=True,
            )
    return FeedBenchResult(
        options=options,
        rounds=tuple(rounds),
        latency_ms=latency,
        latency_events=events,
        batch_latency_ms=batch_latency,
        batch_latency_events=batch_events,
    )


def _latency_text(latency: dict[str, float]) -> str:
    verdict = "ok" if latency.get("p50", math.inf) <= GOAL_LATENCY_MS else "ABOVE GOAL"
    return (
        f"median {latency.get('p50', math.nan):.1f} ms, p95 {latency.get('p95', math.nan):.1f} "
        f"ms, p99 {latency.get('p99', math.nan):.1f} ms, max {latency.get('max', math.nan):.1f} "
        f"ms (goal median <= {GOAL_LATENCY_MS:g} ms: {verdict})"
    )


def format_report(result: FeedBenchResult) -> str:
    o = result.options
    lines = [
        f"usage feed benchmark: {o.nodes} nodes on one redis-server; load on node 0 "
        f"({o.concurrency} workers over {o.keys} keys, no streams), {o.rounds} rounds of "
        f"{o.seconds:g} s per kind",
        f"  {'kind':<36} {'requests/s per round':<24} {'median':>8} {'ratio':>6} "
        f"{'node CPU/req':>13} {'CPU ratio':>9}",
    ]
    describe = {
        "none": "no subscriber",
        "keys": f"{o.subscribers} key subscribers",
        "keys-batch": f"{o.subscribers} key subscribers, batched",
        "admin": f"{o.subscribers} admin subscribers",
        "admin-batch": f"{o.subscribers} admin subscribers, batched",
    }
    for kind in KINDS:
        per_round = ", ".join(f"{r.throughput:.0f}" for r in result.of(kind))
        ratio = result.ratio(kind)
        verdict = "" if kind == "none" else ("  ok" if ratio >= GOAL_RATIO else "  BELOW GOAL")
        lines.append(
            f"  {describe[kind]:<36} {per_round:<24} {result.median(kind):8.1f} {ratio:6.3f} "
            f"{result.median(kind, 'node_cpu_ms'):10.2f} ms {result.cpu_ratio(kind):9.3f}"
            f"{verdict}"
        )
    for kind in KINDS[1:]:
        received = [n for r in result.of(kind) for n in r.received]
        messages = sum(n for r in result.of(kind) for n in r.messages)
        lagged = sum(r.lagged for r in result.of(kind))
        lines.append(
            f"  {describe[kind]}: {min(received)}-{max(received)} events per subscriber "
            f"per round, {sum(received) / max(messages, 1):.1f} events per message, "
            f"{lagged} lagged"
        )
    lines += [
        f"  delivery latency, node 0 -> subscriber on node 1 ({result.latency_events} events "
        f"at {o.latency_rate:g}/s): {_latency_text(result.latency_ms)}",
        f"  the same, batched ({result.batch_latency_events} events): "
        f"{_latency_text(result.batch_latency_ms)}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FeedBenchOptions()
    parser.add_argument("--nodes", type=int, default=d.nodes, help="node processes (>= 2)")
    parser.add_argument(
        "--subscribers", type=int, default=d.subscribers, help="live subscribers on node 0"
    )
    parser.add_argument("--keys", type=int, default=d.keys, help="keys the load is spread over")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="length of each round")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="rounds of each kind")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="load workers")
    parser.add_argument(
        "--latency-seconds", type=float, default=d.latency_seconds,
        help="length of the latency measurement",
    )  # fmt: skip
    parser.add_argument(
        "--latency-rate", type=float, default=d.latency_rate,
        help="requests per second during the latency measurement",
    )  # fmt: skip
    parser.add_argument("--json", dest="json_path", help="also write the figures here")


def main(args: argparse.Namespace) -> int:
    options = FeedBenchOptions(
        nodes=args.nodes,
        subscribers=args.subscribers,
        keys=args.keys,
        seconds=args.seconds,
        rounds=args.rounds,
        concurrency=args.concurrency,
        latency_seconds=args.latency_seconds,
        latency_rate=args.latency_rate,
    )
    try:
        result = trio.run(lambda: run(options, log=sys.stderr))
    except (RuntimeError, ValueError, OSError, ConnectionClosed) as exc:
        print(f"bench feed: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscribe"]:
        url, batch, *tokens = sys.argv[2:]
        print(json.dumps(trio.run(subscribe_many, url, tokens, batch == "1")), flush=True)
        sys.exit(0)
    parser = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
