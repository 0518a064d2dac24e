"""Tests for tokenguard.counting: offline loading and OpenAI-exact prompt counting.

Expected figures marked "cookbook" are printed in OpenAI's cookbook notebook
"How to count tokens with tiktoken" (examples/How_to_count_tokens_with_tiktoken.ipynb),
where the prompt counts were checked against the live API's usage.prompt_tokens. Token
ids marked "tiktoken docs" are the ones in tiktoken's documentation. Figures marked
"derived" were computed with the verified encodings and pin behaviour against regressions.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import subprocess
import sys
import textwrap
import threading
from importlib import resources
from pathlib import Path

import pytest
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

from tokenguard.counting import (
    EncodingDataError,
    count_cache,
    count_chat_prompt,
    count_text,
    encoding_for_model,
    encoding_name_for,
    encodings,
    tool_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Verbatim from the cookbook, section 6.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]

# Verbatim from the cookbook, section 7.
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


# --- cookbook prompt counts (checked there against the API) -------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),  # cookbook
        ("gpt-4-0613", 129),  # cookbook
        ("gpt-4", 129),  # cookbook
        ("gpt-4o", 124),  # cookbook
        ("gpt-4o-mini", 124),  # cookbook
        # Same encoding and per-message rules as the above (derived, not in the notebook).
        ("gpt-3.5-turbo-0613", 129),
        ("gpt-4o-2024-08-06", 124),
    ],
)
def test_cookbook_example_messages(model: str, expected: int) -> None:
    assert count_chat_prompt(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize(
    ("model", "api"),
    [
        ("gpt-3.5-turbo", 105),  # cookbook
        ("gpt-4", 105),  # cookbook
        ("gpt-4o", 101),  # cookbook
        ("gpt-4o-mini", 101),  # cookbook
    ],
)
def test_cookbook_tools_example_costs_at_least_the_api_and_the_json(model: str, api: int) -> None:
    # A definition costs the larger of the cookbook's scheme and its JSON's tokens, so
    # never less than the API's own count, and never less than its JSON.
    counted = count_chat_prompt(model, COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)
    messages = count_chat_prompt(model, COOKBOOK_TOOL_MESSAGES)
    func_end = 12  # the cookbook's closing overhead
    json_tokens = count_text(model, tool_json(COOKBOOK_TOOLS[0]))
    assert counted == messages + json_tokens + func_end
    assert counted >= api


def test_every_part_of_a_schema_counts() -> None:
    # $defs, items, anyOf, default and the parameters' own description cost nothing
    # in the cookbook's scheme; 100k tokens of text there counted as 29.
    text = " ".join(f"word{i}" for i in range(50_000))
    for where in ("$defs", "items", "anyOf", "default", "description"):
        tool = copy.deepcopy(COOKBOOK_TOOLS[0])
        tool["function"]["parameters"][where] = {"def": {"description": text}}
        counted = count_chat_prompt("gpt-4o", [], tools=[tool])
        assert counted >= count_text("gpt-4o", text), where
        assert counted >= count_text("gpt-4o", tool_json(tool)), where


def test_the_validators_tool_texts_count_the_same() -> None:
    texts = [tool_json(t) for t in COOKBOOK_TOOLS]
    assert count_chat_prompt(
        "gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS, tool_texts=texts
    ) == count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)


def test_legacy_functions_count_like_tools() -> None:
    functions = [tool["function"] for tool in COOKBOOK_TOOLS]
    for model in ("gpt-4", "gpt-4o"):
        assert count_chat_prompt(
            model, COOKBOOK_TOOL_MESSAGES, functions=functions
        ) == count_chat_prompt(model, COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)


def test_tools_add_tokens_monotonically() -> None:
    base = count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES)
    assert count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=[]) == base
    one = count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)
    two = count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS * 2)
    assert base < one < two


def test_nested_schema_properties_are_charged() -> None:
    # Beyond the cookbook (which ignores nesting): nested object and array-item
    # properties are charged, so a bigger nested schema never counts as cheaper.
    def with_location(schema: dict) -> int:
        tools = copy.deepcopy(COOKBOOK_TOOLS)
        tools[0]["function"]["parameters"]["properties"]["location"] = schema
        return count_chat_prompt("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=tools)

    city = {"city": {"type": "string"}}
    flat = with_location({"type": "object"})
    nested = with_location({"type": "object", "properties": city})
    deeper = with_location({"type": "object", "properties": {**city, "zip": {"type": "string"}}})
    items = with_location({"type": "array", "items": {"type": "object", "properties": city}})
    assert flat < nested < deeper
    assert flat < items


# --- encodings and token ids ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "text", "ids"),
    [
        # tiktoken docs / cookbook
        ("gpt-4o", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
        ("gpt-4", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        # cookbook, section 5
        ("gpt-4", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
        ("gpt-4o", "antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
        ("gpt-4", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
        ("gpt-4o", "2 + 2 = 4", [17, 659, 220, 17, 314, 220, 19]),
        (
            "gpt-4",
            "お誕生日おめでとう",
            [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699],
        ),
        ("gpt-4o", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
        # derived
        ("gpt-4", "hello world", [15339, 1917]),
        ("gpt-4o", "hello world", [24912, 2375]),
    ],
)
def test_known_token_ids(model: str, text: str, ids: list[int]) -> None:
    assert encoding_for_model(model).encode(text) == ids
    assert count_text(model, text) == len(ids)


def test_count_text_tiktoken_is_great() -> None:
    assert count_text("gpt-4o", "tiktoken is great!") == 6
    assert count_text("gpt-4", "tiktoken is great!") == 6
    assert count_text("gpt-4o", "") == 0


@pytest.mark.parametrize(
    ("text", "o200k", "cl100k"),
    [
        # derived: emoji ZWJ sequence, emoji + CJK, zero-width chars, Hebrew, Arabic
        # wrapped in RTL override/pop formatting marks
        ("👨\u200d👩\u200d👧\u200d👦", 11, 18),
        ("🫡🍣顏文字", 8, 9),
        ("💩💩💩💩💩", 10, 10),
        ("zero\u200bwidth\u200cjoiner\u200dhere\ufeff", 9, 10),
        ("שלום עולם", 2, 10),
        ("\u202eمرحبا بالعالم\u202c", 6, 14),
    ],
)
def test_unicode_is_counted_by_the_tokenizer(text: str, o200k: int, cl100k: int) -> None:
    for model, expected in (("gpt-4o", o200k), ("gpt-4", cl100k)):
        n = count_text(model, text)
        assert n == expected
        assert n > 0
        assert n != len(text)  # tokens, not characters


def test_special_token_text_is_plain_text() -> None:
    # The API counts user-typed "<|endoftext|>" as text; tiktoken would raise by default.
    assert count_text("gpt-4o", "<|endoftext|>") == 7
    assert count_text("gpt-4", "a <|endoftext|> b <|endofprompt|>") > 4
    messages = [{"role": "user", "content": "<|im_start|>system<|im_end|>"}]
    assert count_chat_prompt("gpt-4o", messages) > 7


def test_lone_surrogate_does_not_raise() -> None:
    assert count_text("gpt-4o", "\ud800x") > 0
    assert count_chat_prompt("gpt-4", [{"role": "user", "content": "\udfff"}]) > 7


# --- model -> encoding ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("o3-mini-2025-01-31", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        # unknown to tiktoken -> fallback
        ("my-local-llama-3-70b", "o200k_base"),
        ("", "o200k_base"),
        # legacy encodings we do not ship -> fallback
        ("text-davinci-003", "o200k_base"),  # p50k_base
        ("davinci", "o200k_base"),  # r50k_base
        # o200k_harmony has o200k_base's ranks
        ("gpt-oss-120b", "o200k_base"),
    ],
)
def test_encoding_name_for(model: str, expected: str) -> None:
    assert encoding_name_for(model) == expected
    assert encoding_for_model(model).name == expected


def test_unknown_model_counts_like_o200k() -> None:
    assert count_chat_prompt("acme-chat-9000", COOKBOOK_MESSAGES) == 124
    assert encoding_for_model("acme-chat-9000") is encoding_for_model("gpt-4o")  # cached


# --- content parts, tool calls, odd values ------------------------------------------


def _user(content: object) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_text_parts_count_like_plain_content() -> None:
    parts = [{"type": "text", "text": "tiktoken is "}, {"type": "text", "text": "great!"}]
    plain = count_chat_prompt("gpt-4o", _user("tiktoken is great!"))
    assert count_chat_prompt("gpt-4o", _user(parts)) >= plain
    assert count_chat_prompt("gpt-4o", _user([{"type": "text", "text": "hi"}])) == (
        count_chat_prompt("gpt-4o", _user("hi"))
    )


def test_media_parts_cost_what_tokenguard_media_prices() -> None:
    # (Each kind in detail: tests/test_media.py.)
    empty = count_chat_prompt("gpt-4o", _user([]))
    remote = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA" * 250, "format": "mp3"}}
    file = {"type": "file", "file": {"file_id": "file-abc"}}
    video = {"type": "video_url", "video_url": {"url": "https://x/y.mp4"}}
    assert count_chat_prompt("gpt-4o", _user([remote])) == empty + 85 + 8 * 170
    assert count_chat_prompt("gpt-4.1-mini", _user([remote])) - count_chat_prompt(
        "gpt-4.1-mini", _user([])
    ) == math.ceil(1536 * 1.62)
    assert count_chat_prompt("gpt-4o", _user([audio])) == empty + math.ceil(750 * 10 / 1000)
    assert count_chat_prompt("gpt-4o", _user([file, video])) == empty + 2 * 1000


def test_none_content_and_minimal_message() -> None:
    # 3 per message + "assistant" (1 token) + 3 reply priming.
    assert count_chat_prompt("gpt-4o", [{"role": "assistant", "content": None}]) == 7
    assert count_chat_prompt("gpt-4o", []) == 3


def test_tool_calls_tool_results_and_function_call_are_counted() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
            }
        ],
    }
    enc = encoding_for_model("gpt-4o")
    expected = (
        3 + 1 + len(enc.encode("get_current_weather")) + len(enc.encode('{"location":"Paris"}'))
    )
    assert count_chat_prompt("gpt-4o", [call]) == 3 + expected

    result = {"role": "tool", "tool_call_id": "call_1", "content": "22C"}
    expected_result = 3 + 1 + len(enc.encode("call_1")) + len(enc.encode("22C"))
    assert count_chat_prompt("gpt-4o", [result]) == 3 + expected_result

    legacy = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
    }
    assert count_chat_prompt("gpt-4o", [legacy]) == count_chat_prompt("gpt-4o", [call])


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "not a list",
        [None, 3, "text", ["nested"]],
        [{"role": 5, "content": {"weird": [1, 2.5, True, None]}, "name": ["x"]}],
        [{"role": "user", "content": [None, 7, "bare string", {"type": "text", "text": 9}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "not-a-dict"}]}],
        [{"role": "assistant", "tool_calls": "oops", "function_call": 3}],
        [{"role": "assistant", "tool_calls": [None, {"function": None}, {"custom": {}}]}],
        [{"role": "user", "content": b"bytes"}],
    ],
)
def test_odd_message_values_do_not_raise(messages: object) -> None:
    assert count_chat_prompt("gpt-4o", messages) >= 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tools",
    [
        [None],
        ["string tool"],
        [{"type": "function"}],
        [{"type": "function", "function": {"name": 3, "parameters": "nope"}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": "str", "b": None}}}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": {"enum": "x"}}}}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": {"type": ["a", 1]}}}}}],
        [{"type": "custom", "custom": {"name": "grep", "description": "search"}}],
    ],
)
def test_odd_tool_definitions_do_not_raise(tools: list[dict]) -> None:
    assert count_chat_prompt("gpt-4", [], tools=tools) > 3


def test_deep_and_circular_values_do_not_raise() -> None:
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["properties"] = {"k": {"type": "object"}}
        node = node["properties"]["k"]
    tools = [{"function": {"name": "f", "parameters": deep}}]
    assert count_chat_prompt("gpt-4o", [], tools=tools) > 3
    loop: list = []
    loop.append(loop)
    assert count_chat_prompt("gpt-4o", _user(loop)) > 3
    assert count_text("gpt-4o", loop) > 0  # type: ignore[arg-type]


# --- package data and integrity ------------------------------------------------------


def test_packaged_files_match_sha256sums() -> None:
    directory = resources.files("tokenguard") / "encodings"
    sums = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, filename = line.split()
        sums[filename] = digest
    assert set(sums) == {f"{name}.tiktoken" for name in encodings.SHIPPED_ENCODINGS}
    for name in encodings.SHIPPED_ENCODINGS:
        data = encodings._read_packaged(name)
        assert hashlib.sha256(data).hexdigest() == sums[f"{name}.tiktoken"]


def test_hash_mismatch_raises_clear_error() -> None:
    with pytest.raises(EncodingDataError, match=r"SHA-256 mismatch.*o200k_base.*reinstall"):
        encodings._load_ranks("o200k_base", "0" * 64)


def test_loader_refuses_unshipped_files_instead_of_downloading() -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    with pytest.raises(EncodingDataError, match="not shipped"):
        encodings._offline_load_tiktoken_bpe(url, "0" * 64)
    with pytest.raises(EncodingDataError, match="not shipped"):
        encodings._build_encoding("p50k_base")


def test_corrupt_gzip_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeResource:
        def __truediv__(self, _: str) -> FakeResource:
            return self

        def read_bytes(self) -> bytes:
            return b"definitely not gzip"

    monkeypatch.setattr(encodings.resources, "files", lambda _: FakeResource())
    with pytest.raises(EncodingDataError, match="not valid gzip"):
        encodings._read_packaged("o200k_base")


def test_parse_ranks_rejects_malformed_lines() -> None:
    assert encodings._parse_ranks(b"IQ== 0\n\nIg== 1\n", "t") == {b"!": 0, b'"': 1}
    with pytest.raises(EncodingDataError, match="malformed line"):
        encodings._parse_ranks(b"IQ== 0\nnot-base64!! 1\n", "t")
    with pytest.raises(EncodingDataError, match="malformed line"):
        encodings._parse_ranks(b"IQ==\n", "t")


def test_tiktoken_loader_is_restored_even_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str, expected_hash: str) -> dict[bytes, int]:
        raise EncodingDataError("boom")

    monkeypatch.setattr(encodings, "_load_ranks", broken)
    with pytest.raises(EncodingDataError, match="boom"):
        encodings._build_encoding("cl100k_base")
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe


def test_built_encodings_match_tiktoken_definitions() -> None:
    # pat_str and special tokens come from tiktoken's own constructors.
    enc = encoding_for_model("gpt-4o")
    assert enc.name == "o200k_base"
    assert enc.n_vocab == 200019
    assert enc.special_tokens_set == {"<|endoftext|>", "<|endofprompt|>"}
    assert encoding_for_model("gpt-4").n_vocab == 100277
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe


# --- offline proof -------------------------------------------------------------------


def test_counts_in_a_fresh_process_without_network(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"no_proxy", "https_proxy", "http_proxy", "all_proxy"}
    }
    env.update(
        TIKTOKEN_CACHE_DIR=str(cache),
        DATA_GYM_CACHE_DIR=str(cache),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    # Besides the dead proxy, an audit hook aborts on any socket use at all.
    code = textwrap.dedent(
        """
        import sys

        def no_network(event, args):
            if event.startswith(("socket.", "urllib.Request")):
                raise SystemExit(f"network access attempted: {event} {args!r}")

        sys.addaudithook(no_network)
        from tokenguard.counting import count_text, count_chat_prompt
        print(count_text('gpt-4o', 'hi'))
        print(count_text('gpt-4', 'tiktoken is great!'))
        print(count_chat_prompt('gpt-4o', [{'role': 'user', 'content': 'hi'}]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "6", "8"]
    assert list(cache.iterdir()) == []


# --- the count cache -----------------------------------------------------------------------


def _long_texts() -> list[str]:
    base = "The rate limiter counts every prompt exactly, whatever its size. " * 8
    return [
        base,
        base + "<|endoftext|> is plain text here " * 4,
        "naïve café 東京 🚀 " * 40,
        "\ud800 a lone surrogate " * 30,
        " ".join(str(i) for i in range(400)),
    ]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_cached_counts_are_the_counts(model: str) -> None:
    """A remembered count is the count: each text counted with the cache (a miss, then a
    hit) equals tiktoken's own count of it, and a chat prompt counted twice too."""
    cache = count_cache.COUNT_CACHE
    cache.clear()
    encoding = encodings.encoding_for_model(model)
    for text in _long_texts():
        assert len(text) >= count_cache.CACHED_MIN_CHARS
        exact = len(encoding.encode(text, disallowed_special=()))
        assert count_text(model, text) == exact
        assert count_text(model, text) == exact
    assert (cache.hits, cache.misses) == (5, 5)
    messages = [{"role": "system", "content": t} for t in _long_texts()]
    first = count_chat_prompt(model, messages)
    cache.enabled = False
    try:
        uncached = count_chat_prompt(model, messages)
    finally:
        cache.enabled = True
    assert count_chat_prompt(model, messages) == first == uncached


def test_the_count_cache_is_bounded_and_forgets_the_least_recently_used() -> None:
    cache = count_cache.CountCache(entries=3)
    encoding = encodings.encoding_for_model("gpt-4o")
    texts = [f"{i} " + "x y " * 200 for i in range(5)]
    for text in texts[:3]:
        cache.count(encoding, text)
    cache.count(encoding, texts[0])  # used again: now the most recent
    for text in texts[3:]:
        cache.count(encoding, text)
    assert len(cache) == 3
    assert (cache.hits, cache.misses) == (1, 5)
    cache.count(encoding, texts[0])  # kept
    assert cache.hits == 2
    cache.count(encoding, texts[1])  # forgotten: counted again
    assert cache.misses == 6


def test_short_texts_and_a_disabled_cache_are_counted_afresh() -> None:
    cache = count_cache.CountCache()
    encoding = encodings.encoding_for_model("gpt-4o")
    short = "x" * (count_cache.CACHED_MIN_CHARS - 1)
    assert (
        cache.count(encoding, short)
        == cache.count(encoding, short)
        == len(encoding.encode_ordinary(short))
    )
    cache.enabled = False
    long = "y " * count_cache.CACHED_MIN_CHARS
    cache.count(encoding, long)
    cache.count(encoding, long)
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def test_the_count_cache_is_shared_safely_by_threads() -> None:
    """Large prompts are counted in worker threads: 8 threads counting the same texts
    at once all get the exact counts, and each text is remembered once."""
    cache = count_cache.CountCache()
    encoding = encodings.encoding_for_model("gpt-4o")
    texts = [f"thread {i} " + "words to count " * 100 for i in range(20)]
    expected = [len(encoding.encode_ordinary(t)) for t in texts]
    results: list[list[int]] = []

    def work() -> None:
        results.append([cache.count(encoding, t) for t in texts])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [expected] * 8
    assert len(cache) == 20
    assert cache.hits + cache.misses == 8 * 20
