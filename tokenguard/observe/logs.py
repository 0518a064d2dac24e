"""Logging: the request log (one line per HTTP request) and the text or JSON format.

:class:`RequestLog` wraps the app's ASGI callable. Every HTTP request gets a
:class:`RequestRecord`, which the handlers fill in as they learn things (the key's name,
the model, the tokens, the rate-limit decision; see ``RequestLog.current``); once the
response has ended (for a stream: after its last chunk, or when the client left) the
record gets its status and latency, is handed to ``on_finish`` (the node's metrics),
and is written as one line on the ``tokenguard.requests`` logger.

Guarantees:

* One line per request, written after the response ended, whatever the outcome
  (including a client that disconnects mid-stream). Probes and scrapes (``/healthz``,
  ``/readyz``, ``/metrics``) are counted in the metrics but not logged: the supervisor
  probes every node every second.
* A line never holds the API key, the ``Authorization`` header, a request body or any
  prompt text: only the fields of :class:`RequestRecord`, all set by tokenguard.
* Text lines cannot be forged: a value with spaces, quotes, ``=`` or control characters
  (a client's path or model name) is written JSON-quoted, and every value is cut at
  :data:`MAX_VALUE_CHARS`.

:class:`JsonFormatter` writes every record (request lines and the rest) as one JSON
object per line; :func:`configure_logging` installs it (``--log-format json``) or the
text format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from tokenguard.limiting.limiter import Decision

LOG_FORMATS = ("text", "json")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_VALUE_CHARS = 200
REQUEST_LOGGER = "tokenguard.requests"
# A text value written bare: nothing that could end the value or the line early.
_BARE = re.compile(r"[\w./:<>*@+,-]+")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@attrs.define
class RequestRecord:
    """What one request's log line says. Handlers set the fields they know; the rest
    stay ``None``. ``decision``: ``admitted``, ``rejected:<dimension>``,
    ``shadow:<dimension>`` (admitted by shadow mode only) or ``unlimited``."""

    method: str
    path: str
    started: float = 0.0  # time.perf_counter()
    status: int | None = None
    key: str | None = None  # the key's name, never the key
    model: str | None = None
    input_tokens: int | None = None
    output_reserved: int | None = None
    output_settled: int | None = None
    decision: str | None = None
    latency_ms: float | None = None
    # the API surface of a dialect's request (chat, responses...); None for other routes
    surface: str | None = None
    # the answer's x-request-id (the upstream's, when it sent one)
    request_id: str | None = None
    queued_ms: int | None = None  # a request that may wait: how long it waited

    def fields(self) -> dict[str, Any]:
        """The line's fields, in order (``node`` and ``ts`` are the formatter's);
        ``queued_ms`` only for a request that may wait."""
        fields = {
            "method": self.method,
            "path": _cut(self.path),
            "status": self.status,
            "key": self.key,
            "model": None if self.model is None else _cut(self.model),
            "input_tokens": self.input_tokens,
            "output_reserved": self.output_reserved,
            "output_settled": self.output_settled,
            "latency_ms": self.latency_ms,
            "decision": self.decision,
            "surface": self.surface,
            "request_id": self.request_id,
        }
        if self.queued_ms is not None:
            fields["queued_ms"] = self.queued_ms
        return fields


def decision_label(decision: Decision) -> str:
    """``admitted``, ``rejected:<dimension>`` or ``shadow:<dimension>`` (admitted only
    because the row that would refuse is in shadow mode)."""
    if not decision.admitted:
        state = decision.refusal
        return f"rejected:{state.row.dimension if state is not None else 'unknown'}"
    if decision.would_refuse:
        state = decision.shadow_refusal
        return f"shadow:{state.row.dimension if state is not None else 'unknown'}"
    return "admitted"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if not isinstance(value, str):
        return str(value)  # a number tokenguard computed
    return value if _BARE.fullmatch(value) else json.dumps(value)


class RequestLine:
    """A request's fields as a log message: ``str()`` gives the text format's line
    (``POST /v1/chat/completions 200 key=alice ...``); :class:`JsonFormatter` reads the
    fields themselves. Rendered only if a handler formats it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        f = self.fields
        head = " ".join(_text_value(f[name]) for name in ("method", "path", "status"))
        rest = " ".join(
            f"{name}={_text_value(value)}"
            for name, value in f.items()
            if name not in ("method", "path", "status")
        )
        return f"{head} {rest}"


