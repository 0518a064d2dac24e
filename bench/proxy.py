"""Proxy overhead: requests per second through a tokenguard proxy node to a mock upstream
node, versus straight to that upstream node, side by side in one run.

``python -m bench proxy`` starts two node processes (memory store): the *upstream*, a
tokenguard node in mock mode with ``--no-limits`` (the cheapest OpenAI-compatible server
at hand), and the *proxy*, a tokenguard node with limits on (a key with limits far above
the load) whose ``[upstream]`` is the first. Then ``--rounds`` rounds of each kind, of
``--seconds`` each, the kinds taking turns (their order rotating each round):

* *direct*: chat load straight to the upstream node;
* *proxy*: the same load to the proxy node, which limits it and forwards it.

The load is wrk (:mod:`bench.wrk`: ``--connections`` connections, the same pool of chat
bodies) when it is installed, else a small Python client (which measures itself too:
the figure is then a lower bound). Reported per kind: requests/s of each round and
their median, p50/p99 latency, and each node's CPU time per request (from ``/proc``,
so the proxy's own cost shows whatever else runs on the machine); then the ratio of
the medians, proxy / direct. On one machine the proxy and the upstream share the CPU,
so the ratio is at most what the proxy's extra CPU per request leaves.

``add_arguments`` registers the options, ``main`` runs it (exit status 0, 1 on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.feed import _wait_healthy
from bench.ports import SUITE_PORTS, free_ports
from bench.procfs import cpu_seconds
from bench.wrk import find_wrk, run_wrk
from bench.wrk_script import chat_body, chat_script

UPSTREAM_KEY = "sk-bench-upstream-0123456789"
PROXY_KEY = "sk-bench-proxy-0123456789"
KEY_ENV = "TOKENGUARD_BENCH_UPSTREAM_KEY"
START_TIMEOUT = 30.0
KINDS = ("direct", "proxy")


@attrs.frozen
class ProxyBenchOptions:
    seconds: float = 5.0
    rounds: int = 2
    connections: int = 16
    prompt_tokens: int = 100
    max_tokens: int = 64
    python_client: bool = False  # force the Python client even if wrk is installed


@attrs.frozen
class Round:
    kind: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    cpu_ms: dict[str, float]  # node -> CPU ms per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@attrs.frozen
class ProxyBenchResult:
    options: ProxyBenchOptions
    client: str
    rounds: tuple[Round, ...]

    def median_rps(self, kind: str) -> float:
        return statistics.median(r.rps for r in self.rounds if r.kind == kind)

    def median_cpu_ms(self, kind: str, node: str) -> float:
        """``node``'s ("proxy" or "upstream") CPU ms per request in ``kind``'s rounds."""
        return statistics.median(r.cpu_ms[node] for r in self.rounds if r.kind == kind)

    @property
    def ratio(self) -> float:
        direct = self.median_rps("direct")
        return self.median_rps("proxy") / direct if direct else 0.0


UPSTREAM_CONFIG = f"""
[[keys]]
key = "{UPSTREAM_KEY}"
name = "proxy-node"
"""


def proxy_config(upstream_url: str) -> str:
    return f"""
[upstream]
base_url = "{upstream_url}/v1"
api_key_env = "{KEY_ENV}"

