"""The client of ``python -m bench streams``: one process holding many chat streams open.

``python -m bench.streams_client SPEC`` (SPEC is JSON: :class:`ClientSpec`) opens
``streams`` chat-completion streams, one TCP connection each, their starts spread
evenly over ``ramp`` seconds from ``start_at`` (``time.monotonic()``, shared by the
processes of one machine), reads every one to its end, and prints one JSON object
(:class:`ClientResult`) on stdout. It speaks HTTP/1.1 on raw trio sockets and reads no
JSON on the hot path (it counts token events by their bytes), so that it costs far less
per event than the server it measures; the benchmark still reports its CPU.

What it measures, per stream: the time from the start of its connect to its first token
event (TTFT), and every gap between two token events' arrivals (tokens that arrive in
one read count as gaps of 0 after the first). An error is named by its kind:
``connect:<errno>``, ``reset`` (the peer reset the connection), ``http_<status>``,
``error_event`` (the server ended the stream with an error event),
``closed_before_answer`` (the server closed the connection before its answer's head: an
overloaded hypercorn does so once a connection waited ``keep_alive_timeout`` for its
request to be read), ``truncated`` (the connection closed after the head, before
``data: [DONE]``), ``timeout``.
"""

from __future__ import annotations

import errno
import json
import sys
import time
from collections import Counter
from typing import Any

import attrs
import trio

# A chat token event: its delta carries content (the opening event's role delta does not).
TOKEN = b'"delta":{"content":"'
DONE = b"data: [DONE]"
ERROR = b'"error":'
GAP_RESOLUTION = 1e-4  # gaps are kept as a histogram of 0.1 ms steps


@attrs.frozen
class ClientSpec:
    host: str
    port: int
    streams: int
    start_at: float
    ramp: float
    max_tokens: int
    models: tuple[str, ...]
    keys: tuple[str, ...]
    first_id: int = 0  # request ids of this client: first_id, first_id + 1, ...
    timeout: float = 300.0


@attrs.define
class ClientResult:
    ttfts: list[float] = attrs.field(factory=list)
    gaps: Counter[int] = attrs.field(factory=Counter)  # GAP_RESOLUTION steps -> count
    tokens: int = 0
    completed: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    starts: dict[int, float] = attrs.field(factory=dict)  # request id -> time.monotonic()


def chat_request(spec: ClientSpec, request_id: int) -> bytes:
    """The HTTP request of stream ``request_id``: its key and id named in the prompt,
    so an honest upstream's ledger says whom it billed (bench/fake_upstream/)."""
    key = spec.keys[request_id % len(spec.keys)]
    model = spec.models[request_id % len(spec.models)]
    name = key.rsplit("-", 1)[-1]
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": spec.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": f"tokenguard-key: {name} tokenguard-request: {request_id} "
                    "Tell me a long story.",
                }
            ],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {spec.host}\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def one_stream(spec: ClientSpec, request_id: int, result: ClientResult) -> None:
    """Open, read and time one stream; record its TTFT, gaps, tokens, or error."""
    started = time.monotonic()
    result.starts[request_id] = started
    try:
        stream = await trio.open_tcp_stream(spec.host, spec.port)
    except OSError as exc:
        result.errors[f"connect:{errno.errorcode.get(exc.errno or 0, 'error')}"] += 1
        return
    try:
        async with stream:
            await stream.send_all(chat_request(spec, request_id))
            kind = await _read_stream(stream, started, result)
    except (trio.BrokenResourceError, ConnectionError, OSError):
        kind = "reset"
    if kind is None:
        result.completed += 1
    else:
        result.errors[kind] += 1


async def _read_stream(
    stream: trio.SocketStream, started: float, result: ClientResult
) -> str | None:
    """Read an answer to its end: ``None`` if it streamed to ``[DONE]``, else the error's
    kind (see the module docstring)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return "closed_before_answer"
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        return f"http_{status}"
    last: float | None = None
    tail = b""
    chunk = rest
    while True:
        now = time.monotonic()
        window = tail + chunk
        count = window.count(TOKEN)
        if count:
            if last is None:
                result.ttfts.append(now - started)
            else:
                result.gaps[round((now - last) / GAP_RESOLUTION)] += 1
            result.gaps[0] += count - 1
            result.tokens += count
            last = now
        if ERROR in window:
            return "error_event"
        if DONE in window:
            return None
        tail = window[-(len(TOKEN) - 1) :]
        chunk = await stream.receive_some(65536)
        if not chunk:
            return "truncated"


async def run_client(spec: ClientSpec) -> ClientResult:
    result = ClientResult()
    step = spec.ramp / max(1, spec.streams)
    now = time.monotonic()

    async def delayed(index: int) -> None:
        await trio.sleep(max(0.0, spec.start_at + index * step - now))
        await one_stream(spec, spec.first_id + index, result)

    with trio.move_on_after(spec.timeout) as scope:
        async with trio.open_nursery() as nursery:
            for index in range(spec.streams):
                nursery.start_soon(delayed, index)
    if scope.cancelled_caught:
        missing = spec.streams - result.completed - sum(result.errors.values())
        result.errors["timeout"] += missing
    return result


def result_json(result: ClientResult) -> dict[str, Any]:
    data = attrs.asdict(result)
    data["gaps"] = {str(k): v for k, v in result.gaps.items()}
    data["starts"] = {str(k): v for k, v in result.starts.items()}
    return data


def main(argv: list[str]) -> int:
    spec_data = json.loads(argv[0])
    spec = ClientSpec(
        **{**spec_data, "models": tuple(spec_data["models"]), "keys": tuple(spec_data["keys"])}
    )
    result = trio.run(run_client, spec)
    json.dump(result_json(result), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
