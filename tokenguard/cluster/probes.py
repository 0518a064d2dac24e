"""Health probes of the supervisor's children: cheap, raw, and never raising.

:func:`probe_healthz` asks a node ``GET /healthz`` (over TCP or its unix socket) and
wants its own node id back; :func:`probe_redis` asks the embedded redis-server
``PING``. Neither uses a client library, and neither raises for a network failure:
the caller bounds the time a probe takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio


async def _open_stream(target: tuple[str, int] | Path) -> trio.SocketStream:
    if isinstance(target, Path):
        return await trio.open_unix_socket(str(target))
    return await trio.open_tcp_stream(*target)


async def probe_healthz(target: tuple[str, int] | Path, node_id: int) -> bool:
    """True if ``GET /healthz`` at ``target`` (TCP address or unix socket) answers 200
    with ``"node": node_id``. A raw HTTP/1.0 exchange (so no chunked body) with no client
    library keeps probing cheap. Never raises for a network failure; the caller bounds
    the time it takes."""
    try:
        async with await _open_stream(target) as stream:
            await stream.send_all(b"GET /healthz HTTP/1.0\r\nHost: tokenguard\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
                head, found, body = data.partition(b"\r\n\r\n")
                # hypercorn keeps the connection open: the body ends at its length.
                if found and len(body) >= _content_length(head):
                    break
    except (OSError, trio.BrokenResourceError):
        return False
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or status[1] != b"200":
        return False
    try:
        return json.loads(body).get("node") == node_id
    except (ValueError, AttributeError):
        return False


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 65536  # unknown: read until the server closes


async def probe_redis(socket_path: Path) -> bool:
    """True if the redis-server on ``socket_path`` answers PING with PONG (not LOADING)."""
    try:
        async with await trio.open_unix_socket(str(socket_path)) as stream:
            await stream.send_all(b"PING\r\n")
            return (await stream.receive_some(64)).startswith(b"+PONG")
    except (OSError, trio.BrokenResourceError):
        return False
