"""Honest fake upstreams: OpenAI-compatible servers that generate and bill what they are
asked for, whatever the client does.

``python -m bench fake-upstream --flavour llama|vllm --port N`` serves one on loopback,
in a process of its own (so a proxy node under test and the client never share its event
loop): ``POST /v1/chat/completions`` and ``POST /v1/completions``, whole answers and
server-sent-event streams, and ``GET /ledger``. The tests start it as a process
(``tests/honest_upstreams.py``); the proxy accuracy audit does too (``bench/proxy_audit.py``).

What a fake guarantees:

* **It reads the output length as its flavour's server does.**

  - ``llama`` (llama.cpp's server, ``tools/server/server-task.cpp``,
    ``params_from_json_cmpl``): ``n_predict``, else ``max_completion_tokens``, else
    ``max_tokens``; a field that is absent, ``null`` or of another type falls through to
    the next (llama.cpp's ``json_value``); a negative value or none at all generates
    until the context is full (``--context-tokens``). ``n`` other than 1, and
    ``best_of`` on ``/v1/completions``, are refused with a 400, as llama.cpp's
    OpenAI-compatible parsers do. The usage chunk of a stream comes when
    ``stream_options.include_usage`` is true.
  - ``vllm`` (``vllm/entrypoints/openai/protocol.py``, ``serving_engine.py``): chat reads
    ``max_completion_tokens or max_tokens`` (the first that is set and not 0),
    completions ``max_tokens`` (16 when absent); none: the context left after the
    prompt. A length must be an integer >= 1 that fits the context with the prompt,
    ``min_tokens`` at most the length, ``n`` >= 1, ``best_of`` >= ``n``: 400 otherwise.
    ``best_of`` sequences are generated (and billed), ``n`` returned. A stream's usage
    chunk comes when ``stream_options`` is given with ``include_usage`` (true by
    default there), as vLLM's.

* **It generates every token it was asked for**, at its pace (``--ttft`` before the
  first token, then ``--tokens-per-second``; 0: as fast as it can), in a task of its
  own: a client that reads slowly, stalls or disconnects changes nothing about what is
  generated and billed (llama.cpp and vLLM would stop on a disconnect; a fake that does
  not is the worst case a limiter must survive). A generated token is one word of
  :data:`tokenguard.upstreams.mock.WORDS`, one token in both shipped encodings.

* **Billed input is a generous, documented measure**, in the model's encoding
  (:func:`tokenguard.counting.count_text`): per chat message 3 tokens, plus the tokens of
  its ``role``, of its text (a string ``content``, or each text part's ``text``), of
  each other content part as compact JSON (images included, data URLs and all), and of
  every other field of the message as compact JSON (``name``, ``tool_calls`` ...);
  plus 3 for the reply's priming, plus ``tools``, ``functions``, ``tool_choice`` and
  ``response_format`` as compact JSON (``$defs`` and all). For a plain message this is
  exactly OpenAI's count; anything richer costs at least what OpenAI's scheme says.
  A completion's prompt: the tokens of each string, the length of each token array,
  and the ``suffix``.

* **``usage`` tells the truth**: ``prompt_tokens`` is the billed input,
  ``completion_tokens`` every token generated, of every sequence (vLLM itself would
  count only the ``n`` returned).

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

import argparse
import functools
import json
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tokenguard.cluster.open_files import LISTEN_BACKLOG, raise_open_files_limit
from tokenguard.counting import count_text
from tokenguard.counting.chat_prompt import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE
from tokenguard.observe.logs import Receive, Scope, Send
from tokenguard.upstreams.mock import FIRST_WORD, WORDS

FLAVOURS = ("llama", "vllm")
DEFAULT_CONTEXT_TOKENS = 131072
MAX_BODY_BYTES = 64 * 1024 * 1024
KEEP_ALIVE_SECONDS = 120.0
TICK = 0.01  # a paced generation adds the tokens due at most every tick
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "response_format")
KEY_MARK = re.compile(rb"tokenguard-key: ([A-Za-z0-9_.:-]+)")
REQUEST_MARK = re.compile(rb"tokenguard-request: ([A-Za-z0-9_.:-]+)")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class Refused(Exception):
    """A request the flavour's server refuses: 400, not billed."""


@attrs.frozen
class Pacing:
    """``ttft``: seconds before the first token; ``tokens_per_second`` per sequence
    afterwards (0: every token at once)."""

    ttft: float = 0.0
    tokens_per_second: float = 0.0


