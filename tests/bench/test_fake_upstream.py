"""The honest fake upstreams (bench/fake_upstream/): they read lengths as llama.cpp and
vLLM do, bill a generous measure of the prompt, and bill every token they generate,
whatever the client does (the last tests run one as a process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.fake_upstream.asks import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    Refused,
    billed_input,
    llama_ask,
    vllm_ask,
)
from tests.support.honest_upstreams import Billed, key_message, running_fake_upstream, take_events
from tokenguard.counting import count_chat_prompt, count_text

CONTEXT = 1000
PROMPT = 40  # input tokens of the asks below: what fits the context is CONTEXT - PROMPT
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": MESSAGES, **fields}


@pytest.mark.parametrize(
    ("fields", "length"),
    [
        ({"max_tokens": 10}, 10),
        ({"max_tokens": 10, "n_predict": 50}, 50),
        ({"max_tokens": 10, "max_completion_tokens": 20}, 20),
        ({"max_tokens": 10, "max_completion_tokens": 20, "n_predict": 30}, 30),
        ({"max_tokens": 10, "n_predict": None}, 10),
        ({"max_tokens": 10, "n_predict": "50"}, 10),  # another type: falls through
        ({"max_tokens": 10, "n_predict": 12.7}, 12),
        ({"max_tokens": 10, "n_predict": -1}, CONTEXT - PROMPT),  # until the context is full
        ({}, CONTEXT - PROMPT),
        ({"n_predict": 5000}, CONTEXT - PROMPT),
    ],
)
def test_llama_reads_n_predict_then_max_completion_tokens_then_max_tokens(
    fields: dict[str, Any], length: int
) -> None:
    ask = llama_ask(CHAT_PATH, chat(**fields), PROMPT, CONTEXT)
    assert (ask.per_sequence, ask.sequences, ask.choices) == (length, 1, 1)


@pytest.mark.parametrize(
    ("path", "fields", "message"),
    [
        (CHAT_PATH, {"n": 2}, "Only one completion choice is allowed"),
        (COMPLETIONS_PATH, {"prompt": "a", "best_of": 2}, "Unsupported param: best_of"),
    ],
)
def test_llama_refuses_what_llama_cpp_refuses(
    path: str, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(Refused, match=message):
        llama_ask(path, chat(**fields), PROMPT, CONTEXT)


@pytest.mark.parametrize(
    ("path", "fields", "length", "sequences", "choices"),
    [
        (CHAT_PATH, {"max_tokens": 10}, 10, 1, 1),
        (CHAT_PATH, {"max_tokens": 10, "max_completion_tokens": 20}, 20, 1, 1),
        (CHAT_PATH, {"max_tokens": 10, "max_completion_tokens": 0}, 10, 1, 1),
        (CHAT_PATH, {"max_tokens": 10, "n_predict": 500, "max_new_tokens": 500}, 10, 1, 1),
        (CHAT_PATH, {}, CONTEXT - PROMPT, 1, 1),
        (CHAT_PATH, {"max_tokens": 4, "n": 2, "best_of": 3}, 4, 3, 2),
        (CHAT_PATH, {"max_tokens": 4, "min_tokens": 4}, 4, 1, 1),
        (COMPLETIONS_PATH, {"prompt": "a"}, 16, 1, 1),
        (COMPLETIONS_PATH, {"prompt": "a", "max_completion_tokens": 99}, 16, 1, 1),
    ],
)
def test_vllm_reads_max_completion_tokens_or_max_tokens_and_generates_best_of(
    path: str, fields: dict[str, Any], length: int, sequences: int, choices: int
) -> None:
    ask = vllm_ask(path, chat(**fields), PROMPT, CONTEXT)
    assert (ask.per_sequence, ask.sequences, ask.choices) == (length, sequences, choices)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": 5, "min_tokens": 6}, "min_tokens must be less than or equal"),
        ({"n": 3, "best_of": 2}, "best_of must be greater than or equal to n"),
        ({"max_tokens": "10"}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 1.5}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": CONTEXT}, "maximum context length"),
        ({"max_tokens": -3}, "max_tokens must be at least 1"),
    ],
)
def test_vllm_refuses_what_vllm_refuses(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(Refused, match=message):
        vllm_ask(CHAT_PATH, chat(**fields), PROMPT, CONTEXT)


@pytest.mark.parametrize(
    "messages",
    [
        MESSAGES,
        [key_message("alice"), {"role": "user", "content": "Tell me about rate limits."}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "a question"}]},
            {"role": "assistant", "content": "an answer"},
        ],
    ],
)
def test_a_plain_chat_is_billed_exactly_what_openai_counts(messages: list[Any]) -> None:
    body = {"model": "gpt-4o", "messages": messages}
    assert billed_input("gpt-4o", CHAT_PATH, body) == count_chat_prompt("gpt-4o", messages)


def test_tools_are_billed_whole_defs_and_all() -> None:
    defs = {"Big": {"type": "object", "description": "word " * 2000}}
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "$defs": defs}},
        }
    ]
    body = {"model": "gpt-4o", "messages": MESSAGES, "tools": tools}
    tools_text = json.dumps(tools, separators=(",", ":"))
    assert billed_input("gpt-4o", CHAT_PATH, body) == count_chat_prompt(
        "gpt-4o", MESSAGES
    ) + count_text("gpt-4o", tools_text)
    assert count_text("gpt-4o", tools_text) > 2000


def test_a_completions_prompt_is_billed_its_strings_and_token_arrays() -> None:
    body = {"model": "m", "prompt": ["say hi", [1, 2, 3]], "suffix": "end"}
    expected = count_text("m", "say hi") + 3 + count_text("m", "end")
    assert billed_input("m", COMPLETIONS_PATH, body) == expected


# --- a fake upstream process -----------------------------------------------------------


@pytest.mark.parametrize("flavour", ["llama", "vllm"])
async def test_a_client_that_leaves_is_billed_every_token_it_asked_for(
    workdir: Path, flavour: str
) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [key_message("alice"), {"role": "user", "content": "go"}],
        "max_tokens": 2000,
        "stream": True,
    }
    with trio.fail_after(60):
        async with (
            running_fake_upstream(workdir, flavour, tokens_per_second=1000) as upstream,
            httpx.AsyncClient(timeout=20) as client,
        ):
            await take_events(client, f"{upstream.base_url}/chat/completions", body, 3)
            billed = await upstream.billed("alice")
            (entry,) = await upstream.ledger()
    prompt = count_chat_prompt("gpt-4o", body["messages"])
    assert billed == Billed(requests=1, input_tokens=prompt, output_tokens=2000)
    assert entry["client_left"] and entry["done"] and entry["ended"] >= entry["started"]


@pytest.mark.parametrize("flavour", ["llama", "vllm"])
async def test_usage_tells_what_the_ledger_billed(workdir: Path, flavour: str) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [key_message("bob"), {"role": "user", "content": "go"}],
        "max_tokens": 7,
    }
    with trio.fail_after(60):
        async with (
            running_fake_upstream(workdir, flavour) as upstream,
            httpx.AsyncClient(timeout=20) as client,
        ):
            whole = (await client.post(f"{upstream.base_url}/chat/completions", json=body)).json()
            streamed = await client.post(
                f"{upstream.base_url}/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
            refused = await client.post(
                f"{upstream.base_url}/chat/completions", json={**body, "n": 0}
            )
            billed = await upstream.billed("bob")
    chunks = [json.loads(e[6:]) for e in streamed.text.split("\n\n") if e.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    usage = whole["usage"]
    assert count_text("gpt-4o", whole["choices"][0]["message"]["content"]) == 7
    assert count_text("gpt-4o", text) == 7
    assert chunks[-1]["usage"] == usage
    assert refused.status_code == 400 and refused.json()["error"]["code"] == 400
    assert billed == Billed(2, 2 * usage["prompt_tokens"], 2 * usage["completion_tokens"])
