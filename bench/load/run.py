"""A whole load run: workers sending planned requests, progress, the audit
(:func:`run_load`)."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TextIO

import httpx
import trio

from bench.audit.verdict import audit
from bench.load.client import Planner, send_one
from bench.load.options import LoadOptions, UsageError
from bench.load.records import RequestRecord, status_class
from bench.load.summary import LoadResult, summarize


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
    meter = _Progress(progress, options.total, options.duration) if progress is not None else None
    started_wall = time.time()
    cpu0, wall0 = time.process_time(), time.monotonic()
    stop_at = wall0 + options.duration if options.duration is not None else math.inf
    records = await _send_all(options, meter, stop, stop_at)
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


async def _send_all(
    options: LoadOptions, meter: _Progress | None, stop: trio.Event | None, stop_at: float
) -> list[RequestRecord]:
    """Send the planned requests from ``options.concurrency`` workers until the total is
    issued, ``stop_at`` (``time.monotonic()``) has passed or ``stop`` is set; every
    request's record, in the order they ended."""
    planner = Planner(options)
    total = options.total
    records: list[RequestRecord] = []
    # One pool for every node; a connection per worker per node, so picking nodes at
    # random never closes a keep-alive connection to make room for another node's.
    pool = options.concurrency * len(options.urls)
    timeouts = httpx.Timeout(options.timeout, connect=options.connect_timeout)

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
    return records
