"""Running ``wrk`` (the C HTTP load generator) against nodes, and reading its results.

Why wrk: the Python load client (:mod:`bench.load`) spends 1-2 ms of CPU per request, so
above a few hundred requests per second it measures itself. wrk costs the client almost
nothing, so a node's throughput and latency are the node's.

* :func:`bench.wrk_script.chat_script` writes the Lua script wrk runs: a fixed pool of
  chat-completion requests (keys rotated, a given share streamed, spread evenly),
  formatted once per thread and sent in turn, and a ``done()`` hook that prints one
  ``WRK_JSON {...}`` line with exact figures (request count, duration, errors by kind,
  latency percentiles in microseconds), so nothing depends on wrk's rounded
  human-readable output. ``python -m bench.wrk --config tokenguard.toml > chat.lua``
  (or ``--key SECRET ...``) writes the same script by hand.
* :func:`run_wrk` runs one wrk process (bounded: it is killed if it overruns its
  duration by :data:`OVERRUN_SECONDS`) and parses its output; :func:`run_wrk_many` runs
  one per node at the same time and adds them up.
* :func:`parse_output` reads the ``WRK_JSON`` line, falling back to wrk's own text
  (``Requests/sec``, the ``--latency`` distribution) when the line is missing.

A run counts answers with a status of 400 or more in ``errors["status"]``; benchmarks
that expect every request to be admitted should check it is 0 (:attr:`WrkResult.ok`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.wrk_script import CHAT_PATH, JSON_MARKER, SURFACE_PATHS, chat_script

OVERRUN_SECONDS = 30.0


class WrkError(RuntimeError):
    """wrk failed, overran its deadline, or printed nothing we can read."""


def find_wrk() -> str | None:
    """The path of the ``wrk`` binary, or ``None`` when it is not installed."""
    return shutil.which("wrk")


# --- results ----------------------------------------------------------------------------


@attrs.frozen
class WrkResult:
    """One wrk run (or several added up). Latencies in seconds; ``latency`` has
    ``p50``/``p75``/``p90``/``p99``/``p999``/``mean``/``max`` (what was reported)."""

    requests: int
    seconds: float
    latency: dict[str, float]
    errors: dict[str, int] = attrs.field(factory=dict)
    bytes: int = 0
    runs: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        """Every request answered, none with a status of 400 or more."""
        return self.requests > 0 and self.error_count == 0

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["rps"] = self.rps
        return data


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _count(text: str) -> int:
    """wrk's counts: ``1234`` or ``1.23k`` / ``4.5M``."""
    match = re.fullmatch(r"([\d.]+)([kMG]?)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk count: {text!r}")
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[match.group(2)]
    return round(float(match.group(1)) * scale)


def parse_text(text: str) -> WrkResult:
    """Read wrk's human-readable output (``--latency`` for the percentiles). Figures are
    as rounded as wrk prints them."""
    done = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", text)
    if done is None:
        raise WrkError(f"no 'N requests in T' line in wrk's output:\n{text}")
    latency: dict[str, float] = {}
    for pct, value in re.findall(r"^\s+([\d.]+)%\s+([\d.]+\w+)\s*$", text, re.M):
        name = {50.0: "p50", 75.0: "p75", 90.0: "p90", 99.0: "p99"}.get(float(pct))
        if name:
            latency[name] = _seconds(value)
    stats = re.search(r"Latency\s+([\d.]+\w+)\s+[\d.]+\w+\s+([\d.]+\w+)", text)
    if stats:
        latency["mean"] = _seconds(stats.group(1))
        latency["max"] = _seconds(stats.group(2))
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket:
        for name, value in zip(
            ("connect", "read", "write", "timeout"), socket.groups(), strict=True
        ):
            errors[name] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors["status"] = int(non2xx.group(1))
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_seconds(done.group(2)),
        latency=latency,
        errors=errors,
    )


def parse_output(text: str) -> WrkResult:
    """The result from wrk's stdout: the script's ``WRK_JSON`` line if present (exact),
    else wrk's text (rounded)."""
    for line in text.splitlines():
        if line.startswith(JSON_MARKER):
            data = json.loads(line[len(JSON_MARKER) :])
            lat = data["latency_us"]
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                latency={k: v / 1e6 for k, v in lat.items() if k not in ("min", "stdev")},
                errors=dict(data["errors"]),
                bytes=data["bytes"],
            )
    return parse_text(text)


