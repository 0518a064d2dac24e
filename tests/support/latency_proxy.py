"""A TCP proxy for the tests, in trio: slows, stalls, drops and resets connections.

Put it between a node and Redis (``redis://127.0.0.1:<proxy.port>/0``) to play a slow
or flaky network. It listens on 127.0.0.1, port 0 (a free one), and forwards every
connection to ``upstream``. Settings can be changed while it runs:

* ``latency`` and ``jitter`` (seconds): every chunk from upstream reaches the client
  ``latency ± jitter`` later (uniformly; never reordered), so each Redis round trip
  takes that much longer;
* ``stalled``: nothing is forwarded (in either direction) while set: a hung server
  whose sockets stay open;
* ``refusing``: new connections are closed at once (a dead server, as close as a
  proxy can play it: connection closed instead of refused);
* :meth:`reset_all`: every open connection is reset (RST, ``SO_LINGER`` 0), both sides.

``connections`` is the number open now, ``max_connections`` the most at once, and
``accepted`` how many were ever taken: the tests use them to show that nothing piles
up. Use it as ``async with running_proxy(("127.0.0.1", port)) as proxy``; everything it
opened is closed when the block ends.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

CHUNK = 65536


@attrs.define(eq=False)
class LatencyProxy:
    upstream: tuple[str, int]
    latency: float = 0.0
    jitter: float = 0.0
    stalled: bool = False
    refusing: bool = False
    seed: int = 0
    port: int = 0
    connections: int = 0
    max_connections: int = 0
    accepted: int = 0
    _streams: set[trio.SocketStream] = attrs.field(factory=set)
    _unstalled: trio.Event = attrs.field(factory=trio.Event)
    _rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stall(self) -> None:
        self.stalled = True
        self._unstalled = trio.Event()

    def resume(self) -> None:
        self.stalled = False
        self._unstalled.set()

    def reset_all(self) -> None:
        """Reset every open connection, client and upstream side (RST, not FIN)."""
        for stream in list(self._streams):
            try:
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
            stream.socket.close()
        self._streams.clear()

    def _delay(self) -> float:
        if not self.jitter:
            return self.latency
        return max(0.0, self.latency + self._rng.uniform(-self.jitter, self.jitter))

    async def _wait_unstalled(self) -> None:
        while self.stalled:
            await self._unstalled.wait()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, delayed: bool
    ) -> None:
        """Copy ``source`` to ``sink`` until either side closes; with ``delayed``, each
        chunk after its latency, in order (a chunk never overtakes the one before it)."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](1000)
        gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

        async def deliver() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await self._wait_unstalled()
                    try:
                        await sink.send_all(data)
                    except gone:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            async with send:
                last_due = 0.0
                while True:
                    try:
                        data = await source.receive_some(CHUNK)
                    except gone:
                        break
                    if not data:
                        break
                    await self._wait_unstalled()
                    due = trio.current_time() + (self._delay() if delayed else 0.0)
                    last_due = max(last_due, due)
                    await send.send((last_due, data))

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if self.refusing:
            await client.aclose()
            return
        try:
            upstream = await trio.open_tcp_stream(*self.upstream)
        except OSError:
            await client.aclose()
            return
        self._streams.update((client, upstream))
        self.connections += 1
        self.max_connections = max(self.max_connections, self.connections)
        try:
            async with trio.open_nursery() as nursery:

                async def one_way(
                    a: trio.SocketStream, b: trio.SocketStream, delayed: bool
                ) -> None:
                    await self._pump(a, b, delayed)
                    nursery.cancel_scope.cancel()  # one side closed: close both

                nursery.start_soon(one_way, client, upstream, False)
                nursery.start_soon(one_way, upstream, client, True)
        finally:
            self.connections -= 1
            self._streams.difference_update((client, upstream))
            for stream in (client, upstream):
                with trio.CancelScope(shield=True):
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass


@asynccontextmanager
async def running_proxy(
    upstream: tuple[str, int], *, latency: float = 0.0, jitter: float = 0.0, seed: int = 0
) -> AsyncIterator[LatencyProxy]:
    """A :class:`LatencyProxy` to ``upstream`` on a free port of 127.0.0.1."""
    proxy = LatencyProxy(upstream=upstream, latency=latency, jitter=jitter, seed=seed)
    proxy._unstalled.set()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
