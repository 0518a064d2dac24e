"""LLM-shaped load: thousands of long streams through one proxy node, against the same
streams straight to the upstream, side by side in one run.

``python -m bench streams [--streams 500,1000,2000] [--until-break] [--ttft 0.3]
[--tokens-per-second 50] [--max-tokens 400] [--clients 2] [--audit] [--json FILE]``
starts

* an honest fake upstream (``python -m bench fake-upstream``, vLLM's flavour, its own
  process), streaming every answer at the pace asked: ``--ttft`` seconds to the first
  token, then ``--tokens-per-second``;
* one proxy node (``tokenguard serve``, memory store) in front of it, with
  :data:`KEYS` keys whose limits the load never reaches;

then, for each concurrency ``N``: ``N`` streams straight to the upstream (*direct*),
then ``N`` through the node (*proxy*), each from ``--clients`` client processes
(:mod:`bench.streams_client`), their starts spread over ``--ramp`` seconds. Reported
per ``N``: the added time to first token (proxy minus direct, p50 and p99), the added
inter-token delay at p99, errors by kind, the node's CPU per relayed token, its
resident memory per open stream (peak over idle), its peak of open file descriptors,
and each process's CPU use (a process near one whole core is the bottleneck: the report
says which). The first ``N`` whose proxy run has errors its direct run has not is where
it breaks, and the errors say why; ``--until-break`` doubles ``N`` past the list until
then (or ``--max-streams``).

``--audit`` adds a run with one key whose output limit the streams exceed within the
window: :func:`bench.audit.audit_billing` compares what the upstream billed for that key
in any window with the limit; definite over-admission must be 0.

Exit status: 0; 1 on definite over-admission or when a run could not be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.audit.billing import audit_billing
from bench.charts import available
from bench.ports import SUITE_PORTS, free_ports
from bench.procfs import children, cmdline, cpu_seconds, rss_kib
from bench.proxy_audit import Sent, billings, ledger_when_done, running_command
from bench.streams_client import GAP_RESOLUTION, ClientSpec
from bench.streams_report import chart, format_report, result_json
from tokenguard.model import Limits

KEYS = 50
MODEL = "gpt-4o-mini"
AUDIT_WINDOW, AUDIT_BUCKET = 10, 1
SAMPLE_SECONDS = 0.25


@attrs.frozen
class StreamsOptions:
    streams: tuple[int, ...] = (500, 1000, 2000)
    until_break: bool = False
    max_streams: int = 16000
    ttft: float = 0.3
    tokens_per_second: float = 50.0
    max_tokens: int = 400
    clients: int = 2
    ramp: float = 2.0
    audit: bool = False
    audit_streams: int = 200
    keys: int = KEYS  # keys the load is spread over, limits never reached


def key_secret(index: int) -> str:
    return f"sk-bench-streams-k{index:03d}"


def proxy_config(upstream_url: str, keys: int, *, audit_limit: int | None = None) -> str:
    """The node's config: the upstream, a pool that never runs out, and the keys: limits
    far above the load, or one key of ``audit_limit`` output tokens per window."""
    if audit_limit is None:
        limits = "rpm = 100000000\ninput_tpm = 100000000000\noutput_tpm = 100000000000\n"
        tables = "".join(
            f'[[keys]]\nkey = "{key_secret(i)}"\nname = "k{i:03d}"\n{limits}\n' for i in range(keys)
        )
        window = ""
    else:
        tables = f'[[keys]]\nkey = "{key_secret(0)}"\nname = "k000"\noutput_tpm = {audit_limit}\n'
        window = f"[window]\nseconds = {AUDIT_WINDOW}\nbucket_seconds = {AUDIT_BUCKET}\n\n"
    return (
        f'{window}[upstream]\nbase_url = "{upstream_url}/v1"\nread_timeout = 120\n'
        f"max_connections = 20000\nkey_share = 1\n\n{tables}"
    )


# --- processes ----------------------------------------------------------------------------


@attrs.frozen
class Proc:
    name: str
    pid: int


@attrs.frozen
class Bench:
    upstream_url: str
    node_url: str
    processes: tuple[Proc, ...]

    @property
    def node(self) -> Proc:
        return next(p for p in self.processes if p.name == "node")


def _child(needle: str) -> int:
    """The pid of this process's child whose command line holds ``needle``."""
    found = [pid for pid in children(os.getpid()) if needle in cmdline(pid)]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} child processes match {needle!r}")
    return found[0]


