"""``python -m bench simulate``: run seeded simulations of a cluster; report violations.

``--seeds N --minutes M`` runs seeds ``--first`` .. ``--first + N - 1``, one after the
other in this process, and stops at the first violation (``--keep-going``: runs them
all), printing its seed, the invariant, the last events before it and the command
that replays it; ``--seed S`` runs seed ``S`` alone. ``--plant NAME`` switches a known
bug on: the run then says after how many seeds it was found (exit status 0), or that
it was not (1). ``--faults`` picks the fault kinds (``all``; ``-store-loss`` for all but
one; ``outage,crash``). Exit status: 0 when every invariant held (or the plant was
found), 1 otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import attrs

from bench.simulate.faults import FAULT_KINDS, parse_kinds
from bench.simulate.plants import PLANTS
from bench.simulate.runner import DEFAULT_NODES, Options, Outcome, replay_command, simulate
from bench.simulate.trace import trimmed

DEFAULT_SEEDS = 200
DEFAULT_MINUTES = 1.0
PROGRESS_EVERY = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds to run")
    parser.add_argument(
        "--minutes", type=float, default=DEFAULT_MINUTES, help="simulated minutes per seed"
    )
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, default=None, help="run (replay) this seed only")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="nodes per cluster")
    parser.add_argument(
        "--faults",
        default="all",
        help=f"fault kinds, comma-separated, or all, none, -KIND (of: {', '.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--plant", choices=sorted(PLANTS), default=None, help="switch on a known bug"
    )
    parser.add_argument(
        "--shares-per-node",
        action="store_true",
        help="count a node's local admissions across its restarts (today a restarted node "
        "starts with empty local windows: docs/reliability.md)",
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every seed; count the violations"
    )
    parser.add_argument(
        "--trace-lines", type=int, default=40, help="events printed before a violation"
    )


def describe(outcome: Outcome, options: Options, trace_lines: int) -> str:
    """A violation's report: seed, invariant, what, faults, last events, replay."""
    violation = outcome.violation
    assert violation is not None
    lines = [
        f"seed {outcome.seed}: {violation.invariant} violated at "
        f"{violation.time:.3f} s (policy {outcome.policy or '?'}, trace {outcome.trace_hash[:16]})",
        f"  {violation.message}",
    ]
    if outcome.faults:
        lines.append("  faults: " + "; ".join(f.describe() for f in outcome.faults))
    events = trimmed(violation.trace, violation.key, trace_lines)
    about = "" if violation.key is None else f" of key {violation.key} and the cluster"
    lines.append(f"  last {len(events)} events{about}:")
    lines += [f"    {line}" for line in events]
    lines.append(f"  replay: {replay_command(outcome.seed, options)}")
    return "\n".join(lines)


@attrs.define
class Tally:
    """What a run of seeds found, and what it cost."""

    run: int = 0
    simulated: float = 0.0
    requests: int = 0
    found: list[Outcome] = attrs.Factory(list)
    caught: Outcome | None = None  # the first seed that caught the plant
    started: float = attrs.Factory(time.perf_counter)
    cpu: float = attrs.Factory(time.process_time)

    def add(self, outcome: Outcome) -> None:
        self.run += 1
        self.simulated += outcome.simulated
        self.requests += sum(v for k, v in outcome.counts.items() if k != "settled")

    def summary(self, options: Options) -> str:
        elapsed = time.perf_counter() - self.started
        cpu = time.process_time() - self.cpu
        return (
            f"{self.run} seed(s) of {options.minutes:g} simulated min, {options.nodes} nodes, "
            f"faults {','.join(options.faults) or 'none'}: {len(self.found)} with a "
            f"violation; {elapsed:.1f} s ({cpu:.1f} s of CPU): {self.run / elapsed:.2f} "
            f"seeds/s, {self.simulated / elapsed:.0f} simulated s per s "
            f"({self.simulated / max(cpu, 1e-9):.0f} per CPU s), {self.requests} requests"
        )


def main(args: argparse.Namespace) -> int:
    try:
        kinds = parse_kinds(args.faults)
    except ValueError as exc:
        print(f"--faults: {exc}")
        return 2
    options = Options(
        minutes=args.minutes,
        nodes=args.nodes,
        faults=kinds,
        plant=args.plant,
        shares_per_node=args.shares_per_node,
    )
    seeds: Sequence[int] = (
        [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    )
    plant = PLANTS[options.plant] if options.plant is not None else None
    tally = Tally()
    for seed in seeds:
        outcome = simulate(seed, options)
        tally.add(outcome)
        if args.seed is not None:
            print(f"seed {seed}: trace {outcome.trace_hash} ({outcome.events} events)")
        if outcome.violation is not None:
            tally.found.append(outcome)
            print(describe(outcome, options, args.trace_lines), flush=True)
            if plant is not None and outcome.violation.invariant not in plant.caught_by:
                print(f"  (not what catches {options.plant}: a finding of its own)")
            elif tally.caught is None:
                tally.caught = outcome
            if not args.keep_going and (plant is None or tally.caught is not None):
                break
        elif tally.run % PROGRESS_EVERY == 0:
            print(f"  {tally.run} seeds, {time.perf_counter() - tally.started:.1f} s", flush=True)
    print(tally.summary(options))
    if options.plant is None:
        return 1 if tally.found else 0
    caught = tally.caught
    if caught is None or caught.violation is None:
        print(f"plant {options.plant} NOT found in {tally.run} seed(s)")
        return 1
    after = list(seeds).index(caught.seed) + 1
    print(
        f"plant {options.plant} found after {after} seed(s): seed {caught.seed}, "
        f"{caught.violation.invariant}"
    )
    return 0
