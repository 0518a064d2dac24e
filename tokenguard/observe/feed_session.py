"""One websocket session of the usage feed, at ``/v1/usage/stream``.

The handshake first: a browser page of an origin not allowed is refused with an HTTP
403 (:func:`origin_allowed`). Then the bearer token: the ``Authorization`` header, or a
first ``{"type": "auth", "token": ...}`` message within ``AUTH_SECONDS`` (unauthenticated
input: refused unparsed past ``AUTH_MESSAGE_BYTES``, then read with the request bodies'
strict JSON reader). A bad token, or none in time, closes the socket with 1008 before
any event is sent. Then the events the node's :class:`~tokenguard.observe.feed.Feed`
hands this subscriber, each with an ``id`` counting up from 1 in that stream: one event
per message, or with ``?batch=1`` every pending event in one message, one per line.
A key's socket closes (1008) once its key is revoked; every socket closes with 1001
when the node shuts down. Event fields are documented in ``docs/usage-feed.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from quart import Response, Websocket

from tokenguard.bearer import bearer_token
from tokenguard.errors import APIError
from tokenguard.model import digest_of
from tokenguard.strict_json import check_text, parse_json

if TYPE_CHECKING:
    from tokenguard.observe.feed import Feed
    from tokenguard.observe.subscriber import Subscriber, Viewer

# Batched mode (`?batch=1`): one websocket message carries every event pending for the
# subscriber (newline-separated JSON), at most BATCH_MOST of them (about 100 KiB: well
# under the 1 MiB a trio-websocket client takes by default, whatever `[feed] backlog`
# is). Events come in one store message per PUBLISH_SECONDS per node, so under load
# a message carries that time's events, with no wait of its own (each websocket
# message costs the node some 40 us of CPU, mostly the socket write, whatever its size).
BATCH_MOST = 256
AUTH_SECONDS = 5.0
# The first message, before authentication, is at most this long (bytes of UTF-8): an
# auth message is ~100 bytes; anything longer is closed with 1008 unparsed.
AUTH_MESSAGE_BYTES = 4096
# hypercorn's cap on every websocket message (tokenguard.cluster.node sets it): one larger is
# closed by hypercorn with 1009 (message too big) once this much of it was buffered. A
# feed socket reads nothing but the auth message, so this only bounds the memory a
# client can make the node hold before its message is seen.
WEBSOCKET_MESSAGE_BYTES = 64 * 1024
# WebSocket close codes (RFC 6455).
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001


NO_TOKEN = "no valid bearer token"
AUTH_MESSAGE = 'the first message must be {"type": "auth", "token": "..."}'


async def _token_of(websocket: Websocket) -> tuple[str | None, str | None]:
    """The Authorization header's bearer token, else a first auth message's, and
    ``None``; or ``None`` and why there is none (two headers, a malformed header, no
    auth message in time, a first message that is not one: see
    :func:`_auth_message_token`)."""
    headers = websocket.headers.getlist("Authorization")
    if len(headers) > 1:
        return None, NO_TOKEN
    if headers:
        token = bearer_token(headers[0])
        return token, None if token else NO_TOKEN
    with trio.move_on_after(AUTH_SECONDS):
        return _auth_message_token(await websocket.receive())
    return None, NO_TOKEN


def _auth_message_token(raw: str | bytes) -> tuple[str | None, str | None]:
    """The token of a first message ``{"type": "auth", "token": "..."}``, or why not.

    Unauthenticated input: refused unread past :data:`AUTH_MESSAGE_BYTES`, then read
    with the request bodies' strict JSON reader (:func:`tokenguard.strict_json.parse_json`:
    no deep nesting, duplicate keys, lone surrogates...), never raising."""
    if len(raw) > AUTH_MESSAGE_BYTES:
        return None, f"the first message is longer than {AUTH_MESSAGE_BYTES} bytes"
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > AUTH_MESSAGE_BYTES:
        return None, f"the first message is longer than {AUTH_MESSAGE_BYTES} bytes"
    try:
        message = parse_json(data)
    except APIError:
        return None, "the first message is not valid JSON"
    if not isinstance(message, Mapping) or message.get("type") != "auth":
        return None, AUTH_MESSAGE
    token = message.get("token")
    if not isinstance(token, str) or not token:
        return None, AUTH_MESSAGE
    try:
        check_text(token, "token")
    except APIError:
        return None, "the token is not valid Unicode"
    return token, None


def origin_allowed(origins: Sequence[str], host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a handshake with these ``Origin`` headers may open the feed: none (not a
    browser: ``tokenguard watch``, scripts), or one that is the node's own origin (its
    ``host[:port]`` is the request's ``Host``) or in ``allowed`` (lower-case
    ``scheme://host[:port]``). Two ``Origin`` headers, or ``null``, are refused."""
    if not origins:
        return True
    if len(origins) > 1:
        return False
    origin = origins[0].strip().lower().rstrip("/")
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    return (
        parts.scheme in ("http", "https")
        and bool(parts.netloc)
        and host is not None
        and parts.netloc == host.strip().lower()
    )


