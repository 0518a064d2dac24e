"""Hostile and malformed requests, over real sockets against a real node process.

One ``tokenguard serve`` process serves the module (tests/support/hostile_node.py). Each
row of :data:`CASES` is sent as raw bytes (so that malformed HTTP reaches the server as
written) and must get exactly its status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), never a 5xx; afterwards the node
is healthy and the key's quota is untouched (a row that is answered 200 consumes
exactly one request). Then: unknown keys all answered alike; text counted by the
tokenizer, never by ``len()``; a prompt under the byte cap but over the key's input
TPM; and, last, the node's log holds no traceback and no key.

What is already covered elsewhere is not repeated: the same bodies through the test
client (tests/api/test_app_bad_requests.py), ``//v1/...`` and the client that
disconnects mid-stream (tests/cluster/test_node_process.py); hostile connections in
tests/api/test_hostile_connections.py.
"""

from __future__ import annotations

import json

import attrs
import httpx
import pytest

from tests.support.hostile_node import (
    SECRETS,
    Node,
    assert_clean_log,
    hostile_node_fixture,
    requests_used,
)
from tests.support.raw_http import (
    VALID,
    assert_openai_error,
    chat_body,
    exchange,
    request,
)
from tokenguard.counting import count_chat_prompt, count_text

node = hostile_node_fixture()  # its log is checked when the module is done


MESSAGE = '"messages":[{"role":"user","content":"hi"}]'


SAME_LIMITER = -1


@attrs.frozen
class Case:
    id: str
    parts: tuple[bytes, ...]
    status: int  # SAME_LIMITER: 200 and counted, or 404 and nothing consumed
    code: str | None = None
    param: str | None = None
    pause: float = 0.0
    consumes: int = 0


def bad(id: str, raw: bytes | str, param: str | None = None, code: str | None = None) -> Case:
    data = raw.encode() if isinstance(raw, str) else raw
    return Case(id, (request(data),), 400, code, param)


