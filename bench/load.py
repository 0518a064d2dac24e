"""The load client: OpenAI-compatible traffic against tokenguard nodes, then a report.

``--surface chat`` (the default) sends chat completions, ``--surface responses`` the
Responses API (the same prompts as a string ``input``, ``max_output_tokens``), and
``--surface mix`` each request as one or the other at random: one key's limits are one
budget across both, and the audit checks them as one.

What a run guarantees:

* **Bounded.** It sends at most ``--requests`` requests and starts none after
  ``--duration`` seconds; every request has a total deadline (``--timeout``) on top of
  httpx's per-operation timeouts, so a run always ends.
* **Reproducible choices.** Which key, which node, the prompt size, ``max_tokens`` and
  streaming are drawn from one ``random.Random(--seed)``, in request order, so the same
  seed sends the same sequence of requests (their timing is the server's business).
* **Every request recorded.** Key name (never the secret), node URL, wall-clock and
  monotonic send / answer / end times, status, error kind, whether streamed, the usage
  the server reported (``prompt_tokens``, ``completion_tokens``; for streams from the
  final usage chunk, asked for with ``stream_options.include_usage``) and the
  ``x-ratelimit-*`` / ``retry-after*`` headers.
* **Honest about itself.** The client's own CPU time is measured against wall time;
  when it used more than :data:`CLIENT_BOUND_SHARE` of a core, the report says the run
  was client-bound, i.e. its throughput measures this client, not the server.
* **Audited.** The records go through :func:`bench.audit.verdict.audit`; the command exits 1 on
  definite over-admission or inconsistent rate-limit headers (see that module for what
  exactly is computed), 3 when no request got any HTTP answer, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
import tomllib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx
import trio

from bench.audit.findings import AuditReport
from bench.audit.observations import Observation, parse_refusal
from bench.audit.report import audit_dict, format_audit
from bench.audit.verdict import audit
from tokenguard.config.loading import load_settings
from tokenguard.config.settings import ConfigError
from tokenguard.model import Limits, digest_of
from tokenguard.upstreams.mock import WORDS

CLIENT_BOUND_SHARE = 0.85
PROMPT_OVERHEAD = 7  # one user message: 3 per message + the role + 3 of reply priming
KEPT_HEADERS = ("x-ratelimit-", "retry-after", "x-tokenguard-queued-ms")
DEFAULT_REQUESTS = 1000
SURFACES = {"chat": ("chat",), "responses": ("responses",), "mix": ("chat", "responses")}
SURFACE_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


class UsageError(ValueError):
    """A bad command-line value; the message says which and why."""


# --- options ----------------------------------------------------------------------------


@attrs.frozen
class TokenRange:
    """A uniform integer distribution ``low..high`` (inclusive)."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


def parse_range(text: str, *, allow_none: bool = False) -> TokenRange | None:
    """``"20:200"`` (uniform), ``"64"`` (fixed) or, if allowed, ``"none"``."""
    if allow_none and text.strip().lower() == "none":
        return None
    low_text, sep, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise UsageError(f"expected N or LOW:HIGH, got {text!r}") from None
    if low < 1 or high < low:
        raise UsageError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return TokenRange(low, high)


@attrs.frozen
class KeySpec:
    """An API key to send with: its name, its secret and (if known) its limits."""

    name: str
    secret: str = attrs.field(repr=False)
    limits: Limits | None = None


def parse_key(text: str) -> KeySpec:
    """``SECRET[,name=NAME][,rpm=N][,input_tpm=N][,output_tpm=N]``.

    Without ``name=``, the key is named by a digest prefix, never by part of the secret,
    since names go into reports and JSON files.
    """
    secret, *fields = text.split(",")
    if not secret:
        raise UsageError(f"--key needs a secret first, got {text!r}")
    name = "key-" + digest_of(secret)[:8]
    values: dict[str, int] = {}
    for field in fields:
        field_name, sep, value = field.partition("=")
        if not sep:
            raise UsageError(f"--key field {field!r} is not NAME=VALUE")
        if field_name == "name":
            name = value
        elif field_name in ("rpm", "input_tpm", "output_tpm"):
            try:
                values[field_name] = int(value)
            except ValueError:
                raise UsageError(f"--key {field_name} must be an integer, got {value!r}") from None
        else:
            raise UsageError(
                f"--key: unknown field {field_name!r} (name, rpm, input_tpm, output_tpm)"
            )
    return KeySpec(name=name, secret=secret, limits=Limits(**values) if values else None)


