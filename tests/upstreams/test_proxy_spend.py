"""Spend through a real proxy node: a request is settled to the upstream's own usage,
its prompt-cache hits priced at ``cached_input`` (a scripted upstream reports them in
OpenAI's ``prompt_tokens_details.cached_tokens``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.support.proxy_nodes import (
    MESSAGES,
    PROXY_KEY,
    SECRET_ENV,
    UPSTREAM_SECRET,
    node,
    proxy_config,
)
from tests.support.proxy_upstreams import fixed, scripted_upstream

# Per million tokens: a token in is 1 micro-unit, a cached one 0.25, a token out 2.
PRICES = '[prices."gpt-4o"]\ninput = 1.0\ncached_input = 0.25\noutput = 2.0\n'


def reply(usage: dict[str, object]) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


@pytest.mark.parametrize(
    ("details", "spent"),
    [
        # 200 uncached x 1 + 800 cached x 0.25 + 100 out x 2 = 600 micro-units.
        ({"prompt_tokens_details": {"cached_tokens": 800}}, 600),
        ({}, 1200),  # no cache hits reported: every input token at the input price
    ],
)
async def test_a_proxied_request_is_settled_to_its_real_cost_cache_hits_at_the_cached_price(
    workdir: Path, details: dict[str, object], spent: int
) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100, **details}
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(200, reply(usage))) as upstream,
            node(
                workdir,
                "proxy",
                proxy_config(upstream.base_url, extra=PRICES) + "spend_per_day = 10.0\n",
                {SECRET_ENV: UPSTREAM_SECRET},
            ) as (url, _),
            httpx.AsyncClient(timeout=10) as client,
        ):
            headers = {"Authorization": f"Bearer {PROXY_KEY}"}
            response = await client.post(
                f"{url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 300},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            body = (await client.get(f"{url}/v1/usage", headers=headers)).json()
    (spend,) = [e for e in body["limits"] if e["dimension"] == "spend"]
    assert (spend["used"], spend["limit"]) == (spent, 10_000_000)