class RequestLog:
    """The request log of one app (see the module docstring).

    ``on_finish`` is called with every finished record (quiet paths included), before
    the line is written; it must not raise. ``logger`` defaults to
    ``tokenguard.requests``.
    """

    def __init__(
        self,
        *,
        on_finish: Callable[[RequestRecord], None] | None = None,
        quiet_paths: frozenset[str] = QUIET_PATHS,
        logger: logging.Logger | None = None,
    ) -> None:
        self.on_finish = on_finish
        self.quiet_paths = quiet_paths
        self.log = logger if logger is not None else logging.getLogger(REQUEST_LOGGER)
        # Per app, not per module: two apps in one process keep their own records. The
        # handler (and a stream's body, iterated after the handler returned) runs in
        # the task that set it, or in tasks started from it, so they all see it.
        self._current: contextvars.ContextVar[RequestRecord] = contextvars.ContextVar(
            f"tokenguard-request-{id(self)}"
        )

    def current(self) -> RequestRecord:
        """The record of the request being handled; outside of one (a test calling a
        handler directly), a fresh record nobody reads."""
        record = self._current.get(None)
        return record if record is not None else RequestRecord("", "")

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` with every HTTP request recorded; websockets and lifespan pass as
        they are."""

        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            record = RequestRecord(scope["method"], scope["path"], time.perf_counter())

            async def send_recorded(message: Message) -> None:
                if message["type"] == "http.response.start":
                    record.status = message["status"]
                    message = with_request_id(message, record)
                await send(message)

            token = self._current.set(record)
            try:
                await app(scope, receive, send_recorded)
            finally:
                self._current.reset(token)
                self.finish(record)

        return recorded

    def finish(self, record: RequestRecord) -> None:
        """Stamp the latency, hand the record to ``on_finish``, write its line."""
        record.latency_ms = round((time.perf_counter() - record.started) * 1000, 3)
        if self.on_finish is not None:
            self.on_finish(record)
        if record.path not in self.quiet_paths and self.log.isEnabledFor(logging.INFO):
            # A record made here, not through Logger.info: that would also walk the
            # stack to find the caller, for every request, and this line has none.
            fields = record.fields()
            line = logging.LogRecord(
                self.log.name, logging.INFO, "", 0, RequestLine(fields), None, None
            )
            line.request = fields
            self.log.handle(line)


def with_request_id(start: Message, record: RequestRecord) -> Message:
    """A response's start message with an ``x-request-id`` (the SDKs show it with every
    answer and error): the one it carries (an upstream's, passed through), else a new
    random one; ``record`` takes it, for the log line."""
    for name, value in start["headers"]:
        if name.lower() == b"x-request-id":
            record.request_id = value.decode("latin-1")
            return start
    record.request_id = f"req_{secrets.token_hex(16)}"
    header = (b"x-request-id", record.request_id.encode("ascii"))
    return {**start, "headers": [*start["headers"], header]}


class _SecondStamp:
    """``time.strftime(format, converter(t))`` of the last whole second asked for: a log
    line per request would otherwise format the same second hundreds of times."""

    def __init__(self, fmt: str, converter: Callable[[float], time.struct_time]) -> None:
        self.fmt = fmt
        self.converter = converter
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.fmt, self.converter(second))
        return self._text


class TextFormatter(logging.Formatter):
    """``<local time>,<ms> <prefix><logger> <LEVEL> <message>``: logging's default
    time format (cached per second)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__(f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s")
        self._stamp = _SecondStamp("%Y-%m-%d %H:%M:%S", time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return f"{self._stamp(record.created)},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``node`` (``None`` in the supervisor), then a request line's fields
    (with ``"event": "request"``) or ``message``; ``exc`` with a traceback if any."""

    def __init__(self, node: int | None = None) -> None:
        super().__init__()
        self.node = node
        self._stamp = _SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": f"{self._stamp(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node,
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            entry["event"] = "request"
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(log_format: str, *, node: int | None = None, prefix: str = "") -> None:
    """Log INFO and above to stderr, as ``text`` (``<time> <prefix><logger> <LEVEL>
    <message>``) or ``json`` (:class:`JsonFormatter`). Like ``logging.basicConfig``,
    does nothing if the root logger already has handlers. Raises ``ValueError`` for
    another format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}: {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(node) if log_format == "json" else TextFormatter(prefix))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


__all__ = [
    "LOG_FORMATS",
    "QUIET_PATHS",
    "REQUEST_LOGGER",
    "JsonFormatter",
    "RequestLine",
    "RequestLog",
    "RequestRecord",
    "TextFormatter",
    "configure_logging",
    "decision_label",
]
