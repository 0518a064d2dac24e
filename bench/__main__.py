"""``python -m bench``: the benchmark commands, one argparse subcommand each.

``load`` (see :mod:`bench.load`) drives chat traffic at nodes and audits the result;
``load --proxy-audit FLAVOUR`` (:mod:`bench.proxy_audit`) audits proxy mode instead.
A subcommand registers its arguments on its own subparser and sets ``run`` to a
function taking the parsed namespace and returning the exit code, so adding one
(``suite``, say) is one more entry in :data:`COMMANDS` here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from bench import (
    decisions,
    feed,
    proxy,
    proxy_audit,
    queue,
    streams,
    stress,
    suite,
    tokens,
)
from bench.fake_upstream import cli as fake_upstream
from bench.load import cli as load
from bench.simulate import cli as simulate

# Every subcommand but ``load``: its name, its module (``add_arguments(parser)`` and
# ``main(args) -> exit code``), its one-line help and its description (``None``: none).
COMMANDS: tuple[tuple[str, ModuleType, str, str | None], ...] = (
    (
        "decisions",
        decisions,
        "store-only decisions per second, no HTTP",
        "Admissions per second straight through a window store, in one process.",
    ),
    (
        "queue",
        queue,
        "the admission queue under bursts of 3x the limit: waiting vs 429",
        "Bursts of 3 x the limit every window against N nodes, for a key "
        "without and a key with max_wait_seconds: 429s, goodput, waits, CPU, store calls.",
    ),
    (
        "suite",
        suite,
        "the benchmark suite: start nodes and Redis, run every scenario, write the report",
        "Run the benchmark scenarios against nodes and a Redis the suite starts; "
        "write docs/performance.md and PNG charts under docs/img/.",
    ),
    (
        "feed",
        feed,
        "node throughput with live feed subscribers vs none; node-to-node event latency",
        None,
    ),
    (
        "proxy",
        proxy,
        "proxy overhead: req/s through a proxy node to a mock upstream vs straight to it",
        None,
    ),
    (
        "tokens",
        tokens,
        "prompt counting per request: the count cache on vs off, a chat vs unique prompts",
        None,
    ),
    (
        "simulate",
        simulate,
        "seeded simulations of a cluster under faults, on a mock clock; check invariants",
        "Run seeded, deterministic simulations of a whole cluster (nodes, store, "
        "faults, traffic, admin changes) in this process, checking the invariants; a "
        "violation prints its seed and trace, and --seed replays it.",
    ),
    (
        "fake-upstream",
        fake_upstream,
        "an honest fake llama.cpp- or vLLM-like upstream with a ledger of what it billed",
        "Serve an OpenAI-compatible fake upstream that generates and bills every "
        "token it is asked for, whatever the client does; GET /ledger lists what it billed.",
    ),
    (
        "streams",
        streams,
        "LLM-shaped load: thousands of paced streams through one proxy node vs direct",
        "Hold N concurrent paced streams through one proxy node and straight "
        "to a fake upstream, side by side; report added TTFT and inter-token delay, errors, "
        "node CPU per token, memory per stream, descriptors, where it breaks.",
    ),
    (
        "stress-tests",
        stress,
        "the whole test suite, round after round, beside CPU-burning processes",
        "Run the test suite (python -m pytest) round after round beside "
        "processes that burn the CPU; stop at the first failing round; print rounds "
        "passed and each round's wall time. Arguments after -- go to pytest.",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m bench`` parser: ``load``, then every subcommand of
    :data:`COMMANDS`, each with ``run`` set to its command."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks for tokenguard nodes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_load(commands)
    for name, module, summary, description in COMMANDS:
        command = commands.add_parser(name, help=summary, description=description)
        module.add_arguments(command)
        command.set_defaults(run=module.main)
    return parser


def _add_load(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``load``: the load test, or with ``--proxy-audit FLAVOUR`` the proxy audit."""
    load_parser = commands.add_parser(
        "load",
        help="send chat-completion load to nodes, report throughput, latency and accuracy",
        description="Send OpenAI-compatible chat load to tokenguard nodes; report "
        "throughput, latency, statuses and an accuracy audit of the rate limits.",
    )
    load.add_arguments(load_parser)
    proxy_audit.add_arguments(load_parser)  # --proxy-audit FLAVOUR: the audit's proxy mode
    load_parser.set_defaults(
        run=lambda args: (proxy_audit.main if args.proxy_audit else load.main)(args)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
