"""Test support for real tokenguard processes: starting them, ports, /healthz, /proc.

Guarantees:

* :func:`running_tokenguard` starts ``tokenguard <args>`` (the installed console script,
  else ``python -m tokenguard``) with stdout and stderr in a file, and on leaving the
  ``async with``, however it is left: SIGTERM, SIGKILL after ``stop_grace`` seconds,
  reaped; then every descendant it ever had (as far as the snapshots taken by
  :meth:`TokenguardProcess.descendants` saw) is SIGKILLed if still alive. A test that
  fails never leaves a node or a redis-server behind. :func:`running_process` does the
  same for any command (the fake upstreams of ``bench/fake_upstream/``).
* :func:`running_cluster` is ``tokenguard serve --nodes N`` that returns only once the
  startup table is printed and every node answers ``/healthz``; it retries on fresh
  ports if one was taken in between.
* Ports come from :func:`bench.ports.free_ports` (the tests' range, below Linux's
  ephemeral range, so client sockets do not take them meanwhile).
* The ``/proc`` helpers count a zombie as dead: in a container, an orphan may never be
  reaped, but it runs nothing and holds nothing.

Waits are unbounded, in trio's style: the caller bounds them (``trio.fail_after``).
When the body of :func:`running_tokenguard` raises, the process's output is printed, so
pytest shows it with the failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

# The /proc readers and the free ports are shared with the benchmark suite.
from bench.ports import free_ports
from bench.procfs import alive, children, cmdline, descendants, rss_kib  # noqa: F401

# Hang guards for real processes. A tokenguard process imports for about a second on an
# idle machine and for 20 s or more on a starved one (the suite beside CPU burners and
# other work: `python -m bench stress-tests`): they bound hangs, not speed.
START_TIMEOUT = 120.0
STOP_GRACE = 20.0


def tokenguard_command() -> list[str]:
    """How a user runs tokenguard: the venv's console script, else ``python -m``."""
    script = Path(sys.executable).with_name("tokenguard")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "tokenguard"]


@contextlib.contextmanager
def short_tmp_dir(prefix: str = "tg-") -> Iterator[Path]:
    """A fresh directory with a short path (unix socket paths must stay < 108 bytes,
    which pytest's ``tmp_path`` does not promise); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def wait_refused(host: str, port: int) -> None:
    """Wait until a new TCP connection to ``host:port`` is refused."""
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return
        await stream.aclose()
        await trio.sleep(0.02)


# --- /proc -------------------------------------------------------------------------------


def write_config(path: Path, body: str, window: int = 60, bucket: int = 5) -> Path:
    """Write a tokenguard config: a ``[window]`` section, then ``body``."""
    path.write_text(f"[window]\nseconds = {window}\nbucket_seconds = {bucket}\n\n{body}")
    return path


async def wait_gone(pids: Sequence[int]) -> None:
    """Wait until none of ``pids`` is alive."""
    # Polling /proc: a process that is not our child offers nothing else to wait on.
    while any(alive(p) for p in pids):  # noqa: ASYNC110
        await trio.sleep(0.05)


# --- tokenguard processes ----------------------------------------------------------------


@attrs.define(eq=False)
class TokenguardProcess:
    """A running ``tokenguard`` command; its output accumulates in ``output_path``."""

    process: trio.Process
    argv: list[str]
    output_path: Path
    seen: set[int] = attrs.field(factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""

    def descendants(self) -> list[int]:
        """Live descendants now (also remembered, for the cleanup)."""
        found = descendants(self.pid) if self.process.returncode is None else []
        self.seen.update(found)
        return found

    def child(self, needle: str) -> int:
        """The pid of the live child whose command line contains ``needle`` (e.g.
        ``"--node-id 1"``, ``"redis-server"``); ``LookupError`` if none or several."""
        matches = [p for p in self.descendants() if needle in cmdline(p)]
        if len(matches) != 1:
            raise LookupError(f"{len(matches)} children match {needle!r}: {matches}")
        return matches[0]

    async def wait_output(self, text: str) -> str:
        """Wait until ``text`` appears in the output and return the output; raise
        ``ChildProcessError`` (with the output) if the process exits first."""
        while text not in (output := self.output()):
            if self.process.returncode is not None:
                raise ChildProcessError(
                    f"{self.argv} exited ({self.process.returncode}) before printing "
                    f"{text!r}:\n{self.output()}"
                )
            await trio.sleep(0.05)
        return output

    async def wait(self) -> int:
        """Wait for the process to exit; return its status."""
        return await self.process.wait()

    def send_signal(self, sig: int) -> None:
        self.descendants()  # remember them before they are reparented
        self.process.send_signal(sig)

    async def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, SIGKILL after ``grace`` s, reap; then SIGKILL remembered
        descendants still alive. Returns the exit status."""
        if self.process.returncode is None:
            self.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        status = await self.process.wait()
        for pid in self.seen:
            # The name check guards against a pid reused by an unrelated process.
            if alive(pid) and any(name in cmdline(pid) for name in ("tokenguard", "redis-server")):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return status