def keys_from_config(path: str | Path, only: Sequence[str] = ()) -> tuple[list[KeySpec], int, int]:
    """Keys with a plaintext ``key`` in a server config, their limits, window and bucket.

    Limits come from :func:`tokenguard.config.loading.load_settings` (so tiers resolve as the
    server resolves them); the plaintext is read from the same TOML, since settings keep
    only digests. Keys given only as ``sha256`` cannot be sent and are skipped.
    """
    settings = load_settings(path)
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    secrets = {k["name"]: k["key"] for k in raw.get("keys", []) if "key" in k}
    specs = [
        KeySpec(name=k.name, secret=secrets[k.name], limits=k.limits)
        for k in settings.keys
        if k.name in secrets and (not only or k.name in only)
    ]
    missing = set(only) - {s.name for s in specs}
    if missing:
        raise UsageError(f"{path}: no key with a plaintext `key` named {sorted(missing)}")
    return specs, settings.window_seconds, settings.bucket_seconds


@attrs.frozen
class LoadOptions:
    """Everything a run needs. ``requests``/``duration``: whichever ends first (but
    each of the ``concurrency`` workers sends at least one request)."""

    urls: tuple[str, ...] = attrs.field(converter=lambda urls: tuple(u.rstrip("/") for u in urls))
    keys: tuple[KeySpec, ...] = attrs.field(converter=tuple)
    requests: int | None = None
    duration: float | None = None
    concurrency: int = 16
    prompt_tokens: TokenRange = TokenRange(20, 200)
    max_tokens: TokenRange | None = TokenRange(16, 128)
    stream_share: float = 0.3
    seed: int = 0
    window_seconds: float = 60.0
    bucket_seconds: float = 5.0
    timeout: float = 30.0
    connect_timeout: float = 5.0
    model: str = "gpt-4o"
    surface: str = attrs.field(default="chat", validator=attrs.validators.in_(SURFACES))

    @property
    def total(self) -> int | None:
        """The request budget; ``None`` when only a duration bounds the run."""
        if self.requests is None and self.duration is None:
            return DEFAULT_REQUESTS
        return self.requests

    def describe(self) -> dict[str, Any]:
        """The options as JSON-able data, without the keys' secrets."""
        return {
            "urls": list(self.urls),
            "keys": [
                {"name": k.name, "limits": None if k.limits is None else attrs.asdict(k.limits)}
                for k in self.keys
            ],
            "requests": self.total,
            "duration": self.duration,
            "concurrency": self.concurrency,
            "prompt_tokens": str(self.prompt_tokens),
            "max_tokens": None if self.max_tokens is None else str(self.max_tokens),
            "stream_share": self.stream_share,
            "seed": self.seed,
            "window_seconds": self.window_seconds,
            "bucket_seconds": self.bucket_seconds,
            "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "model": self.model,
            "surface": self.surface,
        }


# --- records ----------------------------------------------------------------------------


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


# --- the run ----------------------------------------------------------------------------


def make_prompt(rng: random.Random, tokens: int) -> str:
    """Words that are one token each (the mock's own), so the count is about ``tokens``."""
    words = max(1, tokens - PROMPT_OVERHEAD)
    return "".join(rng.choices(WORDS, k=words)).lstrip()


def output_reservation(plan: Plan) -> int | None:
    """The output tokens the server reserves for a plan, as ``Pipeline.output_reservation``
    computes them (n is always 1 here); ``None`` when the key's limits are unknown."""
    if plan.max_tokens is not None:
        return plan.max_tokens
    limits = plan.key.limits
    if limits is None:
        return None
    per_choice = limits.default_max_tokens
    if limits.output_tpm is not None:
        per_choice = max(1, min(per_choice, limits.output_tpm))
    return per_choice


