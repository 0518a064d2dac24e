"""Hostile and malformed input, over real sockets against a real node process.

One ``tokenguard serve`` process serves the whole module (started once, stopped at the
end). Each row of :data:`CASES` is sent as raw bytes (so that malformed HTTP reaches the
server as written) and must get exactly its status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), never a 5xx; afterwards the node
is healthy and the key's quota is untouched (a row that is answered 200 consumes
exactly one request). Then: text counted by the tokenizer, never by ``len()``; a
prompt under the byte cap but over the key's input TPM; slow clients (slowloris)
measured against normal clients' latency; property-based fuzzing of bodies and headers
(in-process, through the app); and, last, the node's log holds no traceback.

What is already covered elsewhere is not repeated: the same bodies through the test
client (tests/test_app.py), ``//v1/...`` and the client that disconnects mid-stream
(tests/test_node_process.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url
from werkzeug.datastructures import Headers

from drivers.memory import MemoryStore
from tests.support.processes import START_TIMEOUT, free_ports, tokenguard_command
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.counting import count_chat_prompt, count_text

MAX_BODY = 256 * 1024  # the 100,000-deep body (200 kB) fits
CONFIG = f"""
[server]
max_body_bytes = {MAX_BODY}

[[keys]]
key = "sk-h"
name = "hostile"
rpm = 1000000
input_tpm = 100000000
output_tpm = 100000000

[[keys]]
key = "sk-tiny"
name = "tiny"
input_tpm = 50

[[keys]]
key = "sk-uni"
name = "unicode"
rpm = 1000
input_tpm = 1000000
"""
SECRETS = ("sk-h", "sk-tiny", "sk-uni")


@attrs.frozen
class Node:
    port: int
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node process for the module: SIGTERM (then SIGKILL) at the end."""
    directory = tmp_path_factory.mktemp("hostile")
    config = directory / "tokenguard.toml"
    config.write_text(CONFIG)
    log_path = directory / "node.log"
    for _ in range(3):
        port = free_ports()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [*tokenguard_command(), "serve", "--config", str(config), "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT  # a hang guard on a busy machine
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            else:
                if "address already in use" in log_path.read_text().lower():
                    continue
                raise RuntimeError(f"node did not start:\n{log_path.read_text()}")
            yield Node(port=port, url=f"http://127.0.0.1:{port}", log_path=log_path)
            return
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    raise RuntimeError("no free port")


# --- raw HTTP --------------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_answer(stream: trio.SocketStream) -> Answer:
    """Read one HTTP/1.1 response (content-length, chunked, or until the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            rest += chunk
        return Answer(status, headers, rest[:length])
    if headers.get("transfer-encoding") == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            rest += chunk
        body, raw = b"", rest
        while raw:
            size_line, _, raw = raw.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, raw = body + raw[:size], raw[size + 2 :]
        return Answer(status, headers, body)
    while chunk := await stream.receive_some(65536):
        rest += chunk
    return Answer(status, headers, rest)


async def exchange(port: int, *parts: bytes, pause: float = 0.0) -> Answer:
    """Send ``parts`` (``pause`` s apart) on a fresh connection; read the response."""
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for part in parts:
                try:
                    await stream.send_all(part)
                except trio.BrokenResourceError:
                    break  # the server answered and closed before reading it all
                await trio.sleep(pause)
            answer = await read_answer(stream)
            await let_the_server_finish(stream)
            return answer


async def let_the_server_finish(stream: trio.SocketStream) -> None:
    """Wait a moment before closing: hypercorn logs a spurious BusyResourceError when a
    client closes at the very moment it sends a response's empty last write (and it
    does not close after ``Connection: close`` itself; see docs/reliability.md)."""
    with trio.move_on_after(0.05):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


def request(
    body: bytes | None = None,
    *,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    key: str | None = "sk-h",
    headers: list[str] = (),  # type: ignore[assignment]
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += headers
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chat_body(**fields: Any) -> bytes:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


VALID = chat_body()
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


async def requests_used(client: httpx.AsyncClient, url: str, key: str = "sk-h") -> dict[str, int]:
    answer = await client.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    dims = answer.json()["dimensions"]
    return {name: dims[name]["used"] for name in dims if dims[name] is not None}


def assert_openai_error(answer: Answer, case: str) -> dict[str, Any]:
    body = answer.json()
    assert set(body) == {"error"}, case
    assert set(body["error"]) == {"message", "type", "param", "code"}, case
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], case
    return body["error"]


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


async def test_early_errors_keep_a_pooled_connection_usable(node: Node) -> None:
    """Answers given before the body is read (401, 404) leave the connection usable for
    the next request: a pooled client (httpx, the openai SDK) neither hangs nor sees
    "server disconnected". Each round races the body's arrival against the answer."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "w " * 35_000}]}
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with trio.fail_after(60):
        async with httpx.AsyncClient(timeout=5, limits=one_connection) as client:
            for _ in range(25):
                answer = await client.post(
                    f"{node.url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": "Bearer sk-not-a-key"},
                )
                assert answer.status_code == 401
                assert answer.json()["error"]["code"] == "invalid_api_key"
                answer = await client.post(
                    f"{node.url}/v1/no/such/route",
                    json=body,
                    headers={"Authorization": "Bearer sk-h"},
                )
                assert answer.status_code == 404
            answer = await client.get(
                f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-h"}
            )
            assert answer.status_code == 200


