"""Relaying an upstream's event stream to the client, and metering what it spent.

A :class:`RelayedStream` is the client's side of an upstream's server-sent events: an
async iterator of SSE events (bytes, each ending in a blank line), yielded as they
arrive, never buffered (the events one read brought are yielded together). What the
events mean is the dialect's business: a :class:`StreamMeter` reads each one (the text
it generated, the usage it reports, whether the client gets it), so one relay serves
every API.

Guarantees:

* Everything the upstream sent is metered as it is read, whether the client took it or
  not: the client pays for what the upstream generated.
* A timeout or a broken connection mid-stream ends the stream with an error event in
  the dialect's shape (:meth:`StreamMeter.error_event`), and is recorded in the tally.
* Under ``drain`` a read of the upstream is never cut by a cancellation (the client
  leaving while the node waits for the upstream's next bytes): it ends, then the
  cancellation takes effect, so the drain reads on from where the relay stopped.
* :meth:`RelayedStream.aclose` (idempotent; quart calls it however the response ends)
  is shielded: if the upstream had not finished (the client left, or was cut for
  stalling) it drains it first when ``drain_seconds`` is set (reading on, relaying
  nothing, for at most that long), then closes the upstream response, releases the
  key's slot of the pool and awaits ``finish(tally)``, exactly once.
"""

from __future__ import annotations

import abc
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import httpx2
import trio

from tokenguard.errors import APIError
from tokenguard.upstreams.usage import ReportedUsage

CLOSE_SECONDS = 5.0  # closing an upstream response never holds a request longer


class StreamMeter(abc.ABC):
    """Reads one relayed stream's events for its dialect. ``usage`` is the last usage
    the stream reported (``None`` while none came)."""

    usage: ReportedUsage | None = None

    @abc.abstractmethod
    def read(self, data: bytes) -> bool:
        """Read one event's data (its ``data:`` lines joined); True if the client gets
        the event, False to drop it (a usage report the client did not ask for)."""

    @abc.abstractmethod
    def output_tokens(self, model: str) -> int:
        """The output tokens of the text the stream carried, counted by tokenguard."""

    @abc.abstractmethod
    def error_event(self, error: APIError) -> bytes:
        """A whole SSE event (ending in a blank line) that tells the client the stream
        broke, in the dialect's shape."""


@attrs.define
class StreamTally:
    """How a relayed stream went: the dialect's ``meter``; whether the upstream's body
    ``ended``; the ``failure`` (``"timeout"``/``"dropped"``) that ended it early, if
    any; whether the client left (or was cut) before the end (``client_gone``)."""

    meter: StreamMeter
    ended: bool = False
    failure: str | None = None
    client_gone: bool = False

    @property
    def complete(self) -> bool:
        """The upstream's body ended without a failure: all it generated was seen."""
        return self.ended and self.failure is None

    @property
    def usage(self) -> ReportedUsage | None:
        return self.meter.usage


def event_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object an event's data holds; ``None`` when it holds something else (a
    meter reads upstream bytes defensively: odd events are relayed, not metered)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), ``None`` if it has none."""
    lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


class RelayedStream:
    """The client's side of an upstream event stream (see the module docstring)."""

    def __init__(
        self,
        response: httpx2.Response,
        *,
        meter: StreamMeter,
        finish: Callable[[StreamTally], Awaitable[None]],
        report: Callable[[str], None],
        release: Callable[[], None] = lambda: None,
        drain_seconds: float | None = None,
    ) -> None:
        self.tally = StreamTally(meter)
        self._response = response
        self._chunks: AsyncIterator[bytes] = response.aiter_bytes()
        self._finish = finish
        self._report = report
        self._release = release
        self._drain_seconds = drain_seconds
        self._buffer = b""
        self._ready: deque[bytes] = deque()
        self._closed = False

    def __aiter__(self) -> RelayedStream:
        return self

    async def __anext__(self) -> bytes:
        """Every whole event read and not yet relayed, in one piece: events that arrived
        together leave in one write, so a node that falls behind catches up in fewer,
        larger sends (one system call per event was a third of its relaying cost)."""
        while not self._ready:
            if self.tally.ended or self._closed:
                await self.aclose()
                raise StopAsyncIteration
            await self._read()
        if len(self._ready) == 1:
            return self._ready.popleft()
        events = b"".join(self._ready)
        self._ready.clear()
        return events

    async def _read(self) -> None:
        try:
            if self._drain_seconds is None:
                chunk = await self._chunks.__anext__()
            else:
                # A read cancelled mid-way closes the upstream response (httpcore does),
                # and the drain could then read nothing on: the key would pay what was
                # relayed, not what the upstream billed. So the read ends first (the next
                # bytes, or the read timeout, the drain's own bound), then the cancel.
                with trio.CancelScope(shield=True):
                    chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.tally.ended = True
            if self._buffer.strip():
                self._consider(self._buffer.rstrip(b"\n"))
            self._buffer = b""
            return
        except httpx2.HTTPError as exc:
            self._broke(isinstance(exc, httpx2.TimeoutException))
            return
        self._buffer += chunk
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            if event.strip():
                self._consider(event)

    def _broke(self, timed_out: bool) -> None:
        """The upstream stopped mid-stream: record it, and tell the client."""
        self.tally.ended = True
        self.tally.failure = "timeout" if timed_out else "dropped"
        what = "stopped sending (read timeout)" if timed_out else "closed the connection"
        code = "upstream_timeout" if timed_out else "upstream_unavailable"
        message = f"The upstream server {what} in the middle of the stream."
        error = APIError(502, message, "server_error", code=code)
        self._ready.append(self.tally.meter.error_event(error))

    def _consider(self, event: bytes) -> None:
        """Meter one event, and queue it for the client unless the meter drops it."""
        data = sse_data(event)
        if data is None or self.tally.meter.read(data):
            self._ready.append(event + b"\n\n")

    async def _drain(self, seconds: float) -> None:
        """Read the upstream on to its end, relaying nothing, for at most ``seconds``."""
        with trio.move_on_after(seconds):
            while not self.tally.ended:
                self._ready.clear()
                await self._read()
        self._ready.clear()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if not self.tally.ended:
                self.tally.client_gone = True
                if self._drain_seconds is not None:
                    await self._drain(self._drain_seconds)
            if self.tally.failure is not None:
                outcome = self.tally.failure
            elif self.tally.client_gone:
                outcome = "client_closed"
            else:
                outcome = "ok"
            with trio.move_on_after(CLOSE_SECONDS):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            await close_response(self._response)
            self._release()
            self._report(outcome)
            await self._finish(self.tally)


async def close_response(response: httpx2.Response) -> None:
    """Close an upstream response, shielded and bounded: a cancelled request still
    returns its connection (or drops it), and closing never hangs the request."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
        await response.aclose()
