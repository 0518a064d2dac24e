"""The admin API in-process (quart's test client over a memory store): keys and tiers
created, changed and revoked, every answer's status and body, auth, validation, the
config-seeding rule, the keyring's view on two "nodes", and the bind check.

Real parts: the admin app and the node's API app share one keyring and one store, so a
change is checked where it matters, on the API (200, 429, 401), not only in the
admin's own answers. Across real node processes and Redis: tests/test_admin_cluster.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError

from drivers.memory import MemoryStore
from tokenguard.api.admin import check_admin_bind, create_admin_app, is_loopback
from tokenguard.api.app import create_app
from tokenguard.cli import main as cli
from tokenguard.cli.keys import key_line
from tokenguard.config.limits_table import limits_from_table
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError, Settings
from tokenguard.limiting.keyring import Keyring
from tokenguard.limiting.registry import KEY, TIER, KeyRecord, build_view, config_records, table_of
from tokenguard.model import digest_of
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.window_store import WindowStore, open_store

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


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with trio.fail_after(TEST_TIMEOUT):
        yield await make_node(MemoryStore())


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


async def test_the_store_down_is_503_and_the_view_stays() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(GuardedStore(MemoryStore())) as guarded:
            node = await make_node(guarded)
            guarded._trip("test: the store is down")  # type: ignore[attr-defined]
            response = await node.call("POST", "/admin/keys", {"name": "new"})
            await error(response, 503, "store_unavailable")
            assert response.headers["retry-after"] == "1"
            await error(await node.call("GET", "/admin/keys"), 503, "store_unavailable")
            # The node keeps serving on its last view of the keys.
            assert (await node.chat("sk-config")).status_code == 200


# --- the keyring: config seeding, propagation, resolution ------------------------------------


async def test_config_seeds_the_store_and_an_admin_change_wins_over_it() -> None:
    store = MemoryStore()
    with trio.fail_after(TEST_TIMEOUT):
        first = await make_node(store)
        await answer(await first.call("PATCH", "/admin/keys/other", {"rpm": 7}), 200)
        await answer(await first.call("DELETE", "/admin/keys/config-key"), 200)
        # A restart with an edited config: the tier it changes is config's (updated);
        # the keys changed through the API keep their admin version; a config key no
        # longer in the config is removed; a new one is added.
        edited = json.loads(json.dumps(CONFIG))
        edited["tiers"]["free"]["rpm"] = 30
        edited["keys"][1]["rpm"] = 99
        edited["keys"].append({"key": "sk-new", "name": "new", "tier": "free"})
        second = await make_node(store, settings_of(edited))
        assert second.keyring.tiers["free"].rpm == 30
        assert second.keyring.by_name("other").limits.rpm == 7  # the admin's, not 99
        assert second.keyring.by_name("config-key") is None  # still revoked
        assert second.keyring.by_name("new").limits.rpm == 30
        assert (await second.chat("sk-config")).status_code == 401
        # The same config again writes nothing (every node seeds at its start).
        version = await store.registry_version()
        await make_node(store, settings_of(edited))
        assert await store.registry_version() == version
        # A key the config had, and no longer has, is gone (it was the config's).
        edited["keys"].pop()
        third = await make_node(store, settings_of(edited))
        assert third.keyring.by_name("new") is None


async def test_a_change_on_one_node_applies_on_another_within_a_second() -> None:
    store = MemoryStore()
    with trio.fail_after(TEST_TIMEOUT):
        one = await make_node(store)
        other = Keyring(one.settings, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(other.run)
            assert other.by_name("config-key").limits.rpm == 2
            with other.watching(digest_of("sk-config")) as revoked:
                await answer(await one.call("PATCH", "/admin/keys/config-key", {"rpm": 9}), 200)
                start = trio.current_time()
                # Polling the other keyring's view, as a request would see it.
                while other.by_name("config-key").limits.rpm != 9:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert trio.current_time() - start < 1.0
                assert not revoked.is_set()
                await answer(await one.call("DELETE", "/admin/keys/config-key"), 200)
                with trio.fail_after(1.0):
                    await revoked.wait()
            assert other.by_digest(digest_of("sk-config")) is None
            other.stop()


def test_the_config_view_is_exactly_the_configs_keys() -> None:
    """Resolving the seeded records gives the very keys and tiers settings.py built."""
    settings = settings_of()
    view = build_view(settings, None, config_records(settings))
    assert dict(view.tiers) == dict(settings.tiers)
    assert sorted(view.keys_by_name.values(), key=lambda k: k.name) == sorted(
        settings.keys, key=lambda k: k.name
    )
    for limits in settings.tiers.values():
        assert limits_from_table(table_of(limits), "<round trip>") == limits


def test_a_bad_record_leaves_its_key_out_never_unlimited() -> None:
    settings = settings_of()
    records = config_records(settings)
    broken = KeyRecord(name="x", digest=digest_of("sk-x"), tier="gone").to_json()
    records[(KEY, "x")] = broken
    records[(KEY, "y")] = "{not json"
    records[(TIER, "z")] = '{"limits": {"rpm": "many"}}'
    view = build_view(settings, 1, records)
    assert set(view.keys_by_name) == {"config-key", "other"}
    assert set(view.tiers) == {"free", "pro"}


# --- the bind check --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
     ("example.com", False)],
)  # fmt: skip
def test_only_loopback_binds_go_without_a_long_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) == loopback
    short = settings_of({"feed": {"admin_token": "x" * 31}})
    long = settings_of({"feed": {"admin_token": "x" * 32}})
    none = settings_of({})
    check_admin_bind(host, long)
    for settings in (short, none):
        if loopback:
            check_admin_bind(host, settings)
        else:
            with pytest.raises(ConfigError, match="at least 32 bytes"):
                check_admin_bind(host, settings)


def test_serve_refuses_a_public_admin_bind_without_a_long_token(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENGUARD_ADMIN_TOKEN", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('[feed]\nadmin_token = "short-but-16-chars"\n')
    for nodes in ("1", "3"):
        argv = ["serve", "--config", str(config), "--admin-port", "29999", "--nodes", nodes]
        status = cli.main([*argv, "--admin-host", "0.0.0.0", "--state-dir", str(tmp_path)])
        assert status == 2
        err = capsys.readouterr().err
        assert "--admin-host 0.0.0.0" in err and "at least 32 bytes" in err
        assert "Traceback" not in err


def test_the_supervisor_checks_admin_ports(tmp_path: Any) -> None:
    from tokenguard.cluster.errors import SupervisorError
    from tokenguard.cluster.supervisor import Supervisor

    ok = Supervisor(nodes=3, state_dir=tmp_path, port=20000, admin_port=20003)
    spec = ok._node_spec(2, lock_fd=0)
    assert spec.argv[spec.argv.index("--admin-port") + 1] == "20005"
    assert spec.argv[spec.argv.index("--admin-host") + 1] == "127.0.0.1"
    for admin_port in (19998, 20002, 65534, 0):
        with pytest.raises(SupervisorError, match="admin"):
            Supervisor(nodes=3, state_dir=tmp_path, port=20000, admin_port=admin_port)
