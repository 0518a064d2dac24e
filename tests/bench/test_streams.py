"""``python -m bench streams`` at a small scale: the report's shape and counts, not speed."""

from __future__ import annotations

from pathlib import Path

import trio

from bench.charts import available
from bench.streams import StreamsOptions, run_streams
from bench.streams_report import chart, format_report, result_json

SMALL = StreamsOptions(
    streams=(4, 6),
    ttft=0.05,
    tokens_per_second=200.0,
    max_tokens=12,
    clients=2,
    ramp=0.1,
    audit=True,
    audit_streams=8,
)


async def test_a_small_streams_run_reports_every_stream_and_audits_the_limited_key(
    tmp_path: Path,
) -> None:
    with trio.fail_after(300):
        result = await run_streams(SMALL)
    assert [level.streams for level in result.levels] == [4, 6]
    for level in result.levels:
        for run in (level.direct, level.proxy):
            assert (run.completed, run.errors) == (level.streams, {})
            assert run.tokens == level.streams * SMALL.max_tokens
            assert run.ttft_ms["p50"] is not None and run.gap_ms["p99"] is not None
        assert level.proxy.node_peak_fds and level.proxy.node_peak_rss_mib
        assert level.proxy.node_cpu_us_per_token is not None
    assert result.broke_at is None
    audit = result.audit
    assert audit is not None
    # The limit allows half the streams' reservations within the window.
    assert (audit.admitted, audit.refused) == (4, 4)
    assert audit.billed_requests == 4 and audit.definite_excess == 0
    report = format_report(result)
    assert "| 4 |" in report and "| 6 |" in report and "definite over-admission 0" in report
    data = result_json(result)
    assert set(data) == {"options", "levels", "broke_at", "audit"}
    if available():
        assert chart(data, tmp_path / "streams.png", "test").stat().st_size > 0
