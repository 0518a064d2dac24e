"""The guarded store as a node uses it: the app's answers while the store fails (503s,
``/readyz`` and ``/healthz``, policies that never answer 5xx), and the config and
command line that choose the policy, the timeout and the cluster size. The store behind
the guard is a memory store made to fail, hang or refuse to start
(tests/support/guarded_memory.py); trio's clock jumps over every wait
(``autojump_clock``), so the timings asserted here are the code's, not the machine's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.guarded_memory import FlakyStore, guarded
from tokenguard.api.app import create_app
from tokenguard.cli import main as cli
from tokenguard.cli import serve
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError, Settings
from tokenguard.store.guarded import GuardedStore, guarded_store

# --- through the app ----------------------------------------------------------------------

APP_CONFIG: dict[str, Any] = {
    "store": {"url": "redis://127.0.0.1:1/0"},
    "keys": [{"key": "sk-k", "name": "k", "rpm": 10, "output_tpm": 1000}],
}


@asynccontextmanager
async def app_on(policy: str) -> AsyncIterator[tuple[Any, GuardedStore, FlakyStore]]:
    settings = parse_settings(APP_CONFIG, "<test>", environ={})
    async with guarded(policy) as (store, primary):
        yield create_app(settings, store).test_client(), store, primary


async def chat(client: Any) -> Any:
    return await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={"Authorization": "Bearer sk-k"},
    )


async def test_readyz_reports_the_store_and_healthz_does_not(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with app_on("closed") as (client, store, primary):
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert (await ready.get_json())["store"] == "ok"
        primary.mode = "fail"
        for _ in range(3):
            answer = await chat(client)
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            error = (await answer.get_json())["error"]
            assert error["code"] == "store_unavailable" and error["type"] == "server_error"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        body = await ready.get_json()
        assert body["status"] == "degraded" and body["breaker"] == "open"
        assert body["policy"] == "closed" and "last_error" in body
        assert (await client.get("/healthz")).status_code == 200


async def test_the_app_on_policy_local_and_open_never_answers_5xx(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with app_on("local") as (client, store, primary):
        primary.mode = "hang"
        statuses = [(await chat(client)).status_code for _ in range(12)]
        assert statuses == [200] * 10 + [429] * 2
        usage = await client.get("/v1/usage", headers={"Authorization": "Bearer sk-k"})
        assert (await usage.get_json())["dimensions"]["requests"]["used"] == 10
    async with app_on("open") as (client, store, primary):
        primary.mode = "fail"
        statuses = [(await chat(client)).status_code for _ in range(12)]
        assert statuses == [200] * 12
        assert (await (await client.get("/readyz")).get_json())["fail_open_admissions"] == 12


async def test_a_memory_store_app_is_always_ready() -> None:
    app = create_app(parse_settings({}, "<test>", environ={}), MemoryStore())
    ready = await app.test_client().get("/readyz")
    assert ready.status_code == 200
    assert (await ready.get_json())["store"] == "ok"


# --- config and command line --------------------------------------------------------------


def test_store_settings_parse_and_default() -> None:
    settings = parse_settings({}, "<test>", environ={})
    assert (settings.on_store_error, settings.store_timeout_ms, settings.cluster_size) == (
        "local",
        100,
        None,
    )
    settings = parse_settings(
        {"store": {"on_store_error": "open", "timeout_ms": 250, "cluster_size": 6}},
        "t.toml",
        environ={},
    )
    assert (settings.on_store_error, settings.store_timeout_ms, settings.cluster_size) == (
        "open",
        250,
        6,
    )


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"on_store_error": "ignore"}, "t.toml: store.on_store_error: must be one of local,"),
        ({"on_store_error": 1}, "t.toml: store.on_store_error: must be a non-empty string"),
        ({"timeout_ms": 0}, "t.toml: store.timeout_ms: must be at least 1"),
        ({"timeout_ms": "100"}, "t.toml: store.timeout_ms: must be an integer"),
        ({"cluster_size": 0}, "t.toml: store.cluster_size: must be at least 1"),
    ],
)
def test_bad_store_settings_name_the_file_and_key(store: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"store": store}, "t.toml", environ={})
    assert str(caught.value).startswith(message)


def test_guarded_store_from_settings() -> None:
    assert isinstance(guarded_store(Settings()), MemoryStore)  # memory:// cannot fail
    settings = Settings(store_url="redis://127.0.0.1:1/0", node_id=1, supervised_nodes=3)
    store = guarded_store(settings)
    assert isinstance(store, GuardedStore)
    assert (store.policy, store.timeout, store.cluster_size, store.spread) == (
        "local",
        0.1,
        3,
        True,
    )
    assert store.share(10) == 3
    # A cluster over several machines: the config's size wins, and no remainder.
    store = guarded_store(
        attrs.evolve(settings, cluster_size=4, on_store_error="open", store_timeout_ms=50)
    )
    assert isinstance(store, GuardedStore)
    assert (store.policy, store.timeout, store.cluster_size, store.spread) == (
        "open",
        0.05,
        4,
        False,
    )


def test_cli_flags_reach_the_settings_and_the_nodes(tmp_path: Path) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--on-store-error", "closed", "--cluster-size", "3"])
    settings = serve._settings(args)
    assert (settings.on_store_error, settings.supervised_nodes) == ("closed", 3)
    assert serve._settings(parser.parse_args(["serve"])).on_store_error == "local"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--on-store-error", "maybe"])
    args = parser.parse_args(
        ["serve", "--nodes", "3", "--on-store-error", "open", "--state-dir", str(tmp_path)]
    )
    node_args = serve._cluster(args).node_args
    assert node_args == ("--on-store-error", "open", "--cluster-size", "3")
