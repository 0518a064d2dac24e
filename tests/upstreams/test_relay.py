"""The relay's pieces: what a client gets of an upstream's event stream, and when."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2

from tokenguard.errors import APIError
from tokenguard.upstreams.relay import RelayedStream, StreamMeter, StreamTally


class EveryEvent(StreamMeter):
    """Relays every event and counts what it read."""

    def __init__(self) -> None:
        self.read_events: list[bytes] = []

    def read(self, data: bytes) -> bool:
        self.read_events.append(data)
        return True

    def output_tokens(self, model: str) -> int:
        return len(self.read_events)

    def error_event(self, error: APIError) -> bytes:
        return b"data: " + repr(error.body()).encode() + b"\n\n"


def upstream_response(*reads: bytes) -> httpx2.Response:
    """An upstream's event-stream answer whose body arrives in ``reads``, one each."""

    async def body() -> AsyncIterator[bytes]:
        for read in reads:
            yield read

    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body())


async def relayed(*reads: bytes) -> tuple[list[bytes], list[StreamTally]]:
    finished: list[StreamTally] = []

    async def finish(tally: StreamTally) -> None:
        finished.append(tally)

    stream = RelayedStream(
        upstream_response(*reads), meter=EveryEvent(), finish=finish, report=lambda _: None
    )
    return [piece async for piece in stream], finished


async def test_events_that_arrive_in_one_read_are_relayed_in_one_piece() -> None:
    three = b"data: one\n\ndata: two\n\ndata: three\n\n"
    pieces, finished = await relayed(three, b"data: [DONE]\n\n")
    assert pieces == [three, b"data: [DONE]\n\n"]
    assert finished[0].complete and finished[0].meter.output_tokens("m") == 4


async def test_events_that_arrive_apart_are_relayed_apart_as_they_arrive() -> None:
    pieces, _ = await relayed(b"data: one\n\n", b"data: tw", b"o\n\n", b"data: [DONE]\n\n")
    assert pieces == [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
