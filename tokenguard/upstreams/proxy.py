"""Proxy mode: forwarding admitted requests to a real OpenAI-compatible server.

An :class:`Upstream` holds one node's ``httpx2.AsyncClient`` (a connection pool with
HTTP/1.1 keep-alive, running on trio through anyio) for as long as :meth:`Upstream.run`
runs, and sends each request to the route its model picks
(:meth:`tokenguard.config.settings.UpstreamSettings.route`), with that route's credential as
``Authorization: Bearer`` and its connect/read timeouts.

Guarantees:

* What the upstream receives is the JSON tokenguard validated and counted, re-serialised
  (never the client's raw bytes).
* No key holds more than its share of the pool (:mod:`tokenguard.upstreams.pool_shares`,
  ``[upstream] key_share``): a request of a key past its share waits for one of that
  key's own requests to end, at most ``connect_timeout``, then gets a 429 (type
  ``concurrency``); a request that waits as long for the pool itself gets a 503
  ``upstream_busy``, said as such, never as a read timeout.
* A connection error is a 502, a timeout a 504, both in OpenAI's error shape
  (:class:`UpstreamFailure`, which says whether the request may have reached the
  upstream), raised before any byte reaches the client.
* A stream is relayed event by event as it arrives (:class:`RelayedStream`), never
  buffered; the upstream's usage chunk is dropped when the client did not ask for it;
  everything the upstream sent is tallied (:class:`StreamTally`), taken by the client or
  not, so the app can settle to the upstream's usage, or to the tokens of the text the
  upstream generated when there is none. When the client leaves first (or is cut for
  stalling), the route's ``on_client_gone`` decides: ``cancel`` closes the upstream
  response at once, ``drain`` reads it on, relaying nothing, to its end (at most
  ``read_timeout``). The upstream response and the key's slot are always released,
  however the stream ends.
* The credential never appears in a repr, a log line or an error message.

Every upstream call ends in one ``on_result(model, seconds, outcome)`` call, if set (for
metrics): ``outcome`` is ``"ok"``, ``"http_<status>"`` (a non-2xx answer, passed through
to the client), ``"timeout"``, ``"connect_error"``, ``"pool_timeout"`` (no connection of
the pool freed in time), ``"key_share"`` (the key's share stayed full), ``"dropped"`` (a
stream broken mid-way) or ``"client_closed"`` (the client left, or was cut, mid-stream).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx2
import trio

from tokenguard.api.errors import APIError
from tokenguard.config.settings import UpstreamRoute, UpstreamSettings
from tokenguard.counting.tokens import count_text
from tokenguard.store.guarded import LogThrottle
from tokenguard.upstreams.pool_shares import PoolShares, ShareTimeout, Slot

log = logging.getLogger("tokenguard.upstreams.proxy")

# Upstream response headers a client may rely on; the upstream's own x-ratelimit-* are
# dropped (tokenguard's replace them), and so is everything hop-by-hop.
PASSTHROUGH_HEADERS = (
    "retry-after",
    "retry-after-ms",
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
)
DRIFT_LOG_SECONDS = 10.0
DRIFT_MODELS = 1024  # models are client input: the per-model drift table is bounded
CLOSE_SECONDS = 5.0  # closing an upstream response never holds a request longer

ResultObserver = Callable[[str, float, str], None]


@attrs.define(eq=False)
class UpstreamFailure(APIError):
    """tokenguard's own answer when the upstream could not answer: a 502, 503 or 504 in
    OpenAI's shape (or the 429 of a key past its share of the pool). ``outcome`` names it
    for metrics; ``sent`` says whether the request may have reached the upstream (a
    timeout or a broken connection after it went out), which may then bill it."""

    outcome: str = "connect_error"
    sent: bool = False


# Never sent: no connection was made, or none was free.
UNSENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout)


def _failure(exc: httpx2.HTTPError, route: UpstreamRoute, pool_size: int) -> UpstreamFailure:
    """The client's error for a failed upstream call. The message names the route's
    host, never its credential."""
    where = httpx2.URL(route.base_url).host
    sent = not isinstance(exc, UNSENT)
    if isinstance(exc, httpx2.PoolTimeout):
        return UpstreamFailure(
            503,
            f"All {pool_size} connections of this node to the upstream servers are in use; "
            f"none freed within {route.connect_timeout:g} s. Please retry shortly.",
            "server_error",
            code="upstream_busy",
            headers={"retry-after": "1"},
            outcome="pool_timeout",
        )
    if isinstance(exc, httpx2.ConnectTimeout):
        message = (
            f"The upstream server ({where}) did not accept a connection within "
            f"{route.connect_timeout:g} s."
        )
        return _timeout(message, sent)
    if isinstance(exc, httpx2.TimeoutException):
        message = f"The upstream server ({where}) did not answer within {route.read_timeout:g} s."
        return _timeout(message, sent)
    return UpstreamFailure(
        502,
        f"The upstream server ({where}) could not be reached: {type(exc).__name__}.",
        "server_error",
        code="upstream_unavailable",
        outcome="connect_error",
        sent=sent,
    )


def _timeout(message: str, sent: bool) -> UpstreamFailure:
    return UpstreamFailure(
        504, message, "server_error", code="upstream_timeout", outcome="timeout", sent=sent
    )


def _share_full(slots: int, waited: float) -> UpstreamFailure:
    return UpstreamFailure(
        429,
        f"This key already holds its share of this node's upstream connections ({slots} "
        f"at once); none of them freed within {waited:g} s. Please try again once one "
        "of its requests has ended.",
        "concurrency",
        code="rate_limit_exceeded",
        headers={"retry-after": "1"},
        outcome="key_share",
    )


@attrs.frozen
class UpstreamReply:
    """A whole upstream answer: status, the headers to pass on, the body's bytes."""

    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON, or ``None`` when it is not JSON."""
        try:
            return json.loads(self.content)
        except ValueError:
            return None


def passthrough_headers(response: httpx2.Response) -> dict[str, str]:
    headers = {
        name: response.headers[name] for name in PASSTHROUGH_HEADERS if name in response.headers
    }
    headers["content-type"] = response.headers.get("content-type", "application/json")
    return headers


class Upstream:
    """The upstream servers of one node, and the pool of connections to them.

    :meth:`run` owns the client; requests may be sent only while it runs (a
    ``RuntimeError`` otherwise). ``on_result`` may be set at any time (see the module
    docstring).
    """

    def __init__(self, settings: UpstreamSettings, on_result: ResultObserver | None = None):
        self.settings = settings
        self.on_result = on_result
        self.drift = InputDrift()
        self.shares = PoolShares(settings.connections_per_key)
        self._client: httpx2.AsyncClient | None = None
        self._serving = trio.CancelScope()

    def route(self, model: str) -> UpstreamRoute | None:
        return self.settings.route(model)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connection pool open until cancelled; ``started()`` once usable."""
        limits = httpx2.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
            keepalive_expiry=30.0,
        )
        # httpx2 logs every request at INFO: the request log already has one line each.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        # Redirects are answers to pass on, not to follow with a credential attached.
        async with httpx2.AsyncClient(limits=limits, follow_redirects=False) as client:
            self._client = client
            try:
                with self._serving:
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._client = None

    def stop(self) -> None:
        """End :meth:`run` (the app stops serving): the pool's connections close."""
        self._serving.cancel()

    def report(self, model: str, started: float, outcome: str) -> None:
        if self.on_result is not None:
            self.on_result(model, trio.current_time() - started, outcome)

    async def _take_slot(self, route: UpstreamRoute, key: str, model: str, started: float) -> Slot:
        """A slot of ``key``'s share of the pool, waited for at most ``connect_timeout``
        (the pool's own wait); the 429 of :func:`_share_full` otherwise."""
        try:
            return await self.shares.acquire(key, route.connect_timeout)
        except ShareTimeout:
            failure = _share_full(self.shares.slots, route.connect_timeout)
            self.report(model, started, failure.outcome)
            raise failure from None

    async def _open(
        self, route: UpstreamRoute, path: str, body: dict[str, Any], model: str, started: float
    ) -> httpx2.Response:
        """Send a request; the response's headers are read, its body is not."""
        client = self._client
        if client is None:
            raise RuntimeError("the upstream client is not running (Upstream.run)")
        headers = {"content-type": "application/json", "accept": "application/json"}
        if route.api_key is not None:
            headers["authorization"] = f"Bearer {route.api_key}"
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        timeout = httpx2.Timeout(
            route.read_timeout, connect=route.connect_timeout, pool=route.connect_timeout
        )
        request = client.build_request(
            "POST", route.base_url + path, content=content, headers=headers, timeout=timeout
        )
        try:
            return await client.send(request, stream=True)
        except httpx2.HTTPError as exc:
            failure = _failure(exc, route, self.settings.max_connections)
            self.report(model, started, failure.outcome)
            raise failure from None

    async def post(
        self, route: UpstreamRoute, path: str, body: dict[str, Any], model: str, *, key: str
    ) -> UpstreamReply:
        """Forward a request for ``key`` (a key id: whose share of the pool it takes) and
        read the whole answer (any status); raise an :class:`UpstreamFailure` when the
        upstream cannot be reached or times out, or the pool or the key's share stays
        full."""
        started = trio.current_time()
        slot = await self._take_slot(route, key, model, started)
        try:
            response = await self._open(route, path, body, model, started)
            return await self._read_whole(route, response, model, started)
        finally:
            slot.release()

    async def _read_whole(
        self, route: UpstreamRoute, response: httpx2.Response, model: str, started: float
    ) -> UpstreamReply:
        """Read an opened answer whole and close it; its outcome is reported either way,
        and a read that fails raises the :class:`UpstreamFailure` of :func:`_failure`."""
        try:
            content = await response.aread()
        except httpx2.HTTPError as exc:
            failure = _failure(exc, route, self.settings.max_connections)
            self.report(model, started, failure.outcome)
            raise failure from None
        finally:
            await _close(response)
        self.report(model, started, _outcome(response.status_code))
        return UpstreamReply(response.status_code, passthrough_headers(response), content)

    async def stream(
        self,
        route: UpstreamRoute,
        path: str,
        body: dict[str, Any],
        model: str,
        *,
        key: str,
        include_usage: bool,
        finish: Callable[[StreamTally], Awaitable[None]],
    ) -> UpstreamReply | RelayedStream:
        """Forward a streamed request for ``key``. A 200 event stream is returned as a
        :class:`RelayedStream` (the caller must iterate or ``aclose`` it; ``finish`` is
        awaited once it ends, with its tally; the key's slot is held until then); any
        other answer is read whole and returned as an :class:`UpstreamReply`. Raises as
        :meth:`post`."""
        started = trio.current_time()
        slot = await self._take_slot(route, key, model, started)
        try:
            response = await self._open(route, path, body, model, started)
            kind = response.headers.get("content-type", "")
            if response.status_code == 200 and kind.startswith("text/event-stream"):
                relayed = RelayedStream(
                    response,
                    model=model,
                    include_usage=include_usage,
                    finish=finish,
                    report=lambda outcome: self.report(model, started, outcome),
                    release=slot.release,
                    drain_seconds=route.read_timeout if route.on_client_gone == "drain" else None,
                )
                slot = None  # the stream releases it
                return relayed
            return await self._read_whole(route, response, model, started)
        finally:
            if slot is not None:
                slot.release()


