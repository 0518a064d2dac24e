"""The app of the Responses API tests (tests/api/test_responses_*.py), and their calls.

:func:`responses_client` is a test client of the app of :data:`CONFIG` over a fresh
memory store; :func:`create` posts ``/v1/responses``; :func:`used` reads a key's
``/v1/usage``; :func:`chat_prompt_tokens` is what the same messages cost in chat.
"""

from __future__ import annotations

from typing import Any

from drivers.memory import MemoryStore
from tests.support.chat_app import FakeClock
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings

CONFIG: dict[str, Any] = {
    "tiers": {"small": {"rpm": 3, "input_tpm": 400, "output_tpm": 200, "default_max_tokens": 20}},
    "keys": [
        {"key": "sk-small", "name": "small", "tier": "small"},
        {"key": "sk-big", "name": "big", "rpm": 1000, "input_tpm": 100000, "output_tpm": 100000},
        {"key": "sk-other", "name": "other", "rpm": 1000, "input_tpm": 100000},
        {"key": "sk-users", "name": "users", "rpm": 1000, "per_user": {"rpm": 1}},
    ],
}
SERVED = ["gpt-4o", "gpt-4o-mini"]


def responses_client():  # type: ignore[no-untyped-def]
    """A test client of the app of :data:`CONFIG` over a fresh memory store."""
    settings = parse_settings(CONFIG, "<test>")
    return create_app(settings, MemoryStore(clock=FakeClock())).test_client()


def auth(key: str = "sk-big") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(client: Any, key: str = "sk-big", **body: Any) -> Any:
    payload = {"model": "gpt-4o", "input": "Say hello to the rate limiter.", **body}
    return await client.post("/v1/responses", json=payload, headers=auth(key))


async def used(client: Any, key: str) -> dict[str, int]:
    response = await client.get("/v1/usage", headers=auth(key))
    dims = (await response.get_json())["dimensions"]
    return {name: dim["used"] for name, dim in dims.items() if dim is not None}


async def chat_prompt_tokens(client: Any, messages: list[dict[str, Any]], **body: Any) -> int:
    payload = {"model": "gpt-4o", "messages": messages, "max_tokens": 5, **body}
    response = await client.post("/v1/chat/completions", json=payload, headers=auth())
    assert response.status_code == 200, await response.get_data()
    return (await response.get_json())["usage"]["prompt_tokens"]
