"""The ``tokens`` scenario: counting prompts with the count cache on vs off, a growing
chat and unique prompts (``python -m bench tokens``, run in this process).
"""

from __future__ import annotations

import attrs
import trio

from bench import tokens
from bench.charts import Panel
from bench.suite.context import Suite
from bench.suite.section import Section


async def scenario_tokens(suite: Suite) -> Section:
    section = suite.section("tokens", "Counting prompts: the count cache on vs off")
    options = tokens.TokensBenchOptions(rounds=suite.profile.tokens_rounds)
    result = await trio.to_thread.run_sync(tokens.run, options)
    section.intro = (
        "A node counts every request's prompt with tiktoken before admitting it, and "
        "remembers the counts of texts of 256 characters or more "
        "(`tokenguard.counting.CountCache`): chat clients resend a conversation's whole "
        "history on every turn. Measured in one process (no HTTP), cache on and off taking "
        "turns, on a growing chat and on prompts never seen before (what the throughput "
        "sections below send: every request's prompt differs)."
    )
    section.commands = [f"python -m bench tokens --rounds {options.rounds}"]
    section.body = tokens.format_report(result).splitlines()
    section.ratios = [
        (f"prompt counting time, cache on / off, {w}", result.ratio(w)) for w in tokens.WORKLOADS
    ]
    section.data = {"tokens": attrs.asdict(result)}
    suite.chart(
        "tokens",
        "Counting prompts: the count cache on vs off",
        [
            Panel(
                kind="bar",
                title="CPU time per prompt (median)",
                x=list(tokens.WORKLOADS),
                series={
                    f"cache {cache}": [result.per_prompt(w, cache) * 1e6 for w in tokens.WORKLOADS]
                    for cache in ("off", "on")
                },
                ylabel="µs per prompt",
                labels=True,
            )
        ],
        section,
    )
    return section
