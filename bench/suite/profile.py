"""The suite's profiles: how long each measurement lasts, how many rounds, which levels.

``FULL`` is ``python -m bench suite`` (about 7 minutes on 2 cores), ``QUICK`` is
``--quick`` (short durations, fewer rounds); the tests make smaller ones of their own.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Profile:
    """Durations (seconds), rounds and levels of one kind of run."""

    name: str
    warmup: int = 2
    connections: int = 32
    rounds: int = 5
    seconds: int = 5
    latency_rounds: int = 3
    latency_seconds: int = 3
    decisions_rounds: int = 3
    decisions_seconds: float = 3.0
    redis_benchmark_requests: int = 100_000
    sweep_levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    sweep_seconds: int = 2
    stream_shares: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    stream_rounds: int = 2
    stream_seconds: int = 2
    nodes_rounds: int = 3
    nodes_seconds: int = 5
    nodes_connections: int = 48
    accuracy_seconds: float = 25.0
    accuracy_concurrency: int = 24
    startup_repeats: int = 3
    settle: float = 1.0  # idle seconds before an "idle" memory sample
    decisions_extras: bool = True  # admissions-only and one-task decision runs too
    tokens_rounds: int = 3
    proxy_rounds: int = 3
    proxy_seconds: float = 5.0
    feed_rounds: int = 3
    feed_seconds: float = 4.0
    feed_latency_seconds: float = 5.0
    streams_levels: tuple[int, ...] = (500, 1000, 2000)  # concurrent paced streams
    streams_audit: int = 200  # streams of the audited run (one key's limit hit)


FULL = Profile(name="full")
QUICK = Profile(
    name="quick",
    warmup=1,
    rounds=2,
    seconds=2,
    latency_rounds=1,
    latency_seconds=1,
    decisions_rounds=1,
    decisions_seconds=1.0,
    redis_benchmark_requests=20_000,
    sweep_levels=(1, 8, 64, 256),
    sweep_seconds=1,
    stream_shares=(0.0, 1.0),
    stream_rounds=1,
    stream_seconds=1,
    nodes_rounds=1,
    nodes_seconds=2,
    accuracy_seconds=8.0,
    startup_repeats=1,
    tokens_rounds=1,
    proxy_rounds=1,
    proxy_seconds=2.0,
    feed_rounds=1,
    feed_seconds=2.0,
    feed_latency_seconds=2.0,
    streams_levels=(100, 200),
    streams_audit=40,
)