@asynccontextmanager
async def running_bench(
    options: StreamsOptions, directory: Path, *, audit_limit: int | None = None
) -> AsyncIterator[Bench]:
    """The fake upstream and the proxy node, each a process of its own."""
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (local, before any await)
    upstream_port, node_port = free_ports(within=SUITE_PORTS), free_ports(within=SUITE_PORTS)
    fake = [sys.executable, "-m", "bench", "fake-upstream", "--flavour", "vllm"]
    fake += ["--port", str(upstream_port), "--ttft", str(options.ttft)]
    fake += ["--tokens-per-second", str(options.tokens_per_second)]
    ready = re.compile(r"upstream on (http://\S+)")
    async with running_command(fake, directory / "upstream.log", ready) as found:
        upstream_url = found.group(1)
        config = directory / "node.toml"
        config.write_text(proxy_config(upstream_url, options.keys, audit_limit=audit_limit))
        node = [sys.executable, "-m", "tokenguard", "serve", "--config", str(config)]
        node += ["--port", str(node_port)]
        ready = re.compile(r"serving on (http://\S+)")
        async with running_command(node, directory / "node.log", ready):
            processes = (
                Proc("upstream", _child(f"--port {upstream_port} ")),
                Proc("node", _child(f"--port {node_port}")),
            )
            yield Bench(upstream_url, f"http://127.0.0.1:{node_port}", processes)


# --- one run ------------------------------------------------------------------------------


@attrs.define
class Sampler:
    """Samples the node's memory and descriptors while a run goes on."""

    pid: int
    peak_rss_kib: int = 0
    peak_fds: int = 0

    async def run(self) -> None:
        while True:
            self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(self.pid) or 0)
            self.peak_fds = max(self.peak_fds, open_fds(self.pid))
            await trio.sleep(SAMPLE_SECONDS)


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@attrs.frozen
class RunResult:
    kind: str  # "direct" or "proxy"
    streams: int
    seconds: float
    completed: int
    tokens: int
    errors: dict[str, int]
    ttft_ms: dict[str, float | None]  # p50, p99
    gap_ms: dict[str, float | None]  # p50, p99 of inter-token gaps
    cpu_cores: dict[str, float]  # process -> cores used over the run
    node_cpu_us_per_token: float | None = None
    node_idle_rss_mib: float | None = None
    node_peak_rss_mib: float | None = None
    node_rss_kib_per_stream: float | None = None
    node_peak_fds: int | None = None
    starts: dict[str, float] = attrs.field(factory=dict, repr=False)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def histogram_percentile(counts: Counter[int], q: float) -> float | None:
    total = sum(counts.values())
    if total == 0:
        return None
    rank, seen = int(total * q), 0
    for step in sorted(counts):
        seen += counts[step]
        if seen > rank:
            return step * GAP_RESOLUTION
    return max(counts) * GAP_RESOLUTION