@attrs.define
class LedgerEntry:
    """One accepted request, billed. ``output_tokens`` grows while it generates."""

    id: int
    key: str | None
    request: str | None
    path: str
    model: str
    stream: bool
    sequences: int
    max_tokens: int  # per sequence, as the flavour read it
    input_tokens: int
    started: float  # time.monotonic()
    started_wall: float
    output_tokens: int = 0
    ended: float | None = None
    ended_wall: float | None = None
    done: bool = False
    client_left: bool = False


# --- what a request asks for -----------------------------------------------------------


@attrs.frozen
class Ask:
    """A validated request: what to generate and how to answer."""

    path: str
    model: str
    stream: bool
    include_usage: bool
    input_tokens: int
    choices: int  # returned
    sequences: int  # generated and billed (best_of)
    per_sequence: int


def _message_tokens(model: str, message: Any) -> int:
    if not isinstance(message, dict):
        return TOKENS_PER_MESSAGE + count_text(model, _json(message))
    total = TOKENS_PER_MESSAGE
    rest = {k: v for k, v in message.items() if k not in ("role", "content")}
    if isinstance(message.get("role"), str):
        total += count_text(model, message["role"])
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    for part in parts:
        if isinstance(part, str):
            total += count_text(model, part)
        elif isinstance(part, dict) and part.get("type") == "text" and "text" in part:
            total += count_text(model, part["text"] if isinstance(part["text"], str) else "")
        elif part is not None:
            total += count_text(model, _json(part))
    if rest:
        total += count_text(model, _json(rest))
    return total


def billed_input(model: str, path: str, body: dict[str, Any]) -> int:
    """The input tokens a request is billed for (see the module docstring)."""
    if path == CHAT_PATH:
        messages = body.get("messages")
        total = REPLY_PRIMING_TOKENS + sum(
            _message_tokens(model, m) for m in (messages if isinstance(messages, list) else [])
        )
        return total + sum(
            count_text(model, _json(body[f])) for f in PROMPT_FIELDS if body.get(f) is not None
        )
    prompt = body.get("prompt")
    items = prompt if isinstance(prompt, list) and not _is_token_array(prompt) else [prompt]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += count_text(model, item)
        elif isinstance(item, list):
            total += len(item)
    suffix = body.get("suffix")
    return total + (count_text(model, suffix) if isinstance(suffix, str) else 0)


def _is_token_array(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _llama_int(body: dict[str, Any], field: str, default: int) -> int:
    """llama.cpp's ``json_value``: the field if it converts to a number, else the default
    (absent, null, a string, an object...). A boolean converts, as nlohmann's does."""
    value = body.get(field)
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value)
    return default


def _vllm_int(body: dict[str, Any], field: str) -> int | None:
    """A pydantic ``Optional[int]``: ``None``, an int, or a float with no fraction."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(f"{field}: Input should be a valid integer, got {value!r}")
    return value


def llama_ask(path: str, body: dict[str, Any], input_tokens: int, context: int) -> Ask:
    """What llama.cpp's server would generate for this body."""
    if _llama_int(body, "n", 1) != 1:
        raise Refused("Only one completion choice is allowed")
    if path == COMPLETIONS_PATH and "best_of" in body:
        raise Refused("Unsupported param: best_of")
    if input_tokens >= context:
        raise Refused(f"the request exceeds the available context size ({context} tokens)")
    max_tokens = _llama_int(body, "max_tokens", -1)
    n_predict = _llama_int(body, "n_predict", _llama_int(body, "max_completion_tokens", max_tokens))
    room = context - input_tokens
    per_sequence = room if n_predict < 0 else min(n_predict, room)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _ask(path, body, input_tokens, 1, 1, per_sequence, include_usage)


def vllm_ask(path: str, body: dict[str, Any], input_tokens: int, context: int) -> Ask:
    """What vLLM's OpenAI server would generate for this body."""
    if path == CHAT_PATH:
        length = _vllm_int(body, "max_completion_tokens") or _vllm_int(body, "max_tokens")
    else:
        length = _vllm_int(body, "max_tokens") if "max_tokens" in body else 16
    if input_tokens >= context:
        raise Refused(f"This model's maximum context length is {context} tokens.")
    per_sequence = context - input_tokens if length is None else length
    if per_sequence < 1:
        raise Refused(f"max_tokens must be at least 1, got {per_sequence}.")
    if input_tokens + per_sequence > context:
        raise Refused(
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {input_tokens + per_sequence} tokens."
        )
    min_tokens = _vllm_int(body, "min_tokens") or 0
    if not 0 <= min_tokens <= per_sequence:
        raise Refused("min_tokens must be less than or equal to max_tokens")
    n = _vllm_int(body, "n")
    n = 1 if n is None else n
    best_of = _vllm_int(body, "best_of")
    if n < 1:
        raise Refused(f"n must be at least 1, got {n}.")
    if best_of is not None and best_of < n:
        raise Refused(f"best_of must be greater than or equal to n, got n={n}, best_of={best_of}")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage", True) is True
    return _ask(path, body, input_tokens, n, best_of or n, per_sequence, include_usage)


