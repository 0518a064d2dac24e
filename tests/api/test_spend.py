"""Spend limits through the app (mock mode, memory store, fake clock): the 429 a spent
budget gets, unpriced models, per-user budgets. The rows are the driver suite's; the
arithmetic is tests/limiting/test_prices.py's."""

from __future__ import annotations

from typing import Any

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings

MESSAGES = [{"role": "user", "content": "hi"}]
# 1 per million tokens in and out: a request's spend in micro-units is its tokens.
PRICES = {"cheap": {"input": 1.0, "output": 1.0}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def client_for(limits: dict[str, Any] | None = None, **key: Any):  # type: ignore[no-untyped-def]
    config = {
        "limits": limits or {},
        "prices": PRICES,
        "teams": {"t": {"spend_per_hour": 0.001}},
        "keys": [{"key": "sk-a", "name": "app", "team": "t", **key}],
    }
    store = MemoryStore(clock=FakeClock())
    return create_app(parse_settings(config, "<test>"), store).test_client(), store


async def chat(client, model: str = "cheap", **body: Any):  # type: ignore[no-untyped-def]
    payload = {"model": model, "messages": MESSAGES, "max_tokens": 100, **body}
    return await client.post(
        "/v1/chat/completions", json=payload, headers={"Authorization": "Bearer sk-a"}
    )


async def test_a_spent_budget_is_insufficient_quota_naming_the_scope_and_window() -> None:
    client, _ = client_for()
    statuses = []
    for _ in range(20):
        response = await chat(client)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 429
    error = (await response.get_json())["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert "team 't'" in error["message"] and "spend per hour" in error["message"]
    assert "Limit 0.001" in error["message"]
    assert int(response.headers["retry-after"]) > 0


async def test_settlement_frees_what_the_reservation_held() -> None:
    """Each request reserves ~110 micro-units but really costs far less (the mock's short
    reply): more requests fit in the budget of 1000 than reservations would allow."""
    client, _ = client_for()
    admitted = 0
    while (await chat(client)).status_code == 200:
        admitted += 1
        assert admitted < 1000
    assert admitted > 1000 // 110


async def test_a_reservation_above_the_budget_never_fits() -> None:
    client, _ = client_for()
    response = await chat(client, max_tokens=5000)
    assert response.status_code == 429
    error = (await response.get_json())["error"]
    assert "can never fit" in error["message"] and "Limit 0.001" in error["message"]


async def test_an_unpriced_model_under_a_spend_limit_is_a_400_naming_it() -> None:
    client, store = client_for()
    response = await chat(client, model="mystery-model")
    assert response.status_code == 400
    error = (await response.get_json())["error"]
    assert error["code"] == "model_not_priced" and error["param"] == "model"
    assert "mystery-model" in error["message"]
    assert store.sweep() == 0


async def test_unpriced_free_admits_an_unpriced_model_at_no_cost() -> None:
    client, _ = client_for({"unpriced": "free"})
    for _ in range(30):
        assert (await chat(client, model="mystery-model")).status_code == 200


async def test_a_per_user_budget_refuses_one_user_and_not_another() -> None:
    client, _ = client_for(per_user={"spend_per_day": 0.0002})
    assert (await chat(client, user="alice")).status_code == 200
    while (response := await chat(client, user="alice")).status_code == 200:
        pass
    error = (await response.get_json())["error"]
    assert error["code"] == "insufficient_quota"
    assert "end user of key 'app'" in error["message"] and "spend per day" in error["message"]
    assert (await chat(client, user="bob")).status_code == 200


async def test_usage_shows_spend_and_remaining_per_window_in_micro_units() -> None:
    client, _ = client_for(spend_per_day=1.0)
    assert (await chat(client, max_tokens=1)).status_code == 200
    response = await client.get("/v1/usage", headers={"Authorization": "Bearer sk-a"})
    body = await response.get_json()
    spend = [e for e in body["limits"] if e["dimension"] == "spend"]
    assert [(e["scope"], e["window_seconds"], e["limit"]) for e in spend] == [
        ("key", 86400.0, 1_000_000),
        ("team", 3600.0, 1_000),
    ]
    assert all(0 < e["used"] == spend[0]["used"] for e in spend)
    tightest = body["dimensions"]["spend"]
    assert tightest["limit"] == 1_000 and tightest["remaining"] == 1_000 - spend[0]["used"]


async def test_metrics_count_spend_by_key_and_model_never_by_user() -> None:
    settings = parse_settings(
        {"prices": PRICES, "keys": [{"key": "sk-a", "name": "app", "spend_per_day": 1.0}]}, "t"
    )
    app = create_app(settings, MemoryStore(clock=FakeClock()))
    client = app.test_client()
    total = 0
    for user in ("alice", "bob"):
        response = await chat(client, user=user)
        usage = (await response.get_json())["usage"]
        total += usage["prompt_tokens"] + usage["completion_tokens"]
    text = app.extensions["tokenguard"].metrics.exposition().decode()
    assert f'tokenguard_spend_micro_total{{key="app",model="cheap"}} {total:.1f}' in text
    assert "alice" not in text and "bob" not in text
