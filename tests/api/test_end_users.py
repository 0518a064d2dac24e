"""Per-end-user limits through the app: where the end user's id is read, the 400s, the
shared bucket, the 429 naming the end user, ``/v1/usage?user=ID``. On the memory store
with a fake clock (the rows themselves are the driver suite's)."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.model import user_digest

MESSAGES = [{"role": "user", "content": "hi"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def config(**limits: Any) -> dict[str, Any]:
    return {
        "limits": {"user_header": "X-End-User", **limits},
        "teams": {"t": {"rpm": 100, "per_user": {"rpm": 3}}},
        "keys": [
            {"key": "sk-app", "name": "app", "rpm": 100, "per_user": {"rpm": 2}},
            {"key": "sk-teamed", "name": "teamed", "team": "t", "rpm": 100},
            {"key": "sk-plain", "name": "plain", "rpm": 100},
        ],
    }


def client_for(**limits: Any):  # type: ignore[no-untyped-def]
    settings = parse_settings(config(**limits), "<test>")
    store = MemoryStore(clock=FakeClock())
    return create_app(settings, store).test_client(), store


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    return client_for()[0]


async def chat(client, key: str = "sk-app", headers: dict[str, str] | None = None, **body: Any):  # type: ignore[no-untyped-def]
    payload = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5, **body}
    return await client.post(
        "/v1/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
    )


async def statuses(client, n: int, **kwargs: Any) -> list[int]:  # type: ignore[no-untyped-def]
    return [(await chat(client, **kwargs)).status_code for _ in range(n)]


async def test_each_end_user_has_their_own_per_user_limit(client) -> None:  # type: ignore[no-untyped-def]
    assert await statuses(client, 3, user="alice") == [200, 200, 429]
    assert await statuses(client, 3, user="bob") == [200, 200, 429]


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"user": "alice"}, {}),
        ({"safety_identifier": "alice"}, {}),
        ({"metadata": {"user_id": "alice"}}, {}),
        ({}, {"X-End-User": "alice"}),
        ({"user": "alice", "safety_identifier": "bob"}, {"X-End-User": "carol"}),
    ],
)
async def test_the_end_user_is_read_from_the_body_then_the_header(  # type: ignore[no-untyped-def]
    client, body, headers
) -> None:
    """Every place names the same user "alice": two requests use up her rpm of 2."""
    assert await statuses(client, 2, user="alice") == [200, 200]
    assert (await chat(client, headers=headers, **body)).status_code == 429


async def test_the_body_wins_over_the_header(client) -> None:  # type: ignore[no-untyped-def]
    assert await statuses(client, 2, user="alice") == [200, 200]
    response = await chat(client, headers={"X-End-User": "alice"}, user="bob")
    assert response.status_code == 200


async def test_the_tightest_scope_answers_the_429_naming_the_end_user(client) -> None:  # type: ignore[no-untyped-def]
    await statuses(client, 2, user="alice")
    response = await chat(client, user="alice")
    assert response.status_code == 429
    error = (await response.get_json())["error"]
    assert "end user of key 'app'" in error["message"]
    assert "alice" not in error["message"]
    assert error["code"] == "rate_limit_exceeded"
    admitted = await chat(client, user="bob")
    assert admitted.headers["x-ratelimit-limit-requests"] == "2"  # the user's, not the key's 100
    assert admitted.headers["x-ratelimit-remaining-requests"] == "1"


async def test_a_team_per_user_limit_counts_the_user_over_the_teams_keys(client) -> None:  # type: ignore[no-untyped-def]
    assert await statuses(client, 4, key="sk-teamed", user="alice") == [200, 200, 200, 429]
    assert (await chat(client, key="sk-teamed", user="bob")).status_code == 200


async def test_requests_naming_nobody_share_one_bucket(client) -> None:  # type: ignore[no-untyped-def]
    assert await statuses(client, 3) == [200, 200, 429]
    assert (await chat(client, user="alice")).status_code == 200


async def test_missing_user_reject_is_a_400_and_consumes_nothing() -> None:
    client, store = client_for(missing_user="reject")
    response = await chat(client)
    assert response.status_code == 400
    error = (await response.get_json())["error"]
    assert error["code"] == "missing_user" and error["param"] == "user"
    assert "X-End-User" in error["message"] or "x-end-user" in error["message"]
    assert store.sweep() == 0
    assert (await chat(client, user="alice")).status_code == 200


async def test_a_key_without_per_user_limits_needs_no_end_user() -> None:
    client, _ = client_for(missing_user="reject")
    assert (await chat(client, key="sk-plain")).status_code == 200


TOO_LONG = "é" * 129  # 258 bytes, 129 characters


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"user": TOO_LONG}, {}, "user"),
        ({"user": 42}, {}, "user"),
        ({"user": ["alice"]}, {}, "user"),
        ({"safety_identifier": "x" * 257}, {}, "safety_identifier"),
        ({"metadata": {"user_id": {"id": 1}}}, {}, "metadata.user_id"),
        ({}, {"X-End-User": "x" * 257}, "x-end-user"),
    ],
)
async def test_a_bad_end_user_id_is_a_400_naming_where_and_consumes_nothing(
    body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    client, store = client_for()
    response = await chat(client, headers=headers, **body)
    assert response.status_code == 400
    error = (await response.get_json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert store.sweep() == 0


async def test_an_id_of_exactly_256_bytes_is_accepted(client) -> None:  # type: ignore[no-untyped-def]
    assert (await chat(client, user="é" * 128)).status_code == 200


async def test_the_store_names_end_users_by_digest_only() -> None:
    client, store = client_for()
    assert (await chat(client, user="alice@example.com")).status_code == 200
    names = [row.counter for (_, row, _, _) in store.held_buckets()]
    assert any(user_digest("alice@example.com") in name for name in names)
    assert not any("alice" in name for name in names)


async def test_usage_of_one_end_user_under_the_calling_key(client) -> None:  # type: ignore[no-untyped-def]
    await statuses(client, 1, user="alice")
    response = await client.get(
        "/v1/usage", query_string={"user": "alice"}, headers={"Authorization": "Bearer sk-app"}
    )
    assert response.status_code == 200
    body = await response.get_json()
    assert body["user"] == "alice"
    per_user = [entry for entry in body["limits"] if entry["scope"] == "user"]
    assert [(e["dimension"], e["used"], e["limit"]) for e in per_user] == [("requests", 1, 2)]
    assert body["dimensions"]["requests"]["remaining"] == 1
    bob = await client.get(
        "/v1/usage", query_string={"user": "bob"}, headers={"Authorization": "Bearer sk-app"}
    )
    assert [e["used"] for e in (await bob.get_json())["limits"] if e["scope"] == "user"] == [0]
    plain = await client.get("/v1/usage", headers={"Authorization": "Bearer sk-app"})
    assert all(e["scope"] == "key" for e in (await plain.get_json())["limits"])


async def test_usage_refuses_an_oversized_user(client) -> None:  # type: ignore[no-untyped-def]
    response = await client.get(
        "/v1/usage", query_string={"user": "x" * 300}, headers={"Authorization": "Bearer sk-app"}
    )
    assert response.status_code == 400
    assert (await response.get_json())["error"]["param"] == "user"
