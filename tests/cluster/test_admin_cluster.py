"""The admin API across a real 3-node cluster: ``tokenguard serve --nodes 3
--admin-port P`` (node i's admin API on P + i), the nodes sharing the supervisor's
embedded redis-server; clients are real HTTP and websocket clients, and the CLI.

Shown here: a limit changed through node 0 applies on node 2 within 1 s; a key created
through node 1 works everywhere within 1 s; a key revoked through node 0 is refused on
every node within 1 s with the very body an unknown key gets, and its usage-feed socket
on node 1 is closed (1008) within 5 s; ``tokenguard keys ...`` drives the same API.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.support.processes import (
    START_TIMEOUT,
    Cluster,
    free_ports,
    running_cluster,
    write_config,
)
from tokenguard.cli import main as cli
from tokenguard.cli.keys import run_keys_command
from tokenguard.config.settings import ADMIN_TOKEN_ENV

pytestmark = pytest.mark.slow

ADMIN = "admin-token-of-the-admin-cluster-tests-0123456789"
CONFIG = """\
[feed]
backlog = 100

[tiers.standard]
rpm = 1000

[[keys]]
key = "sk-alpha"
name = "alpha"
tier = "standard"

[[keys]]
key = "sk-beta"
name = "beta"
tier = "standard"
"""
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# A change must apply everywhere within this long (the promise).
PROPAGATION = 1.0


async def chat(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return await client.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)


async def admin(
    client: httpx.AsyncClient, url: str, method: str, path: str, body: Any = None
) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    response = await client.request(method, url + path, json=body, headers=headers)
    assert response.status_code < 300, response.text
    return response.json()


async def requests_limit(client: httpx.AsyncClient, url: str, key: str) -> int | None:
    """The key's requests-per-minute limit as the node enforces it (reads, consumes
    nothing); ``None`` for a refused key."""
    response = await client.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    if response.status_code == 401:
        return None
    return response.json()["dimensions"]["requests"]["limit"]


async def until(check: Any, *args: Any) -> float:
    """Poll ``await check(*args)`` until true; the seconds it took."""
    start = trio.current_time()
    # Other processes' state: nothing to wait on but their answers.
    while not await check(*args):  # noqa: ASYNC110
        await trio.sleep(0.01)
    return trio.current_time() - start


@pytest.fixture
async def cluster(workdir: Path) -> Any:
    config = write_config(workdir / "tokenguard.toml", CONFIG)
    admin_port = free_ports(3)
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(
            workdir / "state",
            nodes=3,
            config=config,
            args=["--admin-port", str(admin_port)],
            env={ADMIN_TOKEN_ENV: ADMIN},
        ) as running:
            admins = [f"http://127.0.0.1:{admin_port + i}" for i in range(3)]
            yield running, admins


async def test_a_limit_changed_through_node_0_applies_on_node_2_within_1s(
    cluster: tuple[Cluster, list[str]],
) -> None:
    nodes, admins = cluster[0].urls, cluster[1]
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            for url in nodes:
                assert await requests_limit(client, url, "sk-alpha") == 1000
            for _ in range(2):
                assert (await chat(client, nodes[2], "sk-alpha")).status_code == 200
            changed = await admin(client, admins[0], "PATCH", "/admin/keys/alpha", {"rpm": 2})
            assert changed["effective_limits"]["rpm"] == 2

            async def applied(url: str) -> bool:
                return await requests_limit(client, url, "sk-alpha") == 2

            waits = [await until(applied, url) for url in (nodes[2], nodes[1])]
            refused = await chat(client, nodes[2], "sk-alpha")
            assert refused.status_code == 429
            assert "Limit 2, Used 2" in refused.json()["error"]["message"]
            assert refused.headers["x-ratelimit-limit-requests"] == "2"
            # The other key of the tier is untouched.
            assert (await chat(client, nodes[2], "sk-beta")).status_code == 200
            # A tier changed through node 1: node 0 applies it to the tier's keys.
            await admin(client, admins[1], "PUT", "/admin/tiers/standard", {"rpm": 7})

            async def tier_applied(url: str) -> bool:
                return await requests_limit(client, url, "sk-beta") == 7

            waits.append(await until(tier_applied, nodes[0]))
    print(f"limit changes applied on the other nodes after {[round(w, 3) for w in waits]} s")
    assert max(waits) < PROPAGATION


async def test_a_key_revoked_through_node_0_is_refused_everywhere_within_1s(
    cluster: tuple[Cluster, list[str]],
) -> None:
    nodes, admins = cluster[0].urls, cluster[1]
    headers = [(b"Authorization", b"Bearer sk-beta")]
    ws_url = nodes[1].replace("http://", "ws://") + "/v1/usage/stream"
    with trio.fail_after(30):
        async with (
            httpx.AsyncClient(timeout=5) as client,
            open_websocket_url(ws_url, extra_headers=headers) as ws,
        ):
            assert json.loads(await ws.get_message())["type"] == "ready"
            for url in nodes:
                assert (await chat(client, url, "sk-beta")).status_code == 200
            unknown = await chat(client, nodes[0], "sk-never-a-key")
            await admin(client, admins[0], "DELETE", "/admin/keys/beta")
            revoked_at = trio.current_time()

            async def refused(url: str) -> bool:
                return (await chat(client, url, "sk-beta")).status_code == 401

            waits = [await until(refused, url) for url in nodes]
            for url in nodes:
                answer = await chat(client, url, "sk-beta")
                assert (answer.status_code, answer.content) == (401, unknown.content)
                assert answer.json()["error"]["code"] == "invalid_api_key"
            # Its feed socket on node 1 closes: 1008, within 5 s of the revocation.
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()  # snapshots may come before the close
            closed_after = trio.current_time() - revoked_at
            assert closed.value.reason.code == 1008
            # The other key still works; the admin API knows beta no more.
            assert (await chat(client, nodes[1], "sk-alpha")).status_code == 200
            gone = await client.get(
                f"{admins[2]}/admin/keys/beta", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            assert gone.status_code == 404
    print(f"revocation refused after {[round(w, 3) for w in waits]} s; socket closed after "
          f"{closed_after:.3f} s")  # fmt: skip
    assert max(waits) < PROPAGATION


async def test_a_key_created_through_node_1_works_everywhere_within_1s(
    cluster: tuple[Cluster, list[str]],
) -> None:
    nodes, admins = cluster[0].urls, cluster[1]
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            body = {"name": "carol", "tier": "standard", "models": {"gpt-4o*": {"rpm": 1}}}
            key = (await admin(client, admins[1], "POST", "/admin/keys", body))["key"]

            async def works(url: str) -> bool:
                return (await requests_limit(client, url, key)) is not None

            waits = [await until(works, url) for url in nodes]
            # The per-model rule holds across nodes: one gpt-4o* request in all.
            assert (await chat(client, nodes[0], key)).status_code == 200
            assert (await chat(client, nodes[2], key)).status_code == 429
    assert max(waits) < PROPAGATION


async def test_the_keys_command_drives_the_admin_api(
    cluster: tuple[Cluster, list[str]], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tokenguard keys new|list|set|revoke --admin URL`` against node 0's admin API,
    the token from a file; the key it prints works on node 2."""
    nodes, admins = cluster[0].urls, cluster[1]
    token_file = workdir / "admin-token"
    token_file.write_text(ADMIN + "\n")
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    common = ["--admin", admins[0], "--admin-token-file", str(token_file)]

    def keys(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        parsed = cli.build_parser().parse_args(["keys", *args, *common])
        status = run_keys_command(parsed, stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    with trio.fail_after(30):
        status, out, err = await trio.to_thread.run_sync(
            keys, "new", "--name", "dave", "--tier", "standard", "rpm=1", "models.gpt-4o*.tpm=50"
        )
        assert status == 0, err
        (key,) = [w for w in out.split() if w.startswith("tg-")]
        assert "models.gpt-4o*.tpm=50" in out
        async with httpx.AsyncClient(timeout=5) as client:

            async def works(url: str) -> bool:
                return (await requests_limit(client, url, key)) == 1

            await until(works, nodes[2])
            assert (await chat(client, nodes[2], key)).status_code == 200
            assert (await chat(client, nodes[2], key)).status_code == 429
            status, out, err = await trio.to_thread.run_sync(keys, "list")
            assert status == 0, err
            lines = out.splitlines()
            assert [line.split()[0] for line in lines] == ["alpha", "beta", "dave"]
            assert key not in out
            status, out, err = await trio.to_thread.run_sync(keys, "set", "dave", "rpm=none")
            assert status == 0 and "rpm=" not in out.split("models")[0], (out, err)
            status, out, err = await trio.to_thread.run_sync(keys, "revoke", "dave")
            assert status == 0, err

            async def refused(url: str) -> bool:
                return (await requests_limit(client, url, key)) is None

            await until(refused, nodes[1])
            status, out, err = await trio.to_thread.run_sync(keys, "revoke", "dave")
            assert status == 1 and "404" in err and "No API key named 'dave'" in err
            status, out, err = await trio.to_thread.run_sync(keys, "set", "alpha", "rpm=x=y")
            assert status == 1 and "400: rpm: must be an integer" in err
