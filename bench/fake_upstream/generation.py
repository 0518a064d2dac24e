"""Generating: every token a request asked for, at the fake's pace, billed as it goes.

* **It generates every token it was asked for**, at its pace (``--ttft`` before the
  first token, then ``--tokens-per-second``; 0: as fast as it can), in a task of its
  own: a client that reads slowly, stalls or disconnects changes nothing about what is
  generated and billed (llama.cpp and vLLM would stop on a disconnect; a fake that does
  not is the worst case a limiter must survive). A generated token is one word of
  :data:`tokenguard.upstreams.mock.WORDS`, one token in both shipped encodings.
"""

from __future__ import annotations

import time

import attrs
import trio

from bench.fake_upstream.asks import Ask
from tokenguard.upstreams.mock import FIRST_WORD, WORDS

TICK = 0.01  # a paced generation adds the tokens due at most every tick


@attrs.frozen
class Pacing:
    """``ttft``: seconds before the first token; ``tokens_per_second`` per sequence
    afterwards (0: every token at once)."""

    ttft: float = 0.0
    tokens_per_second: float = 0.0


UNPACED = Pacing()
"""Every token at once, from the first moment: the pacing when none is given."""


@attrs.define
class LedgerEntry:
    """One accepted request, billed. ``output_tokens`` grows while it generates."""

    id: int
    key: str | None
    request: str | None
    path: str
    model: str
    stream: bool
    sequences: int
    max_tokens: int  # per sequence, as the flavour read it
    input_tokens: int
    started: float  # time.monotonic()
    started_wall: float
    output_tokens: int = 0
    ended: float | None = None
    ended_wall: float | None = None
    done: bool = False
    client_left: bool = False


def word(sequence: int, position: int) -> str:
    """The token at ``position`` of generated sequence ``sequence``."""
    return FIRST_WORD if position == 0 else WORDS[(sequence + position) % len(WORDS)]


@attrs.define(eq=False)
class Generation:
    """One request's generation: ``produced`` tokens of each sequence so far."""

    ask: Ask
    entry: LedgerEntry
    produced: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)
    answered: bool = False  # the answer's last bytes were handed to the server

    @property
    def done(self) -> bool:
        return self.entry.done

    def advance(self, produced: int) -> None:
        self.produced = produced
        self.entry.output_tokens = produced * self.ask.sequences
        if produced >= self.ask.per_sequence:
            self.entry.done = True
            self.entry.ended, self.entry.ended_wall = time.monotonic(), time.time()
        self.changed.set()
        self.changed = trio.Event()

    async def run(self, pacing: Pacing) -> None:
        """Generate every token, at the pace; bill as it goes."""
        await trio.sleep(pacing.ttft)
        total = self.ask.per_sequence
        if pacing.tokens_per_second <= 0 or total == 0:
            self.advance(total)
            return
        started = trio.current_time()
        while not self.done:
            due = int((trio.current_time() - started) * pacing.tokens_per_second) + 1
            if due > self.produced:
                self.advance(min(total, due))
            if not self.done:
                # Wake when the next token is due (a tick at the soonest, so a fast pace
                # adds its tokens a tick's worth at a time), not every tick.
                due_at = started + self.produced / pacing.tokens_per_second
                await trio.sleep_until(max(due_at, trio.current_time() + TICK))
