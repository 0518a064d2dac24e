"""The context every scenario gets: :class:`Suite`.

It holds the profile and the machine, starts the processes a scenario asks for
(``tokenguard serve`` single nodes and clusters, the shared Redis) and stops them all
when the suite ends (``stack``, in reverse order), measures targets through the
throughput client, samples resident memory for the ``memory`` section and draws charts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import attrs
import trio

from bench import charts
from bench.charts import Panel
from bench.ports import SUITE_PORTS, free_ports
from bench.procfs import cpu_seconds, rss_kib, smaps_rollup_kib
from bench.suite.clients import LoadClient, WrkClient
from bench.suite.configs import EIGHT_RULES, throughput_config
from bench.suite.figures import fmt_ms
from bench.suite.machine import Machine, utc_now
from bench.suite.profile import Profile
from bench.suite.runs import Run
from bench.suite.section import Section
from bench.suite.targets import (
    NODE_GRACE,
    START_TIMEOUT,
    VARIANT_LABELS,
    VARIANTS,
    Proc,
    RedisInfo,
    SuiteError,
    Target,
    cluster_pids,
    supervisor_ready_seconds,
    tokenguard_command,
    wait_healthy,
)
from bench.suite.tokenguard_parts import ChildProcess, RedisServerSpec, find_redis_binary, ping
from bench.wrk import WrkError


@attrs.frozen
class RssSample:
    """One reading of a process's resident memory (``phase``: idle or after load)."""

    process: str
    phase: str
    kib: int
    # From /proc/PID/smaps_rollup: the proportional share of shared pages, and the
    # private pages (unique set size); None where the kernel has no smaps_rollup.
    pss_kib: int | None = None
    uss_kib: int | None = None


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

    def section(self, key: str, title: str) -> Section:
        """A new section for scenario ``key``, stamped with the time it starts."""
        self.say(f"--- {key}: {title}")
        return Section(key=key, title=title, started=utc_now())

    def stamp(self) -> str:
        return f"{self.command} · {self.machine.short()} · {utc_now()}"

    def unique(self, name: str) -> str:
        self._counter += 1
        return f"{self._counter:02d}-{name}"

    def sample_rss(self, process: str, phase: str, pids: Sequence[int | None]) -> None:
        for pid in pids:
            kib = rss_kib(pid) if pid is not None else None
            if pid is not None and kib is not None:
                rollup = smaps_rollup_kib(pid) or {}
                self.rss.append(
                    RssSample(process, phase, kib, rollup.get("Pss"), rollup.get("Uss"))
                )

    def sample_singles(self, phase: str) -> None:
        """Sample the resident memory of the single nodes (:meth:`singles`)."""
        for variant, target in (self._singles or {}).items():
            self.sample_rss(f"single node, {VARIANT_LABELS[variant]}", phase, target.node_pids)

    def chart(self, name: str, title: str, panels: Sequence[Panel], section: Section) -> None:
        """Draw ``panels`` into ``name``.png for ``section``; without matplotlib, a note
        saying there is no chart."""
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
        """Start ``argv``, its output in a log file of the work dir; it is stopped when
        the suite ends."""
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
        if self._redis is None:
            if self.given_redis is not None:
                self._redis = RedisInfo(url=self.given_redis, pid=None, embedded=False)
            else:
                self._redis = await self._start_redis()
        return self._redis

    async def _start_redis(self) -> RedisInfo:
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
            self.say(f"redis-server ready: {spec.url}")
            return RedisInfo(url=spec.url, pid=proc.pid, embedded=True)
        raise SuiteError(f"redis-server did not answer PING in {START_TIMEOUT} s")

    async def _start(
        self, name: str, args: list[str], nodes: int
    ) -> tuple[Proc, list[str], float, list[float]]:
        """Start ``tokenguard serve ... --port P`` on fresh ports (retrying if a port was
        taken meanwhile); the process, node URLs, spawn time and per-node ready times."""
        for attempt in range(3):
            port = free_ports(nodes, within=SUITE_PORTS)
            urls = [f"http://127.0.0.1:{port + i}" for i in range(nodes)]
            argv = [*tokenguard_command(), "serve", *args, "--port", str(port)]
            t0 = trio.current_time()
            proc = await self.spawn(name, argv)
            try:
                ready = await wait_healthy(proc, urls)
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
        args += ["--grace", NODE_GRACE, "--start-timeout", str(START_TIMEOUT)]
        if store is not None:
            args += ["--store", store]
        proc, urls, t0, ready = await self._start(name, args, nodes)
        node_pids, redis_pid = cluster_pids(proc, nodes, name)
        return Target(
            name=f"{nodes} nodes",
            urls=urls,
            proc=proc,
            node_pids=node_pids,
            redis_pid=redis_pid,
            startup_seconds=max(ready) - t0,
            node_ready=[r - t0 for r in ready],
            reported_ready=await supervisor_ready_seconds(proc),
            log_paths=[state_dir / "logs" / f"node-{i}.log" for i in range(nodes)],
        )

    async def singles(self) -> dict[str, Target]:
        """The three single nodes (off, memory, Redis), started side by side once and
        kept for the single-node scenarios; idle RSS is sampled when they are up."""
        if self._singles is None:
            await self.redis()
            self._singles = await self.start_singles(VARIANTS)
            await trio.sleep(0.5)
            self.sample_singles("idle")
            self.say(
                "single nodes up: "
                + ", ".join(f"{v} {t.urls[0]}" for v, t in self._singles.items())
            )
            for target in self._singles.values():
                await self.warm(target)
        return self._singles

    async def start_singles(
        self, variants: Sequence[str], *, suffix: str = "", config: Path | None = None
    ) -> dict[str, Target]:
        """Single nodes of ``variants`` started side by side (named ``node-VARIANT`` +
        ``suffix``), in ``variants``' order."""
        started: dict[str, Target] = {}

        async def one(variant: str) -> None:
            started[variant] = await self.start_single(
                variant, f"node-{variant}{suffix}", config=config
            )

        async with trio.open_nursery() as nursery:
            for variant in variants:
                nursery.start_soon(one, variant)
        return {v: started[v] for v in variants}

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
        """One measurement of ``target``, with the CPU its nodes and Redis used."""
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
        connections: int,
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
                run = await self.measure(
                    targets[name],
                    connections=connections,
                    seconds=seconds,
                    share=share,
                    variant=name,
                    round=r,
                )
                runs[name].append(run)
                self.say(f"{label} round {r + 1}/{rounds} {name}: {_progress(run)}")
        return runs


def _progress(run: Run) -> str:
    """A measurement in one line of progress."""
    res = run.result
    return f"{res.rps:,.0f} req/s, p50 {fmt_ms(res.latency.get('p50'))} ms" + (
        f", ERRORS {res.errors}" if res.error_count else ""
    )
