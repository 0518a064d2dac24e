"""An in-process node with the admin API, as tests/api/test_admin_*.py build it.

:class:`Node` is the node's API app and admin app over one keyring and one store, so
a change made through the admin API is checked where it matters, on the API.
:data:`CONFIG` has the admin token :data:`ADMIN`, tiers ``free`` and ``pro``, team
``research`` and two config keys (``sk-config``, ``sk-other``). :func:`answer` and
:func:`error` check an answer's status and shape and return its body or message.
"""

from __future__ import annotations

from typing import Any

import attrs

from tokenguard.api.admin import create_admin_app
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import Settings
from tokenguard.limiting.keyring import Keyring
from tokenguard.store.window_store import WindowStore

TEST_TIMEOUT = 10.0
ADMIN = "admin-token-for-the-admin-api-tests-0123"
CONFIG: dict[str, Any] = {
    "feed": {"admin_token": ADMIN},
    "tiers": {
        "free": {"rpm": 3, "input_tpm": 1000},
        "pro": {"rpm": 60, "models": {"gpt-4o*": {"rpm": 20, "mode": "shadow"}}},
    },
    "teams": {"research": {"rph": 600}},
    "keys": [
        {"key": "sk-config", "name": "config-key", "tier": "free", "rpm": 2},
        {"key": "sk-other", "name": "other", "tier": "pro", "team": "research"},
    ],
}
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def settings_of(config: dict[str, Any] = CONFIG) -> Settings:
    return parse_settings(config, "<test>", environ={})


@attrs.define
class Node:
    """One in-process node: its API app and admin app over one keyring and store."""

    settings: Settings
    store: WindowStore
    keyring: Keyring
    api: Any
    admin: Any

    async def call(self, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
        client = self.admin.test_client()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if isinstance(body, bytes):
            return await client.open(path, method=method, data=body, headers=headers)
        if body is None:
            return await client.open(path, method=method, headers=headers)
        return await client.open(path, method=method, json=body, headers=headers)

    async def chat(self, key: str, model: str = "gpt-4o") -> Any:
        headers = {"Authorization": f"Bearer {key}"}
        body = {**BODY, "model": model}
        return await self.api.test_client().post("/v1/chat/completions", json=body, headers=headers)


async def make_node(store: WindowStore, settings: Settings | None = None) -> Node:
    settings = settings or settings_of()
    keyring = Keyring(settings, store)
    await keyring.seed()
    await keyring.refresh()
    api = create_app(settings, store, keyring=keyring)
    limiter = api.extensions["tokenguard"].limiter
    return Node(settings, store, keyring, api, create_admin_app(settings, store, keyring, limiter))


async def answer(response: Any, status: int) -> dict[str, Any]:
    body = await response.get_json()
    assert response.status_code == status, body
    assert response.content_type == "application/json"
    return body


async def error(response: Any, status: int, code: str | None, param: Any = None) -> str:
    """The error's message, once its shape, code and param (unless ``...``) are checked."""
    body = await answer(response, status)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    if param is not ...:
        assert body["error"]["param"] == param, body
    return body["error"]["message"]