def _ask(
    path: str,
    body: dict[str, Any],
    input_tokens: int,
    choices: int,
    sequences: int,
    per_sequence: int,
    include_usage: bool,
) -> Ask:
    return Ask(
        path=path,
        model=body["model"],
        stream=body.get("stream") is True,
        include_usage=include_usage,
        input_tokens=input_tokens,
        choices=choices,
        sequences=sequences,
        per_sequence=max(0, per_sequence),
    )


ASKERS = {"llama": llama_ask, "vllm": vllm_ask}


# --- generating ------------------------------------------------------------------------


def word(sequence: int, position: int) -> str:
    """The token at ``position`` of generated sequence ``sequence``."""
    return FIRST_WORD if position == 0 else WORDS[(sequence + position) % len(WORDS)]


@attrs.define(eq=False)
class Generation:
    """One request's generation: ``produced`` tokens of each sequence so far."""

    ask: Ask
    entry: LedgerEntry
    produced: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)
    answered: bool = False  # the answer's last bytes were handed to the server

    @property
    def done(self) -> bool:
        return self.entry.done

    def advance(self, produced: int) -> None:
        self.produced = produced
        self.entry.output_tokens = produced * self.ask.sequences
        if produced >= self.ask.per_sequence:
            self.entry.done = True
            self.entry.ended, self.entry.ended_wall = time.monotonic(), time.time()
        self.changed.set()
        self.changed = trio.Event()

    async def run(self, pacing: Pacing) -> None:
        """Generate every token, at the pace; bill as it goes."""
        await trio.sleep(pacing.ttft)
        total = self.ask.per_sequence
        if pacing.tokens_per_second <= 0 or total == 0:
            self.advance(total)
            return
        started = trio.current_time()
        while not self.done:
            due = int((trio.current_time() - started) * pacing.tokens_per_second) + 1
            if due > self.produced:
                self.advance(min(total, due))
            if not self.done:
                # Wake when the next token is due (a tick at the soonest, so a fast pace
                # adds its tokens a tick's worth at a time), not every tick.
                due_at = started + self.produced / pacing.tokens_per_second
                await trio.sleep_until(max(due_at, trio.current_time() + TICK))


# --- answering -------------------------------------------------------------------------


def _chunk_object(ask: Ask) -> str:
    return "chat.completion.chunk" if ask.path == CHAT_PATH else "text_completion"


def _choice_delta(ask: Ask, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
    if ask.path == CHAT_PATH:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}


def usage_of(entry: LedgerEntry) -> dict[str, int]:
    return {
        "prompt_tokens": entry.input_tokens,
        "completion_tokens": entry.output_tokens,
        "total_tokens": entry.input_tokens + entry.output_tokens,
    }


def whole_answer(generation: Generation, created: int) -> dict[str, Any]:
    """A finished generation as one answer: the first ``choices`` sequences."""
    ask = generation.ask
    choices = []
    for index in range(ask.choices):
        text = "".join(word(index, i) for i in range(ask.per_sequence))
        if ask.path == CHAT_PATH:
            body: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            body = {"text": text}
        choices.append({"index": index, **body, "logprobs": None, "finish_reason": "length"})
    kind = "chat.completion" if ask.path == CHAT_PATH else "text_completion"
    return {
        "id": f"fake-{generation.entry.id}",
        "object": kind,
        "created": created,
        "model": ask.model,
        "choices": choices,
        "usage": usage_of(generation.entry),
    }


