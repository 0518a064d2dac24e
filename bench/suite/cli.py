"""``python -m bench suite``: its options, and the command a report names.

Exit status: 0 if every scenario ran, 1 if one failed, 2 for bad options.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import trio

from bench.suite.goals import mark
from bench.suite.machine import REPO
from bench.suite.profile import FULL, QUICK
from bench.suite.run import SCENARIOS, run_suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="short durations, fewer rounds (under 2 minutes)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--redis",
        help="use this Redis (redis:// or unix:// for redis-benchmark) instead of starting one",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "load"),
        default="auto",
        help="throughput client: wrk, or bench.load (client-bound); auto: wrk if installed",
    )
    parser.add_argument("--output", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--img-dir", help="where the PNGs go (default: OUTPUT's dir/img)")
    parser.add_argument("--json", dest="json_path", help="also write all figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m bench suite"]
    if args.quick:
        parts.append("--quick")
    for name in args.only or ():
        parts.append(f"--only {name}")
    if args.redis:
        parts.append("--redis " + re.sub(r"//[^@/]*@", "//***@", args.redis))
    if args.client != "auto":
        parts.append(f"--client {args.client}")
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:
    """``python -m bench suite``: run, write the report; 1 if a scenario failed."""
    profile = QUICK if args.quick else FULL
    try:
        result = trio.run(
            lambda: run_suite(
                profile,
                scenarios=args.only or SCENARIOS,
                output=Path(args.output),
                img_dir=Path(args.img_dir) if args.img_dir else None,
                redis_url=args.redis,
                client=args.client,
                command=_command(args),
                json_path=Path(args.json_path) if args.json_path else None,
                keep=args.keep,
            )
        )
    except ValueError as exc:
        print(f"bench suite: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.output} in {result.seconds:.0f} s")
    for section in result.sections:
        for g in section.goals:
            print(f"  {mark(g.met)} {g.name}: {g.measured} (goal {g.target}) {g.detail}")
        if section.error:
            print(f"  FAILED {section.key}: {section.error.strip()}")
    return 0 if result.ok else 1
