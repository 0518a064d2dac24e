"""The ``tokenguard`` command line (also ``python -m tokenguard``): its subcommands.

``serve`` runs a node or a supervised cluster (:mod:`tokenguard.cli.serve`), ``keys``
makes and manages API keys (:mod:`tokenguard.cli.keys`), ``watch`` shows a live table
of quota use from a node's usage feed (:mod:`tokenguard.cli.watch`). Each returns the
process's exit status; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tokenguard.cli import watch
from tokenguard.cli.keys import add_keys_parser, run_keys_command
from tokenguard.cli.serve import add_serve_parser, run_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenguard",
        description="An exact rate limiter for OpenAI-compatible LLM APIs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_keys_parser(sub)
    watch_parser = sub.add_parser(
        "watch", help="a live table of quota use from a node's usage feed (or --json events)"
    )
    watch.add_arguments(watch_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "keys":
        return run_keys_command(args)
    if args.command == "watch":
        return watch.main(args)
    if args.command != "serve":
        parser.error(f"unknown command {args.command}")
    return run_serve(args, parser)


__all__ = ["build_parser", "main"]
