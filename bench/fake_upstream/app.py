"""The ASGI app of one fake upstream: its routes, and the ledger of what it billed.

* **The ledger** (``GET /ledger``, JSON): one entry per accepted request, in arrival
  order: the tokenguard key it is for (the ``NAME`` of a ``tokenguard-key: NAME`` text
  anywhere in the request, e.g. a system message; a proxy forwards only its own
  credential), the client's request id (``tokenguard-request: ID``), the input and
  output tokens billed (output grows as tokens are generated), when it started and
  ended (``time.monotonic()``, comparable across processes of one machine, and wall
  clock), whether generation is done and whether the client left before the end.
  Refused requests (400) are not billed and not in the ledger.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import attrs
import trio

from bench.fake_upstream.answers import error_body, send_json, stream_answer, whole_answer
from bench.fake_upstream.asks import (
    ASKERS,
    CHAT_PATH,
    COMPLETIONS_PATH,
    DEFAULT_CONTEXT_TOKENS,
    FLAVOURS,
    Refused,
    billed_input,
)
from bench.fake_upstream.generation import UNPACED, Generation, LedgerEntry, Pacing
from tokenguard.observe.logs import Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024 * 1024
KEY_MARK = re.compile(rb"tokenguard-key: ([A-Za-z0-9_.:-]+)")
REQUEST_MARK = re.compile(rb"tokenguard-request: ([A-Za-z0-9_.:-]+)")


async def _read_body(receive: Receive) -> bytes | None:
    data = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        data += message.get("body", b"")
        if len(data) > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            return bytes(data)


class FakeUpstream:
    """The ASGI app of one fake upstream, and the nursery its generations run in.

    :meth:`run` must be running (``nursery.start``) before requests are served: every
    generation is a task of its nursery, never of the request.
    """

    def __init__(
        self, flavour: str, pacing: Pacing = UNPACED, context: int = DEFAULT_CONTEXT_TOKENS
    ) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
        self.flavour = flavour
        self.pacing = pacing
        self.context = context
        self.ledger: list[LedgerEntry] = []
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def ledger_json(self, key: str | None = None) -> dict[str, Any]:
        entries = [attrs.asdict(e) for e in self.ledger if key is None or e.key == key]
        return {"flavour": self.flavour, "entries": entries}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/ledger" and method == "GET":
            query = dict(
                part.split("=", 1)
                for part in scope["query_string"].decode().split("&")
                if "=" in part
            )
            await send_json(send, 200, self.ledger_json(query.get("key")))
        elif path in (CHAT_PATH, COMPLETIONS_PATH) and method == "POST":
            await self._completion(path, receive, send)
        else:
            await send_json(send, 404, error_body(404, f"no route for {method} {path}"))

    def _accept(self, path: str, data: bytes) -> Generation:
        """Validate a body the flavour's way, bill it, start generating; raise Refused."""
        try:
            body = json.loads(data)
        except ValueError:
            raise Refused("the body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise Refused("the body needs a model")
        if path == CHAT_PATH and not isinstance(body.get("messages"), list):
            raise Refused("messages: a list is required")
        if path == COMPLETIONS_PATH and "prompt" not in body:
            raise Refused('"prompt" is required')
        input_tokens = billed_input(body["model"], path, body)
        ask = ASKERS[self.flavour](path, body, input_tokens, self.context)
        key, request = KEY_MARK.search(data), REQUEST_MARK.search(data)
        entry = LedgerEntry(
            id=len(self.ledger),
            key=key.group(1).decode() if key else None,
            request=request.group(1).decode() if request else None,
            path=path,
            model=ask.model,
            stream=ask.stream,
            sequences=ask.sequences,
            max_tokens=ask.per_sequence,
            input_tokens=input_tokens,
            started=time.monotonic(),
            started_wall=time.time(),
        )
        self.ledger.append(entry)
        generation = Generation(ask=ask, entry=entry)
        assert self._nursery is not None, "FakeUpstream.run is not running"
        self._nursery.start_soon(generation.run, self.pacing)
        return generation

    async def _completion(self, path: str, receive: Receive, send: Send) -> None:
        data = await _read_body(receive)
        if data is None:
            return
        try:
            generation = self._accept(path, data)
        except Refused as refusal:
            await send_json(send, 400, error_body(400, str(refusal)))
            return
        created = int(time.time())
        async with trio.open_nursery() as nursery:
            # A client that leaves ends the answer, never the generation.
            nursery.start_soon(_watch_disconnect, receive, generation, nursery.cancel_scope)
            if generation.ask.stream:
                await stream_answer(generation, send, created)
            else:
                while not generation.done:
                    await generation.changed.wait()
                generation.answered = True
                await send_json(send, 200, whole_answer(generation, created))
            nursery.cancel_scope.cancel()


async def _watch_disconnect(
    receive: Receive, generation: Generation, scope: trio.CancelScope
) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if not generation.answered:
        generation.entry.client_left = True
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