class _Planner:
    """Draws plans in request order from one seeded generator."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.issued = 0

    def next(self) -> Plan:
        o, rng = self.options, self.rng
        key = rng.choice(o.keys)
        url = rng.choice(o.urls)
        prompt_tokens = o.prompt_tokens.draw(rng)
        max_tokens = None if o.max_tokens is None else o.max_tokens.draw(rng)
        stream = rng.random() < o.stream_share
        surfaces = SURFACES[o.surface]
        # (drawn only for a mix: a run of one surface draws as it always did)
        surface = rng.choice(surfaces) if len(surfaces) > 1 else surfaces[0]
        prompt = make_prompt(rng, prompt_tokens)
        body: dict[str, Any] = {"model": o.model}
        if surface == "responses":
            # a string input is counted as chat's one-message prompt
            body["input"] = prompt
            if max_tokens is not None:
                body["max_output_tokens"] = max_tokens
            if stream:
                body["stream"] = True  # the usage comes in the terminal event
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
        plan = Plan(
            id=self.issued,
            key=key,
            url=url,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            stream=stream,
            body=json.dumps(body, separators=(",", ":")).encode(),
            surface=surface,
        )
        self.issued += 1
        return plan


def _read_usage(data: Any) -> tuple[int | None, int | None]:
    """(input, output tokens) of a chat or Responses ``usage`` block."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None, None
    if "input_tokens" in usage:
        return usage.get("input_tokens"), usage.get("output_tokens")
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _error_message(body: bytes) -> str | None:
    """The ``error.message`` of an OpenAI error body, if it is one."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


async def _read_stream(response: httpx.Response) -> tuple[int | None, int | None, int, bool]:
    """Parse SSE until ``[DONE]`` (chat) or a terminal event (Responses): (prompt,
    completion tokens, content chunks, done)."""
    prompt = completion = None
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return prompt, completion, chunks, True
        event = json.loads(payload)
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "response.output_text.delta":
            chunks += 1
        elif kind in RESPONSES_TERMINAL:  # a Responses stream ends here, no [DONE]
            prompt, completion = _read_usage(event.get("response"))
            return prompt, completion, chunks, True
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
        if event.get("usage"):
            prompt, completion = _read_usage(event)
    return prompt, completion, chunks, False


async def send_one(client: httpx.AsyncClient, plan: Plan, deadline: float) -> RequestRecord:
    """Send one planned request and record what happened; never raises for I/O."""
    start_wall, start = time.time(), time.monotonic()
    answered: float | None = None
    status: int | None = None
    error: str | None = None
    prompt = completion = None
    headers: dict[str, str] = {}
    message = None
    chunks = 0
    request_headers = {
        "authorization": f"Bearer {plan.key.secret}",
        "content-type": "application/json",
    }
    try:
        with trio.move_on_after(deadline) as scope:
            async with client.stream(
                "POST",
                f"{plan.url}{SURFACE_PATHS[plan.surface]}",
                content=plan.body,
                headers=request_headers,
            ) as response:
                answered = time.monotonic()
                status = response.status_code
                headers = {k: v for k, v in response.headers.items() if k.startswith(KEPT_HEADERS)}
                if plan.stream and status == 200:
                    prompt, completion, chunks, done = await _read_stream(response)
                    if not done or completion is None:
                        error = "incomplete stream"
                elif status == 200:
                    prompt, completion = _read_usage(json.loads(await response.aread()))
                    if completion is None:
                        error = "bad response: no usage"
                else:
                    message = _error_message(await response.aread())
        if scope.cancelled_caught:
            error = "timeout"
    except httpx.HTTPError as exc:
        error = error_kind(exc)
    except (json.JSONDecodeError, UnicodeDecodeError):
        error = "bad response: not JSON"
    end = time.monotonic()
    if error is None and status is not None and status not in (200, 429):
        error = f"{status // 100}xx: {status}"
    if completion is None and status == 200 and plan.stream:
        completion = chunks or None  # what arrived: a lower bound of what was charged
    return RequestRecord(
        id=plan.id,
        key=plan.key.name,
        url=plan.url,
        streamed=plan.stream,
        planned_prompt_tokens=plan.prompt_tokens,
        max_tokens=plan.max_tokens,
        start_wall=start_wall,
        start=start,
        answered=end if answered is None else answered,
        end=end,
        status=status,
        error=error,
        input_tokens=prompt,
        output_tokens=completion,
        headers=headers,
        message=message,
        reserved_output=output_reservation(plan),
        surface=plan.surface,
    )


@attrs.frozen
class Summary:
    """The run in numbers. Latencies are seconds, over requests that got an HTTP answer."""

    requests: int
    wall_seconds: float
    cpu_seconds: float
    throughput: float
    latency: dict[str, float]
    latency_by_status: dict[str, dict[str, float]]
    statuses: dict[str, int]
    by_node: dict[str, dict[str, int]]
    by_key: dict[str, dict[str, int]]
    errors: dict[str, int]
    streamed: int
    input_tokens: int
    output_tokens: int

    @property
    def cpu_share(self) -> float:
        """The client's CPU time as a share of one core over the run."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def client_bound(self) -> bool:
        return self.cpu_share > CLIENT_BOUND_SHARE

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["cpu_share"] = self.cpu_share
        data["client_bound"] = self.client_bound
        return data


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (nearest rank), max and mean; empty input gives an empty dict."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def _count(records: Sequence[RequestRecord], group: str) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in records:
        row = table.setdefault(getattr(r, group), {})
        cls = status_class(r)
        row[cls] = row.get(cls, 0) + 1
    return table


