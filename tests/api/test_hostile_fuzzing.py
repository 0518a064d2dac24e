"""Property-based fuzzing of chat bodies and headers, in process through the app.

Hypothesis sends bodies (valid chats, chat-like JSON, any JSON, raw bytes) with
authorization and other headers of any text: never a 5xx, every error in OpenAI's
shape, nothing logged at ERROR, and quota consumed by the 200s only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings

# --- property-based fuzzing (in-process) ---------------------------------------------------

FUZZ_CONFIG: dict[str, Any] = {
    "server": {"max_body_bytes": 4096},
    "keys": [
        {"key": "sk-fuzz", "name": "fuzz", "rpm": 10**9, "input_tpm": 10**9, "output_tpm": 10**9}
    ],
}
FUZZ_APP = create_app(
    parse_settings(FUZZ_CONFIG, "<fuzz>", environ={}), MemoryStore(clock=lambda: 2_000_000.0)
)
FUZZ_COUNTS = {"200": 0}

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), json_value),
        "content": st.one_of(st.text(max_size=50), json_value),
        "name": json_value,
        "tool_calls": json_value,
    },
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["gpt-4o", "gpt-4", "unknown-model"]), json_value),
        "messages": st.one_of(st.lists(message, max_size=3), json_value),
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=2**40), json_value),
        "max_completion_tokens": json_value,
        "n": st.one_of(st.integers(min_value=-2, max_value=200), json_value),
        "stream": json_value,
        "stream_options": json_value,
        "tools": json_value,
        "functions": json_value,
    },
)


def _encode(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


valid_chat = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-4", "gpt-3.5-turbo", "x"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "developer"]),
                    "content": st.text(st.characters(codec=None), max_size=60),
                }
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "max_tokens": st.integers(min_value=-1, max_value=50),
        "n": st.integers(min_value=0, max_value=3),
        "stream": st.booleans(),
        "temperature": json_value,
    },
)
bodies = st.one_of(
    st.builds(_encode, valid_chat, st.booleans()),
    st.builds(_encode, valid_chat, st.booleans()),
    st.builds(_encode, valid_chat, st.booleans()),
    st.builds(_encode, chat_like, st.booleans()),
    st.builds(_encode, json_value, st.booleans()),
    st.binary(max_size=300),
    st.builds(
        lambda b, tail: b + tail,
        st.builds(_encode, chat_like, st.just(True)),
        st.binary(max_size=8),
    ),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40)
authorizations = st.one_of(
    st.just(["Bearer sk-fuzz"]),
    st.just(["Bearer sk-fuzz"]),
    st.just(["Bearer sk-fuzz"]),
    st.just(["bearer sk-fuzz"]),
    st.just([]),
    st.just(["Bearer sk-fuzz", "Bearer sk-fuzz"]),
    st.lists(header_text, max_size=2),
    st.builds(lambda t: [f"Bearer {t}"], header_text),
)
extra_headers = st.lists(
    st.tuples(st.sampled_from(["Content-Type", "X-Any", "Accept", "User-Agent"]), header_text),
    max_size=3,
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=bodies, authorization=authorizations, headers=extra_headers)
def test_fuzzed_requests_never_5xx_and_only_200s_consume(
    body: bytes, authorization: list[str], headers: list[tuple[str, str]], caplog: Any
) -> None:
    caplog.set_level(logging.WARNING)

    async def one() -> tuple[int, int]:
        client = FUZZ_APP.test_client()
        all_headers = [("Authorization", value) for value in authorization] + headers
        all_headers.append(("Content-Length", str(len(body))))
        # Not client.post: its buffer holds ~10 chunks of a stream before it is read.
        async with client.request(
            "/v1/chat/completions", method="POST", headers=Headers(all_headers)
        ) as connection:
            await connection.send(body)
            await connection.send_complete()
            answer = await connection.as_response()
        data = await answer.get_data()
        if answer.status_code != 200:
            error = json.loads(data)["error"]
            assert set(error) == {"message", "type", "param", "code"}
        usage = await client.get("/v1/usage", headers={"Authorization": "Bearer sk-fuzz"})
        return answer.status_code, (await usage.get_json())["dimensions"]["requests"]["used"]

    status, used = trio.run(one)
    assert status in (200, 400, 401, 413, 429), status
    FUZZ_COUNTS["200"] += status == 200
    assert used == FUZZ_COUNTS["200"]  # quota is consumed by 200s only
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]
