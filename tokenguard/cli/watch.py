"""``tokenguard watch``: follow a node's live usage feed from a terminal.

``tokenguard watch --url ws://127.0.0.1:8000 --token KEY`` subscribes to
``/v1/usage/stream`` (a ``trio-websocket`` client, the token in the Authorization
header) and shows a table, one row per key: used/limit for requests, input tokens and
output tokens, redrawn in place (on a terminal; otherwise printed again whenever it
changes, at most once a second), with the connection state and the latest rejection.
``--json`` prints each event exactly as received, one per line, for piping. ``--key``
(admin token only) follows one key. The watcher asks for the feed's batched mode
(``?batch=1``: every pending event in one message, one per line), which costs the node
far less under load than a message per event; what it shows is the same.

The watcher reconnects by itself, with backoff, when the connection is lost or its node
restarts. It stops with exit status 2 when the node refuses the token (close code
1008), never retrying it; 0 on Ctrl-C. Connection notices go to stderr (``--json``) or
into the table, never into the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

TOKEN_ENV = "TOKENGUARD_TOKEN"
STREAM_PATH = "/v1/usage/stream"
DIMENSIONS = ("requests", "input_tokens", "output_tokens")
HEADINGS = ("requests", "input tokens", "output tokens")
RECONNECT_SECONDS = (0.5, 5.0)
REFRESH_SECONDS = 0.25  # terminal redraws, at most this often
PLAIN_REFRESH_SECONDS = 1.0  # prints when stdout is not a terminal
CLOSE_POLICY = 1008
EXIT_REFUSED = 2


class Refused(Exception):
    """The node closed the feed with 1008: the token (or the filter) is not accepted."""


def stream_url(url: str, key: str | None = None, *, batch: bool = True) -> str:
    """The feed's websocket URL for a node URL: ``http(s)`` becomes ``ws(s)``, a bare
    host gets ``/v1/usage/stream``, ``key`` becomes ``key=`` and ``batch`` (the
    batched mode) ``batch=1`` in the query. ``ValueError`` for a URL that is no node
    URL."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a node URL: {url!r} (e.g. ws://127.0.0.1:8000)")
    path = parts.path.rstrip("/") or STREAM_PATH
    query = "&".join(([f"key={quote(key)}"] if key else []) + (["batch=1"] if batch else []))
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "unlimited"
    return f"{entry['used']}/{entry['limit']}"


