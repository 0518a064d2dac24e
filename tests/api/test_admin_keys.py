"""The admin API's keys, in process: listed without secrets, created, changed and revoked.

Each answer's status and body, the bad fields (400 naming the field), and each change
checked on the node's API (200, 429, 401), not only in the admin's own answers; a
revoked key's feed sockets are closed. Across real node processes and Redis:
tests/cluster/test_admin_cluster.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError

from drivers.memory import MemoryStore
from tests.support.admin_node import (
    ADMIN,
    TEST_TIMEOUT,
    Node,
    answer,
    error,
    make_node,
    settings_of,
)
from tokenguard.cli.keys import key_line
from tokenguard.model import digest_of

# --- keys ------------------------------------------------------------------------------------


async def test_lists_the_config_keys_without_secrets(node: Node) -> None:
    body = await answer(await node.call("GET", "/admin/keys"), 200)
    assert body["object"] == "list"
    assert [k["name"] for k in body["data"]] == ["config-key", "other"]
    first = body["data"][0]
    assert first == {
        "object": "api_key",
        "name": "config-key",
        "key_id": digest_of("sk-config")[:16],
        "tier": "free",
        "team": None,
        "limits": {"rpm": 2},
        "effective_limits": {
            "rpm": 2,
            "input_tpm": 1000,
            "default_max_tokens": 1024,
            "mode": "enforce",
        },
        "source": "config",
        "updated_at": None,
        "month_spend": [],  # no monthly budget applies
    }
    text = json.dumps(body)
    assert "sk-config" not in text and digest_of("sk-config") not in text


SPEND_CONFIG: dict[str, Any] = {
    "feed": {"admin_token": ADMIN},
    "limits": {"timezone": "Europe/Paris"},
    "prices": {"gpt-4o": {"input": 1.0, "output": 1.0}},  # micro-units = tokens
    "teams": {"acme": {"spend_per_month": 200.0}},
    "keys": [
        {"key": "sk-web", "name": "web", "team": "acme", "spend_per_month": 2.5},
        {"key": "sk-day", "name": "day", "spend_per_day": 1.0},
    ],
}


async def test_keys_list_shows_each_keys_spend_this_calendar_month() -> None:
    """The admin API's ``month_spend`` and ``tokenguard keys list``'s line for it: per
    monthly budget (the key's, its team's), what the usage says was spent this month."""
    with trio.fail_after(TEST_TIMEOUT):
        node = await make_node(MemoryStore(), settings_of(SPEND_CONFIG))
        for _ in range(3):
            assert (await node.chat("sk-web")).status_code == 200
        assert (await node.chat("sk-day")).status_code == 200
        usage = await node.api.test_client().get(
            "/v1/usage", headers={"Authorization": "Bearer sk-web"}
        )
        body = await answer(await node.call("GET", "/admin/keys"), 200)
    spent = [e for e in (await usage.get_json())["limits"] if e["dimension"] == "spend"]
    used = spent[0]["used"]
    assert used > 0 and [e["used"] for e in spent] == [used, used]
    month = node.api.extensions["tokenguard"].limiter.months.current()[0].label
    web, day = body["data"][1], body["data"][0]
    assert [(e["scope"], e["month"], e["used"], e["limit"]) for e in web["month_spend"]] == [
        ("key", month, used, 2_500_000),
        ("team", month, used, 200_000_000),
    ]
    assert all(0 < e["reset_seconds"] <= 31 * 86400 for e in web["month_spend"])
    assert day["month_spend"] == []  # a daily budget only: no month is counted
    line = key_line(web)
    assert line.startswith("web  tier=-  team=acme  spend_per_month=2.5")
    amount = f"{used / 1_000_000:.6f}".rstrip("0")
    assert line.endswith(
        f"  spent {month} (key): {amount} of 2.5  spent {month} (team): {amount} of 200"
    )
    assert key_line(day) == "day  tier=-  team=-  spend_per_day=1.0"


async def test_a_created_key_is_shown_once_and_works_at_once(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        created = await answer(
            await node.call("POST", "/admin/keys", {"name": "bob", "tier": "free", "tpm": 500}),
            201,
        )
        key = created["key"]
        assert key.startswith("tg-") and len(key) == 46
        assert created["name"] == "bob" and created["tier"] == "free"
        assert created["limits"] == {"tpm": 500}
        assert created["effective_limits"]["rpm"] == 3 and created["source"] == "admin"
        assert (await node.chat(key)).status_code == 200
        shown = await answer(await node.call("GET", "/admin/keys/bob"), 200)
        listed = await answer(await node.call("GET", "/admin/keys"), 200)
        _, records = await node.store.registry_load()
    assert "key" not in shown and shown["key_id"] == digest_of(key)[:16]
    assert [k["name"] for k in listed["data"]] == ["bob", "config-key", "other"]
    stored = " ".join(records.values())
    assert key not in stored and digest_of(key) in stored  # the digest, never the key
    assert key not in json.dumps(listed)


async def test_creating_a_taken_name_is_409(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for name in ("config-key", "dup"):
            if name == "dup":
                await answer(await node.call("POST", "/admin/keys", {"name": name}), 201)
            response = await node.call("POST", "/admin/keys", {"name": name, "rpm": 1})
            message = await error(response, 409, "key_exists")
            assert repr(name) in message


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "name", "name is required"),
        ({"name": ""}, "name", "name is required"),
        ({"name": 5}, "name", "name is required"),
        ({"name": "has space"}, None, "a key name is 1-100"),
        ({"name": "k", "tier": "gold"}, "tier", "unknown tier 'gold'"),
        ({"name": "k", "team": "nope"}, "team", "unknown team 'nope'"),
        ({"name": "k", "tier": 3}, "tier", "non-empty string or null"),
        ({"name": "k", "rpm": "10"}, "rpm", "must be an integer"),
        ({"name": "k", "rpm": 0}, "rpm", "must be at least 1"),
        ({"name": "k", "rpm": True}, "rpm", "must be an integer"),
        ({"name": "k", "rpmm": 5}, "rpmm", "unknown key"),
        ({"name": "k", "mode": "loud"}, "mode", "must be one of enforce, shadow"),
        ({"name": "k", "models": {"gpt-4o*": {}}}, "models.gpt-4o*", "sets no limit"),
        ({"name": "k", "models": {"gpt-4o*": {"rpm": -1}}}, "models.gpt-4o*.rpm", "at least 1"),
        ({"name": "k", "models": []}, "models", "must be a table"),
        ({"name": "k", "key": "sk-mine"}, "key", "made by tokenguard"),
        ({"name": "k", "sha256": "0" * 64}, "sha256", "made by tokenguard"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    node: Node, body: dict[str, Any], param: str | None, words: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        version = await node.store.registry_version()
        message = await error(await node.call("POST", "/admin/keys", body), 400, None, param)
        assert await node.store.registry_version() == version  # nothing written
    assert words in message


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[1]", b'"name"', b'{"name": "a", "name": "b"}', b'{"rpm": NaN}', b"\xff"],
)
async def test_bodies_are_strict_json_objects(node: Node, raw: bytes) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await error(await node.call("POST", "/admin/keys", raw), 400, None, ...)


async def test_a_changed_limit_applies_at_once(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        # config-key: rpm 2 (its own) over free's 3. Lower it to 1.
        assert (await node.chat("sk-config")).status_code == 200
        changed = await answer(await node.call("PATCH", "/admin/keys/config-key", {"rpm": 1}), 200)
        assert changed["limits"] == {"rpm": 1} and changed["source"] == "admin"
        refused = await node.chat("sk-config")
        assert refused.status_code == 429
        assert "Limit 1" in (await refused.get_json())["error"]["message"]
        # null removes the key's own value: the tier's 3 applies again (1 used: the
        # refusal consumed nothing).
        changed = await answer(
            await node.call("PATCH", "/admin/keys/config-key", {"rpm": None}), 200
        )
        assert changed["limits"] == {} and changed["effective_limits"]["rpm"] == 3
        assert (await node.chat("sk-config")).status_code == 200
        assert (await node.chat("sk-config")).status_code == 200
        assert (await node.chat("sk-config")).status_code == 429


async def test_per_model_limits_apply_on_top_of_the_key_limits(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        created = await answer(
            await node.call(
                "POST", "/admin/keys", {"name": "m", "rpm": 3, "models": {"gpt-4o*": {"rpm": 1}}}
            ),
            201,
        )
        key = created["key"]
        assert (await node.chat(key, "gpt-4o")).status_code == 200
        refused = await node.chat(key, "gpt-4o-mini")  # the same glob: its counter is spent
        assert refused.status_code == 429
        assert "gpt-4o*" in (await refused.get_json())["error"]["message"]
        assert (await node.chat(key, "gpt-4.1")).status_code == 200
        # The rule removed: gpt-4o* is only under the key's rpm 3 (2 used).
        patch = {"models": {"gpt-4o*": None}}
        changed = await answer(await node.call("PATCH", "/admin/keys/m", patch), 200)
        assert "models" not in changed["limits"]
        assert (await node.chat(key, "gpt-4o")).status_code == 200
        assert (await node.chat(key, "gpt-4o")).status_code == 429  # the key's own rpm


async def test_patch_changes_tier_and_team_and_refuses_identity_fields(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        path = "/admin/keys/config-key"
        moved = await answer(
            await node.call("PATCH", path, {"tier": "pro", "team": "research"}), 200
        )
        assert moved["tier"] == "pro" and moved["team"] == "research"
        assert moved["effective_limits"]["rpm"] == 2  # its own rpm still wins
        assert moved["effective_limits"]["models"] == {"gpt-4o*": {"rpm": 20, "mode": "shadow"}}
        assert node.keyring.by_name("config-key").team.name == "research"
        untiered = await answer(await node.call("PATCH", path, {"tier": None}), 200)
        assert untiered["tier"] is None and untiered["effective_limits"] == {
            "rpm": 2,
            "default_max_tokens": 1024,
            "mode": "enforce",
        }
        for field in ("name", "key", "sha256"):
            await error(await node.call("PATCH", path, {field: "x"}), 400, None, field)
        await error(await node.call("PATCH", path, {"tier": "gold"}), 400, None, "tier")
        message = await error(
            await node.call("PATCH", "/admin/keys/nobody", {"rpm": 1}), 404, "key_not_found"
        )
        assert "'nobody'" in message


async def test_a_revoked_key_answers_like_an_unknown_one(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert (await node.chat("sk-config")).status_code == 200
        revoked = await answer(await node.call("DELETE", "/admin/keys/config-key"), 200)
        assert revoked == {"object": "api_key", "name": "config-key", "revoked": True}
        refused = await node.chat("sk-config")
        unknown = await node.chat("sk-never-existed")
        assert refused.status_code == unknown.status_code == 401
        assert await refused.get_data() == await unknown.get_data()
        assert (await refused.get_json())["error"]["code"] == "invalid_api_key"
        assert "x-ratelimit-limit-requests" not in refused.headers
        usage = await node.api.test_client().get(
            "/v1/usage", headers={"Authorization": "Bearer sk-config"}
        )
        assert usage.status_code == 401
        await error(await node.call("GET", "/admin/keys/config-key"), 404, "key_not_found")
        await error(await node.call("DELETE", "/admin/keys/config-key"), 404, "key_not_found")
        await error(
            await node.call("PATCH", "/admin/keys/config-key", {"rpm": 1}), 404, "key_not_found"
        )
        listed = await answer(await node.call("GET", "/admin/keys"), 200)
        assert [k["name"] for k in listed["data"]] == ["other"]
        # The name may be used again, by a new key; the old one stays refused.
        again = await answer(await node.call("POST", "/admin/keys", {"name": "config-key"}), 201)
        assert (await node.chat(again["key"])).status_code == 200
        assert (await node.chat("sk-config")).status_code == 401


async def test_revoking_closes_the_keys_feed_sockets(node: Node) -> None:
    """The key's websocket closes with 1008; another key's stays open."""
    client = node.api.test_client()
    codes: list[int] = []
    with trio.fail_after(TEST_TIMEOUT):
        try:
            async with (
                client.websocket(
                    "/v1/usage/stream", headers={"Authorization": "Bearer sk-config"}
                ) as ws,
                client.websocket(
                    "/v1/usage/stream", headers={"Authorization": "Bearer sk-other"}
                ) as other,
            ):
                assert json.loads(await ws.receive())["type"] == "ready"
                assert json.loads(await other.receive())["type"] == "ready"
                await answer(await node.call("DELETE", "/admin/keys/config-key"), 200)
                with trio.fail_after(5):
                    while True:  # snapshots may come first; then the close
                        await ws.receive()
        except* WebsocketDisconnectError as group:
            codes += [exc.args[0] for exc in leaves(group)]
    assert codes == [1008]


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
