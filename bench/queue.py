"""The admission queue under a bursty client: waiting instead of 429, against N nodes.

``python -m bench queue`` starts ``tokenguard serve --nodes N`` (the embedded Redis) with
two keys of the same ``rpm`` limit ``L`` per window ``W``: ``off`` (no wait: today's
429s) and ``on`` (``max_wait_seconds``). For each key in turn a client sends bursts of
3 x L requests at once, one burst every window, spread round robin over the nodes, and
waits for every answer. Reported per key:

* statuses, the 429 rate, and **goodput**: admissions per window as a share of the
  limit, over the run (``off``) or while requests wait (``on``: from the first to the
  last admission; the sliding window's own ceiling there is ``W / (W + bucket)``, since a
  slot admitted at a bucket's start frees one bucket past the window);
* the waits (``x-tokenguard-queued-ms``): p50, p99, max;
* the nodes' CPU time per request (less what the idle nodes spend in as long: measured
  for ``IDLE_SECONDS`` first), and the extra per waiting request;
* the Redis commands each phase cost (``INFO commandstats``), and per waiting request:
  admissions (``EVALSHA``), ticket steps (``EVAL``), announcements (``PUBLISH``).

The client's timing is never asserted on: it reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import redis
import trio

from bench.ports import free_ports
from bench.procfs import cmdline, cpu_seconds, descendants

MESSAGES = [{"role": "user", "content": "hello"}]
IDLE_SECONDS = 10.0


@attrs.define
class Answer:
    sent: float  # time.monotonic()
    answered: float
    status: int
    queued_ms: int | None


def config_text(limit: int, window: int, bucket: int, max_wait: float) -> str:
    return f"""\
[window]
seconds = {window}
bucket_seconds = {bucket}

[[keys]]
key = "sk-off"
name = "off"
rpm = {limit}