def summarize(records: Sequence[RequestRecord], wall: float, cpu: float) -> Summary:
    answered = [r for r in records if r.status is not None]
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    by_status: dict[str, list[float]] = {}
    for r in records:
        cls = status_class(r)
        statuses[cls] = statuses.get(cls, 0) + 1
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
        if r.status is not None:
            by_status.setdefault(cls, []).append(r.latency)
    admitted = [r for r in records if r.status == 200]
    return Summary(
        requests=len(records),
        wall_seconds=wall,
        cpu_seconds=cpu,
        throughput=len(records) / wall if wall > 0 else 0.0,
        latency=percentiles([r.latency for r in answered]),
        latency_by_status={k: percentiles(v) for k, v in sorted(by_status.items())},
        statuses=dict(sorted(statuses.items())),
        by_node=_count(records, "url"),
        by_key=_count(records, "key"),
        errors=dict(sorted(errors.items())),
        streamed=sum(1 for r in records if r.streamed),
        input_tokens=sum(r.input_tokens or 0 for r in admitted),
        output_tokens=sum(r.output_tokens or 0 for r in admitted),
    )


@attrs.frozen
class LoadResult:
    options: LoadOptions
    started_wall: float
    records: tuple[RequestRecord, ...]
    summary: Summary
    audit: AuditReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.options.describe(),
            "started_wall": self.started_wall,
            "summary": self.summary.to_dict(),
            "audit": audit_dict(self.audit),
            "records": [r.to_dict() for r in self.records],
        }


class _Progress:
    """The live line on stderr: done/total, the rate over the last seconds, statuses."""

    def __init__(self, stream: TextIO, total: int | None, duration: float | None) -> None:
        self.stream = stream
        self.total = total
        self.duration = duration
        self.started = time.monotonic()
        self.counts: dict[str, int] = {}
        self.done = 0
        self.recent: deque[float] = deque()

    def add(self, record: RequestRecord) -> None:
        self.done += 1
        cls = status_class(record)
        self.counts[cls] = self.counts.get(cls, 0) + 1
        self.recent.append(time.monotonic())

    def line(self) -> str:
        now = time.monotonic()
        while self.recent and self.recent[0] < now - 2.0:
            self.recent.popleft()
        span = min(2.0, max(now - self.started, 1e-3))
        done = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        clock = f"{now - self.started:.1f}s" + (
            f"/{self.duration:g}s" if self.duration is not None else ""
        )
        counts = " ".join(f"{k}:{v}" for k, v in sorted(self.counts.items()))
        return f"{done}  {len(self.recent) / span:.1f} req/s  {clock}  {counts}"

    async def show(self) -> None:
        while True:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
            await trio.sleep(0.25)

    def finish(self) -> None:
        self.stream.write("\r" + self.line() + "\x1b[K\n")
        self.stream.flush()