CASES = [
    # -- malformed JSON
    bad("malformed JSON", "{not json"),
    bad("trailing garbage", VALID + b" trailing"),
    bad("a JSON array", "[1, 2]"),
    bad("a JSON string", '"hello"'),
    bad("JSON null", "null"),
    bad("an empty body", ""),
    bad("NaN", f'{{"model":"gpt-4o",{MESSAGE},"max_tokens":NaN}}'),
    bad("Infinity", f'{{"model":"gpt-4o",{MESSAGE},"max_tokens":Infinity}}'),
    bad("-Infinity", f'{{"model":"gpt-4o",{MESSAGE},"n":-Infinity}}'),
    bad(
        "max_tokens twice (a quota bypass if read differently)",
        f'{{"model":"gpt-4o",{MESSAGE},"max_tokens":1,"max_tokens":100000}}',
        "max_tokens",
    ),
    bad("model twice", f'{{"model":"gpt-4o","model":"gpt-4",{MESSAGE}}}', "model"),
    bad("100,000-deep nesting", b"[" * 100_000 + b"]" * 100_000),
    bad("40,000-deep objects", b'{"a":' * 40_000 + b"1" + b"}" * 40_000),
    # -- fields
    bad("messages missing", chat_body(messages=...), "messages"),
    bad("messages empty", chat_body(messages=[]), "messages"),
    bad("messages a string", chat_body(messages="hi"), "messages"),
    bad("messages an object", chat_body(messages={"role": "user"}), "messages"),
    bad("a message not an object", chat_body(messages=["hi"]), "messages[0]"),
    bad("model missing", chat_body(model=...), "model"),
    bad("model empty", chat_body(model=""), "model"),
    bad("model a number", chat_body(model=4), "model"),
    # -- huge model names: refused before any cache, metric label, log line or event
    *[
        Case(
            f"a model of {size} characters on {path}",
            (request(json.dumps({**body, "model": "m" * size}).encode(), path=path),),
            400,
            param="model",
        )
        for size in (257, 200_000)
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/embeddings", {"input": "hi"}),
        )
    ],
    bad('max_tokens "100"', chat_body(max_tokens="100"), "max_tokens"),
    bad("max_tokens 1.5", chat_body(max_tokens=1.5), "max_tokens"),
    bad("max_tokens 1e3", f'{{"model":"gpt-4o",{MESSAGE},"max_tokens":1e3}}', "max_tokens"),
    bad("max_tokens true", chat_body(max_tokens=True), "max_tokens"),
    bad("max_tokens -1", chat_body(max_tokens=-1), "max_tokens"),
    bad("max_tokens 0", chat_body(max_tokens=0), "max_tokens"),
    bad("max_tokens 2^31", chat_body(max_tokens=2**31), "max_tokens"),
    bad("max_tokens 10^30", chat_body(max_tokens=10**30), "max_tokens"),
    bad("max_completion_tokens -5", chat_body(max_completion_tokens=-5), "max_completion_tokens"),
    bad("n absurdly large", chat_body(n=10**9), "n"),
    bad("n 0", chat_body(n=0), "n"),
    bad("stream a string", chat_body(stream="yes"), "stream"),
    # -- text
    bad(
        "a lone surrogate",
        '{"model":"gpt-4o","messages":[{"role":"user","content":"a\\ud800b"}]}',
        "messages[0].content",
    ),
    bad(
        "a lone surrogate in the model",
        f'{{"model":"gpt\\udfff",{MESSAGE}}}',
        "model",
    ),
    bad("invalid UTF-8", b'{"model":"gpt-4o","messages":[{"role":"user","content":"\xff\xfe"}]}'),
    bad("overlong UTF-8", b'{"model":"gpt-4o","messages":[{"role":"user","content":"\xc0\xaf"}]}'),
    # -- size and framing
    Case(
        "10 MB Content-Length (413 before reading)",
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-h\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n",
        ),
        413,
        "request_too_large",
    ),
    Case(
        "Content-Length and Transfer-Encoding",
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-h\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(VALID), len(VALID), VALID),
        ),
        400,
        "invalid_framing",
    ),
    Case(
        "two Content-Lengths",
        (request(VALID, headers=["Content-Length: 3"]),),
        400,
        "invalid_http",
    ),
    Case(
        "oversized headers, sent at once",
        (request(VALID, headers=["X-Pad: " + "a" * 20_000]),),
        431,
        "headers_too_large",
    ),
    Case(
        "oversized headers, trickled",
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", *[b"a" * 2048] * 12),
        431,
        "invalid_http",
        pause=0.01,
    ),
    Case("a malformed request line", (b"HELLO\r\n\r\n",), 400, "invalid_http"),
    Case(
        "an unsupported transfer coding",
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-h\r\n"
            b"Transfer-Encoding: gzip\r\n\r\n",
        ),
        400,
        "invalid_http",
    ),
    # -- credentials
    Case("no Authorization", (request(VALID, key=None),), 401, "invalid_api_key"),
    Case(
        "an empty Authorization",
        (request(VALID, key=None, headers=["Authorization: "]),),
        401,
        "invalid_api_key",
    ),
    Case(
        "a scheme other than Bearer",
        (request(VALID, key=None, headers=["Authorization: Basic c2staA=="]),),
        401,
        "invalid_api_key",
    ),
    Case(
        "lower-case bearer",
        (request(VALID, key=None, headers=["Authorization: bearer sk-h"]),),
        200,
        consumes=1,
    ),
    Case(
        "two Authorization headers (never pick one)",
        (request(VALID, headers=["Authorization: Bearer sk-tiny"]),),
        400,
        "invalid_authorization",
    ),
    Case("an unknown key", (request(VALID, key="sk-unknown"),), 401, "invalid_api_key"),
    # -- paths: the limiter's route (counted) or a 404, never an unlimited route
    *[
        Case(f"path {path}", (request(VALID, path=path),), SAME_LIMITER, "unknown_url")
        for path in (
            "/v1/chat/completions/",
            "//v1/chat/completions",
            "/v1//chat/completions",
            "/V1/CHAT/COMPLETIONS",
            "/v1/x/../chat/completions",
            "/v1/./chat/completions",
            "/v1/chat/completions?a=1",
            "/v1/chat/%63ompletions",
            "/v1/chat/completions%2F",
            "/v1/chat/completions;x",
            "http://127.0.0.1/v1/chat/completions",
        )
    ],
    Case("GET on the POST route", (request(None, method="GET"),), 405),
    # -- the admission queue's headers: only ever less, and nothing consumed when bad
    *[
        Case(
            f"{name}: {value!r}",
            (request(VALID, headers=[f"{name}: {value}"]),),
            400,
            param=name,
        )
        for name, values in (
            (
                "x-tokenguard-max-wait",
                ("abc", "-1", "nan", "inf", "1e3", "1.5.2", "", "0x10", "1" * 20, "+2"),
            ),
            ("x-tokenguard-priority", ("urgent", "INTERACTIVE", "", "batch,interactive")),
        )
        for value in values
    ],
    *[
        Case(
            f"{name} twice",
            (request(VALID, headers=[f"{name}: {value}", f"{name}: {value}"]),),
            400,
            param=name,
        )
        for name, value in (("x-tokenguard-max-wait", "1"), ("x-tokenguard-priority", "batch"))
    ],
    *[
        Case(
            f"{header} (a key with no wait: as before)",
            (request(VALID, headers=[header]),),
            200,
            consumes=1,
        )
        for header in ("x-tokenguard-max-wait: 99999999", "x-tokenguard-priority: interactive")
    ],
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_request(node: Node, case: Case) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        before = await requests_used(client, node.url)
        answer = await exchange(node.port, *case.parts, pause=case.pause)
        consumes = case.consumes
        if case.status == SAME_LIMITER:
            assert answer.status in (200, 404), (case.id, answer)
            consumes = int(answer.status == 200)
        else:
            assert answer.status == case.status, (case.id, answer)
        assert answer.status < 500
        if answer.status != 200:
            error = assert_openai_error(answer, case.id)
            if case.code is not None:
                assert error["code"] == case.code, (case.id, error)
            if case.status == 400 and case.code is None:
                assert error["param"] == case.param, (case.id, error)
        for secret in SECRETS:
            assert secret.encode() not in answer.body
        health = await client.get(f"{node.url}/healthz")
        assert health.status_code == 200
        after = await requests_used(client, node.url)
    assert after["requests"] - before["requests"] == consumes
    if not consumes:
        assert after == before


