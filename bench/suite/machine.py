"""The machine and the checkout a report was measured on, and the time of day.

Every section of the report names them (a figure without its machine means little).
Reading ``/proc`` or ``git`` may fail: the fields then say ``unknown`` or 0, never raise.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path

import attrs

# The checkout the suite runs from: its commit goes into the report, and the
# ``python -m bench ...`` processes the suite starts run from here.
REPO = Path(__file__).resolve().parents[2]


@attrs.frozen
class Machine:
    """What a report names about where it ran: cores (online, and usable by this
    process), CPU model, memory, kernel, Python, the commit measured and the date."""

    cores: int
    usable_cores: int
    cpu: str
    memory_gb: float
    kernel: str
    python: str
    commit: str
    date: str

    def short(self) -> str:
        return f"{self.usable_cores} cores, {self.cpu}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory_gb() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> Machine:
    """This machine and checkout now (the commit marked if the tree has changes)."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return Machine(
        cores=os.cpu_count() or 1,
        usable_cores=usable,
        cpu=_cpu_model(),
        memory_gb=_memory_gb(),
        kernel=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        commit=commit,
        date=utc_now(),
    )
