"""The Responses API's state through the app, on the mock: follow-ups, stored responses, models.

A follow-up (``previous_response_id``) is charged the previous input and output as
input, an unknown one is a 400 that costs nothing; a stored response is retrieved,
listed and deleted by its key only, at no cost; ``input_tokens`` is the count admission
uses; ``/v1/models`` in the spec's shape, and a model the mock does not serve a 404.
"""

from __future__ import annotations

from typing import Any

import pytest

from drivers.memory import MemoryStore
from tests.support.chat_app import FakeClock
from tests.support.openai_spec import check
from tests.support.responses_app import (
    CONFIG,
    SERVED,
    auth,
    create,
    responses_client,
    used,
)
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    return responses_client()


@pytest.fixture
def served_client():  # type: ignore[no-untyped-def]
    settings = parse_settings({**CONFIG, "mock": {"models": SERVED}}, "<test>")
    return create_app(settings, MemoryStore(clock=FakeClock())).test_client()


# --- previous_response_id -----------------------------------------------------------------


async def test_a_follow_up_is_charged_the_previous_input_and_output_as_input(client) -> None:  # type: ignore[no-untyped-def]
    first = await (await create(client, max_output_tokens=50)).get_json()
    alone = await (await create(client, input="And then?", max_output_tokens=5)).get_json()
    follow = await create(
        client, input="And then?", max_output_tokens=5, previous_response_id=first["id"]
    )
    assert follow.status_code == 200
    body = await follow.get_json()
    check("Response", body)
    assert body["previous_response_id"] == first["id"]
    prior = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert body["usage"]["input_tokens"] == alone["usage"]["input_tokens"] + prior


@pytest.mark.parametrize("key", ["sk-big", "sk-other"])
async def test_an_unknown_previous_response_is_a_400_and_costs_nothing(client, key) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, "sk-big", max_output_tokens=5)).get_json()
    before = await used(client, key)
    # sk-big: an id nobody made; sk-other: sk-big's own, which another key may not use
    previous = "resp_nobody_made_this" if key == "sk-big" else made["id"]
    response = await create(client, key, previous_response_id=previous)
    assert response.status_code == 400
    error = (await response.get_json())["error"]
    assert (error["param"], error["code"]) == (
        "previous_response_id",
        "previous_response_not_found",
    )
    assert await used(client, key) == before


async def test_a_response_not_stored_cannot_be_continued_or_retrieved(client) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, store=False, max_output_tokens=5)).get_json()
    assert made["store"] is False
    assert (await create(client, previous_response_id=made["id"])).status_code == 400
    assert (await client.get(f"/v1/responses/{made['id']}", headers=auth())).status_code == 404


# --- the stored responses -----------------------------------------------------------------


async def test_a_response_is_retrieved_listed_and_deleted_by_its_key_only(client) -> None:  # type: ignore[no-untyped-def]
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
    ]
    made = await (await create(client, input=items, max_output_tokens=5)).get_json()
    path = f"/v1/responses/{made['id']}"
    got = await client.get(path, headers=auth())
    assert got.status_code == 200
    assert await got.get_json() == made
    assert "x-ratelimit-remaining-requests" in got.headers
    listed = await (await client.get(f"{path}/input_items", headers=auth())).get_json()
    check("ResponseItemList", listed)
    assert [item["role"] for item in listed["data"]] == ["user", "developer"]
    assert (await client.get(path, headers=auth("sk-other"))).status_code == 404
    assert (await client.delete(path, headers=auth("sk-other"))).status_code == 404
    deleted = await client.delete(path, headers=auth())
    assert await deleted.get_json() == {
        "id": made["id"],
        "object": "response.deleted",
        "deleted": True,
    }
    missing = await client.get(path, headers=auth())
    assert missing.status_code == 404
    check("ErrorResponse", await missing.get_json())
    assert (await client.get(f"{path}/input_items", headers=auth())).status_code == 404


async def test_retrieving_consumes_nothing(client) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, max_output_tokens=5)).get_json()
    before = await used(client, "sk-big")
    await client.get(f"/v1/responses/{made['id']}", headers=auth())
    await client.get(f"/v1/responses/{made['id']}/input_items", headers=auth())
    assert await used(client, "sk-big") == before


# --- input_tokens -------------------------------------------------------------------------


async def test_input_tokens_is_the_count_admission_uses_and_costs_one_request(client) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "gpt-4o", "input": "How many tokens am I?", "instructions": "Count."}
    counted = await client.post("/v1/responses/input_tokens", json=body, headers=auth("sk-small"))
    assert counted.status_code == 200
    answer = await counted.get_json()
    assert answer["object"] == "response.input_tokens"
    assert await used(client, "sk-small") == {
        "requests": 1,
        "input_tokens": 0,
        "output_tokens": 0,
    }
    assert counted.headers["x-ratelimit-remaining-requests"] == "2"
    made = await (await create(client, "sk-small", **body)).get_json()
    assert answer["input_tokens"] == made["usage"]["input_tokens"]


async def test_input_tokens_counts_a_previous_response_and_is_refused_past_the_rpm(client) -> None:  # type: ignore[no-untyped-def]
    made = await (await create(client, "sk-small", max_output_tokens=5)).get_json()
    body = {"model": "gpt-4o", "input": "hi", "previous_response_id": made["id"]}
    counted = await client.post("/v1/responses/input_tokens", json=body, headers=auth("sk-small"))
    alone = await client.post(
        "/v1/responses/input_tokens",
        json={**body, "previous_response_id": None},
        headers=auth("sk-small"),
    )
    prior = made["usage"]["input_tokens"] + made["usage"]["output_tokens"]
    tokens = (await counted.get_json())["input_tokens"]
    assert tokens == (await alone.get_json())["input_tokens"] + prior
    refused = await client.post("/v1/responses/input_tokens", json=body, headers=auth("sk-small"))
    assert refused.status_code == 429


# --- models -------------------------------------------------------------------------------


async def test_models_are_listed_and_retrieved_in_the_specs_shape(served_client) -> None:  # type: ignore[no-untyped-def]
    listed = await (await served_client.get("/v1/models", headers=auth())).get_json()
    check("ListModelsResponse", listed)
    assert [m["id"] for m in listed["data"]] == SERVED
    one = await served_client.get("/v1/models/gpt-4o-mini", headers=auth())
    assert one.status_code == 200
    check("Model", await one.get_json())
    missing = await served_client.get("/v1/models/gpt-5-ultra", headers=auth())
    assert missing.status_code == 404
    error = await missing.get_json()
    check("ErrorResponse", error)
    assert error["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
async def test_a_model_the_mock_does_not_serve_is_404_and_costs_nothing(
    served_client: Any, path: str
) -> None:
    body = {"model": "gpt-5-ultra", "input": "hi", "messages": [{"role": "user", "content": "hi"}]}
    response = await served_client.post(path, json=body, headers=auth())
    assert response.status_code == 404
    assert (await response.get_json())["error"]["code"] == "model_not_found"
    assert set((await used(served_client, "sk-big")).values()) == {0}


async def test_without_mock_models_every_model_is_answered(client) -> None:  # type: ignore[no-untyped-def]
    assert (await create(client, model="any-model-at-all")).status_code == 200
