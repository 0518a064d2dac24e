"""What a load run keeps of each request: its :class:`Plan` and its
:class:`RequestRecord`."""

from __future__ import annotations

from typing import Any

import attrs
import httpx

from bench.audit.observations import Observation, parse_refusal
from bench.load.options import KeySpec


@attrs.frozen
class Plan:
    """One request, drawn before it is sent."""

    id: int
    key: KeySpec
    url: str
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    body: bytes
    surface: str = "chat"


@attrs.frozen
class RequestRecord:
    """One request's outcome. Times: ``start``/``answered``/``end`` are monotonic seconds
    (sent; headers received, or the failure; body done); ``start_wall`` is ``time.time()``
    at send. ``error`` names what went wrong, ``None`` for a complete HTTP answer."""

    id: int
    key: str
    url: str
    streamed: bool
    planned_prompt_tokens: int
    max_tokens: int | None
    start_wall: float
    start: float
    answered: float
    end: float
    status: int | None
    error: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    message: str | None = None
    reserved_output: int | None = None
    surface: str = "chat"

    @property
    def latency(self) -> float:
        return self.end - self.start

    def observation(self) -> Observation:
        """What the audit needs: admission happened between send and headers (and, for
        a request that waited in the admission queue, not before ``x-tokenguard-queued-ms``
        after its send: the node's wait before the store call that admitted it)."""
        queued = int(self.headers.get("x-tokenguard-queued-ms", "0") or 0) / 1000
        return Observation(
            id=self.id,
            key=self.key,
            start=min(self.start + queued, self.answered),
            end=self.answered,
            status=self.status,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            headers={k: v for k, v in self.headers.items() if k.startswith("x-ratelimit-")},
            refusal=parse_refusal(self.message) if self.status == 429 and self.message else None,
            reserved_output=self.reserved_output,
        )

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["end_wall"] = self.start_wall + (self.end - self.start)
        return data


def error_kind(exc: BaseException) -> str:
    """A short, stable name for a transport failure, for counting errors by kind."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, httpx.PoolTimeout):
        return "pool timeout"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect error"
    if isinstance(exc, httpx.ProtocolError):
        return "protocol error"
    if isinstance(exc, httpx.NetworkError):
        return "network error"
    return f"error: {type(exc).__name__}"


def status_class(record: RequestRecord) -> str:
    """``"200"``, ``"429"``, ``"5xx"``-style buckets and ``"error"`` for no HTTP answer."""
    if record.status is None:
        return "error"
    if record.status in (200, 429):
        return str(record.status)
    return f"{record.status // 100}xx" if record.status >= 500 else str(record.status)