def _outcome(status: int) -> str:
    return "ok" if 200 <= status < 300 else f"http_{status}"


async def _close(response: httpx2.Response) -> None:
    # Shielded and bounded: a cancelled request still returns its connection (or drops
    # it), and closing never hangs the request.
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
        await response.aclose()


# --- usage ----------------------------------------------------------------------------


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@attrs.frozen
class ReportedUsage:
    """The upstream's own ``usage`` block; a field is ``None`` when absent or invalid."""

    prompt_tokens: int | None
    completion_tokens: int | None

    @classmethod
    def of(cls, usage: Any) -> ReportedUsage | None:
        if not isinstance(usage, dict):
            return None
        return cls(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _choice_texts(choice: Any, key: str) -> list[str]:
    """The generated text in one choice (``key``: ``"message"`` whole, ``"delta"``
    streamed): content, refusal, reasoning, tool and function call names and
    arguments, or a legacy completion's ``text``."""
    if not isinstance(choice, dict):
        return []
    texts: list[str] = []
    if isinstance(choice.get("text"), str):
        texts.append(choice["text"])
    part = choice.get(key)
    if not isinstance(part, dict):
        return texts
    for name in ("content", "refusal", "reasoning_content"):
        if isinstance(part.get(name), str):
            texts.append(part[name])
    calls = part.get("tool_calls")
    functions = (
        [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    )
    functions.append(part.get("function_call"))
    for fn in functions:
        if isinstance(fn, dict):
            texts.extend(fn[k] for k in ("name", "arguments") if isinstance(fn.get(k), str))
    return texts


def reply_tokens(model: str, body: Any) -> int:
    """The output tokens of a whole reply counted by tokenguard (when the upstream
    reports no usage): each choice's generated text in the model's encoding."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        return 0
    return sum(count_text(model, "".join(_choice_texts(c, "message"))) for c in choices)


@attrs.define
class StreamTally:
    """What an upstream event stream carried: the text generated per choice (every
    event the upstream sent, whether the client took it or not), the upstream's usage if
    it reported one, whether ``[DONE]`` came, whether the upstream's body ended, the
    failure (``"timeout"``/``"dropped"``) that ended it early, if any, and whether the
    client left (or was cut) before the end."""

    texts: dict[int, list[str]] = attrs.field(factory=dict)
    usage: ReportedUsage | None = None
    done: bool = False
    ended: bool = False
    failure: str | None = None
    client_gone: bool = False

    @property
    def complete(self) -> bool:
        """The upstream's body ended without a failure: all it generated was seen."""
        return self.ended and self.failure is None

    def add(self, parts: list[tuple[int, str]]) -> None:
        for index, text in parts:
            self.texts.setdefault(index, []).append(text)

    def counted_tokens(self, model: str) -> int:
        """Tokens of the generated text, counted per choice in the model's encoding."""
        return sum(count_text(model, "".join(parts)) for parts in self.texts.values())


def stream_output(tally: StreamTally, model: str, reserved: int, route: UpstreamRoute) -> int:
    """The output tokens a stream costs when the upstream reported no usage: the tokens
    of the text it generated, when its body ended normally; otherwise at least the whole
    reservation ``reserved`` (the upstream may have generated, and billed, all of it):
    when the client left or stalled and the stream was cancelled (or its drain did not
    finish), and when the upstream broke mid-way, unless the route's
    ``on_upstream_error`` is ``"refund"`` (then the text generated until then)."""
    counted = tally.counted_tokens(model)
    if tally.complete:
        return counted
    if tally.failure is not None and route.on_upstream_error == "refund":
        return counted
    return max(reserved, counted)


def _sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), ``None`` if it has none."""
    lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


def _stream_error_event(message: str, code: str) -> bytes:
    # The SDKs raise an APIError for a streamed event carrying "error".
    body = APIError(502, message, "server_error", code=code).body()
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class RelayedStream:
    """The client's side of an upstream event stream: an async iterator of SSE events
    (bytes, each ending in a blank line), yielded as they arrive.

    Events pass unchanged, except the upstream's usage-only chunk when the client did
    not ask for usage (tokenguard asks the upstream for it, to settle exactly). Every
    event's text is tallied as it is read from the upstream: what the upstream generated,
    which the client pays for whether it took it or not. A timeout or a broken
    connection mid-stream ends the stream with an error event in OpenAI's shape.
    :meth:`aclose` (idempotent; quart calls it however the response ends) is shielded:
    if the upstream had not finished (the client left, or was cut for stalling) it
    drains it first when ``drain_seconds`` is set (reading on, relaying nothing, for at
    most that long), then closes the upstream response, releases the key's slot
    (``release``) and awaits ``finish(tally)``.
    """

    def __init__(
        self,
        response: httpx2.Response,
        *,
        model: str,
        include_usage: bool,
        finish: Callable[[StreamTally], Awaitable[None]],
        report: Callable[[str], None],
        release: Callable[[], None] = lambda: None,
        drain_seconds: float | None = None,
    ) -> None:
        self.model = model
        self.include_usage = include_usage
        self.tally = StreamTally()
        self._response = response
        self._chunks = response.aiter_bytes()
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
        while not self._ready:
            if self.tally.ended or self._closed:
                await self.aclose()
                raise StopAsyncIteration
            await self._read()
        return self._ready.popleft()

    async def _read(self) -> None:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.tally.ended = True
            if self._buffer.strip():
                self._consider(self._buffer.rstrip(b"\n"))
            self._buffer = b""
            return
        except httpx2.HTTPError as exc:
            self.tally.ended = True
            timed_out = isinstance(exc, httpx2.TimeoutException)
            self.tally.failure = "timeout" if timed_out else "dropped"
            what = "stopped sending (read timeout)" if timed_out else "closed the connection"
            message = f"The upstream server {what} in the middle of the stream."
            code = "upstream_timeout" if timed_out else "upstream_unavailable"
            self._ready.append(_stream_error_event(message, code))
            return
        self._buffer += chunk
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            if event.strip():
                self._consider(event)

    def _consider(self, event: bytes) -> None:
        """Queue one event for the client (or drop it), tallying its text and usage."""
        data = _sse_data(event)
        if data == b"[DONE]":
            self.tally.done = True
        elif data is not None:
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = None
            if isinstance(chunk, dict):
                usage = ReportedUsage.of(chunk.get("usage"))
                choices = chunk.get("choices")
                for choice in choices if isinstance(choices, list) else []:
                    index = choice.get("index", 0) if isinstance(choice, dict) else 0
                    index = index if isinstance(index, int) else 0
                    self.tally.add([(index, text) for text in _choice_texts(choice, "delta")])
                if usage is not None:
                    self.tally.usage = usage
                    if not self.include_usage and not choices:
                        return  # the usage chunk tokenguard asked for, not the client
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
                await self._chunks.aclose()
            await _close(self._response)
            self._release()
            self._report(outcome)
            await self._finish(self.tally)


# --- miscounting ----------------------------------------------------------------------


@attrs.define
class ModelDrift:
    """One model's input-token drift: how many upstream answers reported usage, how
    many of them disagreed with tokenguard's count, and the net difference."""

    reported: int = 0
    differed: int = 0
    net: int = 0  # sum of (upstream's prompt_tokens - tokenguard's count)
    log_throttle: LogThrottle = attrs.field(factory=lambda: LogThrottle(DRIFT_LOG_SECONDS))


class InputDrift:
    """Per model, how tokenguard's input-token count compares with the upstream's
    ``prompt_tokens``; a difference is logged (at most a line per model every
    :data:`DRIFT_LOG_SECONDS`), so a miscounted model shows up."""

    def __init__(self) -> None:
        self.models: dict[str, ModelDrift] = {}

    def record(self, model: str, counted: int, reported: int) -> None:
        drift = self.models.get(model)
        if drift is None:
            if len(self.models) >= DRIFT_MODELS:
                self.models.clear()
            drift = self.models[model] = ModelDrift()
        drift.reported += 1
        if reported == counted:
            return
        drift.differed += 1
        drift.net += reported - counted
        if drift.log_throttle.ready() is not None:
            log.warning(
                "input tokens of model %r: counted %d, the upstream reported %d (%+d); "
                "%d of %d answers differed, net %+d tokens; settled to the upstream's count",
                model,
                counted,
                reported,
                reported - counted,
                drift.differed,
                drift.reported,
                drift.net,
            )
