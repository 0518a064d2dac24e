"""``python -m bench stress-tests``: the whole test suite, round after round, beside
processes that burn the CPU, as on a busy CI machine.

Each round runs ``python -m pytest -q -p no:cacheprovider [PYTEST ARGS]`` in the
project's root directory with this very interpreter, so in the virtualenv the command is
run from (what tox's ``py`` environment runs, but on one worker unless given ``-- -n 2
--dist loadfile`` as tox gives it; not tox itself, which would first build an
environment of its own and then run ruff as well). All the
while, ``--burners`` processes (default 2: as many as the CI machine's cores) spin on
the CPU at the same priority, from before the first round until the last ends.

The rounds stop at the first that fails. Printed: each round's result and wall time as
it ends, then ``N of M rounds passed`` and the wall time of each round run. The exit
status is 0 when every round passed, else the failing round's pytest status (or 2 for a
bad command line).

However the command ends, nothing it started is left behind: the burners die with it
(``PR_SET_PDEATHSIG``, even if it is killed), and when it is stopped (Ctrl-C or
SIGTERM) pytest and every process its tests started (pytest runs in a process group
of its own) get SIGTERM, then SIGKILL if any is left after ``STOP_GRACE`` seconds.

    python -m bench stress-tests --rounds 3
    python -m bench stress-tests --rounds 1 --burners 2 -- -x tests/store/test_faults_redis_down.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import attrs

from tokenguard.cluster.children import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider")
# What a burner runs: a busy loop, all of one core for as long as it is let run.
BURNER_CODE = "while True: pass"
# How long the processes of an interrupted round are given to stop after SIGTERM (s).
STOP_GRACE = 20.0


@attrs.frozen
class Round:
    number: int
    status: int  # pytest's exit status
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the whole suite (default 3)"
    )
    parser.add_argument(
        "--burners",
        type=int,
        default=2,
        help="CPU-burning processes beside the suite (default 2)",
    )
    parser.add_argument(
        "pytest_args",
        nargs="*",
        metavar="PYTEST ARGS",
        help=(
            "after --: more arguments for pytest (e.g. -- -x tests/store/test_faults_redis_down.py)"
        ),
    )


@contextmanager
def burning(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` busy-loop processes for the duration of the block; killed after it."""
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            burners.append(
                subprocess.Popen([sys.executable, "-c", BURNER_CODE], preexec_fn=die_with_parent())
            )
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def run_rounds(rounds: int, burners: int, pytest_args: Sequence[str]) -> list[Round]:
    """Run up to ``rounds`` rounds of the suite beside ``burners`` burners; stop at the
    first round that fails. Returns the rounds run, each printed as it ends."""
    command = [sys.executable, *PYTEST, *pytest_args]
    done: list[Round] = []
    with burning(burners):
        for number in range(1, rounds + 1):
            print(f"round {number}/{rounds}: {' '.join(command[1:])}", flush=True)
            start = time.monotonic()
            status = run_pytest(command)
            done.append(Round(number, status, time.monotonic() - start))
            outcome = "passed" if status == 0 else f"FAILED (pytest exit status {status})"
            print(f"round {number}/{rounds}: {outcome} in {done[-1].seconds:.0f} s", flush=True)
            if status != 0:
                break
    return done


def run_pytest(command: Sequence[str]) -> int:
    """Run pytest to its end, in a process group of its own; its exit status.

    Interrupted (Ctrl-C, or SIGTERM made an exception by :func:`main`), it stops the
    whole group, pytest and what its tests started, before passing the interrupt on.
    (Not an interrupt of pytest alone: inside a trio test, pytest takes it for that
    test's failure and goes on with the next.)
    """
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        return process.wait()
    except BaseException:
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to ``process``'s group, SIGKILL to what is left of it after
    ``STOP_GRACE`` seconds; reap ``process``."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(group, 0)  # anyone left?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def summary(rounds: int, done: Sequence[Round]) -> str:
    """``N of M rounds passed``, the failing round if any, and each round's wall time."""
    passed = sum(r.passed for r in done)
    failed = [r.number for r in done if not r.passed]
    times = ", ".join(f"{r.seconds:.0f} s" for r in done)
    line = f"{passed} of {rounds} rounds passed"
    if failed:
        line += f" (round {failed[0]} failed, the rounds stopped there)"
    return f"{line}; wall time per round: {times}"


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.burners < 0:
        print("stress-tests: --rounds must be >= 1 and --burners >= 0", file=sys.stderr)
        return 2
    print(
        f"stress-tests: {args.rounds} round(s) of the test suite in {ROOT}, "
        f"beside {args.burners} CPU burner(s)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupted)  # so that the cleanup above runs
    # Started where SIGINT is ignored (a background job of a script), the command would
    # pass that on to pytest and every process of the suite: a handler of its own
    # makes Ctrl-C work here and resets SIGINT to its default in each child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = run_rounds(args.rounds, args.burners, args.pytest_args)
    except KeyboardInterrupt:
        print("stress-tests: interrupted; the round's processes were stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    print(summary(args.rounds, done), flush=True)
    return next((r.status for r in done if not r.passed), 0)


__all__ = [
    "BURNER_CODE",
    "Round",
    "add_arguments",
    "main",
    "run_pytest",
    "run_rounds",
    "stop_group",
    "summary",
]
