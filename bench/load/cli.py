"""``python -m bench load``: its arguments and its command."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TextIO

import trio

from bench.load.options import (
    DEFAULT_REQUESTS,
    SURFACES,
    KeySpec,
    LoadOptions,
    UsageError,
    keys_from_config,
    parse_key,
    parse_range,
)
from bench.load.report import format_report, write_json
from bench.load.run import run_load
from bench.load.summary import LoadResult
from tokenguard.config.settings import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        help="node base URL (repeatable), e.g. http://127.0.0.1:8000",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        help="SECRET[,name=N][,rpm=N][,input_tpm=N][,output_tpm=N] (repeatable)",
    )
    parser.add_argument("--config", help="the server's tokenguard.toml: keys, limits and window")
    parser.add_argument(
        "--only", action="append", default=[], help="with --config: use only this key name"
    )
    parser.add_argument(
        "--requests", type=int, help=f"requests in total (default {DEFAULT_REQUESTS})"
    )
    parser.add_argument("--duration", type=float, help="start no request after S seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    parser.add_argument("--prompt-tokens", default="20:200", help="LOW:HIGH uniform (20:200)")
    parser.add_argument("--max-tokens", default="16:128", help="LOW:HIGH, N or none (16:128)")
    parser.add_argument("--stream-share", type=float, default=0.3, help="share streamed (0.3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument(
        "--surface",
        choices=sorted(SURFACES),
        default="chat",
        help="chat completions, the Responses API, or a mix of both (chat)",
    )
    parser.add_argument("--window", type=float, help="window seconds without --config (60)")
    parser.add_argument("--bucket", type=float, help="bucket seconds without --config (5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline (30)")
    parser.add_argument("--json", dest="json_path", help="write the full result here")
    parser.add_argument(
        "--progress", action="store_true", help="live status line even if stderr is no TTY"
    )


def options_from_args(args: argparse.Namespace) -> LoadOptions:
    keys: list[KeySpec] = []
    window, bucket = 60.0, 5.0
    if args.config:
        config_keys, window, bucket = keys_from_config(args.config, args.only)
        keys += config_keys
    elif args.only:
        raise UsageError("--only needs --config")
    keys += [parse_key(k) for k in args.key]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise UsageError(f"key names must be distinct (give --key ...,name=N), got {names}")
    if args.window is not None:
        window = args.window
    if args.bucket is not None:
        bucket = args.bucket
    if not 0 <= args.stream_share <= 1:
        raise UsageError("--stream-share must be within 0..1")
    if args.requests is not None and args.requests < 1:
        raise UsageError("--requests must be at least 1")
    prompt_tokens = parse_range(args.prompt_tokens)
    assert prompt_tokens is not None
    return LoadOptions(
        urls=tuple(args.url),
        keys=tuple(keys),
        requests=args.requests,
        duration=args.duration,
        concurrency=args.concurrency,
        prompt_tokens=prompt_tokens,
        max_tokens=parse_range(args.max_tokens, allow_none=True),
        stream_share=args.stream_share,
        seed=args.seed,
        window_seconds=float(window),
        bucket_seconds=float(bucket),
        timeout=args.timeout,
        model=args.model,
        surface=args.surface,
    )


async def _run_interruptible(options: LoadOptions, progress: TextIO | None) -> LoadResult:
    """Run the load; a first Ctrl-C stops it early and still reports, a second aborts."""
    stop = trio.Event()

    async def on_interrupt(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                print("\nbench load: stopping; Ctrl-C again to abort", file=sys.stderr)
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(on_interrupt)  # no request before Ctrl-C is caught
        result = await run_load(options, progress=progress, stop=stop)
        nursery.cancel_scope.cancel()
    return result


def main(args: argparse.Namespace) -> int:
    """``python -m bench load``: run, print the report, write JSON; the exit code."""
    try:
        options = options_from_args(args)
        progress = sys.stderr if (args.progress or sys.stderr.isatty()) else None
        result = trio.run(_run_interruptible, options, progress)
    except (UsageError, ConfigError) as exc:
        print(f"bench load: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json_path:
        write_json(result, args.json_path)
        print(f"full result written to {args.json_path}")
    if not any(r.status is not None for r in result.records):
        return 3
    return 0 if result.audit.ok else 1