def combine(results: Sequence[WrkResult]) -> WrkResult:
    """Runs made side by side (one per node), as one: requests and errors add up, the
    duration is the longest, throughput is therefore the sum of the nodes'. Percentiles
    cannot be merged exactly from summaries: each is the request-weighted mean of the
    runs' (``max`` is the largest), which is exact when the runs are alike."""
    if not results:
        raise ValueError("nothing to combine")
    if len(results) == 1:
        return results[0]
    total = sum(r.requests for r in results)
    names = set.intersection(*(set(r.latency) for r in results))
    latency = {}
    for name in names:
        if name == "max":
            latency[name] = max(r.latency[name] for r in results)
        elif total:
            latency[name] = sum(r.latency[name] * r.requests for r in results) / total
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return WrkResult(
        requests=total,
        seconds=max(r.seconds for r in results),
        latency=latency,
        errors=errors,
        bytes=sum(r.bytes for r in results),
        runs=sum(r.runs for r in results),
    )


# --- running ----------------------------------------------------------------------------


def wrk_argv(
    url: str,
    script: str | Path,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    timeout: float = 10.0,
    binary: str = "wrk",
) -> list[str]:
    """wrk's command line. ``threads`` is capped at ``connections`` (wrk requires it)."""
    return [
        binary,
        f"-t{max(1, min(threads, connections))}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds
        f"--timeout={timeout:g}s",
        "--latency",
        "-s",
        str(script),
        url.rstrip("/") + CHAT_PATH,
    ]


def display_command(argv: Sequence[str]) -> str:
    """A command line as a user would type it, with ``wrk`` unqualified."""
    shown = list(argv)
    if shown and Path(shown[0]).name == "wrk":
        shown[0] = "wrk"
    return shlex.join(shown)


async def run_wrk(
    url: str,
    script: str | Path,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    request_timeout: float = 10.0,
) -> WrkResult:
    """Run wrk against one node and return what it measured; :class:`WrkError` if wrk
    is missing, fails, or runs :data:`OVERRUN_SECONDS` past its duration (it is then
    killed: trio's ``run_process`` never leaves it behind)."""
    binary = find_wrk()
    if binary is None:
        raise WrkError("wrk is not installed (apt-get install wrk)")
    argv = wrk_argv(
        url,
        script,
        connections=connections,
        seconds=seconds,
        threads=threads,
        timeout=request_timeout,
        binary=binary,
    )
    with trio.move_on_after(math.ceil(seconds) + OVERRUN_SECONDS) as scope:
        done = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    if scope.cancelled_caught:
        raise WrkError(f"{display_command(argv)} overran its {seconds:g} s by {OVERRUN_SECONDS} s")
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise WrkError(
            f"{display_command(argv)} exited {done.returncode}:\n"
            f"{output}{done.stderr.decode(errors='replace')}"
        )
    return parse_output(output)


async def run_wrk_many(
    urls: Sequence[str],
    script: str | Path,
    *,
    connections: int,
    seconds: float,
    request_timeout: float = 10.0,
) -> WrkResult:
    """One wrk per node (``connections`` each), all at once; the sum (:func:`combine`)."""
    results: list[WrkResult | None] = [None] * len(urls)

    async def one(i: int, url: str) -> None:
        results[i] = await run_wrk(
            url, script, connections=connections, seconds=seconds, request_timeout=request_timeout
        )

    async with trio.open_nursery() as nursery:
        for i, url in enumerate(urls):
            nursery.start_soon(one, i, url)
    return combine([r for r in results if r is not None])


# --- the script, from the command line ----------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.wrk (--config F | --key SECRET ...) [--stream-share S] > chat.lua``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.wrk", description="Write the wrk Lua script the suite uses."
    )
    parser.add_argument("--key", action="append", default=[], help="API key (repeatable)")
    parser.add_argument("--config", help="a tokenguard.toml: use every key with a plaintext `key`")
    parser.add_argument("--stream-share", type=float, default=0.0, help="share streamed (0)")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--surface", choices=sorted(SURFACE_PATHS), default="chat", help="API surface (chat)"
    )
    args = parser.parse_args(argv)
    secrets = list(args.key)
    if args.config:
        from bench.load.options import keys_from_config

        secrets += [k.secret for k in keys_from_config(args.config)[0]]
    if not secrets:
        parser.error("give --key or --config")
    sys.stdout.write(
        chat_script(
            secrets,
            stream_share=args.stream_share,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            surface=args.surface,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
