"""``tokenguard watch`` against running nodes: ``python -m tokenguard.cli.watch`` as a real
process, reading its output. JSON lines, the table, a refused token, and reconnecting
when the node restarts. Every test is bounded by ``trio.fail_after``; every process is
stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.processes import free_ports, running_tokenguard, wait_healthy
from tests.support.usage_feed import ADMIN, Node, chat, running_node, settings_for
from tokenguard.cli.watch import Board, follow, stream_url

TEST_TIMEOUT = 30.0


class Output:
    """A child's stdout and stderr, read as they come."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = ""
        self.stderr = ""

    async def pump(self, which: str) -> None:
        stream = getattr(self.process, which)
        while chunk := await stream.receive_some():
            setattr(self, which, getattr(self, which) + chunk.decode())

    async def wait_for(self, text: str, which: str = "stdout", count: int = 1) -> str:
        """Wait until ``text`` occurs ``count`` times in the stream; return the stream."""
        # Polling our own buffers, filled by the pump tasks.
        while getattr(self, which).count(text) < count:  # noqa: ASYNC110
            if self.process.returncode is not None:
                raise AssertionError(f"watch exited: {self.stdout}\n{self.stderr}")
            await trio.sleep(0.02)
        return getattr(self, which)


@asynccontextmanager
async def watching(args: Sequence[str]) -> AsyncIterator[Output]:
    """``python -m tokenguard.cli.watch *args`` until the ``async with`` ends."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tokenguard.cli.watch", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    output = Output(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.pump, "stdout")
            nursery.start_soon(output.pump, "stderr")
            try:
                yield output
            finally:
                if process.returncode is None:
                    process.terminate()
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with running_node(settings_for()) as running:
        yield running


async def test_json_prints_every_event_as_received_one_per_line(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with watching(["--url", node.url, "--token", "sk-alpha", "--json"]) as watch:
            await watch.wait_for('"type":"ready"')
            async with httpx.AsyncClient() as client:
                await chat(client, node.url, "sk-beta")  # not alpha's: never shown
                await chat(client, node.url, "sk-alpha", max_tokens=7)
            await watch.wait_for('"type":"settled"')
        events = [json.loads(line) for line in watch.stdout.splitlines()]
        assert events[0]["type"] == "ready" and events[0]["key"] == "alpha"
        assert events[0]["batch"] is True  # the watcher asks for the batched mode
        assert {e["key"] for e in events[1:]} == {"alpha"}
        traffic = [e for e in events if e["type"] in ("admitted", "settled")]
        assert [e["type"] for e in traffic] == ["admitted", "settled"]
        assert traffic[0]["reserved"]["output_tokens"] == 7
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        assert "sk-alpha" not in watch.stdout


async def test_the_table_shows_used_and_limit_per_key(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with watching(["--url", node.url, "--token", ADMIN]) as watch:
            await watch.wait_for("live on node 0 (admin)")
            async with httpx.AsyncClient() as client:
                await chat(client, node.url, "sk-alpha")
                await chat(client, node.url, "sk-alpha")
                await chat(client, node.url, "sk-tiny")
                assert (await chat(client, node.url, "sk-tiny")).status_code == 429
            await watch.wait_for("last rejection")
            text = await watch.wait_for("alpha  2/1000")
        table = text.rsplit("tokenguard watch", 1)[1]
        rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line}
        assert rows["key"] == ["requests", "input", "tokens", "output", "tokens"]
        assert rows["alpha"][0] == "2/1000"
        assert rows["alpha"][1].endswith("/1000000")
        assert rows["tiny"][:2] == ["1/1", "unlimited"]
        assert rows["tiny"][2].endswith("/100")
        assert "tiny on requests, used 1/1, asked 1, retry after" in table


async def test_a_refused_token_stops_with_status_2(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with watching(["--url", node.url, "--token", "sk-nobody", "--json"]) as watch:
            assert await watch.process.wait() == 2
            await watch.wait_for("refused (1008): invalid token", "stderr")
        assert watch.stdout == ""


async def test_it_reconnects_by_itself_when_its_node_restarts(tmp_path: Path) -> None:
    config = tmp_path / "tokenguard.toml"
    config.write_text('[[keys]]\nkey = "sk-alpha"\nname = "alpha"\nrpm = 100\n')
    port = free_ports()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--config", str(config), "--port", str(port)]
    with trio.fail_after(TEST_TIMEOUT * 2):
        async with watching(["--url", url, "--token", "sk-alpha", "--json"]) as watch:
            for life in (1, 2):
                async with running_tokenguard(args, output_path=tmp_path / f"node{life}.out"):
                    await wait_healthy(url)
                    # The watcher was retrying meanwhile: it subscribes by itself.
                    await watch.wait_for('"type":"ready"', count=life)
                    async with httpx.AsyncClient() as client:
                        assert (await chat(client, url, "sk-alpha")).status_code == 200
                    await watch.wait_for('"type":"admitted"', count=life)
            assert "disconnected (1001 node shutting down)" in watch.stderr
            assert "reconnecting in" in watch.stderr
            assert watch.process.returncode is None  # still watching


async def test_follow_hands_over_the_events_of_a_batched_message_one_by_one(node: Node) -> None:
    node.feed.publish_seconds = 0.5  # events then come in batches, for certain
    texts: list[str] = []
    states: list[str] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
            url = stream_url(node.url)
            nursery.start_soon(follow, url, "sk-alpha", texts.append, states.append)
            while not texts:  # noqa: ASYNC110 (polling our own list)
                await trio.sleep(0.02)
            for _ in range(3):
                assert (await chat(client, node.url, "sk-alpha")).status_code == 200
            while sum('"type":"settled"' in t for t in texts) < 3:  # noqa: ASYNC110
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    events = [json.loads(text) for text in texts]  # each text is one event
    assert events[0]["type"] == "ready" and events[0]["batch"] is True
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    traffic = [e["type"] for e in events if e["type"] in ("admitted", "settled")]
    assert traffic == ["admitted", "settled"] * 3


def test_stream_url_from_a_node_url() -> None:
    assert stream_url("ws://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/usage/stream?batch=1"
    assert stream_url("http://h:1/", batch=False) == "ws://h:1/v1/usage/stream"
    assert stream_url("https://h") == "wss://h/v1/usage/stream?batch=1"
    assert (
        stream_url("127.0.0.1:8000", key="a b")
        == "ws://127.0.0.1:8000/v1/usage/stream?key=a%20b&batch=1"
    )
    assert stream_url("h:1", key="a", batch=False) == "ws://h:1/v1/usage/stream?key=a"
    assert stream_url("ws://h:1/v1/usage/stream") == "ws://h:1/v1/usage/stream?batch=1"
    with pytest.raises(ValueError, match="not a node URL"):
        stream_url("ftp://h")


def test_the_board_follows_events() -> None:
    board = Board("ws://h/v1/usage/stream")
    usage = {
        "requests": {"used": 1, "limit": 5},
        "input_tokens": None,
        "output_tokens": {"used": 30, "limit": 100},
    }
    board.apply({"type": "ready", "role": "key", "key": "k", "node": 3})
    board.apply({"type": "admitted", "key": "k", "usage": usage})
    board.apply({"type": "settled", "key": "k", "refund": 20})
    board.apply(
        {
            "type": "rejected",
            "key": "k",
            "dimension": "requests",
            "used": 5,
            "limit": 5,
            "requested": 1,
            "retry_after": None,
            "ts": 0,
        }
    )
    text = board.render()
    assert "live on node 3 (key k)" in text
    assert "k    5/5       unlimited     10/100" in text
    assert "can never fit" in text
