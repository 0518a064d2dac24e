"""A password in the store URL stays secret: off every command line, out of every log.

``redact_url`` is the one redaction every printed or logged store URL goes through
(table-driven here, with URLs built to trip it); then, for real, a ``tokenguard serve
--nodes 3`` cluster on a redis-server with ``requirepass``, the URL (password included)
in its config file: no process's ``/proc/PID/cmdline`` holds the password (the
supervisor passes the URL to its nodes in their environment, which only their user may
read), and neither does any log file nor the supervisor's output, even after Redis
went away and came back (the nodes log the store's failures, naming it).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.node_load import chat, wait_ready
from tests.support.processes import cmdline, running_cluster, write_config
from tests.support.redis_servers import running_redis_server
from tokenguard.store.window_store import redact_url

SECRET = "hunter2"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:hunter2@h:1/0", "redis://user:***@h:1/0"),
        ("rediss://u:hunter2@h/0?ssl_cert_reqs=none", "rediss://u:***@h/0?ssl_cert_reqs=none"),
        ("unix://:hunter2@/tmp/r.sock?db=1", "unix://:***@/tmp/r.sock?db=1"),
        ("redis+sentinel://:hunter2@s/m?sentinel_password=hunter2", None),
        ("redis+sentinel://s:26379/m?sentinel_password=hunter2&timeout=1", None),
        ("redis://h/0?password=hunter2", "redis://h/0?password=***"),
        # Characters that should have been percent-encoded: still hidden, whole.
        ("redis://:hun@ter2@h/0", "redis://:***@h/0"),
        ("redis://:hun/ter2@h/0", "redis://:***@h/0"),
        ("redis://:hun?ter2@h/0", "redis://:***@h/0"),
        ("redis://:hun:ter2@h/0", "redis://:***@h/0"),
        ("redis+sentinel://s/m?sentinel_password=hun@ter2", None),
        ("redis://:hunter2@h1:1,h2:2", "redis://:***@h1:1,h2:2"),
        ("memory://", "memory://"),
        ("no scheme hunter2", None),  # not a URL: left as it is (nothing to find)
    ],
)
def test_redaction_hides_every_password(url: str, shown: str | None) -> None:
    redacted = redact_url(url)
    if shown is not None:
        assert redacted == shown
    if "://" in url:
        assert SECRET not in redacted and "hun" not in redacted.replace("hunter", ""), redacted


async def test_a_password_in_the_store_url_is_on_no_command_line_and_in_no_log(
    workdir: Path,
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    with (
        trio.fail_after(120),
        running_redis_server(workdir / "redis", extra_args=("--requirepass", password)) as server,
    ):
        url = f"redis://:{password}@{server.host}:{server.port}/0"
        config = write_config(
            workdir / "c.toml",
            f'[store]\nurl = "{url}"\n\n[[keys]]\nkey = "sk-s"\nname = "s"\nrpm = 1000\n',
        )
        state = workdir / "state"
        async with (
            running_cluster(state, nodes=3, config=config) as cluster,
            httpx.AsyncClient(timeout=10) as client,
        ):
            await wait_ready(client, cluster.urls)  # (they did authenticate)
            for url_ in cluster.urls:
                assert (await chat(client, url_, "sk-s", max_tokens=1)).status_code == 200
            # Redis goes away (each node's breaker opens: logged, naming the store) and
            # comes back.
            await trio.to_thread.run_sync(server.kill)
            for url_ in cluster.urls:
                for _ in range(4):
                    answer = await chat(client, url_, "sk-s", max_tokens=1)
                    assert answer.status_code == 200
            await trio.to_thread.run_sync(server.start)
            await wait_ready(client, cluster.urls)
            pids = [cluster.supervisor.pid, *(cluster.node_pid(i) for i in range(3))]
            commands = [cmdline(pid) for pid in pids]
            environments = [os.stat(f"/proc/{pid}/environ") for pid in pids[1:]]
        logs = {path.name: path.read_text(errors="replace") for path in (state / "logs").iterdir()}
        logs["supervisor.out"] = cluster.supervisor.output()
    assert all(command for command in commands)  # (they were read)
    for command in commands:
        assert password not in command and "--store" not in command, command
    for info in environments:  # where the nodes get the URL: their user's eyes only
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0
    assert {"node-0.log", "node-1.log", "node-2.log", "supervisor.out"} <= set(logs)
    for name, text in logs.items():
        assert password not in text, name
    # Not vacuous: the URL was printed and logged, redacted.
    shown = f"redis://:***@{server.host}:{server.port}/0"
    assert shown in logs["supervisor.out"]
    assert all(shown in logs[f"node-{i}.log"] for i in range(3))
    assert all(f"store {shown} unavailable" in logs[f"node-{i}.log"] for i in range(3))
