"""HTTP-level defences: request framing, header size, and OpenAI-shaped protocol errors.

* :func:`check_request_framing` (the app's first ``before_request``): a request with
  both ``Content-Length`` and ``Transfer-Encoding`` is refused with a 400 (h11 would
  follow ``Transfer-Encoding``; a proxy in front that followed ``Content-Length``
  would see another request: request smuggling); headers larger than
  ``MAX_HEADER_BYTES`` in all are refused with a 431. Both before the body is read or
  the key is looked up.
* :func:`install_protocol_errors`: hypercorn answers an HTTP request it cannot parse
  (a malformed request line, headers trickled past ``h11_max_incomplete_size``, an
  unsupported transfer coding) itself, before the app runs, with an empty body. This
  gives those answers OpenAI's error body too, so every error a client can receive
  from tokenguard has one shape. It replaces one method of hypercorn's h11 protocol
  (``H11Protocol._send_error_response``, hypercorn 0.17-0.18); the hostile-input tests
  check it over real sockets, so a hypercorn that changes it fails them.
* :func:`install_shielded_recycle`: hypercorn recycles (or closes) an HTTP/1.1
  connection from inside the app's own task, right after telling the app the client is
  done; quart-trio cancels that task as soon as the message arrives, so the close could
  be abandoned halfway: a response sent before the request body was fully read (a 401
  to a request with a large body) then left the connection open and deaf, and the
  client's next request on it hung. The recycle now runs shielded
  (``test_early_errors_keep_a_pooled_connection_usable``).
* :data:`KEEP_ALIVE_TIMEOUT`, :data:`BODY_TIMEOUT`: the node's slow-client bounds (see
  ``docs/reliability.md``). hypercorn's idle timer runs from a connection's start until
  a complete request head arrives, so a client trickling its headers (slowloris) is
  cut after ``KEEP_ALIVE_TIMEOUT``, like an idle one; a body must arrive within
  ``BODY_TIMEOUT`` (quart answers 408). There is no read timeout: a client receiving a
  minutes-long stream sends nothing meanwhile, and must not be cut.
"""

from __future__ import annotations

import json
from typing import Any

import h11
import trio
from quart import Response, request

from tokenguard.errors import APIError, invalid

# How long hypercorn's handing of the end of a request to the app may take, shielded.
RECYCLE_TIMEOUT = 5.0
MAX_HEADER_BYTES = 16 * 1024  # all header names and values of a request together
KEEP_ALIVE_TIMEOUT = 75  # seconds; longer than typical client pools keep sockets idle
BODY_TIMEOUT = 30  # seconds for a whole request body to arrive

PROTOCOL_ERROR_MESSAGES = {
    400: "The request is not valid HTTP/1.1.",
    413: "The request is too large.",
    431: f"The request headers are larger than the limit of {MAX_HEADER_BYTES} bytes.",
    501: "The request uses a transfer coding that is not supported (only chunked).",
}
# h11 says 501 for an unsupported transfer coding: the client's doing, so a 4xx (no
# answer of tokenguard's is a 5xx unless tokenguard itself failed).
PROTOCOL_ERROR_STATUS = {501: 400}


async def check_request_framing() -> None:
    """Refuse ambiguous framing and oversized headers (a ``before_request`` hook)."""
    headers = request.headers
    if "Content-Length" in headers and "Transfer-Encoding" in headers:
        raise invalid(
            "send either Content-Length or Transfer-Encoding, not both",
            code="invalid_framing",
        )
    size = sum(len(name) + len(value) + 4 for name, value in headers.items())
    if size > MAX_HEADER_BYTES:
        raise APIError(
            431,
            f"The request headers ({size} bytes) are larger than the limit of "
            f"{MAX_HEADER_BYTES} bytes.",
            code="headers_too_large",
        )


async def drain_request_body(response: Response) -> Response:
    """Read what is left of the request body, if it fits the cap, before the answer
    goes out (an ``after_request`` hook of every app; a body already read costs
    nothing).

    An answer given before the body was read (a 401 on a large body) would otherwise
    make hypercorn close the connection, and a client that reuses it for its next
    request (every pooled client: httpx, the openai SDK) gets "server disconnected"
    instead of its answer. A body over the cap is never read: that connection closes.
    """
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        with trio.move_on_after(BODY_TIMEOUT):
            try:
                await request.body
            except Exception:  # noqa: BLE001 - too large or cut off: the connection closes
                pass
    return response


def protocol_error_body(status_code: int) -> bytes:
    message = PROTOCOL_ERROR_MESSAGES.get(status_code, "The request could not be parsed.")
    error = APIError(status_code, message, code="invalid_http")
    return json.dumps(error.body(), separators=(",", ":")).encode()


async def _send_error_response(self: object, status_code: int) -> None:
    """hypercorn's own protocol-error answer, with OpenAI's error body."""
    body = protocol_error_body(status_code)
    status_code = PROTOCOL_ERROR_STATUS.get(status_code, status_code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),  # type: ignore[attr-defined]
    ]
    send = self._send_h11_event  # type: ignore[attr-defined]
    await send(h11.Response(status_code=status_code, headers=headers))
    await send(h11.Data(data=body))
    await send(h11.EndOfMessage())


def install_protocol_errors() -> None:
    """Give hypercorn's HTTP/1.1 protocol errors OpenAI's body (idempotent)."""
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_send_error_response", None) is not _send_error_response:
        H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]


async def _maybe_recycle(self: object) -> None:
    """hypercorn's ``H11Protocol._maybe_recycle`` (0.17-0.18), shielded from the
    cancellation of the app task it runs in (see the module docstring)."""
    from hypercorn.events import Closed, Updated

    this: Any = self
    with trio.CancelScope(shield=True):
        with trio.move_on_after(RECYCLE_TIMEOUT):
            await this._close_stream()
        connection = this.connection
        if (
            not this.context.terminated.is_set()
            and connection.our_state is h11.DONE
            and connection.their_state is h11.DONE
        ):
            try:
                connection.start_next_cycle()
            except h11.LocalProtocolError:
                await this.send(Closed())
            else:
                this.response = None
                this.scope = None
                await this.can_read.set()
                await this.send(Updated(idle=True))
        else:
            await this.can_read.set()
            await this.send(Closed())


def install_shielded_recycle() -> None:
    """Make hypercorn's HTTP/1.1 connection recycling uncancellable (idempotent)."""
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_maybe_recycle", None) is not _maybe_recycle:
        H11Protocol._maybe_recycle = _maybe_recycle  # type: ignore[method-assign]
