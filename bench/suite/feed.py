"""The ``feed`` scenario: the usage feed with 10 subscribers of each kind vs none, and
its delivery latency node to node (``python -m bench feed``, which starts everything).
"""

from __future__ import annotations

import math

from bench import feed
from bench.suite.context import Suite
from bench.suite.goals import goal_at_least, goal_at_most
from bench.suite.section import Section

# How goals and headline ratios name each kind of subscriber (bench.feed.KINDS[1:]).
FEED_LABELS = {
    "keys": "10 key subscribers (one event per message)",
    "keys-batch": "10 key subscribers, batched (`?batch=1`)",
    "admin": "10 admin subscribers (one event per message)",
    "admin-batch": "10 admin subscribers, batched (what the dashboard and `watch` use)",
}


async def scenario_feed(suite: Suite) -> Section:
    section = suite.section("feed", "Usage feed: 10 live subscribers vs none")
    p = suite.profile
    options = feed.FeedBenchOptions(
        seconds=p.feed_seconds, rounds=p.feed_rounds, latency_seconds=p.feed_latency_seconds
    )
    result = await feed.run(options)
    o = result.options
    section.intro = (
        f"{o.nodes} nodes on one redis-server, load on node 0 ({o.concurrency} workers over "
        f"{o.keys} keys, no streams), and {o.subscribers} websocket subscribers of the feed "
        "on node 0, in each wire format: the default (one event per websocket message) and "
        "the batched mode (`?batch=1`: one message carries every event pending for the "
        "subscriber, one per line). Kinds take turns, the order rotating every round; "
        '"CPU ratio" is requests per node-0 CPU second against *no subscriber*, the '
        "figure least disturbed by the load client and the subscribers' process sharing "
        "the cores. Delivery latency: node 0 to a subscriber on node 1, at a light load "
        "(`python -m bench feed`, which starts everything itself)."
    )
    section.commands = [
        f"python -m bench feed --seconds {o.seconds:g} --rounds {o.rounds} "
        f"--latency-seconds {o.latency_seconds:g}"
    ]
    section.body = [
        "```text",
        *feed.format_report(result).splitlines(),
        "```",
        "",
        "Each websocket message costs a node some 40-50 µs of CPU through quart and "
        "hypercorn, mostly its socket write, whatever its size, and an admin subscriber "
        "sees two events per request (`admitted`, `settled`): in the default mode ten of "
        "them cost a good share of a node's CPU, while the batched mode carries many events "
        "per message under load. Key subscribers see only their own key's events.",
    ]
    section.goals = [
        goal_at_least(
            f"Usage feed: {FEED_LABELS[kind]} / none",
            result.ratio(kind),
            feed.GOAL_RATIO,
            percent=True,
        )
        for kind in feed.KINDS[1:]
    ]
    section.goals.append(
        goal_at_most(
            "Usage feed: delivery latency node to node, median",
            result.latency_ms.get("p50", math.nan),
            feed.GOAL_LATENCY_MS,
            "ms",
        )
    )
    section.ratios = [
        (f"usage feed, {FEED_LABELS[k]} / none", result.ratio(k)) for k in FEED_LABELS
    ]
    section.data = {"feed": result.to_dict()}
    return section
