"""The ``accuracy`` scenario: ``bench.load`` and its audit against a 3-node cluster,
one key with small limits. Over-admission must be 0; under-admission is measured.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import attrs

from bench.audit.findings import AuditReport
from bench.charts import Panel
from bench.load.options import KeySpec, LoadOptions
from bench.load.run import run_load
from bench.load.summary import LoadResult
from bench.suite.configs import (
    ACCURACY_BUCKET,
    ACCURACY_LIMITS,
    ACCURACY_WINDOW,
    accuracy_config,
)
from bench.suite.context import Suite
from bench.suite.goals import Goal
from bench.suite.profile import Profile
from bench.suite.section import Section
from bench.suite.targets import trouble_before, trouble_notes


def trailing_sums(
    points: Sequence[tuple[float, int]], window: float, grid: Sequence[float]
) -> list[float]:
    """For each ``t`` in ``grid``: the sum of amounts at times in ``(t - window, t]``."""
    points = sorted(points)
    out = []
    lo = hi = 0
    total = 0
    for t in grid:
        while hi < len(points) and points[hi][0] <= t:
            total += points[hi][1]
            hi += 1
        while lo < hi and points[lo][0] <= t - window:
            total -= points[lo][1]
            lo += 1
        out.append(total)
    return out


async def scenario_accuracy(suite: Suite) -> Section:
    section = suite.section("accuracy", "Accuracy under a 3-node hammer on one key")
    p = suite.profile
    secret = "sk-hammer-" + secrets.token_hex(8)
    config = suite.workdir / "accuracy.toml"
    config.write_text(accuracy_config(secret), encoding="utf-8")
    cluster = await suite.start_cluster(
        3, config=config, store=suite.given_redis, name="accuracy-cluster"
    )
    suite.say(f"accuracy: {p.accuracy_seconds:g} s of bench.load on {len(cluster.urls)} nodes")
    trouble = trouble_before({"3 nodes": cluster})
    result = await run_load(_load_options(p, cluster.urls, secret))
    suite.sample_rss("cluster node (of 3)", "after load", cluster.node_pids)
    await cluster.proc.stop()
    report = result.audit
    section.intro = _intro(p, suite.given_redis is None)
    section.commands = [
        "tokenguard serve --nodes 3 --config accuracy.toml --port 8000",
        f"python -m bench load --config accuracy.toml --url http://127.0.0.1:8000 "
        f"--url http://127.0.0.1:8001 --url http://127.0.0.1:8002 "
        f"--duration {p.accuracy_seconds:g} --concurrency {p.accuracy_concurrency} "
        "--stream-share 0.3",
    ]
    section.body = _body(result)
    section.goals = _goals(report)
    guard = trouble_notes({"3 nodes": cluster}, trouble)
    section.notes += guard
    if guard:
        section.goals = [
            attrs.evolve(g, detail="the nodes' store guard fell back meanwhile: see the section")
            for g in section.goals
        ]
    section.notes += _audit_notes(report)
    section.data = _data(result)
    _chart(suite, section, result)
    section.notes.append(
        "The chart counts admissions at the moment their answer arrived, a client-side "
        "view: it can cross the limit by what was in flight (the timing uncertainty); "
        "the audit's definite check above is what proves the limit held."
    )
    return section


def _load_options(p: Profile, urls: Sequence[str], secret: str) -> LoadOptions:
    return LoadOptions(
        urls=tuple(urls),
        keys=(KeySpec(name="hammer", secret=secret, limits=ACCURACY_LIMITS),),
        duration=p.accuracy_seconds,
        concurrency=p.accuracy_concurrency,
        stream_share=0.3,
        seed=0,
        window_seconds=float(ACCURACY_WINDOW),
        bucket_seconds=float(ACCURACY_BUCKET),
    )


def _intro(p: Profile, embedded: bool) -> str:
    lim = ACCURACY_LIMITS
    return (
        f"`bench.load` with its accuracy audit against `serve --nodes 3` "
        f"({'embedded Redis' if embedded else 'the given Redis'}), one key "
        f"with small limits: {lim.rpm} requests, {lim.input_tpm:,} input tokens and "
        f"{lim.output_tpm:,} output tokens per {ACCURACY_WINDOW} s window ({ACCURACY_BUCKET} s "
        f"buckets: the window is shortened from 60 s so that a {p.accuracy_seconds:g} s run "
        f"spans several windows and exercises the sliding), {p.accuracy_concurrency} "
        "concurrent requests spread at random over the nodes, 30% streamed. The audit "
        "(`bench/audit/`) knows each admission only to lie between its send and its "
        "answer: *definite* over-admission is proof the limit was broken and must be 0; "
        "*possible* over-admission is not a proof (the timing uncertainty exceeds the "
        "server's one-bucket slack); under-admission counts refusals that exact "
        "accounting would have admitted (expected by design: amounts are held up to one "
        "bucket past the window and output tokens at their reservation until settled). "
        "The load client is Python, so this run is client-bound by design: it tests "
        "correctness, not speed."
    )


def _body(result: LoadResult) -> list[str]:
    """The run's summary and a row per dimension: over- and under-admission."""
    s, report = result.summary, result.audit
    statuses = ", ".join(f"{k}: {v:,}" for k, v in s.statuses.items())
    rows = [
        f"{s.requests:,} requests in {s.wall_seconds:.1f} s ({s.throughput:,.0f} req/s, "
        f"client CPU {s.cpu_share:.0%} of a core); statuses {statuses}; "
        f"{report.unknown_outcomes} unknown outcome(s); header cross-check: "
        f"{report.headers.checked:,} answers, {len(report.headers.problems)} problem(s).",
        "",
        "| dimension | limit / window | admitted in the run | most in one window: "
        "definite | over | possible | refusals | would have fit | max unused (≥) | "
        "mean unused | unexplained |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    under = {u.dimension: u for u in report.under}
    for o in report.over:
        u = under.get(o.dimension)
        refusals = u.refusals if u else 0
        fit = f"{u.would_fit:,} ({u.would_fit / refusals:.0%})" if u and refusals else "0"
        rows.append(
            f"| {o.dimension.replace('_', ' ')} | {o.limit:,} | {o.admitted_total:,} | "
            f"{o.definite.amount:,} | **{o.definite_excess}** | {o.possible.amount:,} "
            f"(+{o.possible_excess}) | {refusals:,} | {fit} | "
            f"{u.max_unused if u else 0:,} | {u.mean_unused if u else 0:.1f} | "
            f"{u.max_unexplained if u else 0:,} |"
        )
    return rows


def _goals(report: AuditReport) -> list[Goal]:
    return [
        Goal(
            "Accuracy, 3 nodes on one key: definite over-admission",
            "= 0",
            str(report.definite_over_admissions),
            report.definite_over_admissions == 0,
        ),
        Goal(
            "Accuracy: rate-limit header inconsistencies",
            "= 0",
            str(len(report.headers.problems)),
            not report.headers.problems,
        ),
    ]


def _audit_notes(report: AuditReport) -> list[str]:
    """What the audit found beyond its figures: header problems, foreign usage."""
    notes = []
    if report.headers.problems:
        kinds = ", ".join(f"{k}: {v}" for k, v in report.headers.counts().items())
        examples = "; ".join(
            f"request {p.request_id}: {p.detail}" for p in report.headers.problems[:3]
        )
        notes.append(
            f"**Header inconsistencies** ({kinds}), e.g. {examples}. See `bench/audit/` "
            "for what each check means."
        )
    if any(f.excess for f in report.foreign):
        notes.append(
            "The server reported usage beyond this client's own on some answers (other "
            "traffic on the key?): under-admission figures overstate."
        )
    return notes


def _data(result: LoadResult) -> dict[str, Any]:
    report = result.audit
    return {
        "summary": result.summary.to_dict(),
        "definite_over_admissions": report.definite_over_admissions,
        "header_problems": len(report.headers.problems),
        "over": [
            {
                "dimension": o.dimension,
                "limit": o.limit,
                "admitted": o.admitted_total,
                "definite": o.definite.amount,
                "possible": o.possible.amount,
            }
            for o in report.over
        ],
        "under": [
            {
                "dimension": u.dimension,
                "refusals": u.refusals,
                "would_fit": u.would_fit,
                "max_unused": u.max_unused,
                "mean_unused": u.mean_unused,
                "max_unexplained": u.max_unexplained,
            }
            for u in report.under
        ],
    }


def _chart(suite: Suite, section: Section, result: LoadResult) -> None:
    """Per dimension: what the client saw admitted in the trailing window, vs the limit."""
    lim = ACCURACY_LIMITS
    t0 = min((r.start for r in result.records), default=0.0)
    end = max((r.answered for r in result.records), default=t0) - t0
    grid = [i * 0.1 for i in range(int(end / 0.1) + 2)]
    admitted = [r for r in result.records if r.status == 200]
    panels = []
    for dim, limit, amount in (
        ("requests", lim.rpm, lambda r: 1),
        ("input tokens", lim.input_tpm, lambda r: r.input_tokens or 0),
        ("output tokens", lim.output_tpm, lambda r: r.output_tokens or 0),
    ):
        sums = trailing_sums(
            [(r.answered - t0, amount(r)) for r in admitted], ACCURACY_WINDOW, grid
        )
        panels.append(
            Panel(
                kind="line",
                title=f"{dim}: admitted in the last {ACCURACY_WINDOW} s",
                x=grid,
                series={"client view, by answer time": sums},
                hlines=[(float(limit or 0), f"limit {limit:,}")],
                xlabel="seconds into the run",
                ylabel=dim,
                ymin=0,
            )
        )
    suite.chart("accuracy", "Accuracy: 3 nodes, one key, sliding window", panels, section)
