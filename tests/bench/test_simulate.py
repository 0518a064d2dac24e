"""Tests for bench.simulate: the cluster simulation holds its invariants on the code it
runs against, finds each planted bug, and replays a seed exactly.

The simulations run in this process on trio's mock clock (no sleeping, no servers):
each test runs a handful of seeded simulations of a simulated minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.simulate.cli import DEFAULT_SEEDS, describe
from bench.simulate.faults import FAULT_KINDS, parse_kinds
from bench.simulate.plants import PLANTS
from bench.simulate.runner import Options, simulate

ROOT = Path(__file__).resolve().parents[2]
# The run kept in tox: every fault kind.
SMALL_RUN_SEEDS = 40
ALL_FAULTS = parse_kinds("all")


def test_a_small_run_holds_every_invariant_on_this_code():
    options = Options(minutes=1, faults=ALL_FAULTS)
    for seed in range(SMALL_RUN_SEEDS):
        outcome = simulate(seed, options)
        assert outcome.violation is None, describe(outcome, options, 40)
        assert outcome.counts.get("200", 0) + outcome.counts.get("429", 0) > 0


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_each_planted_bug_is_found_within_the_default_seeds_and_its_seed_replays(plant):
    options = Options(minutes=1, faults=ALL_FAULTS, plant=plant)
    caught = None
    for seed in range(DEFAULT_SEEDS):
        outcome = simulate(seed, options)
        if outcome.violation is not None:
            assert outcome.violation.invariant in PLANTS[plant].caught_by, describe(
                outcome, options, 40
            )
            caught = outcome
            break
    assert caught is not None, f"{plant} not found in {DEFAULT_SEEDS} seeds"
    again = simulate(caught.seed, options)
    assert again.trace_hash == caught.trace_hash
    assert again.violation == caught.violation
    # The same seed without the bug holds.
    assert simulate(caught.seed, Options(minutes=1, faults=ALL_FAULTS)).violation is None


def test_the_same_seed_gives_the_same_trace_hash_twice_and_another_seed_another():
    options = Options(minutes=1)
    first = simulate(12, options)
    second = simulate(12, options)
    assert first.faults and first.events > 100
    assert (second.trace_hash, second.counts) == (first.trace_hash, first.counts)
    assert simulate(13, options).trace_hash != first.trace_hash


CHILD = """
from bench.simulate.runner import Options, simulate
print(simulate(12, Options(minutes=1)).trace_hash)
"""


@pytest.mark.parametrize("hash_seed", ["0", "1"])
def test_a_seed_replays_the_same_in_a_process_with_another_hash_seed(hash_seed):
    # str hashes (dict and set orders) differ between these processes and this one.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    child = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == simulate(12, Options(minutes=1)).trace_hash


def test_the_cli_prints_a_violation_with_its_replay_command_which_replays_it(capsys):
    status = bench_main(["simulate", "--seeds", "5", "--plant", "no-refund", "--faults", "crash"])
    out = capsys.readouterr().out
    assert status == 0
    assert "settled-once violated" in out and "plant no-refund found after 1 seed(s)" in out
    replay = next(line for line in out.splitlines() if "replay:" in line).split("replay: ")[1]
    assert replay.startswith("python -m bench simulate --seed 0 ")
    trace = next(line for line in out.splitlines() if "trace " in line).split("trace ")[1][:16]
    assert bench_main(replay.split()[3:]) == 0  # the plant, caught again
    replayed = capsys.readouterr().out
    assert f"trace {trace}" in replayed


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("all", FAULT_KINDS),
        ("none", ()),
        ("", ()),
        ("crash, outage", ("outage", "crash")),
        ("-store-loss", tuple(k for k in FAULT_KINDS if k != "store-loss")),
        ("-store-loss,-skew", tuple(k for k in FAULT_KINDS if k not in ("store-loss", "skew"))),
    ],
)
def test_fault_lists_parse_to_kinds_in_a_fixed_order(text, kinds):
    assert parse_kinds(text) == kinds


@pytest.mark.parametrize("text", ["crashes", "outage,lightning", "-nothing", "outage,-crash"])
def test_an_unknown_fault_kind_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_kinds(text)


# -- regression seeds: real bugs the simulator found (docs/reliability.md) --------------


def test_seed_1_keeps_serving_config_keys_through_a_store_loss():
    outcome = simulate(1, Options(minutes=1, faults=("store-loss",)))
    assert outcome.violation is None, outcome.violation


def test_seed_33_keeps_a_created_key_through_a_store_loss():
    outcome = simulate(33, Options(minutes=1))
    assert outcome.violation is None, outcome.violation


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="a node restarted during an outage starts with empty local windows and "
    "admits its share again (docs/reliability.md)",
)
def test_seed_196_a_node_restarted_during_an_outage_admits_no_more_than_its_share():
    options = Options(minutes=1, faults=("outage", "hang", "crash"), shares_per_node=True)
    outcome = simulate(196, options)
    assert outcome.violation is None, outcome.violation
