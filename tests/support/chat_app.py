"""The HTTP surface's app as the tests of tests/api/test_app_*.py build it, and their calls.

:data:`CONFIG` has three keys: ``sk-small`` (the ``small`` tier: 3 rpm, 200 input and
100 output tokens a minute, 20 tokens reserved by default), ``sk-big`` (large limits)
and ``sk-open`` (no limit). :class:`FakeClock` is the memory store's clock, still until
a test moves it. :func:`chat` posts a chat completion of :data:`MESSAGES`;
:func:`used` reads a key's ``/v1/usage`` dimensions (and asserts a 200).
"""

from __future__ import annotations

from typing import Any

CONFIG = {
    "server": {"max_body_bytes": 4096},
    "tiers": {"small": {"rpm": 3, "input_tpm": 200, "output_tpm": 100, "default_max_tokens": 20}},
    "keys": [
        {"key": "sk-small", "name": "small", "tier": "small"},
        {"key": "sk-big", "name": "big", "rpm": 1000, "input_tpm": 100000, "output_tpm": 100000},
        {"key": "sk-open", "name": "open"},
    ],
}
MESSAGES = [{"role": "user", "content": "Say hello to the rate limiter."}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def auth(key: str = "sk-big") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def chat(client, key: str = "sk-big", **body: Any):  # type: ignore[no-untyped-def]
    payload = {"model": "gpt-4o", "messages": MESSAGES, **body}
    return await client.post("/v1/chat/completions", json=payload, headers=auth(key))


async def used(client, key: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    response = await client.get("/v1/usage", headers=auth(key))
    assert response.status_code == 200
    return (await response.get_json())["dimensions"]
