"""How answers leave the node: JSON bodies, event streams, and headers added below quart.

* An admitted answer's rate-limit headers skip werkzeug's ``Headers``: validating,
  storing and re-encoding a dozen headers there cost about as much as admitting the
  request. :func:`stash_headers` leaves them in the ASGI scope, already encoded, and the
  :func:`send_stashed_headers` wrapper adds them to the response's start message. An
  error answer drops them (:func:`drop_stashed_headers`: it sends its own).
* A relayed upstream stream waits in the ASGI scope until its response is over, and the
  :func:`close_relayed_stream` wrapper closes it then: quart closes a response body it
  iterated, but not one it never reached (a client that left while the headers were
  going out), and the upstream response, the key's slot of the pool and the settlement
  must follow however the request ended.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Mapping
from typing import Any, Protocol

from quart import Response, has_request_context, request

from tokenguard.observe.logs import ASGIApp, Message, Receive, Scope, Send

STASHED_HEADERS = "tokenguard.ratelimit_headers"
QUEUED_MS = "tokenguard.queued_ms"
QUEUED_MS_HEADER = b"x-tokenguard-queued-ms"
RELAYED_STREAM = "tokenguard.relayed_stream"


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A compact JSON answer."""
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status=status,
        headers=dict(headers or {}),
        content_type="application/json",
    )


def event_stream(events: AsyncIterable[bytes], headers: Mapping[str, str]) -> Response:
    """A server-sent-events answer, sent as ``events`` yields (never buffered)."""
    response = Response(
        events, headers={**headers, "cache-control": "no-cache"}, content_type="text/event-stream"
    )
    response.timeout = None  # an LLM stream may run for minutes
    return response


def stash_headers(fields: list[tuple[bytes, bytes]]) -> None:
    """Send ``fields`` (ASGI header pairs) with this request's response, whatever
    builds it."""
    request.scope[STASHED_HEADERS] = fields


def stash_queued_ms(ms: int) -> None:
    """Send ``x-tokenguard-queued-ms: ms`` with this request's response, whatever builds
    it (an error answer after the admission too: the request did wait)."""
    request.scope[QUEUED_MS] = ms


def drop_stashed_headers() -> None:
    if has_request_context():  # (a websocket's handshake has no rate-limit headers)
        request.scope.pop(STASHED_HEADERS, None)


def send_stashed_headers(app: ASGIApp) -> ASGIApp:
    """``app`` whose HTTP responses carry the headers :func:`stash_headers` left."""

    async def sending(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_stashed(message: Message) -> None:
            if message["type"] == "http.response.start":
                stashed = scope.pop(STASHED_HEADERS, None)
                queued = scope.pop(QUEUED_MS, None)
                if queued is not None:
                    stashed = [*(stashed or ()), (QUEUED_MS_HEADER, b"%d" % queued)]
                if stashed:
                    message = {**message, "headers": [*message["headers"], *stashed]}
            await send(message)

        await app(scope, receive, send_with_stashed)

    return sending


class Closable(Protocol):
    async def aclose(self) -> None: ...


def keep_relayed_stream(stream: Closable) -> None:
    """Have this request's relayed ``stream`` closed once the app is done with it."""
    request.scope[RELAYED_STREAM] = stream


def close_relayed_stream(app: ASGIApp) -> ASGIApp:
    """``app`` whose relayed stream (if a handler kept one, :func:`keep_relayed_stream`)
    is closed once the app is done with the request, however it ended (idempotent: a
    stream quart closed already is left as it is)."""

    async def closing(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        finally:
            stream = scope.pop(RELAYED_STREAM, None)
            if stream is not None:
                await stream.aclose()  # shielded inside

    return closing
