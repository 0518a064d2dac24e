"""Prompt counting: what the count cache saves, and what it costs where it cannot help.

``python -m bench tokens`` counts chat prompts in this process (no HTTP, no store), the
way a node counts a request's input, in two workloads, each with the count cache
(:class:`tokenguard.counting.CountCache`) on and off, taking turns:

``conversation``  one chat growing turn by turn, every request resending the whole
                  history (a long system prompt, then user and assistant messages), as
                  chat clients do: the cache knows every message but the newest.
``claude-conversation``  the same chat sent to Anthropic's Messages API (the system
                  prompt apart), whose input is estimated
                  (:func:`tokenguard.counting.claude.estimate_claude_prompt`): what a
                  ``/v1/messages`` request costs to count.
``unique``        every prompt new (one user message never seen before): nothing to
                  remember, so only the cache's own cost shows.

It reports the CPU time per prompt (median over rounds) and cache on / off.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import attrs

from tokenguard import counting
from tokenguard.counting.claude import estimate_claude_prompt

MODEL = "gpt-4o"
WORKLOADS = ("conversation", "claude-conversation", "unique")


@attrs.frozen
class TokensBenchOptions:
    rounds: int = 3
    turns: int = 30  # conversation: requests, each resending the history
    system_words: int = 1500  # words like "w4711": a few tokens each
    message_words: int = 150
    prompts: int = 200  # unique: prompts per round


@attrs.frozen
class TokensBenchResult:
    options: TokensBenchOptions
    # workload -> "on"/"off" -> seconds per prompt, one per round
    seconds: dict[str, dict[str, list[float]]]
    tokens_per_prompt: dict[str, float]

    def per_prompt(self, workload: str, cache: str) -> float:
        return statistics.median(self.seconds[workload][cache])

    def ratio(self, workload: str) -> float:
        """Time per prompt, cache on / off (below 1: the cache saves time)."""
        return self.per_prompt(workload, "on") / self.per_prompt(workload, "off")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(n))


def conversation(options: TokensBenchOptions, seed: int) -> list[list[dict[str, Any]]]:
    """The prompts of one chat, turn by turn: each the history so far plus a question."""
    rng = random.Random(seed)
    history: list[dict[str, Any]] = [
        {"role": "system", "content": _words(rng, options.system_words)}
    ]
    prompts = []
    for _ in range(options.turns):
        history.append({"role": "user", "content": _words(rng, options.message_words)})
        prompts.append(list(history))
        history.append({"role": "assistant", "content": _words(rng, 2 * options.message_words)})
    return prompts


def unique(options: TokensBenchOptions, seed: int) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": _words(rng, 4 * options.message_words)}]
        for _ in range(options.prompts)
    ]


def count_prompt(workload: str, messages: list[dict[str, Any]]) -> int:
    """A prompt's input tokens as a node counts them for ``workload``'s API: a chat
    prompt's exactly, a Messages prompt's estimate (its system message apart)."""
    if workload != "claude-conversation":
        return counting.count_chat_prompt(MODEL, messages)
    system, rest = messages[0]["content"], messages[1:]
    return estimate_claude_prompt(system, rest, None)


def _timed(workload: str, prompts: Sequence[list[dict[str, Any]]], cache: bool) -> float:
    """CPU seconds per prompt, counting ``prompts`` with the cache on or off (emptied
    first: what it knows comes from these prompts only)."""
    counting.COUNT_CACHE.clear()
    counting.COUNT_CACHE.enabled = cache
    try:
        started = time.process_time()
        for messages in prompts:
            count_prompt(workload, messages)
        return (time.process_time() - started) / len(prompts)
    finally:
        counting.COUNT_CACHE.enabled = True


def run(options: TokensBenchOptions) -> TokensBenchResult:
    counting.preload((counting.encoding_name_for(MODEL),))
    seconds: dict[str, dict[str, list[float]]] = {w: {"on": [], "off": []} for w in WORKLOADS}
    sizes: dict[str, float] = {}
    for r in range(options.rounds):
        # New texts every round (nothing carries over), the same ones for on and off.
        chat = conversation(options, r)
        made = {"conversation": chat, "claude-conversation": chat, "unique": unique(options, r)}
        for workload, prompts in made.items():
            sizes[workload] = statistics.mean(count_prompt(workload, m) for m in prompts)
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for cache in order:
                seconds[workload][cache].append(_timed(workload, prompts, cache == "on"))
    return TokensBenchResult(options=options, seconds=seconds, tokens_per_prompt=sizes)


def format_report(result: TokensBenchResult) -> str:
    o = result.options
    lines = [
        "| workload | tokens per prompt | cache off, µs per prompt | cache on | on / off |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        lines.append(
            f"| {workload} | {result.tokens_per_prompt[workload]:,.0f} | "
            f"{result.per_prompt(workload, 'off') * 1e6:,.0f} | "
            f"{result.per_prompt(workload, 'on') * 1e6:,.0f} | "
            f"**{result.ratio(workload):.1%}** |"
        )
    lines += [
        "",
        f"conversation: {o.turns} requests of one chat (a {o.system_words}-word system "
        f"prompt, {o.message_words}-word questions, answers twice that), each resending "
        f"the history; claude-conversation: the same chat as Messages API prompts, "
        f"estimated; unique: {o.prompts} one-message prompts of {4 * o.message_words} "
        f"words never seen before. {o.rounds} round(s), on and off taking turns, CPU time.",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TokensBenchOptions()
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--turns", type=int, default=d.turns, help="conversation length")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="unique prompts per round")


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.turns < 1 or args.prompts < 1:
        print("bench tokens: --rounds, --turns and --prompts must be at least 1")
        return 2
    result = run(TokensBenchOptions(rounds=args.rounds, turns=args.turns, prompts=args.prompts))
    print(format_report(result))
    return 0
