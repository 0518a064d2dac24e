"""A deadline on each part of a streamed answer: a client that stops reading is cut.

A relayed stream goes at its client's pace: hypercorn's send of a body part returns once
the client's socket took the bytes, and waits, shielded from cancellation, while the
client reads nothing and the socket's buffers are full. Without a deadline a client that
stops reading would hold its request forever, and with it, in proxy mode, its upstream
connection and its key's share of the pool. A handler puts the stream's deadline in the
ASGI scope (:func:`limit_sends`, with the route's ``client_idle_timeout``);
:meth:`SendDeadlines.wrap` then watches every ``http.response.body`` send of that
response, and :meth:`SendDeadlines.run` (a task of the app's) cuts the connection of any
send that waited longer, as if the client had hung up.

How it cuts: cancelling the waiting send cannot work (hypercorn shields it), and the
app cannot raise out of it either. So it ends the response the way hypercorn ends one
whose app has returned: it calls the server's own ``send`` with ``None`` (hypercorn
0.17-0.18: ``HTTPStream.app_send(None)``), which closes the stream, tells the app
``http.disconnect`` and closes the socket; the waiting send then returns, and the
handler is cancelled as for any client that left (quart-trio cancels it on
``http.disconnect``), so the stream's own close runs: settlement, the upstream response,
the key's slot. ``tests/test_proxy_accounting.py`` checks this over real sockets, so a
hypercorn that changes it fails them.

Guarantees:

* A send that has waited ``seconds`` is cut within :data:`TICK` more (one watchdog task
  checks the sends in progress every tick); sends that complete cost two dictionary
  operations, nothing else.
* Only responses whose handler set a deadline are watched, only while :meth:`run` runs;
  anything else is sent as it is.
* ``on_stall`` (if set) is called once per cut response, with its scope.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio
from quart import request

from tokenguard.log_throttle import LogThrottle
from tokenguard.observe.logs import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tokenguard.api.send_deadline")

SEND_DEADLINE = "tokenguard.api.send_deadline"  # scope key: seconds a body send may wait
TICK = 0.25  # how often the watchdog looks at the sends in progress
CUT_SECONDS = 5.0  # cutting a connection never takes the watchdog longer


def limit_sends(seconds: float) -> None:
    """Cut the current request's response when one of its sends waits ``seconds`` for
    the client."""
    request.scope[SEND_DEADLINE] = seconds


@attrs.define(eq=False)
class _Waiting:
    """A body send in progress: when it must be done by, and the server's send."""

    deadline: float
    seconds: float
    send: Send
    scope: Scope
    cut: bool = False


class SendDeadlines:
    """The send deadlines of one app (see the module docstring)."""

    def __init__(self, on_stall: Callable[[Scope], None] | None = None) -> None:
        self.on_stall = on_stall
        self.stalls = 0
        self._waiting: set[_Waiting] = set()
        self._running = False
        self._serving = trio.CancelScope()
        self._log = LogThrottle()

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` with its streamed answers' body sends under their deadline. It must
        be the outermost wrapper: it holds the server's own ``send``."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_in_time(message: Message) -> None:
                seconds = scope.get(SEND_DEADLINE)
                if seconds is None or not self._running or message["type"] != "http.response.body":
                    await send(message)
                    return
                waiting = _Waiting(trio.current_time() + seconds, seconds, send, scope)
                self._waiting.add(waiting)
                try:
                    await send(message)
                finally:
                    self._waiting.discard(waiting)

            await app(scope, receive, send_in_time)

        return guarded

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the sends in progress until cancelled or :meth:`stop`."""
        async with trio.open_nursery() as nursery:
            with self._serving:
                self._running = True
                task_status.started()
                try:
                    while True:
                        await trio.sleep(TICK)
                        now = trio.current_time()
                        for waiting in [w for w in self._waiting if w.deadline <= now]:
                            if not waiting.cut:
                                waiting.cut = True
                                nursery.start_soon(self._cut, waiting)
                finally:
                    self._running = False

    def stop(self) -> None:
        self._serving.cancel()

    async def _cut(self, waiting: _Waiting) -> None:
        """End the response of a send that waited too long, and close its connection."""
        self.stalls += 1
        if self.on_stall is not None:
            self.on_stall(waiting.scope)
        held = self._log.ready()
        if held is not None:
            log.info(
                "a client took no bytes of its stream for %g s: connection closed "
                "(%d more since the last line)",
                waiting.seconds,
                held,
            )
        with trio.CancelScope(shield=True), trio.move_on_after(CUT_SECONDS):
            await waiting.send(None)  # type: ignore[arg-type]  # hypercorn: the app is done
