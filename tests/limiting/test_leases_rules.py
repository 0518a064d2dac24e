"""max_concurrent and near-limit signals in the config, the rule model, the limiter and
the app (in process, on the memory store; across real nodes: test_leases_cluster.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.limiting.rules import alert_at, describe_limit, templates
from tokenguard.store.rows import CONCURRENT
from tokenguard.store.window_store import open_store

TEST_TIMEOUT = 10.0
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def parse(doc: dict[str, Any]) -> Any:
    return parse_settings(doc, "cfg.toml")


def error_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    return str(info.value)


# --- config -------------------------------------------------------------------------------


def test_max_concurrent_is_a_limit_of_tiers_keys_teams_and_model_rules() -> None:
    settings = parse(
        {
            "limits": {"lease_seconds": 2.5, "near_limit_ratio": 0.9},
            "tiers": {"t": {"max_concurrent": 4, "models": {"gpt-4o*": {"max_concurrent": 2}}}},
            "teams": {"r": {"max_concurrent": 10}},
            "keys": [
                {"key": "k1", "name": "a", "tier": "t", "team": "r"},
                {"key": "k2", "name": "b", "tier": "t", "max_concurrent": 1},
            ],
        }
    )
    assert (settings.lease_seconds, settings.near_limit_ratio) == (2.5, 0.9)
    a, b = settings.keys
    assert a.limits.max_concurrent == 4 and b.limits.max_concurrent == 1
    assert a.team.limits.max_concurrent == 10
    assert a.limits.models[0].limits.max_concurrent == 2
    rows = templates(a, "gpt-4o", window_ms=60_000, bucket_ms=5_000, lease_ms=2_500)
    leases = [(t.scope, t.limit, t.window_ms) for t in rows if t.dimension == CONCURRENT]
    assert leases == [
        (f"key:{a.key_id}", 4, 2_500),
        (f"key:{a.key_id}:model:gpt-4o*", 2, 2_500),
        ("team:r", 10, 2_500),
    ]


def test_defaults_and_bad_values() -> None:
    settings = parse({})
    assert (settings.lease_seconds, settings.near_limit_ratio) == (30.0, 0.8)
    assert error_of({"limits": {"lease_seconds": 0}}) == (
        "cfg.toml: limits.lease_seconds: must be at least 0.1, got 0"
    )
    assert "limits.lease_seconds: must be a finite number" in error_of(
        {"limits": {"lease_seconds": float("inf")}}
    )
    assert error_of({"limits": {"near_limit_ratio": 1.5}}) == (
        "cfg.toml: limits.near_limit_ratio: must be a share of the limit, 0 to 1, got 1.5"
    )
    assert error_of({"keys": [{"key": "k", "name": "a", "max_concurrent": 0}]}) == (
        "cfg.toml: keys[0].max_concurrent: must be at least 1, got 0"
    )
    assert "limits.lease_secs: unknown key" in error_of({"limits": {"lease_secs": 3}})


# --- rules ----------------------------------------------------------------------------------


def test_alert_marks() -> None:
    assert alert_at(5, 0.8) == 4  # not 5: 5 x 0.8 is 4.000000000000001 in floating point
    assert alert_at(10, 0.8) == 8
    assert alert_at(3, 0.5) == 2
    assert alert_at(1, 0.01) == 1
    assert alert_at(100, 0.0) == 0


def test_only_enforced_windowed_rows_carry_an_alert_mark() -> None:
    settings = parse(
        {
            "teams": {"s": {"rpm": 10, "mode": "shadow"}},
            "keys": [{"key": "k", "name": "a", "team": "s", "rpm": 10, "max_concurrent": 3}],
        }
    )
    (key,) = settings.keys
    rows = templates(key, None, window_ms=60_000, bucket_ms=5_000, near_limit_ratio=0.8)
    marks = [(t.scope.split(":")[0], t.dimension, t.alert_at) for t in rows]
    assert marks == [("key", "requests", 8), ("key", CONCURRENT, 0), ("team", "requests", 0)]
    assert describe_limit(rows[1].row(1)) == "requests in flight (max_concurrent)"


# --- limiter ----------------------------------------------------------------------------------


async def test_the_limiter_counts_near_limit_crossings_by_dimension() -> None:
    settings = parse({"keys": [{"key": "k", "name": "a", "rpm": 10, "input_tpm": 100}]})
    (key,) = settings.keys
    limiter = Limiter(MemoryStore(), window_seconds=60, bucket_seconds=5, near_limit_ratio=0.8)
    told = []
    for _ in range(9):
        decision = await limiter.admit(key, Cost(input_tokens=10))
        told.append([s.row.dimension for s in decision.near_limits])
    assert told == [[]] * 7 + [["requests", "input_tokens"], []]
    assert limiter.near_limit_crossings == {"requests": 1, "input_tokens": 1}


async def test_settlement_releases_the_lease_even_with_nothing_to_refund() -> None:
    settings = parse({"keys": [{"key": "k", "name": "a", "max_concurrent": 1}]})
    (key,) = settings.keys
    limiter = Limiter(MemoryStore(), window_seconds=60, bucket_seconds=5)
    first = await limiter.admit(key, Cost(output_tokens=8))
    assert first.admitted and first.reservation.lease is not None
    assert not (await limiter.admit(key, Cost(output_tokens=8))).admitted
    await limiter.settle(first, output_tokens=8)  # nothing to refund: still released
    assert (await limiter.admit(key, Cost(output_tokens=8))).admitted


# --- the app --------------------------------------------------------------------------------


async def test_a_full_key_gets_a_concurrency_429_until_a_request_ends() -> None:
    settings = parse(
        {
            "mock": {"token_delay_ms": 50},
            "keys": [{"key": "sk-a", "name": "a", "max_concurrent": 1}],
        }
    )
    headers = {"Authorization": "Bearer sk-a"}
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(MemoryStore()) as store:
            app = create_app(settings, store)
            async with app.test_app() as test_app:
                client = test_app.test_client()
                statuses: list[int] = []
                bodies: list[Any] = []

                async def one() -> None:
                    response = await client.post("/v1/chat/completions", headers=headers, json=CHAT)
                    statuses.append(response.status_code)
                    bodies.append((await response.get_json(), response.headers))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one)  # 8 tokens x 50 ms: 0.4 s in flight
                    await trio.sleep(0.1)
                    nursery.start_soon(one)
                assert statuses == [429, 200]
                error, response_headers = bodies[0]
                assert error["error"] == {
                    "message": "Concurrency limit reached for key 'a' on requests in flight "
                    "(max_concurrent): Limit 1, In flight 1. Please try again in 1s.",
                    "type": "concurrency",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
                assert response_headers["retry-after"] == "1"
                assert response_headers["retry-after-ms"] == "1000"
                # The first request ended and settled: the slot is free again.
                response = await client.post("/v1/chat/completions", headers=headers, json=CHAT)
                assert response.status_code == 200
