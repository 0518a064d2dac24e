"""A node process for hostile input, and its keys' usage.

:func:`running_hostile_node` starts one ``tokenguard serve`` of :data:`CONFIG` (keys
``sk-h``, unlimited for hostile traffic; ``sk-tiny``, 50 input tokens a minute;
``sk-uni``, for unicode text) on a free port, and stops it (SIGTERM, then SIGKILL)
whatever happens. Its log is kept in the directory given, so a test can read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import httpx
import pytest

from tests.support.processes import START_TIMEOUT, free_ports, tokenguard_command

MAX_BODY = 256 * 1024  # the 100,000-deep body (200 kB) fits
CONFIG = f"""
[server]
max_body_bytes = {MAX_BODY}

[[keys]]
key = "sk-h"
name = "hostile"
rpm = 1000000
input_tpm = 100000000
output_tpm = 100000000

[[keys]]
key = "sk-tiny"
name = "tiny"
input_tpm = 50

[[keys]]
key = "sk-uni"
name = "unicode"
rpm = 1000
input_tpm = 1000000
"""
SECRETS = ("sk-h", "sk-tiny", "sk-uni")


@attrs.frozen
class Node:
    port: int
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_hostile_node(directory: Path) -> Iterator[Node]:
    """One node process of :data:`CONFIG`, its config and log in ``directory``:
    SIGTERM (then SIGKILL) at the end. Raises ``RuntimeError`` if it does not start
    within ``START_TIMEOUT`` or finds no free port in 3 tries."""
    config = directory / "tokenguard.toml"
    config.write_text(CONFIG)
    log_path = directory / "node.log"
    for _ in range(3):
        port = free_ports()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [*tokenguard_command(), "serve", "--config", str(config), "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT  # a hang guard on a busy machine
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            else:
                if "address already in use" in log_path.read_text().lower():
                    continue
                raise RuntimeError(f"node did not start:\n{log_path.read_text()}")
            yield Node(port=port, url=f"http://127.0.0.1:{port}", log_path=log_path)
            return
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    raise RuntimeError("no free port")


def assert_clean_log(node: Node) -> None:
    """What a node that took hostile input must never log: a traceback, an ERROR line
    or a key's secret (``sk-h-but-longer`` is a wrong key sent on purpose)."""
    log = node.log()
    assert "Traceback" not in log
    assert " ERROR " not in log
    for secret in SECRETS:
        assert secret not in log.replace("sk-h-but-longer", "")


def hostile_node_fixture() -> Callable[..., Iterator[Node]]:
    """A module-scoped ``node`` fixture: one hostile node per test module, whose log is
    checked with :func:`assert_clean_log` when the module's tests are done (so every
    request any of them sent is covered). Use: ``node = hostile_node_fixture()``."""

    @pytest.fixture(scope="module")
    def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
        with running_hostile_node(tmp_path_factory.mktemp("hostile")) as started:
            yield started
        assert_clean_log(started)

    return node


async def requests_used(client: httpx.AsyncClient, url: str, key: str = "sk-h") -> dict[str, int]:
    answer = await client.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    dims = answer.json()["dimensions"]
    return {name: dims[name]["used"] for name in dims if dims[name] is not None}