async def test_an_early_answer_waits_for_the_body_and_keeps_the_connection(node: Node) -> None:
    """A 401 decided from the head alone goes out once the body has arrived (read and
    dropped), so the kept-alive connection serves the next request, twice over. (Were
    it sent at once, hypercorn would close the connection with the body unread.)"""
    body = chat_body()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Authorization: Bearer sk-not-a-key\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        async with stream:
            for _ in range(2):
                await stream.send_all(head)
                await trio.sleep(0.2)  # the app has decided its 401 by now
                await stream.send_all(body)
                answer = await read_answer(stream)
                assert answer.status == 401
                assert answer.json()["error"]["code"] == "invalid_api_key"
            await let_the_server_finish(stream)


async def test_a_chunked_body_is_cut_off_at_the_cap(node: Node) -> None:
    """A chunked body with no length: 413 as soon as it passes the cap, long before it
    ends (it would be 1 MB); nothing consumed."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-h\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"2000\r\n" + b" " * 0x2000 + b"\r\n"  # 8 KiB of JSON whitespace
    sent = 0
    async with httpx.AsyncClient(timeout=10) as client:
        before = await requests_used(client, node.url)
        with trio.fail_after(15):
            stream = await trio.open_tcp_stream("127.0.0.1", node.port)
            async with stream:
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        nonlocal sent
                        await stream.send_all(head)
                        try:
                            while sent < 1024 * 1024:
                                await stream.send_all(piece)
                                sent += 0x2000
                                await trio.sleep(0.002)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass

                    nursery.start_soon(send)
                    answer = await read_answer(stream)
                    nursery.cancel_scope.cancel()
                await let_the_server_finish(stream)
        after = await requests_used(client, node.url)
    assert answer.status == 413
    assert assert_openai_error(answer, "chunked")["code"] == "request_too_large"
    assert sent < 2 * MAX_BODY
    assert after == before


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


# --- slow clients ------------------------------------------------------------------------


async def median_latency(url: str, samples: int) -> float:
    took = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(samples):
            began = time.perf_counter()
            answer = await client.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": "Bearer sk-h"},
                content=VALID,
            )
            took.append(time.perf_counter() - began)
            assert answer.status_code == 200
    return statistics.median(took)


async def test_slow_clients_do_not_slow_normal_ones(node: Node) -> None:
    """300 slow connections (150 idle, 150 trickling a request head a byte every
    half second, slowloris), all held open: normal clients are still served, every
    one of their requests. Idle and trickling connections are cut after hypercorn's
    keep-alive timeout (75 s; not waited for here). The median latency with and
    without them is printed, not asserted: on a busy machine it moves with the load
    beside the test, not only with the slow clients."""
    with trio.fail_after(60):
        await median_latency(node.url, 10)  # warm up
        before = await median_latency(node.url, 60)
        opened: list[trio.SocketStream] = []
        async with trio.open_nursery() as nursery:

            async def trickle(stream: trio.SocketStream) -> None:
                head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
                await stream.send_all(head)
                while True:
                    await trio.sleep(0.5)
                    await stream.send_all(b"a")

            for i in range(300):
                stream = await trio.open_tcp_stream("127.0.0.1", node.port)
                opened.append(stream)
                if i % 2:
                    nursery.start_soon(trickle, stream)
            await trio.sleep(1.0)
            during = await median_latency(node.url, 60)
            still_open = 0
            for stream in opened:
                with trio.move_on_after(0.001):
                    if await stream.receive_some(1) == b"":
                        continue
                still_open += 1
            nursery.cancel_scope.cancel()
        for stream in opened:
            await stream.aclose()
    print(f"median latency: {before * 1000:.2f} ms alone, {during * 1000:.2f} ms with 300 slow")
    assert still_open == 300  # they were really there, all of them, all along


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


# --- the usage feed before authentication -------------------------------------------------

FEED_CASES = [
    # id, first message, close code
    ("longer than the auth cap", "x" * 8_000, 1008),
    ("far longer: hypercorn's cap", "x" * 1_000_000, 1009),
    ("deep nesting under the cap", "[" * 4_000, 1008),
    ("deep nesting far past the cap", "[" * 200_000, 1009),
    ("not JSON", "sk-h", 1008),
    ("a JSON array", '["auth", "sk-h"]', 1008),
    ("another type", '{"type": "hello", "token": "sk-h"}', 1008),
    ("a token that is not a string", '{"type": "auth", "token": 5}', 1008),
    ("a lone surrogate", '{"type": "auth", "token": "\\ud800"}', 1008),
    ("duplicate keys", '{"type": "auth", "token": "sk-h", "token": "x"}', 1008),
    ("bytes that are not UTF-8", b'{"type": "auth", "token": "\xff"}', 1008),
    ("an unknown key", '{"type": "auth", "token": "sk-unknown"}', 1008),
]


@pytest.mark.parametrize(
    ("message", "code"), [c[1:] for c in FEED_CASES], ids=[c[0] for c in FEED_CASES]
)
async def test_the_feed_closes_bad_first_messages_unparsed_with_one_line(
    node: Node, message: str | bytes, code: int
) -> None:
    url = f"ws://127.0.0.1:{node.port}/v1/usage/stream"
    with trio.fail_after(15):
        async with open_websocket_url(url, message_queue_size=1) as ws:
            try:
                await ws.send_message(message)
            except ConnectionClosed:
                pass  # hypercorn closed it before the whole message was sent
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == code
    if code == 1008:
        assert "closed a websocket before authentication" in node.log()
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"{node.url}/healthz")).status_code == 200


# --- last: the node never logged a traceback -----------------------------------------------


def test_the_node_logged_no_traceback_and_no_secret(node: Node) -> None:
    log = node.log()
    assert "Traceback" not in log
    assert " ERROR " not in log
    for secret in SECRETS:
        assert secret not in log.replace("sk-h-but-longer", "")