[[keys]]
key = "sk-on"
name = "on"
rpm = {limit}
max_wait_seconds = {max_wait}
max_waiting = 1000
"""


async def one(client: httpx.AsyncClient, url: str, key: str, out: list[Answer]) -> None:
    sent = time.monotonic()
    response = await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4},
    )
    queued = response.headers.get("x-tokenguard-queued-ms")
    out.append(Answer(sent, time.monotonic(), response.status_code, _int(queued)))


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


async def bursts(
    urls: list[str], key: str, limit: int, window: float, count: int
) -> tuple[list[Answer], float]:
    """``count`` bursts of 3 x ``limit`` requests, one every ``window`` seconds; every
    answer, and the time the first burst went."""
    answers: list[Answer] = []
    limits = httpx.Limits(max_connections=3 * limit * count + 10)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for burst in range(count):
                await trio.sleep(max(0.0, start + burst * window - time.monotonic()))
                for i in range(3 * limit):
                    nursery.start_soon(one, client, urls[i % len(urls)], key, answers)
    return answers, start


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in client.info("commandstats").items()}


def node_cpu(supervisor: int) -> float:
    return sum(cpu_seconds(pid) for pid in descendants(supervisor) if "--node-id" in cmdline(pid))


def percentile(values: list[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def summarize(
    answers: list[Answer], start: float, limit: int, window: float, bucket: float, count: int
) -> dict[str, Any]:
    admitted = sorted(a.answered for a in answers if a.status == 200)
    waits = [a.queued_ms for a in answers if a.status == 200 and a.queued_ms]
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    run_goodput = len(admitted) / (limit * count)
    busy = None
    if waits and len(admitted) > limit:
        # While requests wait: admissions after the first window's, per window.
        span = admitted[-1] - admitted[limit - 1]
        busy = (len(admitted) - limit) / (limit * span / window) if span > 0 else None
    return {
        "requests": len(answers),
        "statuses": statuses,
        "refused_share": statuses.get("429", 0) / len(answers),
        "goodput_over_bursts": run_goodput,
        "goodput_while_waiting": busy,
        "sliding_ceiling": window / (window + bucket),
        "waiting": len(waits),
        "wait_p50_s": percentile([w / 1000 for w in waits], 0.5),
        "wait_p99_s": percentile([w / 1000 for w in waits], 0.99),
        "wait_max_s": max(waits, default=0) / 1000,
        "last_answer_s": max(a.answered for a in answers) - start,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tg-queue-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir(mode=0o700)
        config = Path(tmp) / "queue.toml"
        config.write_text(config_text(args.limit, args.window, args.bucket, args.max_wait))
        port = free_ports(args.nodes)
        argv = [sys.executable, "-m", "tokenguard", "serve", "--nodes", str(args.nodes)]
        argv += ["--port", str(port), "--state-dir", str(state), "--config", str(config)]
        urls = [f"http://127.0.0.1:{port + i}" for i in range(args.nodes)]
        proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            return await _measure(args, proc.pid, urls, state / "redis.sock")
        finally:
            proc.terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await proc.wait()


async def _healthy(urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=1) as client:
        for url in urls:
            while True:
                try:
                    if (await client.get(f"{url}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.2)


async def _measure(
    args: argparse.Namespace, supervisor: int, urls: list[str], socket: Path
) -> dict[str, Any]:
    with trio.fail_after(120):
        await _healthy(urls)
    store = redis.Redis(unix_socket_path=str(socket))
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "limit": args.limit,
        "window_s": args.window,
        "bucket_s": args.bucket,
        "bursts": args.bursts,
        "max_wait_s": args.max_wait,
    }
    idle = node_cpu(supervisor)
    await trio.sleep(IDLE_SECONDS)
    idle_rate = (node_cpu(supervisor) - idle) / IDLE_SECONDS
    result["idle_node_cpu_ms_per_s"] = 1000 * idle_rate
    for key in ("off", "on"):
        # Each key has its own window: the phases do not share any room.
        calls, cpu, began = commandstats(store), node_cpu(supervisor), time.monotonic()
        answers, start = await bursts(urls, f"sk-{key}", args.limit, args.window, args.bursts)
        cpu = node_cpu(supervisor) - cpu - idle_rate * (time.monotonic() - began)
        after = commandstats(store)
        delta = {c: n - calls.get(c, 0) for c, n in after.items() if n - calls.get(c, 0)}
        summary = summarize(answers, start, args.limit, args.window, args.bucket, args.bursts)
        summary["node_cpu_ms_per_request"] = 1000 * cpu / len(answers)
        summary["redis_commands"] = delta
        result[key] = summary
    on, off = result["on"], result["off"]
    waiters = on["waiting"]
    if waiters:
        plain = on["requests"] - waiters
        on["per_waiting_request"] = {
            "admissions": (on["redis_commands"].get("cmdstat_evalsha", 0) - plain) / waiters,
            "ticket_steps": on["redis_commands"].get("cmdstat_eval", 0) / waiters,
            "announcements": on["redis_commands"].get("cmdstat_publish", 0) / waiters,
            "extra_node_cpu_ms": (
                on["node_cpu_ms_per_request"] * on["requests"]
                - off["node_cpu_ms_per_request"] * on["requests"]
            )
            / waiters,
        }
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="nodes (3)")
    parser.add_argument("--limit", type=int, default=30, help="rpm of each key, per window (30)")
    parser.add_argument("--window", type=int, default=60, help="window seconds (60)")
    parser.add_argument("--bucket", type=int, default=1, help="bucket seconds (1)")
    parser.add_argument("--bursts", type=int, default=2, help="bursts of 3 x limit (2)")
    parser.add_argument(
        "--max-wait", type=float, default=65.0, help="the on key's max_wait_seconds (65)"
    )
    parser.add_argument("--json", dest="json_path", help="write the result here")


def main(args: argparse.Namespace) -> int:
    result = trio.run(run, args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    return 0
