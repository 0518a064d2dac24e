"""The admin API's authentication, in process: every route needs the admin token.

With no admin token configured the admin API is off; unknown routes, methods and big
bodies are answered in OpenAI's error shape.
"""

from __future__ import annotations

import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.admin_node import (
    ADMIN,
    CONFIG,
    TEST_TIMEOUT,
    Node,
    error,
    make_node,
    settings_of,
)

# --- auth ------------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("GET", "/admin/keys/config-key"),
    ("PATCH", "/admin/keys/config-key"),
    ("DELETE", "/admin/keys/config-key"),
    ("GET", "/admin/tiers"),
    ("GET", "/admin/tiers/free"),
    ("PUT", "/admin/tiers/free"),
    ("GET", "/admin/nothing-here"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_admin_route_needs_the_admin_token(node: Node, method: str, path: str) -> None:
    client = node.admin.test_client()
    with trio.fail_after(TEST_TIMEOUT):
        version = await node.store.registry_version()
        for headers in (
            {},
            {"Authorization": "Bearer sk-config"},  # an API key is not an admin token
            {"Authorization": f"Bearer {ADMIN}x"},
            {"Authorization": f"Bearer {ADMIN[:-1]}"},
            {"Authorization": f"Basic {ADMIN}"},
            {"Authorization": "Bearer  "},
        ):
            response = await client.open(path, method=method, json={"rpm": 1}, headers=headers)
            await error(response, 401, "invalid_admin_token")
        assert await node.store.registry_version() == version


async def test_with_no_admin_token_the_admin_api_is_off() -> None:
    config = {k: v for k, v in CONFIG.items() if k != "feed"}
    with trio.fail_after(TEST_TIMEOUT):
        node = await make_node(MemoryStore(), settings_of(config))
        for method, path in ROUTES:
            for token in ("", ADMIN, "sk-config"):
                response = await node.call(method, path, {"rpm": 1}, token=token)
                message = await error(response, 403, "admin_disabled")
                assert "no admin token is configured" in message


async def test_unknown_routes_methods_and_big_bodies_answer_in_openai_shape(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await error(await node.call("GET", "/admin/nothing-here"), 404, "unknown_url")
        await error(await node.call("PUT", "/admin/keys"), 405, None)
        await error(await node.call("POST", "/admin/tiers/free", {"rpm": 1}), 405, None)
        big = {"name": "big", "x": "y" * 70000}
        await error(await node.call("POST", "/admin/keys", big), 413, "request_too_large")