async def run_load(
    options: LoadOptions, *, progress: TextIO | None = None, stop: trio.Event | None = None
) -> LoadResult:
    """Run the load described by ``options``, audit it, and return everything.

    ``progress``: a stream for the live status line (``None``: quiet). ``stop``: once
    set, no new request starts; those in flight finish and the run is reported.
    """
    if not options.urls or not options.keys:
        raise UsageError("give at least one --url and one key (--key or --config)")
    if options.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    planner = _Planner(options)
    total = options.total
    records: list[RequestRecord] = []
    meter = _Progress(progress, total, options.duration) if progress is not None else None
    # One pool for every node; a connection per worker per node, so picking nodes at
    # random never closes a keep-alive connection to make room for another node's.
    pool = options.concurrency * len(options.urls)
    timeouts = httpx.Timeout(options.timeout, connect=options.connect_timeout)
    started_wall = time.time()
    cpu0, wall0 = time.process_time(), time.monotonic()
    stop_at = wall0 + options.duration if options.duration is not None else math.inf

    async def worker(client: httpx.AsyncClient) -> None:
        # Every worker sends at least one request, even if it only starts after the
        # duration (a starved machine): a run always measures something.
        first = True
        while (
            (total is None or planner.issued < total)
            and (first or time.monotonic() < stop_at)
            and not (stop is not None and stop.is_set())
        ):
            first = False
            record = await send_one(client, planner.next(), options.timeout)
            records.append(record)
            if meter is not None:
                meter.add(record)

    async with httpx.AsyncClient(
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        timeout=timeouts,
    ) as client:
        async with trio.open_nursery() as outer:
            if meter is not None:
                outer.start_soon(meter.show)
            async with trio.open_nursery() as workers:
                for _ in range(options.concurrency):
                    workers.start_soon(worker, client)
            outer.cancel_scope.cancel()
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    if meter is not None:
        meter.finish()
    records.sort(key=lambda r: r.id)
    limits = {k.name: k.limits for k in options.keys if k.limits is not None}
    report = audit(
        (r.observation() for r in records),
        limits,
        options.window_seconds,
        options.bucket_seconds,
    )
    return LoadResult(
        options=options,
        started_wall=started_wall,
        records=tuple(records),
        summary=summarize(records, wall, cpu),
        audit=report,
    )


# --- the report -------------------------------------------------------------------------


def _ms(stats: dict[str, float], name: str) -> str:
    return f"{stats[name] * 1000:.1f}" if name in stats else "-"


def _table(title: str, table: dict[str, dict[str, int]], columns: list[str]) -> list[str]:
    width = max([len(title), *(len(k) for k in table)])
    lines = [f"  {title:<{width}} " + " ".join(f"{c:>7}" for c in columns)]
    for name, row in sorted(table.items()):
        lines.append(f"  {name:<{width}} " + " ".join(f"{row.get(c, 0):>7}" for c in columns))
    return lines


def format_report(result: LoadResult) -> str:
    """The end-of-run report: throughput, latency, statuses, nodes, keys, errors, audit."""
    s = result.summary
    o = result.options
    columns = list(s.statuses)
    lines = [
        f"tokenguard load: {s.requests} requests to {len(o.urls)} node(s), "
        f"{len(o.keys)} key(s), concurrency {o.concurrency}, {s.streamed} streamed, seed {o.seed}",
        f"  wall {s.wall_seconds:.2f} s, throughput {s.throughput:.1f} req/s; "
        f"client CPU {s.cpu_seconds:.2f} s = {100 * s.cpu_share:.0f}% of one core"
        + (
            "  ** client-bound: the client, not the server, limited throughput **"
            if s.client_bound
            else ""
        ),
        f"  latency ms: p50 {_ms(s.latency, 'p50')}  p95 {_ms(s.latency, 'p95')}  "
        f"p99 {_ms(s.latency, 'p99')}  max {_ms(s.latency, 'max')}",
    ]
    for cls, stats in s.latency_by_status.items():
        lines.append(
            f"    {cls:>5}: p50 {_ms(stats, 'p50')}  p95 {_ms(stats, 'p95')}  "
            f"p99 {_ms(stats, 'p99')}  max {_ms(stats, 'max')}"
        )
    lines.append("  statuses: " + ", ".join(f"{k}: {v}" for k, v in s.statuses.items()))
    lines.append(
        f"  admitted usage: {s.input_tokens} input tokens, {s.output_tokens} output tokens"
    )
    lines += _table("node", s.by_node, columns)
    lines += _table("key", s.by_key, columns)
    if s.errors:
        lines.append("  errors: " + ", ".join(f"{k}: {v}" for k, v in s.errors.items()))
    else:
        lines.append("  errors: none")
    lines.append(format_audit(result.audit))
    return "\n".join(lines)


