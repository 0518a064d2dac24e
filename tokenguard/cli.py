"""The ``tokenguard`` command line (also ``python -m tokenguard``).

``tokenguard serve`` runs one node in this process; with ``--nodes N`` (N > 1) it runs
the supervisor, which starts N node processes and, unless ``--store`` names one, a
private Redis for them to share.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import attrs
import trio

from tokenguard.settings import (
    DEMO_CONFIG,
    ConfigError,
    Settings,
    demo_settings,
    load_settings,
)
from tokenguard.windows import UnknownStoreScheme


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenguard",
        description="An exact rate limiter for OpenAI-compatible LLM APIs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one node, or a supervised cluster of nodes")
    serve.add_argument("--config", help="TOML config file (default: a built-in demo config)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port of node 0 (default 8000)")
    serve.add_argument("--store", help="window-store URL, overriding the config's [store] url")
    serve.add_argument("--nodes", type=_positive, default=1, help="node processes (default 1)")
    serve.add_argument(
        "--grace", type=float, default=10.0, help="seconds to drain in-flight requests on stop"
    )
    serve.add_argument(
        "--no-limits",
        action="store_true",
        help="admit everything without counting (for benchmarking the limiter's cost)",
    )
    serve.add_argument("--node-id", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config) if args.config else demo_settings()
    changes: dict[str, object] = {"node_id": args.node_id}
    if args.store:
        changes["store_url"] = args.store
    if args.no_limits:
        changes["limiting"] = False
    return attrs.evolve(settings, **changes)


def _print_demo_banner(url: str) -> None:
    print("tokenguard: no --config given; running the built-in demo config:")
    print("  demo keys: sk-demo-free (3 RPM, 1000 input TPM, 300 output TPM)")
    print("             sk-demo-pro  (60 RPM, 20000 input TPM, 10000 output TPM)")
    print(f"  try: curl {url}/v1/chat/completions -H 'Authorization: Bearer sk-demo-free' \\")
    print("        -H 'Content-Type: application/json' \\")
    body = '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    print(f"        -d '{body}'")
    sys.stdout.flush()


async def _run_single(args: argparse.Namespace, settings: Settings) -> None:
    from tokenguard.node import serve_node

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(on_signals)
        url = await nursery.start(
            lambda task_status: serve_node(
                settings,
                host=args.host,
                port=args.port,
                grace=args.grace,
                shutdown=shutdown,
                task_status=task_status,
            )
        )
        print(f"tokenguard node {settings.node_id} serving on {url} (store {settings.store_url})")
        if not args.config:
            _print_demo_banner(url)
        sys.stdout.flush()
        await shutdown.wait()
        # serve_node drains and returns; then stop the signal watcher with the rest.
    print("tokenguard: stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        try:
            settings = _settings(args)
        except ConfigError as exc:
            print(f"tokenguard: config error: {exc}", file=sys.stderr)
            return 2
        if args.nodes > 1:
            print("tokenguard: --nodes > 1 needs the supervisor (not yet built)", file=sys.stderr)
            return 2
        try:
            trio.run(_run_single, args, settings)
        except UnknownStoreScheme as exc:
            print(f"tokenguard: {exc}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


__all__ = ["DEMO_CONFIG", "main"]