class _Events:
    """The SSE events of one streamed answer, built as tokens come."""

    def __init__(self, generation: Generation, created: int) -> None:
        self.generation = generation
        self.head = {
            "id": f"fake-{generation.entry.id}",
            "object": _chunk_object(generation.ask),
            "created": created,
            "model": generation.ask.model,
        }

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + _json({**self.head, "choices": choices, **extra}).encode() + b"\n\n"

    def opening(self) -> bytes:
        ask = self.generation.ask
        if ask.path != CHAT_PATH:
            return b""
        return b"".join(
            self.event([{"index": i, "delta": {"role": "assistant", "content": ""}}])
            for i in range(ask.choices)
        )

    def tokens(self, start: int, end: int) -> bytes:
        ask = self.generation.ask
        return b"".join(
            self.event([_choice_delta(ask, index, word(index, position), None)])
            for position in range(start, end)
            for index in range(ask.choices)
        )

    def closing(self) -> bytes:
        ask = self.generation.ask
        events = [
            self.event([_choice_delta(ask, index, None, "length")]) for index in range(ask.choices)
        ]
        if ask.include_usage:
            events.append(self.event([], usage=usage_of(self.generation.entry)))
        return b"".join(events) + b"data: [DONE]\n\n"


async def _send_json(send: Send, status: int, body: Any) -> None:
    content = _json(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": False})


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


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
        self, flavour: str, pacing: Pacing = Pacing(), context: int = DEFAULT_CONTEXT_TOKENS
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
            await _send_json(send, 200, self.ledger_json(query.get("key")))
        elif path in (CHAT_PATH, COMPLETIONS_PATH) and method == "POST":
            await self._completion(path, receive, send)
        else:
            await _send_json(send, 404, error_body(404, f"no route for {method} {path}"))

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
            await _send_json(send, 400, error_body(400, str(refusal)))
            return
        created = int(time.time())
        async with trio.open_nursery() as nursery:
            # A client that leaves ends the answer, never the generation.
            nursery.start_soon(_watch_disconnect, receive, generation, nursery.cancel_scope)
            if generation.ask.stream:
                await _stream(generation, send, created)
            else:
                while not generation.done:
                    await generation.changed.wait()
                generation.answered = True
                await _send_json(send, 200, whole_answer(generation, created))
            nursery.cancel_scope.cancel()


async def _watch_disconnect(
    receive: Receive, generation: Generation, scope: trio.CancelScope
) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if not generation.answered:
        generation.entry.client_left = True
    scope.cancel()


async def _stream(generation: Generation, send: Send, created: int) -> None:
    events = _Events(generation, created)
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    sent = 0
    first = events.opening()
    while True:
        produced = generation.produced
        if produced > sent or first:
            body = first + events.tokens(sent, produced)
            first, sent = b"", produced
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if generation.done and sent >= generation.ask.per_sequence:
            break
        if generation.produced == sent:
            await generation.changed.wait()
    generation.answered = True
    await send({"type": "http.response.body", "body": events.closing(), "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- the command -----------------------------------------------------------------------


async def serve_fake(
    upstream: FakeUpstream,
    host: str,
    port: int,
    *,
    until: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``upstream`` on ``host:port`` until ``until()`` returns; ``started(url)``
    once bound."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 1.0
    config.backlog = LISTEN_BACKLOG  # thousands of streams may connect at once
    # hypercorn closes a connection whose request it has not read within this; a fake
    # starved of CPU under thousands of streams must not fail requests for that.
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.accesslog = None
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        serving = functools.partial(serve, upstream, config, shutdown_trigger=stopping.wait)
        binds = await nursery.start(serving)  # type: ignore[arg-type]
        task_status.started(binds[0])
        await until()
        stopping.set()
        nursery.cancel_scope.cancel()


async def _signalled() -> None:
    """Returns at the first SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def _main(args: argparse.Namespace) -> None:
    raise_open_files_limit()
    upstream = FakeUpstream(
        args.flavour,
        Pacing(ttft=args.ttft, tokens_per_second=args.tokens_per_second),
        context=args.context_tokens,
    )
    async with trio.open_nursery() as nursery:
        serving = functools.partial(serve_fake, upstream, args.host, args.port, until=_signalled)
        url = await nursery.start(serving)
        print(f"fake {args.flavour} upstream on {url}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flavour", choices=FLAVOURS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token (0)")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=0.0,
        help="per sequence after the first token; 0: all at once (0)",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"the model's context: prompt + generated tokens ({DEFAULT_CONTEXT_TOKENS})",
    )


def main(args: argparse.Namespace) -> int:
    """``python -m bench fake-upstream``: serve until SIGTERM or Ctrl-C."""
    try:
        trio.run(_main, args)
    except OSError as exc:
        print(f"bench fake-upstream: {exc}", file=sys.stderr)
        return 1
    return 0
