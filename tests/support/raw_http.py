"""HTTP/1.1 written and read as raw bytes, so malformed requests reach a server as written.

:func:`request` builds a request's bytes, :func:`exchange` sends them on a fresh
connection and reads one response (:func:`read_answer`: content-length, chunked, or
until the close), and :func:`assert_openai_error` checks OpenAI's error body.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio

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


def assert_openai_error(answer: Answer, case: str) -> dict[str, Any]:
    body = answer.json()
    assert set(body) == {"error"}, case
    assert set(body["error"]) == {"message", "type", "param", "code"}, case
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], case
    return body["error"]