[[keys]]
key = "{PROXY_KEY}"
name = "bench"
rpm = 100000000
input_tpm = 100000000000
output_tpm = 100000000000
"""


@attrs.frozen
class Node:
    url: str
    pid: int


@asynccontextmanager
async def running_pair(directory: Path) -> AsyncIterator[dict[str, Node]]:
    """The upstream node (mock, ``--no-limits``) and a proxy node in front of it."""
    processes: list[trio.Process] = []
    nodes: dict[str, Node] = {}
    env = {**os.environ, KEY_ENV: UPSTREAM_KEY}
    try:
        for name in ("upstream", "proxy"):
            config = directory / f"{name}.toml"
            text = UPSTREAM_CONFIG if name == "upstream" else proxy_config(nodes["upstream"].url)
            config.write_text(text)
            port = free_ports(within=SUITE_PORTS)
            argv = [sys.executable, "-m", "tokenguard", "serve", "--config", str(config)]
            argv += ["--port", str(port)] + (["--no-limits"] if name == "upstream" else [])
            # A local file, opened and closed without awaiting anything.
            with open(directory / f"{name}.log", "wb") as log:  # noqa: ASYNC230
                process = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            processes.append(process)
            url = f"http://127.0.0.1:{port}"
            with trio.fail_after(START_TIMEOUT):
                await _wait_healthy(url, process)
            nodes[name] = Node(url=url, pid=process.pid)
        yield nodes
    finally:
        with trio.CancelScope(shield=True):
            for process in reversed(processes):
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def python_load(
    url: str, key: str, options: ProxyBenchOptions
) -> tuple[int, int, float, list[float]]:
    """``connections`` workers posting one chat body for ``seconds``: (answered, errors,
    seconds, latencies)."""
    body = chat_body(prompt_tokens=options.prompt_tokens, max_tokens=options.max_tokens)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=options.connections)
    started = time.monotonic()
    deadline = started + options.seconds

    async with httpx.AsyncClient(timeout=10, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                sent = time.monotonic()
                response = await client.post(
                    f"{url}/v1/chat/completions", content=body, headers=headers
                )
                latencies.append(time.monotonic() - sent)
                errors += response.status_code >= 400

        async with trio.open_nursery() as nursery:
            for _ in range(options.connections):
                nursery.start_soon(worker)
    return len(latencies), errors, time.monotonic() - started, latencies


async def one_round(
    kind: str, nodes: dict[str, Node], options: ProxyBenchOptions, script: Path | None
) -> Round:
    target, key = (
        (nodes["upstream"], UPSTREAM_KEY) if kind == "direct" else (nodes["proxy"], PROXY_KEY)
    )
    cpu_before = {name: cpu_seconds(node.pid) for name, node in nodes.items()}
    if script is not None:
        result = await run_wrk(
            target.url, script, connections=options.connections, seconds=options.seconds
        )
        requests, errors, seconds = result.requests, result.error_count, result.seconds
        p50 = result.latency.get("p50")
        p99 = result.latency.get("p99")
    else:
        requests, errors, seconds, latencies = await python_load(target.url, key, options)
        ordered = sorted(latencies)
        p50 = ordered[len(ordered) // 2] if ordered else None
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else None
    cpu_ms = {
        name: (cpu_seconds(node.pid) - cpu_before[name]) * 1000 / max(1, requests)
        for name, node in nodes.items()
    }
    return Round(
        kind=kind,
        requests=requests,
        errors=errors,
        seconds=seconds,
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
        cpu_ms=cpu_ms,
    )


async def run(options: ProxyBenchOptions, *, log: Any = None) -> ProxyBenchResult:
    use_wrk = find_wrk() is not None and not options.python_client
    with tempfile.TemporaryDirectory(prefix="tg-proxy-bench-") as tmp:
        directory = Path(tmp)
        async with running_pair(directory) as nodes:
            scripts: dict[str, Path | None] = {"direct": None, "proxy": None}
            if use_wrk:
                for kind, key in (("direct", UPSTREAM_KEY), ("proxy", PROXY_KEY)):
                    path = directory / f"{kind}.lua"
                    path.write_text(
                        chat_script(
                            [key],
                            prompt_tokens=options.prompt_tokens,
                            max_tokens=options.max_tokens,
                        )
                    )
                    scripts[kind] = path
            rounds: list[Round] = []
            for i in range(options.rounds):
                order = KINDS if i % 2 == 0 else tuple(reversed(KINDS))
                for kind in order:
                    done = await one_round(kind, nodes, options, scripts[kind])
                    rounds.append(done)
                    if log is not None:
                        print(f"  round {i + 1} {kind}: {done.rps:,.0f} req/s", file=log)
    return ProxyBenchResult(
        options=options, client="wrk" if use_wrk else "python", rounds=tuple(rounds)
    )


def format_report(result: ProxyBenchResult) -> str:
    o = result.options
    lines = [
        f"Proxy overhead: {o.rounds} rounds x {o.seconds:g} s per kind, {o.connections} "
        f"connections, {result.client} client, chat bodies of ~{o.prompt_tokens} prompt "
        f"tokens, max_tokens {o.max_tokens}, no streams",
        "",
        "| kind | req/s (rounds) | median req/s | p50 ms | p99 ms | CPU ms/req proxy | "
        "CPU ms/req upstream | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS:
        mine = [r for r in result.rounds if r.kind == kind]
        rps = ", ".join(f"{r.rps:,.0f}" for r in mine)
        p50 = statistics.median(r.p50_ms for r in mine if r.p50_ms is not None)
        p99 = statistics.median(r.p99_ms for r in mine if r.p99_ms is not None)
        cpu = {n: result.median_cpu_ms(kind, n) for n in ("proxy", "upstream")}
        lines.append(
            f"| {kind} | {rps} | {result.median_rps(kind):,.0f} | {p50:.1f} | {p99:.1f} | "
            f"{cpu['proxy']:.2f} | {cpu['upstream']:.2f} | {sum(r.errors for r in mine)} |"
        )
    lines += ["", f"Through the proxy / direct: {result.ratio:.1%} (ratio of the medians)"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=5.0, help="each round's length (5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per kind (2)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent requests (16)")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--python-client", action="store_true", help="never use wrk")
    parser.add_argument("--json", help="also write the figures to this file")


def main(args: argparse.Namespace) -> int:
    options = ProxyBenchOptions(
        seconds=args.seconds,
        rounds=args.rounds,
        connections=args.connections,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        python_client=args.python_client,
    )
    try:
        result = trio.run(lambda: run(options, log=sys.stderr))
    except Exception as exc:  # a failed run is reported, not a traceback
        print(f"bench proxy failed: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        data = attrs.asdict(result)
        data["ratio"] = result.ratio
        Path(args.json).write_text(json.dumps(data, indent=2))
    errors = sum(r.errors for r in result.rounds)
    return 0 if errors == 0 else 1
