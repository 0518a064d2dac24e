"""What the suite starts and sends load to: processes, their nodes, the Redis.

A :class:`Proc` is one process the suite spawned (its output in a log file); a
:class:`Target` is the node URLs a measurement sends load to, with the pids whose CPU
and memory it reads. :func:`wait_healthy` and the cluster readers below turn a started
``tokenguard serve`` into a Target. Every failure to start raises :class:`SuiteError`
with the process's log tail, so the report says why a scenario did not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import attrs
import httpx
import trio

from bench.procfs import alive, cmdline, descendants
from bench.suite.tokenguard_parts import ChildProcess

# How long a started process may take to answer before the scenario fails: a deadline
# for a hung start on a busy machine, not a figure (start-up is measured separately).
START_TIMEOUT = 90.0
STOP_GRACE = 20.0
NODE_GRACE = "1"  # --grace for nodes: in-flight requests at stop are benchmark leftovers
# The single nodes compared side by side: limits off (the baseline), memory, Redis.
VARIANTS = ("off", "memory", "redis")
STORE_VARIANTS = VARIANTS[1:]  # the ones that count, each compared with limits off
VARIANT_LABELS = {"off": "limits off", "memory": "memory store", "redis": "Redis store"}


class SuiteError(RuntimeError):
    """A scenario could not run (a process failed to start, a tool failed)."""


def tokenguard_command() -> list[str]:
    """How to run ``tokenguard``: this Python's script, else ``python -m tokenguard``."""
    script = Path(sys.executable).with_name("tokenguard")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "tokenguard"]


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
        fallback windows for a while (``tokenguard/store/guarded.py``): figures measured
        meanwhile are partly the fallback's, so scenarios report these counts."""
        warnings = opened = 0
        for path in self.log_paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if "tokenguard.store.guarded" in line and "WARNING" in line:
                    warnings += 1
                    opened += " unavailable (" in line
        return warnings, opened


@attrs.frozen
class RedisInfo:
    """The Redis the scenarios share: its URL, its pid if the suite started it
    (``embedded``: configured like the supervisor's own redis-server)."""

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


async def wait_healthy(proc: Proc, urls: Sequence[str]) -> list[float]:
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
                    f"{shlex.join(proc.argv)} exited ({proc.child.returncode}):\n{proc.log_tail()}"
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


def cluster_pids(proc: Proc, nodes: int, name: str) -> tuple[list[int], int | None]:
    """A supervisor's node pids, in node order, and its embedded redis-server's pid
    (``None`` without one). SuiteError unless exactly one child looks like each node."""
    kids = proc.remember()
    node_pids = []
    for i in range(nodes):
        matches = [p for p in kids if f"--node-id {i} " in cmdline(p) + " "]
        if len(matches) != 1:
            raise SuiteError(f"{name}: {len(matches)} processes look like node {i}")
        node_pids.append(matches[0])
    redis_pids = [p for p in kids if "redis-server" in cmdline(p)]
    return node_pids, redis_pids[0] if redis_pids else None


async def supervisor_ready_seconds(proc: Proc) -> float | None:
    """The supervisor's own figure (``nodes healthy after X s`` in its log), or ``None``
    if it has not printed one within 5 s."""
    # The supervisor prints it right after its last probe: soon.
    with trio.move_on_after(5):
        while True:
            found = re.findall(r"nodes healthy after ([\d.]+) s", proc.log_tail(100_000))
            if found:
                return float(found[-1])
            await trio.sleep(0.02)
    return None


def trouble_before(targets: dict[str, Target]) -> dict[str, tuple[int, int]]:
    """Each target's store trouble so far: the baseline for :func:`trouble_notes`."""
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
