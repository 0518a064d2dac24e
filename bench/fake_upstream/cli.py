"""``python -m bench fake-upstream``: serve one fake upstream until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from bench.fake_upstream.app import FakeUpstream
from bench.fake_upstream.asks import DEFAULT_CONTEXT_TOKENS, FLAVOURS
from bench.fake_upstream.generation import Pacing
from tokenguard.cluster.open_files import LISTEN_BACKLOG, raise_open_files_limit

KEEP_ALIVE_SECONDS = 120.0


async def serve_fake(
    upstream: FakeUpstream,
    host: str,
    port: int,
    *,
    until: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``upstream`` on ``host:port`` until ``until()`` returns; ``started(url)``
    once bound."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 1.0
    config.backlog = LISTEN_BACKLOG  # thousands of streams may connect at once
    # hypercorn closes a connection whose request it has not read within this; a fake
    # starved of CPU under thousands of streams must not fail requests for that.
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.accesslog = None
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        serving = functools.partial(serve, upstream, config, shutdown_trigger=stopping.wait)
        binds = await nursery.start(serving)  # type: ignore[arg-type]
        task_status.started(binds[0])
        await until()
        stopping.set()
        nursery.cancel_scope.cancel()


async def _signalled() -> None:
    """Returns at the first SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def _main(args: argparse.Namespace) -> None:
    raise_open_files_limit()
    upstream = FakeUpstream(
        args.flavour,
        Pacing(ttft=args.ttft, tokens_per_second=args.tokens_per_second),
        context=args.context_tokens,
    )
    async with trio.open_nursery() as nursery:
        serving = functools.partial(serve_fake, upstream, args.host, args.port, until=_signalled)
        url = await nursery.start(serving)
        print(f"fake {args.flavour} upstream on {url}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flavour", choices=FLAVOURS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token (0)")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=0.0,
        help="per sequence after the first token; 0: all at once (0)",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"the model's context: prompt + generated tokens ({DEFAULT_CONTEXT_TOKENS})",
    )


def main(args: argparse.Namespace) -> int:
    """``python -m bench fake-upstream``: serve until SIGTERM or Ctrl-C."""
    try:
        trio.run(_main, args)
    except OSError as exc:
        print(f"bench fake-upstream: {exc}", file=sys.stderr)
        return 1
    return 0