def _refusal(error: APIError) -> Response:
    body = json.dumps(error.body(), ensure_ascii=False, separators=(",", ":"))
    return Response(body, status=error.status, content_type="application/json")


async def serve_websocket(feed: Feed, websocket: Websocket) -> Response | None:
    """One subscriber's session, from the handshake until it or the node leaves.

    Refused before the handshake completes (an HTTP 403 with OpenAI's error body, which
    the handler must return): a browser page of an origin not allowed
    (:func:`origin_allowed`; ``[feed] allowed_origins``), so no other site's page can
    ride a user's token. Refused after it (1008, nothing else sent): no token, a bad
    one, a filter it may not use, a ``batch`` that is neither ``0`` nor ``1``.
    Accepted: a ``ready`` message, then events, ``lagged`` when some were dropped for
    it; on node shutdown the socket closes with 1001.

    By default each message carries one event. With ``?batch=1`` each message carries
    every event pending for the subscriber when it is taken (at most ``BATCH_MOST``),
    newline-separated, a ``lagged`` first when there is one, each with its own ``id``.
    """
    origins = websocket.headers.getlist("Origin")
    if not origin_allowed(origins, websocket.headers.get("Host"), feed.allowed_origins):
        return _refusal(
            APIError(
                403,
                f"Origin {origins[0][:200]!r} may not open the usage feed "
                "(see [feed] allowed_origins).",
                code="origin_not_allowed",
            )
        )
    await websocket.accept()
    accepted = await _authenticate(feed, websocket)
    if accepted is None:
        return None
    viewer, token, batched = accepted
    # A key's socket closes (1008) once the keyring sees its key revoked; the admin
    # token comes from the config and is never revoked.
    revocation = (
        feed.keyring.watching(digest_of(token))
        if viewer.role == "key" and token is not None
        else nullcontext(trio.Event())
    )
    with feed.subscription(viewer) as subscriber, revocation as revoked:
        async with trio.open_nursery() as nursery:

            async def discard_incoming() -> None:
                # Read (and ignore) what the client sends, so a disconnect is noticed
                # and quart's bounded receive queue never fills.
                while True:
                    await websocket.receive()

            async def close_on(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(discard_incoming)
            nursery.start_soon(close_on, feed.closing)
            nursery.start_soon(close_on, revoked)
            await _send_events(feed, websocket, subscriber, viewer, batched)
    if revoked.is_set():
        await websocket.close(CLOSE_POLICY, "API key revoked")
        return None
    # Only reached on shutdown: a client that left cancels the whole handler.
    await websocket.close(CLOSE_GOING_AWAY, "node shutting down")
    return None


async def _authenticate(feed: Feed, websocket: Websocket) -> tuple[Viewer, str | None, bool] | None:
    """The accepted socket's viewer, its token and whether it asked for batches; or
    ``None`` once the socket was closed with 1008 (no token, a bad one, a filter it may
    not use, a ``batch`` that is neither ``0`` nor ``1``)."""
    token, problem = await _token_of(websocket)
    key_filter = websocket.args.get("key") or None
    batch = websocket.args.get("batch", "0")
    viewer = (problem or NO_TOKEN) if token is None else feed.viewer_for(token, key_filter)
    if not isinstance(viewer, str) and batch not in ("0", "1"):
        viewer = "batch must be 0 or 1"
    if isinstance(viewer, str):
        if problem is not None:
            feed.refused_unauthenticated(problem)
        await websocket.close(CLOSE_POLICY, viewer)
        return None
    return viewer, token, batch == "1"


async def _send_events(
    feed: Feed, websocket: Websocket, subscriber: Subscriber, viewer: Viewer, batched: bool
) -> None:
    """``ready``, then the subscriber's events (and ``lagged`` counts) until cancelled,
    each message numbered with this stream's next ``id``."""
    next_id = 1

    def numbered(body: str) -> str:
        # An encoded event, `{"type":...}`, with this stream's next id put first.
        nonlocal next_id
        text = f'{{"id":{next_id},{body[1:]}'
        next_id += 1
        return text

    def control(event: dict[str, Any]) -> str:
        return numbered(json.dumps(feed.stamped(event), ensure_ascii=False, separators=(",", ":")))

    # Every node publishes before `ready`: events after it are all delivered.
    await feed.announced()
    await websocket.send(
        control({"type": "ready", "role": viewer.role, "key": viewer.key, "batch": batched})
    )
    if batched:
        while True:
            dropped, bodies = await subscriber.take(BATCH_MOST)
            lines = [control({"type": "lagged", "dropped": dropped})] if dropped else []
            lines += map(numbered, bodies)
            await websocket.send("\n".join(lines))
    else:
        while True:
            dropped, bodies = await subscriber.take()
            if dropped:
                await websocket.send(control({"type": "lagged", "dropped": dropped}))
            for body in bodies:
                await websocket.send(numbered(body))
