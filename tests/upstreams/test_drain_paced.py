"""``on_client_gone = "drain"`` with an upstream that streams at a model's pace: the node
is waiting for the upstream's next bytes when the client leaves, and must still read on
to what the upstream billed (tokenguard/upstreams/relay.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from bench.fake_upstream.asks import FLAVOURS
from tests.support.honest_upstreams import take_events
from tests.upstreams.test_proxy_accounting import auth, charged_once_settled, chat, proxied

pytestmark = pytest.mark.slow

PACED_TOKENS = 2000
TOKENS_PER_SECOND = 400.0  # a 5 s stream, one event every 2.5 ms


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_paced_stream_abandoned_mid_way_is_drained_and_charged_what_was_billed(
    workdir: Path, flavour: str
) -> None:
    route = 'on_client_gone = "drain"'
    with trio.fail_after(120):
        async with (
            proxied(workdir, flavour, tokens_per_second=TOKENS_PER_SECOND, route=route) as (
                url,
                upstream,
            ),
            httpx.AsyncClient(timeout=30) as client,
        ):
            body = chat("alice", PACED_TOKENS, stream=True)
            await take_events(client, f"{url}/v1/chat/completions", body, 5, auth("alice"))
            billed = await upstream.billed("alice")
            assert billed.output_tokens == PACED_TOKENS
            assert await charged_once_settled(url, "alice", billed) == billed
