"""Test support for proxy mode: a tiny HTTP/1.1 server on trio with scripted answers.

:func:`scripted_upstream` serves on a free localhost port for the duration of an
``async with`` and yields a :class:`ScriptedUpstream`: every request it receives is
recorded (method, path, headers, JSON body), and answered by the test's ``answer``
coroutine, which writes raw bytes to the connection. Two answers are provided:

* :func:`fixed` -- a whole response (status, headers, body) with a Content-Length;
* :func:`dropping` -- a 200 event stream in chunked encoding that sends some events and
  then closes the connection without the terminating chunk: a broken stream, as httpx
  (the proxy's client) sees an upstream that died mid-reply;
* :func:`streaming` -- the same stream, ended properly.

The connection is closed after each answer. The server runs in the test's own trio run,
so it needs no process of its own; the proxy node under test is a real process.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

MAX_HEAD = 65536


@attrs.frozen
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


Answer = Callable[[trio.SocketStream, ReceivedRequest], Awaitable[None]]


@attrs.define(eq=False)
class ScriptedUpstream:
    port: int
    answer: Answer
    received: list[ReceivedRequest] = attrs.field(factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


async def _read_request(stream: trio.SocketStream) -> ReceivedRequest | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > MAX_HEAD:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        rest += chunk
    body = json.loads(rest[:length]) if length else None
    return ReceivedRequest(method=method, path=path, headers=headers, body=body)


@contextlib.asynccontextmanager
async def scripted_upstream(answer: Answer) -> AsyncIterator[ScriptedUpstream]:
    """Serve ``answer`` to every request on a fresh localhost port until the block ends."""
    async with trio.open_nursery() as nursery:
        server = ScriptedUpstream(port=0, answer=answer)

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                received = await _read_request(stream)
                if received is None:
                    return
                server.received.append(received)
                await server.answer(stream, received)

        serve = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


REASONS = {200: "OK", 401: "Unauthorized", 429: "Too Many Requests", 500: "Internal Server Error"}


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fixed(status: int, body: Any, headers: dict[str, str] | None = None) -> Answer:
    """Answer every request with ``status`` and ``body`` (JSON), plus ``headers``."""
    content = json.dumps(body).encode()

    async def answer(stream: trio.SocketStream, request: ReceivedRequest) -> None:
        head = {
            "content-type": "application/json",
            "content-length": str(len(content)),
            "connection": "close",
            **(headers or {}),
        }
        await stream.send_all(_head(status, head) + content)

    return answer


def sse_event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def content_chunk(text: str, model: str = "gpt-4o") -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        ],
    }


def dropping(events: Sequence[bytes], pause: float = 0.05, *, ends: bool = False) -> Answer:
    """A 200 event stream (chunked) that sends ``events`` ``pause`` s apart and then
    closes the connection mid-body (or, when ``ends``, ends the body properly)."""

    async def answer(stream: trio.SocketStream, request: ReceivedRequest) -> None:
        head = {"content-type": "text/event-stream", "transfer-encoding": "chunked"}
        await stream.send_all(_head(200, head))
        for event in events:
            await stream.send_all(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await trio.sleep(pause)
        if ends:
            await stream.send_all(b"0\r\n\r\n")
        # Otherwise no "0\r\n\r\n": the body never ends properly.

    return answer


def streaming(events: Sequence[bytes], pause: float = 0.0) -> Answer:
    """A 200 event stream (chunked) of ``events``, ended properly."""
    return dropping(events, pause, ends=True)