async def run_clients(
    options: StreamsOptions, url: str, streams: int, keys: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """``streams`` streams from ``--clients`` processes; their results and CPU seconds."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    start_at = time.monotonic() + 1.0  # every client has started by then
    share = [
        streams // options.clients + (i < streams % options.clients) for i in range(options.clients)
    ]
    outputs: list[dict[str, Any]] = []
    cpu: dict[int, float] = {}

    async def client(index: int) -> None:
        spec = ClientSpec(
            host=host,
            port=int(port),
            streams=share[index],
            start_at=start_at,
            ramp=options.ramp,
            max_tokens=options.max_tokens,
            models=(MODEL,),
            keys=tuple(keys),
            first_id=sum(share[:index]) + streams * 1000,
        )
        argv = [sys.executable, "-m", "bench.streams_client", json.dumps(attrs.asdict(spec))]
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert process.stdout is not None
        data = b""
        async for chunk in process.stdout:
            data += chunk
            cpu[index] = cpu_seconds(process.pid)
        await process.wait()
        outputs.append(json.loads(data))

    async with trio.open_nursery() as nursery:
        for index in range(options.clients):
            nursery.start_soon(client, index)
    return outputs, cpu


async def one_run(
    options: StreamsOptions, bench: Bench, kind: str, streams: int, keys: Sequence[str]
) -> RunResult:
    """``streams`` streams, direct (to the upstreams) or through the node."""
    url = bench.upstream_url if kind == "direct" else bench.node_url
    node = bench.node
    idle_rss = rss_kib(node.pid) or 0
    before = {p.name: cpu_seconds(p.pid) for p in bench.processes}
    sampler = Sampler(node.pid)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        outputs, client_cpu = await run_clients(options, url, streams, keys)
        nursery.cancel_scope.cancel()
    seconds = time.monotonic() - started
    cores = {p.name: (cpu_seconds(p.pid) - before[p.name]) / seconds for p in bench.processes}
    for index, used in client_cpu.items():
        cores[f"client-{index}"] = used / seconds
    ttfts = sorted(t for o in outputs for t in o["ttfts"])
    gaps: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    starts: dict[str, float] = {}
    for o in outputs:
        gaps.update({int(k): v for k, v in o["gaps"].items()})
        errors.update(o["errors"])
        starts.update(o["starts"])
    tokens = sum(o["tokens"] for o in outputs)
    result = RunResult(
        kind=kind,
        streams=streams,
        seconds=seconds,
        completed=sum(o["completed"] for o in outputs),
        tokens=tokens,
        errors=dict(errors),
        ttft_ms=_ms({"p50": percentile(ttfts, 0.5), "p99": percentile(ttfts, 0.99)}),
        gap_ms=_ms(
            {"p50": histogram_percentile(gaps, 0.5), "p99": histogram_percentile(gaps, 0.99)}
        ),
        cpu_cores=cores,
        starts=starts,
    )
    if kind == "proxy":
        node_cpu = cores["node"] * seconds
        result = attrs.evolve(
            result,
            node_cpu_us_per_token=node_cpu * 1e6 / tokens if tokens else None,
            node_idle_rss_mib=idle_rss / 1024,
            node_peak_rss_mib=sampler.peak_rss_kib / 1024,
            node_rss_kib_per_stream=max(0, sampler.peak_rss_kib - idle_rss) / streams,
            node_peak_fds=sampler.peak_fds,
        )
    return result


def _ms(values: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else v * 1000 for k, v in values.items()}


# --- levels, the audit, the report ----------------------------------------------------------


@attrs.frozen
class Level:
    streams: int
    direct: RunResult
    proxy: RunResult

    def added(self, field: str, q: str) -> float | None:
        ours, theirs = getattr(self.proxy, field)[q], getattr(self.direct, field)[q]
        return None if ours is None or theirs is None else ours - theirs

    @property
    def new_errors(self) -> dict[str, int]:
        """Errors of the proxy run beyond the direct run's, by kind."""
        return {
            kind: count - self.direct.errors.get(kind, 0)
            for kind, count in self.proxy.errors.items()
            if count > self.direct.errors.get(kind, 0)
        }


@attrs.frozen
class AuditResult:
    streams: int
    window: float
    limit: int
    admitted: int
    refused: int
    billed_requests: int
    definite_excess: int
    possible_excess: int


@attrs.frozen
class StreamsResult:
    options: StreamsOptions
    levels: tuple[Level, ...]
    broke_at: int | None
    audit: AuditResult | None = None


def levels_to_run(options: StreamsOptions, done: Sequence[Level]) -> int | None:
    """The next concurrency to measure, or ``None`` when done."""
    if len(done) < len(options.streams):
        return options.streams[len(done)]
    if not options.until_break or any(level.new_errors for level in done):
        return None
    following = done[-1].streams * 2
    return following if following <= options.max_streams else None


async def measure_levels(
    options: StreamsOptions,
    bench: Bench,
    log: Any,
    audit: AuditResult | None = None,
    progress: Callable[[StreamsResult], None] | None = None,
) -> list[Level]:
    keys = [key_secret(i) for i in range(options.keys)]
    # The first request of each server loads its tokenizer: not part of any level.
    warm = attrs.evolve(options, clients=1, ramp=0.0)
    for url in (bench.upstream_url, bench.node_url):
        await run_clients(warm, url, 2, keys)
    done: list[Level] = []
    while (streams := levels_to_run(options, done)) is not None:
        runs = {}
        for kind in ("direct", "proxy"):
            runs[kind] = await one_run(options, bench, kind, streams, keys)
            r = runs[kind]
            print(
                f"  {streams} streams {kind}: {r.completed} completed, errors {r.errors}, "
                f"TTFT p50 {r.ttft_ms['p50']} ms, {r.seconds:.1f} s",
                file=log,
            )
        done.append(Level(streams, runs["direct"], runs["proxy"]))
        if progress is not None:
            broke = next((level.streams for level in done if level.new_errors), None)
            progress(StreamsResult(options, tuple(done), broke, audit))
    return done


async def audited_run(options: StreamsOptions, directory: Path) -> AuditResult:
    """``audit_streams`` streams of one key whose output limit allows about half of them
    within the window; the upstream's ledger against the limit."""
    limit = options.audit_streams * options.max_tokens // 2
    audit_options = attrs.evolve(options, clients=1)
    async with running_bench(audit_options, directory, audit_limit=limit) as bench:
        run = await one_run(audit_options, bench, "proxy", options.audit_streams, [key_secret(0)])
        with trio.fail_after(options.max_tokens / max(1.0, options.tokens_per_second) + 120):
            ledger = await ledger_when_done(bench.upstream_url)
    sent = [Sent(id=int(i), key="k000", behaviour="stream", start=t) for i, t in run.starts.items()]
    bills, _ = billings(ledger, sent)
    over = audit_billing(bills, {"k000": Limits(output_tpm=limit)}, AUDIT_WINDOW)
    return AuditResult(
        streams=options.audit_streams,
        window=AUDIT_WINDOW,
        limit=limit,
        admitted=run.completed + sum(v for k, v in run.errors.items() if k != "http_429"),
        refused=run.errors.get("http_429", 0),
        billed_requests=len(bills),
        definite_excess=sum(o.definite_excess for o in over),
        possible_excess=sum(o.possible_excess for o in over),
    )


async def run_streams(
    options: StreamsOptions,
    *,
    log: Any = None,
    progress: Callable[[StreamsResult], None] | None = None,
) -> StreamsResult:
    """The audit (if asked: it is short), then every level; ``progress`` is called with
    the result so far after each, so a long run that is stopped keeps its figures."""
    with tempfile.TemporaryDirectory(prefix="tg-streams-") as tmp:
        directory = Path(tmp)
        audit = await audited_run(options, directory / "audit") if options.audit else None
        if progress is not None:
            progress(StreamsResult(options, (), None, audit))
        async with running_bench(options, directory / "levels") as bench:
            levels = await measure_levels(options, bench, log, audit, progress)
    broke = next((level.streams for level in levels if level.new_errors), None)
    return StreamsResult(options, tuple(levels), broke, audit)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a list of integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, got {text!r}")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StreamsOptions()
    parser.add_argument(
        "--streams",
        type=_counts,
        default=defaults.streams,
        help="concurrencies to measure (500,1000,2000)",
    )
    parser.add_argument(
        "--until-break",
        action="store_true",
        help="then double the concurrency until the proxy run has errors",
    )
    parser.add_argument("--max-streams", type=int, default=defaults.max_streams)
    parser.add_argument("--ttft", type=float, default=defaults.ttft)
    parser.add_argument("--tokens-per-second", type=float, default=defaults.tokens_per_second)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument(
        "--clients", type=int, default=defaults.clients, help="client processes (2)"
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=defaults.ramp,
        help="seconds over which the streams' starts are spread (2)",
    )
    parser.add_argument(
        "--audit", action="store_true", help="also a run hitting one key's output limit, audited"
    )
    parser.add_argument("--audit-streams", type=int, default=defaults.audit_streams)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--chart", help="also draw added TTFT and memory into this PNG")


def main(args: argparse.Namespace) -> int:
    options = StreamsOptions(
        streams=args.streams,
        until_break=args.until_break,
        max_streams=args.max_streams,
        ttft=args.ttft,
        tokens_per_second=args.tokens_per_second,
        max_tokens=args.max_tokens,
        clients=args.clients,
        ramp=args.ramp,
        audit=args.audit,
        audit_streams=args.audit_streams,
    )

    def progress(result: StreamsResult) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result_json(result), indent=2))

    try:
        result = trio.run(lambda: run_streams(options, log=sys.stderr, progress=progress))
    except Exception as exc:  # a failed run is reported, not a traceback
        print(f"bench streams failed: {exc!r}", file=sys.stderr)
        return 1
    print(format_report(result))
    progress(result)
    if args.chart and available():
        stamp = f"python -m bench streams · {os.cpu_count()} cores · {time.strftime('%F %H:%M')}"
        chart(result_json(result), Path(args.chart), stamp)
    over = result.audit is not None and result.audit.definite_excess > 0
    return 1 if over else 0