class Board:
    """What the table shows: per key, the latest usage per dimension; the connection's
    state; the latest rejection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.state = "connecting"
        self.usage: dict[str, dict[str, dict[str, Any] | None]] = {}
        self.last_rejection: dict[str, Any] | None = None

    def set_state(self, state: str) -> None:
        self.state = state

    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        key = event.get("key")
        if kind == "ready":
            who = "admin" if event.get("role") == "admin" else f"key {key}"
            if event.get("role") == "admin" and key:
                who += f", key {key}"
            self.set_state(f"live on node {event.get('node')} ({who})")
            return
        if not isinstance(key, str):
            return
        row = self.usage.setdefault(key, {})
        if kind in ("admitted", "snapshot"):
            row.update(event.get("usage") or {})
        elif kind == "settled":
            output = row.get("output_tokens")
            if output is not None and event.get("refund"):
                # The next snapshot corrects any drift; this shows the refund at once.
                row["output_tokens"] = {**output, "used": max(0, output["used"] - event["refund"])}
        elif kind == "rejected":
            dimension = event.get("dimension")
            if dimension in DIMENSIONS:
                row[dimension] = {**(row.get(dimension) or {}), "used": event["used"]}
                row[dimension]["limit"] = event["limit"]
            self.last_rejection = dict(event)

    def render(self) -> str:
        """The table, as lines of text."""
        header = f"tokenguard watch · {self.url} · {self.state}"
        rows = [("key", *HEADINGS)]
        for key in sorted(self.usage):
            usage = self.usage[key]
            rows.append((key, *(_cell(usage.get(d)) if d in usage else "-" for d in DIMENSIONS)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [header, ""]
        for row in rows:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append("  ".join(cells).rstrip())
        if len(rows) == 1:
            lines.append("(no usage yet)")
        rejection = self.last_rejection
        if rejection is not None:
            at = time.strftime("%H:%M:%S", time.localtime(rejection.get("ts", 0) / 1000))
            wait = rejection.get("retry_after")
            lines += [
                "",
                f"last rejection {at}: {rejection.get('key')} on {rejection.get('dimension')}, "
                f"used {rejection.get('used')}/{rejection.get('limit')}, asked "
                f"{rejection.get('requested')}, "
                + ("can never fit" if wait is None else f"retry after {wait:g} s"),
            ]
        return "\n".join(lines) + "\n"


async def follow(
    url: str,
    token: str,
    on_event: Callable[[str], None],
    on_state: Callable[[str], None],
    *,
    reconnect: bool = True,
) -> None:
    """Subscribe and hand each event to ``on_event(text)`` (the lines of a batched
    message one by one, in order) until cancelled; on a lost connection,
    ``on_state(text)`` and reconnect with backoff (or return, without ``reconnect``).
    Raises :class:`Refused` on close code 1008."""
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    backoff = RECONNECT_SECONDS[0]
    while True:
        on_state("connecting")
        try:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                backoff = RECONNECT_SECONDS[0]
                while True:
                    message = await ws.get_message()
                    text = message if isinstance(message, str) else message.decode()
                    # Batched mode: one event per line (JSON never holds a raw newline).
                    for line in text.split("\n"):
                        on_event(line)
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == CLOSE_POLICY:
                raise Refused(reason.reason or "refused") from None
            code = "" if reason is None else f" ({reason.code} {reason.reason or ''})".rstrip()
            on_state(f"disconnected{code}")
        except HandshakeError as exc:  # refused, unreachable, not a websocket
            on_state(f"cannot connect: {exc.__cause__ or exc}")
        if not reconnect:
            return
        on_state(f"reconnecting in {backoff:g} s")
        await trio.sleep(backoff)
        backoff = min(backoff * 2, RECONNECT_SECONDS[1])


async def watch(
    url: str,
    token: str,
    *,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    reconnect: bool = True,
) -> int:
    """Run the watcher until cancelled (or, without ``reconnect``, the connection
    ends); the exit status."""
    if as_json:
        return await _watch_json(url, token, out, err, reconnect=reconnect)
    return await _watch_table(url, token, out, err, reconnect=reconnect)


async def _watch_json(url: str, token: str, out: TextIO, err: TextIO, *, reconnect: bool) -> int:
    """Each event as one JSON line on ``out``; the connection's state on ``err``."""

    def on_event(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    def on_state(state: str) -> None:
        print(f"tokenguard watch: {url}: {state}", file=err, flush=True)

    try:
        await follow(url, token, on_event, on_state, reconnect=reconnect)
    except Refused as exc:
        print(f"tokenguard watch: {url}: refused (1008): {exc}", file=err, flush=True)
        return EXIT_REFUSED
    return 0


async def _watch_table(url: str, token: str, out: TextIO, err: TextIO, *, reconnect: bool) -> int:
    """The keys' table, redrawn in place on a terminal (else a fresh copy each time)."""
    board = Board(url)
    terminal = out.isatty()

    def on_table_event(text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        if isinstance(event, dict):
            board.apply(event)

    async def draw_forever() -> None:
        shown = ""
        while True:
            table = board.render()
            if table != shown:
                shown = table
                # Terminal: home, draw, clear the rest; else a fresh copy each time.
                out.write("\x1b[H" + table + "\x1b[J" if terminal else table + "\n")
                out.flush()
            await trio.sleep(REFRESH_SECONDS if terminal else PLAIN_REFRESH_SECONDS)

    if terminal:
        out.write("\x1b[2J")
    status = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(draw_forever)
        try:
            await follow(url, token, on_table_event, board.set_state, reconnect=reconnect)
        except Refused as exc:
            board.set_state(f"refused (1008): {exc}")
            status = EXIT_REFUSED
        out.write(("\x1b[H" + board.render() + "\x1b[J") if terminal else board.render() + "\n")
        out.flush()
        nursery.cancel_scope.cancel()
    if status == EXIT_REFUSED:
        print(f"tokenguard watch: {url}: refused (1008)", file=err, flush=True)
    return status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default="ws://127.0.0.1:8000",
        help="the node to follow (ws://, wss://, http:// or https://; default ws://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--token",
        help=f"an API key (its own usage) or the admin token (every key); default "
        f"${TOKEN_ENV}, which keeps it out of the process list",
    )
    parser.add_argument("--key", help="with the admin token: follow only this key name")
    parser.add_argument(
        "--json", action="store_true", help="print each event as received, one per line"
    )


def main(args: argparse.Namespace) -> int:
    """``tokenguard watch``: 0 on Ctrl-C, 2 for a refused token or a usage error."""
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"tokenguard watch: give --token or set ${TOKEN_ENV}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        url = stream_url(args.url, args.key)
    except ValueError as exc:
        print(f"tokenguard watch: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return trio.run(lambda: watch(url, token, as_json=args.json))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `--json | head`: the reader is gone, which ends the watch, quietly.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter's final flush)
        return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="tokenguard watch", description="Follow a node's live usage feed."
    )
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
