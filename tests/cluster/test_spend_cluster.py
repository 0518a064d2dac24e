"""Spend and per-user limits across real node processes sharing one Redis (``tokenguard
serve --nodes 3`` with the embedded redis-server), and a spent monthly budget as the
official openai SDK sees it."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import trio

from tests.support.processes import (
    START_TIMEOUT,
    free_ports,
    running_cluster,
    running_tokenguard,
    wait_healthy,
)

MODEL = "gpt-4o"
# 1 per million tokens in and out: a request's spend in micro-units is its tokens.
PRICES = '[prices."gpt-4o"]\ninput = 1.0\ncached_input = 1.0\noutput = 1.0\n\n'


async def chat(client: httpx.AsyncClient, url: str, key: str, **body: Any) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            **body,
        },
    )


def seconds_to_next_utc_month(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp() - now


async def test_a_teams_monthly_budget_spent_through_node_0_is_refused_on_node_2(
    workdir: Path,
) -> None:
    config = workdir / "c.toml"
    config.write_text(
        PRICES + "[teams.t]\nspend_per_month = 0.0001\n\n"  # 100 micro-units a month
        '[[keys]]\nkey = "sk-a"\nname = "a"\nteam = "t"\n\n'
        '[[keys]]\nkey = "sk-b"\nname = "b"\nteam = "t"\n\n'
        '[[keys]]\nkey = "sk-c"\nname = "c"\nspend_per_month = 0.0001\n'
    )
    with trio.fail_after(START_TIMEOUT + 90):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            node0, _, node2 = cluster.urls
            async with httpx.AsyncClient(timeout=30) as client:
                spent = 0
                while (await chat(client, node0, "sk-a")).status_code == 200:
                    spent += 1
                    assert spent < 100
                assert spent >= 1
                for key in ("sk-a", "sk-b"):
                    refused = await chat(client, node2, key)
                    assert refused.status_code == 429, refused.text
                    error = refused.json()["error"]
                    assert error["code"] == "insufficient_quota"
                    assert "team 't'" in error["message"]
                    assert "spend per calendar month" in error["message"]
                # Another key's own budget is untouched.
                assert (await chat(client, node2, "sk-c")).status_code == 200


async def test_one_users_concurrent_requests_across_nodes_admit_exactly_their_limit(
    workdir: Path,
) -> None:
    """50 requests of one end user at once through 3 nodes against per_user.rpm = 10:
    exactly 10 are admitted; another user of the same key is unaffected."""
    config = workdir / "c.toml"
    config.write_text(
        '[[keys]]\nkey = "sk-app"\nname = "app"\nrpm = 1000\nper_user = { rpm = 10 }\n'
    )
    with trio.fail_after(START_TIMEOUT + 90):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            statuses: list[int] = []
            async with httpx.AsyncClient(timeout=30) as client:

                async def one(i: int) -> None:
                    url = cluster.urls[i % 3]
                    statuses.append((await chat(client, url, "sk-app", user="alice")).status_code)

                async with trio.open_nursery() as nursery:
                    for i in range(50):
                        nursery.start_soon(one, i)
                assert sorted(set(statuses)) == [200, 429]
                assert statuses.count(200) == 10 and statuses.count(429) == 40
                for url in cluster.urls:
                    assert (await chat(client, url, "sk-app", user="bob")).status_code == 200
                response = await client.get(
                    f"{cluster.urls[1]}/v1/usage",
                    params={"user": "alice"},
                    headers={"Authorization": "Bearer sk-app"},
                )
                entries = [e for e in response.json()["limits"] if e["scope"] == "user"]
                assert [(e["used"], e["limit"]) for e in entries] == [(10, 10)]


async def test_the_sdk_raises_insufficient_quota_with_a_retry_after_at_the_months_end(
    workdir: Path,
) -> None:
    config = workdir / "c.toml"
    config.write_text(
        PRICES + '[[keys]]\nkey = "sk-budget"\nname = "budget"\nspend_per_month = 0.0001\n'
    )
    port = free_ports()
    args = ["serve", "--config", str(config), "--port", str(port)]
    with trio.fail_after(START_TIMEOUT + 90):
        async with running_tokenguard(args, output_path=workdir / "node.out"):
            url = f"http://127.0.0.1:{port}"
            await wait_healthy(url)
            client = openai.OpenAI(
                base_url=f"{url}/v1", api_key="sk-budget", max_retries=0, timeout=10
            )

            def ask() -> None:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8
                )

            admitted = 0
            while True:
                before = time.time()
                try:
                    await trio.to_thread.run_sync(ask)
                except openai.RateLimitError as caught:
                    error = caught
                    break
                admitted += 1
                assert admitted < 100
            after = time.time()
    assert admitted >= 1
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    assert error.body is not None and error.body["type"] == "insufficient_quota"
    retry_after = int(error.response.headers["retry-after"])
    # The month's end, as seen between sending and receiving the refusal (whole seconds,
    # rounded up).
    assert math.floor(seconds_to_next_utc_month(after)) <= retry_after
    assert retry_after <= math.ceil(seconds_to_next_utc_month(before)) + 1