async def test_unknown_keys_answer_identically(node: Node) -> None:
    bodies = set()
    for key in ("sk-unknown", "tg-" + "A" * 43, "x", "sk-h-but-longer", "SK-H"):
        answer = await exchange(node.port, request(VALID, key=key))
        assert answer.status == 401
        bodies.add(answer.body)
    assert len(bodies) == 1


async def test_a_prompt_under_the_byte_cap_but_over_the_input_tpm_never_fits(node: Node) -> None:
    content = "lorem ipsum " * 100  # ~200 tokens, 1.2 kB
    body = chat_body(messages=[{"role": "user", "content": content}])
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await exchange(node.port, request(body, key="sk-tiny"))
        used = await requests_used(client, node.url, "sk-tiny")
    assert answer.status == 429
    error = assert_openai_error(answer, "never fits")
    assert error["code"] == "rate_limit_exceeded"
    assert "can never fit" in error["message"] and "Limit 50" in error["message"]
    assert "retry-after" not in answer.headers
    assert used == {"input_tokens": 0}


TEXTS = {
    "emoji": "👩‍👩‍👧‍👦🏳️‍🌈🚀🔥👍🏽",
    "CJK": "速率限制器统计令牌，而不是字符。日本語のテキストも数えます。한국어 텍스트",
    "zero-width": "zero\u200bwidth\u200cjoiner\u200d test\u2060 \ufeff" * 5,
    "right-to-left": "\u202eמגביל קצב\u202c مرحبا بالعالم \u200f",
    "combining": "e\u0301" * 30 + "Z\u0351\u0352\u0353\u0354" * 10,
}


@pytest.mark.parametrize("name", list(TEXTS))
async def test_text_is_counted_by_the_tokenizer_never_by_len(node: Node, name: str) -> None:
    text = TEXTS[name]
    messages = [{"role": "user", "content": text}]
    expected = count_chat_prompt("gpt-4o", messages)
    async with httpx.AsyncClient(timeout=10) as client:
        before = await requests_used(client, node.url, "sk-uni")
        answer = await client.post(
            f"{node.url}/v1/chat/completions",
            headers={"Authorization": "Bearer sk-uni"},
            content=json.dumps({"model": "gpt-4o", "messages": messages, "max_tokens": 3}),
        )
        after = await requests_used(client, node.url, "sk-uni")
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == expected
    assert after["input_tokens"] - before["input_tokens"] == expected
    # Neither characters nor bytes: what the tokenizer says.
    assert count_text("gpt-4o", text) not in (len(text), len(text.encode()))


# --- last: the node never logged a traceback -----------------------------------------------


def test_the_node_logged_no_traceback_and_no_secret(node: Node) -> None:
    assert_clean_log(node)
