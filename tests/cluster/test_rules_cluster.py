"""Richer limits across real node processes sharing one Redis (``tokenguard serve
--nodes 3`` with the embedded redis-server): a team's limit spent by two keys through
two nodes refuses on the third; a day quota spent through node 0 refuses on node 2;
shadow mode admits and counts what enforce mode refuses, identically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.processes import START_TIMEOUT, running_cluster

MODEL = "gpt-4o"


async def chat(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    )


async def usage(client: httpx.AsyncClient, url: str, key: str) -> dict[str, Any]:
    response = await client.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_team_limit_is_shared_across_nodes(workdir: Path) -> None:
    config = workdir / "c.toml"
    config.write_text(
        '[teams.research]\nrpm = 2\n\n[teams.research.models."gpt-4o*"]\ntpd = 100000\n\n'
        '[[keys]]\nkey = "sk-a"\nname = "a"\nteam = "research"\nrpm = 10\n\n'
        '[[keys]]\nkey = "sk-b"\nname = "b"\nteam = "research"\nrpm = 10\n\n'
        '[[keys]]\nkey = "sk-c"\nname = "c"\nrpm = 10\n'
    )
    with trio.fail_after(START_TIMEOUT + 90):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            node0, node1, node2 = cluster.urls
            async with httpx.AsyncClient(timeout=30) as client:
                assert (await chat(client, node0, "sk-a")).status_code == 200
                assert (await chat(client, node1, "sk-b")).status_code == 200
                for key in ("sk-a", "sk-b"):
                    refused = await chat(client, node2, key)
                    assert refused.status_code == 429, refused.text
                    message = refused.json()["error"]["message"]
                    assert "team 'research'" in message
                    assert "requests per min (RPM)" in message
                    assert "Limit 2, Used 2, Requested 1" in message
                    assert int(refused.headers["retry-after"]) <= 65
                # A key outside the team is not affected.
                assert (await chat(client, node2, "sk-c")).status_code == 200
                # Each key's own counter holds its own request; the team's both.
                body = await usage(client, node1, "sk-a")
                used = {(e["scope"], e["dimension"]): e["used"] for e in body["limits"]}
                assert used == {("key", "requests"): 1, ("team", "requests"): 2}


async def test_a_day_quota_and_shadow_mode_across_nodes(workdir: Path) -> None:
    config = workdir / "c.toml"
    config.write_text(
        "[tiers.daily]\nrpm = 100\nrpd = 5\n\n"
        '[[keys]]\nkey = "sk-enforce"\nname = "enforce"\ntier = "daily"\n\n'
        '[[keys]]\nkey = "sk-shadow"\nname = "shadow"\ntier = "daily"\nmode = "shadow"\n'
    )
    with trio.fail_after(START_TIMEOUT + 90):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            node0, _, node2 = cluster.urls
            async with httpx.AsyncClient(timeout=30) as client:
                statuses: dict[str, list[int]] = {"sk-enforce": [], "sk-shadow": []}
                for key, codes in statuses.items():
                    for _ in range(5):
                        codes.append((await chat(client, node0, key)).status_code)
                    for _ in range(3):
                        response = await chat(client, node2, key)
                        codes.append(response.status_code)
                        if key == "sk-enforce":
                            assert response.status_code == 429
                            assert "requests per day (RPD)" in response.json()["error"]["message"]
                            # The quota's hour bucket leaves 24 to 25 hours from now.
                            assert 24 * 3600 <= int(response.headers["retry-after"]) <= 25 * 3600
                assert statuses["sk-enforce"] == [200] * 5 + [429] * 3
                assert statuses["sk-shadow"] == [200] * 8
                # Identical counts: the shadow day counter holds what enforce admitted.
                for key, mode in (("sk-enforce", "enforce"), ("sk-shadow", "shadow")):
                    body = await usage(client, node2, key)
                    day = [e for e in body["limits"] if e["window_seconds"] == 86400]
                    assert [(e["mode"], e["used"], e["limit"]) for e in day] == [(mode, 5, 5)]
