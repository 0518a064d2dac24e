"""Running the suite: the scenarios in their order, the work dir, the report written.

:func:`run_suite` is the whole run (``python -m bench suite`` and the tests call it);
:data:`SCENARIOS` is the run order. A scenario that fails (a process would not start, a
tool failed) becomes a section saying so, and the others still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

import attrs
import trio

from bench.suite.accuracy import scenario_accuracy
from bench.suite.clients import LoadClient, WrkClient
from bench.suite.concurrency import scenario_concurrency
from bench.suite.context import Suite
from bench.suite.decisions import scenario_decisions
from bench.suite.feed import scenario_feed
from bench.suite.machine import REPO, machine_info, utc_now
from bench.suite.memory import scenario_memory
from bench.suite.nodes import scenario_nodes
from bench.suite.profile import Profile
from bench.suite.proxy import scenario_proxy
from bench.suite.report import render_markdown
from bench.suite.rules import scenario_rules
from bench.suite.section import Section
from bench.suite.startup import scenario_startup
from bench.suite.stores import scenario_stores
from bench.suite.streaming import scenario_streaming
from bench.suite.streams import scenario_streams
from bench.suite.targets import SuiteError
from bench.suite.tokens import scenario_tokens
from bench.wrk import WrkError, find_wrk

# In run order: ``memory`` last, as it reports the samples the others took.
SCENARIO_FUNCTIONS: dict[str, Callable[[Suite], Awaitable[Section]]] = {
    "startup": scenario_startup,
    "decisions": scenario_decisions,
    "tokens": scenario_tokens,
    "stores": scenario_stores,
    "rules": scenario_rules,
    "concurrency": scenario_concurrency,
    "streaming": scenario_streaming,
    "nodes": scenario_nodes,
    "accuracy": scenario_accuracy,
    "proxy": scenario_proxy,
    "feed": scenario_feed,
    "streams": scenario_streams,
    "memory": scenario_memory,
}
SCENARIOS = tuple(SCENARIO_FUNCTIONS)


def make_workdir() -> Path:
    """A fresh directory with a short path (unix socket paths must stay < 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="tg-suite-", dir="/tmp" if os.path.isdir("/tmp") else None))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, making its directory if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@attrs.frozen
class SuiteResult:
    """A finished run: its sections, the report's text, how long it took, where the
    report was written; ``ok`` unless a scenario failed."""

    sections: tuple[Section, ...]
    markdown: str
    seconds: float
    output: Path

    @property
    def ok(self) -> bool:
        return not any(s.error for s in self.sections)


async def run_suite(
    profile: Profile,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    output: Path = REPO / "docs" / "performance.md",
    img_dir: Path | None = None,
    redis_url: str | None = None,
    client: str = "auto",
    command: str = "python -m bench suite",
    progress: TextIO | None = sys.stderr,
    json_path: Path | None = None,
    keep: bool = False,
) -> SuiteResult:
    """Run ``scenarios`` (in :data:`SCENARIOS` order) and write the report to ``output``
    (charts to ``img_dir``, default ``output``'s ``img/``). Every process started is
    stopped before this returns or raises.

    ValueError for an unknown scenario, or ``client="wrk"`` without wrk installed."""
    client = _checked(scenarios, client)
    output = Path(output)
    img_dir = Path(img_dir) if img_dir is not None else output.parent / "img"
    workdir = make_workdir()
    started = time.monotonic()
    load_before = _load_average()
    ok = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            suite = Suite(
                profile=profile,
                machine=machine_info(),
                command=command,
                workdir=workdir,
                img_dir=img_dir,
                doc_dir=output.parent,
                stack=stack,
                client=WrkClient(workdir) if client == "wrk" else LoadClient(),
                given_redis=redis_url,
                progress=progress,
            )
            suite.say(f"{profile.name} profile, client {suite.client.name}, work dir {workdir}")
            sections = await _run_scenarios(suite, scenarios)
            suite.say("stopping processes")
        seconds = time.monotonic() - started
        markdown = render_markdown(suite, sections, seconds, (load_before, _load_average()))
        write_text(output, markdown)
        if json_path is not None:
            write_text(Path(json_path), _json(suite, sections, seconds))
        ok = True
        return SuiteResult(tuple(sections), markdown, seconds, output)
    finally:
        if keep or not ok:
            if progress is not None:
                progress.write(f"suite: logs kept in {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _checked(scenarios: Sequence[str], client: str) -> str:
    """The client to use (``wrk`` or ``load``); ValueError for an unknown scenario or
    ``wrk`` without wrk installed."""
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if client == "auto":
        client = "wrk" if find_wrk() else "load"
    if client == "wrk" and find_wrk() is None:
        raise ValueError("--client wrk: wrk is not installed (apt-get install wrk)")
    return client


async def _run_scenarios(suite: Suite, scenarios: Sequence[str]) -> list[Section]:
    """Each of ``scenarios``, in :data:`SCENARIOS` order; a failed one as its error."""
    sections: list[Section] = []
    for name in SCENARIOS:
        if name not in scenarios:
            continue
        try:
            sections.append(await SCENARIO_FUNCTIONS[name](suite))
        except (SuiteError, WrkError, OSError, trio.TooSlowError, ValueError) as exc:
            suite.say(f"{name} FAILED: {exc}")
            failed = Section(key=name, title=name, started=utc_now())
            failed.error = "".join(traceback.format_exception_only(exc))
            sections.append(failed)
    return sections


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _json(suite: Suite, sections: Sequence[Section], seconds: float) -> str:
    """Every figure of the run (``--json``): the machine, the profile, each section's
    data, goals and error."""
    data = {
        "machine": attrs.asdict(suite.machine),
        "profile": attrs.asdict(suite.profile),
        "seconds": seconds,
        "sections": {
            s.key: {
                "data": s.data,
                "goals": [attrs.asdict(g) for g in s.goals],
                "error": s.error,
            }
            for s in sections
        },
    }
    return json.dumps(data, indent=1, default=str)