@contextlib.asynccontextmanager
async def running_tokenguard(
    args: Sequence[str],
    *,
    output_path: Path,
    env: Mapping[str, str] | None = None,
    stop_grace: float = STOP_GRACE,
) -> AsyncIterator[TokenguardProcess]:
    """``tokenguard *args`` for the duration of the ``async with``; always stopped.

    ``env`` entries are added to this process's environment.
    """
    argv = [*tokenguard_command(), *args]
    async with running_process(
        argv, output_path=output_path, env=env, stop_grace=stop_grace
    ) as proc:
        yield proc


@contextlib.asynccontextmanager
async def running_process(
    argv: Sequence[str],
    *,
    output_path: Path,
    env: Mapping[str, str] | None = None,
    stop_grace: float = STOP_GRACE,
    cwd: Path | None = None,
) -> AsyncIterator[TokenguardProcess]:
    """``argv`` for the duration of the ``async with``, stopped as the module docstring
    says; its output is printed if the body raises. ``env`` entries are added to this
    process's environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # A local file for the child's output: opened and closed without awaiting anything.
    with open(output_path, "ab") as output:  # noqa: ASYNC230
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
        )
    proc = TokenguardProcess(process=process, argv=list(argv), output_path=output_path)
    try:
        yield proc
    except BaseException:
        print(f"--- output of {' '.join(argv)} ---\n{proc.output()}")
        raise
    finally:
        with trio.CancelScope(shield=True):
            await proc.stop(stop_grace)


@contextlib.asynccontextmanager
async def running_node_process(
    config: Path, output_path: Path
) -> AsyncIterator[tuple[str, TokenguardProcess]]:
    """``tokenguard serve --config CONFIG`` (one node, its memory store) on a free port
    until the ``async with`` ends; yields its URL, once healthy, and the process."""
    port = free_ports()
    args = ["serve", "--config", str(config), "--port", str(port)]
    async with running_tokenguard(args, output_path=output_path) as proc:
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(START_TIMEOUT):
            await wait_healthy(url)
        yield url, proc


async def wait_healthy(url: str, node_id: int | None = None) -> dict[str, Any]:
    """Poll ``url/healthz`` until it answers 200 (with ``node_id``, if given); return
    its JSON."""
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            try:
                response = await client.get(f"{url}/healthz")
                body = response.json()
                if response.status_code == 200 and node_id in (None, body.get("node")):
                    return body
            except (httpx.TransportError, ValueError):
                pass
            await trio.sleep(0.05)


@attrs.define(eq=False)
class Cluster:
    """A ``tokenguard serve --nodes N`` supervisor whose nodes are all healthy."""

    supervisor: TokenguardProcess
    urls: list[str]
    state_dir: Path
    port: int

    def node_pid(self, node_id: int) -> int:
        return self.supervisor.child(f"--node-id {node_id} ")

    def redis_pid(self) -> int:
        return self.supervisor.child("redis-server")


@contextlib.asynccontextmanager
async def running_cluster(
    state_dir: Path,
    *,
    nodes: int = 3,
    config: Path | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    attempts: int = 3,
) -> AsyncIterator[Cluster]:
    """``tokenguard serve --nodes N --port P --state-dir D [--config C] *args`` until the
    ``async with`` ends; yields once the startup table is printed and every node
    answers /healthz (TooSlowError after ``START_TIMEOUT`` s). The supervisor's output
    is ``state_dir/supervisor.out``."""
    # Yours only (the supervisor refuses a state dir others may write), whatever the umask.
    await trio.Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    output_path = state_dir / "supervisor.out"
    reuse_port = "--reuse-port" in args
    for attempt in range(attempts):
        port = free_ports(1 if reuse_port else nodes)
        argv = ["serve", "--nodes", str(nodes), "--port", str(port), "--state-dir", str(state_dir)]
        # The supervisor's own start deadline, as generous as the test's: a busy machine.
        argv += ["--start-timeout", str(START_TIMEOUT)]
        if config is not None:
            argv += ["--config", str(config)]
        async with running_tokenguard([*argv, *args], output_path=output_path, env=env) as proc:
            try:
                with trio.fail_after(START_TIMEOUT):
                    await proc.wait_output("nodes healthy after")
            except ChildProcessError:
                # A port taken between free_ports() and the bind: try others.
                if "address already in use" in proc.output().lower() and attempt + 1 < attempts:
                    continue
                raise
            urls = [f"http://127.0.0.1:{port if reuse_port else port + i}" for i in range(nodes)]
            with trio.fail_after(START_TIMEOUT):
                for i, url in enumerate(urls):
                    await wait_healthy(url, node_id=None if reuse_port else i)
            proc.descendants()
            yield Cluster(supervisor=proc, urls=urls, state_dir=state_dir, port=port)
            return
    raise AssertionError("unreachable")