def write_json(result: LoadResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")


# --- the command ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        help="node base URL (repeatable), e.g. http://127.0.0.1:8000",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        help="SECRET[,name=N][,rpm=N][,input_tpm=N][,output_tpm=N] (repeatable)",
    )
    parser.add_argument("--config", help="the server's tokenguard.toml: keys, limits and window")
    parser.add_argument(
        "--only", action="append", default=[], help="with --config: use only this key name"
    )
    parser.add_argument(
        "--requests", type=int, help=f"requests in total (default {DEFAULT_REQUESTS})"
    )
    parser.add_argument("--duration", type=float, help="start no request after S seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    parser.add_argument("--prompt-tokens", default="20:200", help="LOW:HIGH uniform (20:200)")
    parser.add_argument("--max-tokens", default="16:128", help="LOW:HIGH, N or none (16:128)")
    parser.add_argument("--stream-share", type=float, default=0.3, help="share streamed (0.3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument(
        "--surface",
        choices=sorted(SURFACES),
        default="chat",
        help="chat completions, the Responses API, or a mix of both (chat)",
    )
    parser.add_argument("--window", type=float, help="window seconds without --config (60)")
    parser.add_argument("--bucket", type=float, help="bucket seconds without --config (5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline (30)")
    parser.add_argument("--json", dest="json_path", help="write the full result here")
    parser.add_argument(
        "--progress", action="store_true", help="live status line even if stderr is no TTY"
    )


def options_from_args(args: argparse.Namespace) -> LoadOptions:
    keys: list[KeySpec] = []
    window, bucket = 60.0, 5.0
    if args.config:
        config_keys, window, bucket = keys_from_config(args.config, args.only)
        keys += config_keys
    elif args.only:
        raise UsageError("--only needs --config")
    keys += [parse_key(k) for k in args.key]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise UsageError(f"key names must be distinct (give --key ...,name=N), got {names}")
    if args.window is not None:
        window = args.window
    if args.bucket is not None:
        bucket = args.bucket
    if not 0 <= args.stream_share <= 1:
        raise UsageError("--stream-share must be within 0..1")
    if args.requests is not None and args.requests < 1:
        raise UsageError("--requests must be at least 1")
    prompt_tokens = parse_range(args.prompt_tokens)
    assert prompt_tokens is not None
    return LoadOptions(
        urls=tuple(args.url),
        keys=tuple(keys),
        requests=args.requests,
        duration=args.duration,
        concurrency=args.concurrency,
        prompt_tokens=prompt_tokens,
        max_tokens=parse_range(args.max_tokens, allow_none=True),
        stream_share=args.stream_share,
        seed=args.seed,
        window_seconds=float(window),
        bucket_seconds=float(bucket),
        timeout=args.timeout,
        model=args.model,
        surface=args.surface,
    )


async def _run_interruptible(options: LoadOptions, progress: TextIO | None) -> LoadResult:
    """Run the load; a first Ctrl-C stops it early and still reports, a second aborts."""
    stop = trio.Event()

    async def on_interrupt(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                print("\nbench load: stopping; Ctrl-C again to abort", file=sys.stderr)
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(on_interrupt)  # no request before Ctrl-C is caught
        result = await run_load(options, progress=progress, stop=stop)
        nursery.cancel_scope.cancel()
    return result


def main(args: argparse.Namespace) -> int:
    """``python -m bench load``: run, print the report, write JSON; the exit code."""
    try:
        options = options_from_args(args)
        progress = sys.stderr if (args.progress or sys.stderr.isatty()) else None
        result = trio.run(_run_interruptible, options, progress)
    except (UsageError, ConfigError) as exc:
        print(f"bench load: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json_path:
        write_json(result, args.json_path)
        print(f"full result written to {args.json_path}")
    if not any(r.status is not None for r in result.records):
        return 3
    return 0 if result.audit.ok else 1
