"""A node holds many connections at once: its open-files limit and its listen backlog
(tokenguard/cluster/open_files.py), seen on real node processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from tests.support.processes import (
    START_TIMEOUT,
    TokenguardProcess,
    free_ports,
    running_process,
    tokenguard_command,
    wait_healthy,
)
from tokenguard.cluster.open_files import WANTED_OPEN_FILES

# More clients than hypercorn's default backlog (100) queues, far fewer than the node's.
BURST = 300


@contextlib.asynccontextmanager
async def node_with_open_files(
    tmp_path: Path, soft: int, hard: int | None = None
) -> AsyncIterator[tuple[str, int, TokenguardProcess]]:
    """A node started under the given open-files limits (set in its process before
    tokenguard runs, as a shell's ``ulimit`` would): its URL, port and process."""
    port = free_ports()
    limits = f"({soft}, {'hard' if hard is None else hard})"
    launcher = (
        "import os, resource, sys\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, {limits})\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    argv = [sys.executable, "-c", launcher, *tokenguard_command()]
    argv += ["serve", "--port", str(port), "--no-limits"]
    async with running_process(argv, output_path=tmp_path / "node.out") as proc:
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(START_TIMEOUT):
            await wait_healthy(url)
        yield url, port, proc


def open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard ``Max open files`` of ``pid``, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise LookupError(f"no open-files limit in /proc/{pid}/limits")


async def test_a_node_raises_its_open_files_soft_limit_at_start(tmp_path: Path) -> None:
    async with node_with_open_files(tmp_path, soft=512) as (_, _, proc):
        soft, hard = open_files_limits(proc.pid)
    assert soft == min(WANTED_OPEN_FILES, hard) and soft > 512


async def test_a_node_says_at_start_when_the_open_files_hard_limit_is_too_low(
    tmp_path: Path,
) -> None:
    async with node_with_open_files(tmp_path, soft=256, hard=1024) as (_, _, proc):
        soft, hard = open_files_limits(proc.pid)
        output = proc.output()
    assert (soft, hard) == (1024, 1024)
    assert "the open-files hard limit is 1024" in output
    assert "about 480 streams at once" in output


def _accept_queue(port: int) -> int:
    """Connections the kernel holds for the listener on ``port``, not yet accepted
    (``rx_queue`` of a LISTEN row of /proc/net/tcp)."""
    queued = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            queued += int(fields[4].split(":")[1], 16)
    return queued


async def _healthz(sock: socket.socket) -> bytes:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: node\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    return answer


async def test_a_burst_of_clients_connecting_at_once_is_queued_not_dropped(
    tmp_path: Path,
) -> None:
    async with node_with_open_files(tmp_path, soft=4096) as (_, port, proc):
        sockets = []
        # The node is stopped: every handshake waits in the kernel's accept queue, which
        # holds as many as the listen backlog allows; the rest would be dropped (and
        # retried, or reset), as under a real burst.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for _ in range(BURST):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                sockets.append(sock)
            with trio.fail_after(30):
                while _accept_queue(port) < BURST:  # noqa: ASYNC110 (the kernel's queue)
                    await trio.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        answers: list[bytes] = []

        async def ask(sock: socket.socket) -> None:
            answers.append(await _healthz(sock))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(ask, sock)
    assert len(answers) == BURST
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
