"""A client that stops reading: a streamed request on a socket whose receive buffer is
small, so the server's sends soon have to wait for it.

:func:`stalled_request` sends one chat completion over a raw socket (HTTP/1.1,
``Connection: close``) and then reads nothing until the caller does, e.g. with
:func:`read_to_end`, which returns all the server sent before it closed the connection.
Used by the proxy accuracy audit (``bench/proxy_audit.py``) and the proxy accounting
tests (``tests/test_proxy_accounting.py``).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

STALL_RCVBUF = 4096


@contextlib.asynccontextmanager
async def stalled_request(
    url: str, secret: str, body: dict[str, Any], rcvbuf: int = STALL_RCVBUF
) -> AsyncIterator[trio.SocketStream]:
    """POST ``body`` to ``url``'s chat completions, then read nothing: a socket with a
    ``rcvbuf``-byte receive buffer, so the node's sends soon have to wait for its client
    (``Connection: close``: the node closes it after the answer). Closed at the end."""
    parsed = httpx.URL(url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((parsed.host, parsed.port))
    content = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parsed.host}\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n"
    )
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(head.encode() + content)
        yield stream


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)
