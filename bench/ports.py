"""Free TCP ports for the processes the benchmarks and the tests start.

A port is only free when it is checked: another process may take it before the caller
binds it, so callers that start a server retry on fresh ports. Ports are picked at
random below Linux's ephemeral range (32768 and up), where client sockets get theirs,
from a range of their own for the tests and for the benchmark suite, so that a suite
run beside the tests does not fight them for ports. The random choice is the system's
(never the seeded ``random`` module: processes seeded alike would pick alike).
"""

from __future__ import annotations

import errno
import secrets
import socket

TEST_PORTS = range(20000, 32000)
"""The tests' ports (their nodes, Redis servers and upstreams)."""

SUITE_PORTS = range(10000, 20000)
"""The benchmark suite's, and the benchmarks' own processes'."""

ATTEMPTS = 200


def free_ports(n: int = 1, *, host: str = "127.0.0.1", within: range = TEST_PORTS) -> int:
    """The first of ``n`` consecutive TCP ports of ``within`` that nothing listens on
    now, on ``host`` (an IPv4 address). Raises ``OSError`` (``EADDRINUSE``) when
    ``ATTEMPTS`` random tries found none."""
    rng = secrets.SystemRandom()
    for _ in range(ATTEMPTS):
        base = rng.randrange(within.start, within.stop - n + 1)
        if all(_bindable(host, base + i) for i in range(n)):
            return base
    where = f"{within.start}..{within.stop - 1}"
    raise OSError(errno.EADDRINUSE, f"no {n} consecutive free ports in {where}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
