"""The admin API's tiers, in process: read and set, and applied to the keys of the tier."""

from __future__ import annotations

import trio

from tests.support.admin_node import (
    TEST_TIMEOUT,
    Node,
    answer,
    error,
)

# --- tiers -----------------------------------------------------------------------------------


async def test_tiers_can_be_read_and_set(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        listed = await answer(await node.call("GET", "/admin/tiers"), 200)
        assert [t["name"] for t in listed["data"]] == ["free", "pro"]
        free = await answer(await node.call("GET", "/admin/tiers/free"), 200)
        assert free["limits"] == {
            "rpm": 3,
            "input_tpm": 1000,
            "default_max_tokens": 1024,
            "mode": "enforce",
        }
        assert free["source"] == "config"
        await error(await node.call("GET", "/admin/tiers/gold"), 404, "tier_not_found")
        # Set free to rpm 1: config-key (its own rpm 2) keeps 2; a new free key gets 1.
        set_ = await answer(await node.call("PUT", "/admin/tiers/free", {"rpm": 1}), 200)
        assert set_["limits"] == {"rpm": 1} and set_["source"] == "admin"
        assert set_["effective_limits"] == {"rpm": 1, "default_max_tokens": 1024, "mode": "enforce"}
        plain = await answer(
            await node.call("POST", "/admin/keys", {"name": "f", "tier": "free"}), 201
        )
        assert plain["effective_limits"]["rpm"] == 1
        assert node.keyring.by_name("config-key").limits.input_tpm is None  # tier replaced whole
        assert (await node.chat(plain["key"])).status_code == 200
        assert (await node.chat(plain["key"])).status_code == 429
        created = await node.call(
            "PUT", "/admin/tiers/gold", {"tpd": 100000, "models": {"o3*": {"rpd": 5}}}
        )
        gold = await answer(created, 201)
        assert gold["effective_limits"]["models"] == {"o3*": {"rpd": 5}}
        moved = await answer(await node.call("PATCH", "/admin/keys/f", {"tier": "gold"}), 200)
        assert moved["effective_limits"]["tpd"] == 100000
        await error(await node.call("PUT", "/admin/tiers/free", {"rpm": "1"}), 400, None, "rpm")
        await error(await node.call("PUT", "/admin/tiers/free", [1]), 400, None)
        await error(await node.call("PUT", "/admin/tiers/bad name", {"rpm": 1}), 400, None)
