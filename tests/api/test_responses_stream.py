"""The Responses API's stream, event by event from the dialect itself.

(quart's test client buffers few chunks; over real HTTP with the SDK:
``test_responses_sdk.py``.) Every streamed event matches OpenAI's spec, in order; the
spec check refuses what is not a response; the meter settles to whichever terminal
event arrives. And ``[mock] models`` must be distinct names.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.support.openai_spec import check, stream_event_schema
from tests.support.responses_app import (
    CONFIG,
)
from tokenguard.api.dialects.response_objects import ResponsesMeter, response_events
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError
from tokenguard.counting import count_text
from tokenguard.errors import APIError
from tokenguard.upstreams.mock import mock_reply

# --- the stream, from the dialect ---------------------------------------------------------


def parsed(raw: bytes) -> tuple[str, dict[str, Any]]:
    name, data = raw.decode().removesuffix("\n\n").split("\n")
    return name.removeprefix("event: "), json.loads(data.removeprefix("data: "))


@pytest.mark.parametrize(("max_tokens", "terminal"), [(100, "completed"), (3, "incomplete")])
def test_every_streamed_event_matches_the_spec_in_order(max_tokens: int, terminal: str) -> None:
    reply = mock_reply("gpt-4o", [{"role": "user", "content": "hi"}], 1, max_tokens)
    request = {"model": "gpt-4o", "input": "hi", "max_output_tokens": max_tokens}
    events = list(response_events(reply, request, 9))
    types = []
    for number, (raw, tokens) in enumerate(events):
        name, event = parsed(raw)
        assert name == event["type"] and event["sequence_number"] == number
        check(stream_event_schema(event["type"]), event)
        assert tokens == (1 if event["type"] == "response.output_text.delta" else 0)
        types.append(event["type"])
    words = len(reply.choices[0].words)
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * words,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{terminal}",
    ]
    final = parsed(events[-1][0])[1]["response"]
    assert final["usage"]["output_tokens"] == words and final["usage"]["input_tokens"] == 9
    if terminal == "incomplete":
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_the_spec_check_refuses_what_is_not_a_response() -> None:
    reply = mock_reply("gpt-4o", [], 1, 5)
    raw, _ = next(iter(response_events(reply, {"model": "gpt-4o"}, 1)))
    event = parsed(raw)[1]
    del event["response"]["output"]
    with pytest.raises(jsonschema.ValidationError):
        check("ResponseCreatedEvent", event)


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed"]
)
def test_the_meter_settles_to_whichever_terminal_event_arrives(terminal: str) -> None:
    meter = ResponsesMeter()
    delta = {"type": "response.output_text.delta", "delta": "Hello there", "sequence_number": 4}
    assert meter.read(json.dumps(delta).encode())
    assert meter.usage is None
    usage = {
        "input_tokens": 40,
        "input_tokens_details": {"cached_tokens": 32},
        "output_tokens": 25,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 65,
    }
    final = {"type": terminal, "sequence_number": 5, "response": {"id": "resp_1", "usage": usage}}
    assert meter.read(json.dumps(final).encode())  # the client gets it too
    assert meter.usage is not None
    # cached tokens are input, reasoning tokens output: both as reported
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (40, 25)
    assert meter.output_tokens("gpt-4o") == count_text("gpt-4o", "Hello there")
    error = APIError(502, "The upstream broke.", "server_error", code="upstream_unavailable")
    name, event = parsed(meter.error_event(error))
    check("ResponseErrorEvent", event)
    assert (name, event["sequence_number"]) == ("error", 6)


@pytest.mark.parametrize("models", [[], "gpt-4o", [""], [1], ["gpt-4o", "gpt-4o"]])
def test_mock_models_must_be_distinct_names(models: Any) -> None:
    with pytest.raises(ConfigError, match=r"<test>: mock.models: must be a list of distinct"):
        parse_settings({**CONFIG, "mock": {"models": models}}, "<test>")
