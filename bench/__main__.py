"""``python -m bench``: the benchmark commands, one argparse subcommand each.

``load`` (see :mod:`bench.load`) drives chat traffic at nodes and audits the result;
``load --proxy-audit FLAVOUR`` (:mod:`bench.proxy_audit`) audits proxy mode instead.
A subcommand registers its arguments on its own subparser and sets ``run`` to a
function taking the parsed namespace and returning the exit code, so adding one
(``suite``, say) is one more ``add_parser`` block here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks for tokenguard nodes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
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
    decisions_parser = commands.add_parser(
        "decisions",
        help="store-only decisions per second, no HTTP",
        description="Admissions per second straight through a window store, in one process.",
    )
    decisions.add_arguments(decisions_parser)
    decisions_parser.set_defaults(run=decisions.main)
    queue_parser = commands.add_parser(
        "queue",
        help="the admission queue under bursts of 3x the limit: waiting vs 429",
        description="Bursts of 3 x the limit every window against N nodes, for a key "
        "without and a key with max_wait_seconds: 429s, goodput, waits, CPU, store calls.",
    )
    queue.add_arguments(queue_parser)
    queue_parser.set_defaults(run=queue.main)
    suite_parser = commands.add_parser(
        "suite",
        help="the benchmark suite: start nodes and Redis, run every scenario, write the report",
        description="Run the benchmark scenarios against nodes and a Redis the suite starts; "
        "write docs/performance.md and PNG charts under docs/img/.",
    )
    suite.add_arguments(suite_parser)
    suite_parser.set_defaults(run=suite.main)
    feed_parser = commands.add_parser(
        "feed",
        help="node throughput with live feed subscribers vs none; node-to-node event latency",
    )
    feed.add_arguments(feed_parser)
    feed_parser.set_defaults(run=feed.main)
    proxy_parser = commands.add_parser(
        "proxy",
        help="proxy overhead: req/s through a proxy node to a mock upstream vs straight to it",
    )
    proxy.add_arguments(proxy_parser)
    proxy_parser.set_defaults(run=proxy.main)
    tokens_parser = commands.add_parser(
        "tokens",
        help="prompt counting per request: the count cache on vs off, a chat vs unique prompts",
    )
    tokens.add_arguments(tokens_parser)
    tokens_parser.set_defaults(run=tokens.main)
    simulate_parser = commands.add_parser(
        "simulate",
        help="seeded simulations of a cluster under faults, on a mock clock; check invariants",
        description="Run seeded, deterministic simulations of a whole cluster (nodes, store, "
        "faults, traffic, admin changes) in this process, checking the invariants; a "
        "violation prints its seed and trace, and --seed replays it.",
    )
    simulate.add_arguments(simulate_parser)
    simulate_parser.set_defaults(run=simulate.main)
    fake_parser = commands.add_parser(
        "fake-upstream",
        help="an honest fake llama.cpp- or vLLM-like upstream with a ledger of what it billed",
        description="Serve an OpenAI-compatible fake upstream that generates and bills every "
        "token it is asked for, whatever the client does; GET /ledger lists what it billed.",
    )
    fake_upstream.add_arguments(fake_parser)
    fake_parser.set_defaults(run=fake_upstream.main)
    streams_parser = commands.add_parser(
        "streams",
        help="LLM-shaped load: thousands of paced streams through one proxy node vs direct",
        description="Hold N concurrent paced streams through one proxy node and straight "
        "to a fake upstream, side by side; report added TTFT and inter-token delay, errors, "
        "node CPU per token, memory per stream, descriptors, where it breaks.",
    )
    streams.add_arguments(streams_parser)
    streams_parser.set_defaults(run=streams.main)
    stress_parser = commands.add_parser(
        "stress-tests",
        help="the whole test suite, round after round, beside CPU-burning processes",
        description="Run the test suite (python -m pytest) round after round beside "
        "processes that burn the CPU; stop at the first failing round; print rounds "
        "passed and each round's wall time. Arguments after -- go to pytest.",
    )
    stress.add_arguments(stress_parser)
    stress_parser.set_defaults(run=stress.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
