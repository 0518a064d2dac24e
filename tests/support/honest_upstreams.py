"""Test support: the honest fake upstreams of ``bench/fake_upstream/``, as processes.

:func:`running_fake_upstream` starts ``python -m bench fake-upstream`` (llama.cpp-like
or vLLM-like) on a free loopback port, in a process of its own, and always stops it
(:func:`tests.support.processes.running_process`). It yields a :class:`FakeUpstreamProcess`:
its ``base_url`` for a proxy route, and :meth:`~FakeUpstreamProcess.ledger`, what it
billed. Prompts name the tokenguard key they are sent for with :func:`key_message` (a
proxy forwards only its own credential, so the fake reads the key from the prompt).

Waits are unbounded, in trio's style: the caller bounds them (``trio.fail_after``).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.support.processes import TokenguardProcess, running_process

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"fake \w+ upstream on (http://\S+)")


def key_message(key_name: str) -> dict[str, str]:
    """The system message that tells a fake upstream which tokenguard key a request is
    for (``tokenguard-key: NAME``)."""
    return {"role": "system", "content": f"tokenguard-key: {key_name}"}


@attrs.frozen
class Billed:
    """What a fake upstream billed one key: requests, input and output tokens."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@attrs.define(eq=False)
class FakeUpstreamProcess:
    flavour: str
    url: str
    process: TokenguardProcess

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def ledger(self) -> list[dict[str, Any]]:
        """Every request the fake accepted, as ``GET /ledger`` lists them."""
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{self.url}/ledger")
        response.raise_for_status()
        entries: list[dict[str, Any]] = response.json()["entries"]
        return entries

    async def billed(self, key_name: str) -> Billed:
        """What the fake billed ``key_name``, once every one of its generations is done
        (polls until then)."""
        while True:
            entries = [e for e in await self.ledger() if e["key"] == key_name]
            if all(e["done"] for e in entries):
                return Billed(
                    requests=len(entries),
                    input_tokens=sum(e["input_tokens"] for e in entries),
                    output_tokens=sum(e["output_tokens"] for e in entries),
                )
            await trio.sleep(0.05)


async def take_events(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    events: int,
    headers: dict[str, str] | None = None,
) -> None:
    """POST ``body`` to ``url`` as a stream (it must be answered 200), take ``events``
    of its events and hang up."""
    async with client.stream("POST", url, json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        taken = 0
        async for line in response.aiter_lines():
            taken += line.startswith("data: {")
            if taken == events:
                return


@contextlib.asynccontextmanager
async def running_fake_upstream(
    workdir: Path,
    flavour: str,
    *,
    ttft: float = 0.0,
    tokens_per_second: float = 0.0,
) -> AsyncIterator[FakeUpstreamProcess]:
    """A fake ``flavour`` upstream (``llama`` or ``vllm``) in its own process until the
    ``async with`` ends; yields once it listens."""
    argv = [
        sys.executable,
        "-m",
        "bench",
        "fake-upstream",
        "--flavour",
        flavour,
        "--port",
        "0",
        "--ttft",
        str(ttft),
        "--tokens-per-second",
        str(tokens_per_second),
    ]
    output_path = workdir / f"fake-{flavour}.out"
    async with running_process(argv, output_path=output_path, cwd=REPO, stop_grace=5) as proc:
        output = await proc.wait_output(" upstream on http://")
        found = READY.search(output)
        assert found is not None, output
        yield FakeUpstreamProcess(flavour=flavour, url=found.group(1), process=proc)
