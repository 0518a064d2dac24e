"""``python -m bench stress-tests``: rounds of pytest beside CPU burners, stopped at the
first failing round, burners gone afterwards.

The command is run as a user runs it, on a tiny test file of the test's own (given
after ``--``) that records each round and the burners it found running beside it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.procfs import alive
from bench.stress import ROOT, Round, summary

# A test module for the rounds: round N (counted in rounds.json) fails if N is in
# FAIL_ROUNDS; every round notes the burner processes beside it (its parent's
# children running the burner's code) and its own pid; with HOLD, it starts a process
# of its own (as tests start nodes), notes its pid too, and waits.
ROUND_TEST = """
import json
import os
import subprocess
import time
from pathlib import Path

from bench.procfs import children, cmdline
from bench.stress import BURNER_CODE

LOG = Path({log!r})
FAIL_ROUNDS = {fail_rounds!r}
HOLD = {hold!r}


def test_one_round():
    rounds = json.loads(LOG.read_text()) if LOG.exists() else []
    burners = [
        pid for pid in children(os.getppid()) if cmdline(pid).endswith("-c " + BURNER_CODE)
    ]
    pids = [os.getpid()]
    if HOLD:
        pids.append(subprocess.Popen(["sleep", "600"]).pid)
    rounds.append([burners, pids])
    LOG.write_text(json.dumps(rounds))
    assert len(rounds) not in FAIL_ROUNDS
    if HOLD:
        time.sleep(600)
"""


def round_test(tmp_path: Path, fail_rounds: tuple[int, ...] = (), hold: bool = False) -> Path:
    test = tmp_path / "test_round.py"
    log = tmp_path / "rounds.json"
    test.write_text(ROUND_TEST.format(log=str(log), fail_rounds=fail_rounds, hold=hold))
    return test


def rounds_seen(tmp_path: Path) -> list[list]:
    """Per round run: [the burners' pids, [pytest's pid, its test's process's]]."""
    log = tmp_path / "rounds.json"
    return json.loads(log.read_text()) if log.exists() else []


def stress(tmp_path: Path, *args: str, fail_rounds: tuple[int, ...] = ()) -> tuple[int, str, list]:
    test = round_test(tmp_path, fail_rounds)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "stress-tests", *args, "--", str(test)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, [b for b, _ in rounds_seen(tmp_path)]


@pytest.mark.slow
def test_every_round_runs_beside_the_burners_and_they_are_gone_after(tmp_path: Path) -> None:
    status, output, rounds = stress(tmp_path, "--rounds", "2", "--burners", "2")
    assert status == 0, output
    assert len(rounds) == 2
    assert [len(burners) for burners in rounds] == [2, 2]
    assert rounds[0] == rounds[1]  # the same burners, from the first round to the last
    assert not any(alive(pid) for pid in rounds[0])
    assert "round 1/2: passed in" in output and "round 2/2: passed in" in output
    assert "2 of 2 rounds passed; wall time per round: " in output


@pytest.mark.slow
def test_the_rounds_stop_at_the_first_that_fails(tmp_path: Path) -> None:
    status, output, rounds = stress(tmp_path, "--rounds", "4", "--burners", "1", fail_rounds=(2,))
    assert status == 1, output  # pytest's status for a failed test
    assert len(rounds) == 2  # rounds 3 and 4 never ran
    assert [len(burners) for burners in rounds] == [1, 1]
    assert not any(alive(pid) for pid in rounds[0])
    assert "round 2/4: FAILED (pytest exit status 1)" in output
    assert "1 of 4 rounds passed (round 2 failed, the rounds stopped there)" in output


@pytest.mark.slow
def test_stopped_with_sigterm_it_leaves_nothing_running(tmp_path: Path) -> None:
    """SIGTERM in the middle of a round: pytest, the process its test started and the
    burners are stopped; nothing is left running."""
    test = round_test(tmp_path, hold=True)
    command = subprocess.Popen(
        [sys.executable, "-m", "bench", "stress-tests", "--burners", "2", "--", str(test)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard
        while not rounds_seen(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        ((burners, started),) = rounds_seen(tmp_path)
        command.send_signal(signal.SIGTERM)
        output, _ = command.communicate(timeout=300)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    assert command.returncode == 128 + signal.SIGTERM, output
    assert len(burners) == 2 and len(started) == 2
    assert not any(alive(pid) for pid in [*burners, *started])


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--burners", "-1"]])
def test_a_bad_count_is_refused(tmp_path: Path, args: list[str]) -> None:
    status, output, rounds = stress(tmp_path, *args)
    assert status == 2 and "--rounds must be >= 1 and --burners >= 0" in output
    assert rounds == []


def test_the_summary_names_rounds_passed_and_each_rounds_wall_time() -> None:
    done = [Round(1, 0, 612.4), Round(2, 0, 598.6), Round(3, 0, 640.0)]
    assert summary(3, done) == "3 of 3 rounds passed; wall time per round: 612 s, 599 s, 640 s"
