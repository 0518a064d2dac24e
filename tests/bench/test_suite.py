"""Tests for the benchmark suite (bench/suite/, bench/wrk.py, bench/wrk_script.py,
bench/charts.py).

The parsers and the wrk script are checked on fixed inputs. The suite's machinery runs
for real in a tiny profile (1 s measurements) against real node processes, a real
redis-server and a real ``serve --nodes 3`` cluster, and its report is checked for what
every section must name: the command, the machine and the date, plus the charts (when
matplotlib, the ``bench`` extra, is installed). The wrk-driven scenario is skipped when
wrk is not installed; everything else runs without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import attrs
import pytest
import trio

from bench import charts
from bench.procfs import children
from bench.suite.accuracy import trailing_sums
from bench.suite.machine import machine_info
from bench.suite.profile import Profile
from bench.suite.redis_benchmark import parse_redis_benchmark_csv
from bench.suite.run import SuiteResult, run_suite
from bench.suite.runs import Run, paired_ratios, variant_table
from bench.suite.targets import RedisInfo, Target, trouble_before, trouble_notes
from bench.wrk import WrkResult, combine, find_wrk, parse_output, parse_text, run_wrk
from bench.wrk_script import JSON_MARKER, chat_script, streamed_slots
from tests.support.processes import START_TIMEOUT

TINY = Profile(
    name="tiny",
    warmup=0,
    rounds=1,
    seconds=1,
    latency_rounds=1,
    latency_seconds=1,
    decisions_rounds=1,
    decisions_seconds=0.3,
    redis_benchmark_requests=2000,
    startup_repeats=1,
    settle=0.2,
    decisions_extras=False,
    tokens_rounds=1,
    proxy_rounds=1,
    proxy_seconds=1.0,
    feed_rounds=1,
    feed_seconds=1.0,
    feed_latency_seconds=1.0,
)

WRK_TEXT = """\
Running 2s test @ http://127.0.0.1:18101/v1/chat/completions
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    56.89ms   94.79ms 451.16ms   88.64%
    Req/Sec   387.31    188.76   646.00     43.75%
  Latency Distribution
     50%   22.09ms
     75%   46.78ms
     90%  182.61ms
     99%  426.40ms
  661 requests in 2.03s, 1.95MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:    325.49
Transfer/sec:      0.96MB
"""


# --- wrk: script and parsing ------------------------------------------------------------


def test_parse_text_reads_wrk_output() -> None:
    result = parse_text(WRK_TEXT)
    assert result.requests == 661
    assert result.seconds == pytest.approx(2.03)
    assert result.latency["p50"] == pytest.approx(0.02209)
    assert result.latency["p99"] == pytest.approx(0.4264)
    assert result.latency["max"] == pytest.approx(0.45116)
    assert result.errors == {"connect": 0, "read": 2, "write": 0, "status": 5, "timeout": 1}
    assert not result.ok


def test_parse_output_prefers_the_json_line() -> None:
    line = (
        f'{JSON_MARKER}{{"requests":100,"duration_us":2000000,"bytes":5,"errors":{{"connect":0,'
        '"read":0,"write":0,"status":0,"timeout":0},"latency_us":{"min":1,"max":9000,'
        '"mean":1500.5,"stdev":1.0,"p50":1000,"p75":1200,"p90":2000,"p99":5000,"p999":8000}}'
    )
    result = parse_output(WRK_TEXT + line + "\n")
    assert result.requests == 100
    assert result.rps == pytest.approx(50.0)
    assert result.latency["p50"] == pytest.approx(0.001)
    assert result.latency["max"] == pytest.approx(0.009)
    assert_every_section_ran(result)


def test_combine_adds_requests_and_weights_percentiles() -> None:
    a = WrkResult(requests=100, seconds=2.0, latency={"p50": 0.010, "max": 0.05})
    b = WrkResult(requests=300, seconds=2.1, latency={"p50": 0.020, "max": 0.04})
    both = combine([a, b])
    assert both.requests == 400
    assert both.seconds == 2.1
    assert both.latency["p50"] == pytest.approx(0.0175)
    assert both.latency["max"] == 0.05
    assert both.runs == 2


@pytest.mark.parametrize("share", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_streamed_slots_spread_the_share(share: float) -> None:
    slots = streamed_slots(share)
    assert sum(slots) == round(share * len(slots))
    if 0 < share < 1:  # spread out, not bunched at one end
        first_half = sum(slots[: len(slots) // 2])
        assert abs(first_half - sum(slots) / 2) <= 1


async def _recording_server(
    bodies: list[bytes], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A bare HTTP/1.1 server on localhost that answers every request 200 ``{}`` and
    keeps its body: what wrk sends, byte for byte."""

    async def serve(stream: trio.SocketStream) -> None:
        buffer = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(buffer) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                bodies.append(buffer[:length])
                buffer = buffer[length:]
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


@pytest.mark.skipif(find_wrk() is None, reason="wrk is not installed (apt-get install wrk)")
async def test_chat_script_sends_a_different_prompt_every_time(tmp_path: Path) -> None:
    """wrk with the chat script, against a server that keeps the bodies: every body is
    a valid chat request of its pool slot's key, and no two prompts are the same (a
    node remembers the counts of prompts it has seen; a benchmark repeating one prompt
    would measure that memory)."""
    script = tmp_path / "chat.lua"
    script.write_text(chat_script(["sk-a", "sk-b"], prompt_tokens=50), encoding="utf-8")
    bodies: list[bytes] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_recording_server, bodies)
            result = await run_wrk(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                script,
                connections=4,
                seconds=1,
                threads=2,
            )
            nursery.cancel_scope.cancel()
    assert result.requests > 50 and result.ok
    prompts = [json.loads(body)["messages"][0]["content"] for body in bodies]
    assert len(prompts) >= result.requests
    assert len(set(prompts)) == len(prompts)
    assert all(re.match(r"u[01]-\d+ the rate limit", p) for p in prompts), prompts[:3]


def test_chat_script_holds_every_key_and_survives_brackets() -> None:
    script = chat_script(["sk-a", "sk-]]-b"], stream_share=0.5)
    assert "sk-a" in script and "sk-]]-b" in script
    assert "[=[sk-]]-b]=]" in script  # a long bracket the key cannot close
    assert script.count('"stream":true') == 50
    assert "function done(" in script and JSON_MARKER.strip() in script


def test_a_responses_script_sends_the_same_prompts_to_the_responses_api() -> None:
    script = chat_script(["sk-a"], stream_share=0.5, surface="responses")
    assert "[[/v1/responses]]" in script and "/v1/chat/completions" not in script
    assert script.count('"input":"') == 100 and '"messages"' not in script
    assert script.count('"max_output_tokens":64') == 100
    assert script.count('"stream":true') == 50 and "stream_options" not in script
    with pytest.raises(ValueError, match="surface"):
        chat_script(["sk-a"], surface="assistants")


# --- suite helpers ----------------------------------------------------------------------


def test_trailing_sums() -> None:
    points = [(0.5, 1), (1.0, 2), (2.5, 4)]
    assert trailing_sums(points, 2.0, [0.0, 1.0, 2.0, 2.5, 3.0, 5.0]) == [0, 3, 3, 6, 4, 0]


def test_paired_ratios_pair_rounds() -> None:
    def run(variant: str, rnd: int, rps: float) -> Run:
        return Run(variant, rnd, WrkResult(requests=int(rps), seconds=1.0, latency={}), 0.0, None)

    runs = {"off": [run("off", 0, 100), run("off", 1, 200)]}
    runs["on"] = [run("on", 0, 90), run("on", 1, 150)]
    assert paired_ratios(runs, "off", "on") == [0.9, 0.75]


def _runs(name: str, rps: list[float], redis_cpu: float | None = None) -> list[Run]:
    latency = {"p50": 0.002, "p99": 0.010}
    return [
        Run(name, i, WrkResult(requests=int(r), seconds=1.0, latency=latency), 0.5, redis_cpu)
        for i, r in enumerate(rps)
    ]


def test_variant_table_compares_each_variant_with_its_own_base() -> None:
    runs = {
        "memory": _runs("memory", [100, 200]),
        "memory-8": _runs("memory-8", [80, 100]),
        "redis": _runs("redis", [50, 50], redis_cpu=0.25),
    }
    rows, ratios = variant_table(
        runs, {"memory-8": "memory"}, compared="8 rules / 3 rules", labels={"memory": "mem"}
    )
    assert rows[:2] == [
        "| node | req/s (median) | range | 8 rules / 3 rules (paired) | p50 ms | p99 ms "
        "| node CPU | Redis CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    assert ratios == {"memory-8": pytest.approx(0.65)}  # the median of 0.8 and 0.5
    assert rows[2] == "| mem | 150 | 100–200 | 1 (baseline) | 2.00 | 10.00 | 50% | - |"
    assert rows[3].startswith("| memory-8 | 90 | 80–100 | **65.0%** (50.0%–80.0%) |")
    assert rows[4].endswith("| 1 (baseline) | 2.00 | 10.00 | 50% | 25% |")


def test_redis_benchmark_csv_and_connection_args() -> None:
    text = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms"\n'
        '"SET","98765.43","0.3","0.1","0.25"\n'
    )
    assert parse_redis_benchmark_csv(text) == (98765.43, 0.25)
    assert RedisInfo("unix:///tmp/r.sock", None, True).benchmark_args() == ["-s", "/tmp/r.sock"]
    assert RedisInfo("redis://:p%40ss@h:7000/0", None, False).benchmark_args() == [
        "-h", "h", "-p", "7000", "-a", "p@ss",
    ]  # fmt: skip
    assert RedisInfo("redis+cluster://h:7000", None, False).benchmark_args() is None


GUARD_LINES = """\
2026-11-28 11:56:11,573 node-0 tokenguard.store.guarded WARNING store call failed (1 in a row; \
policy local applies): store unix:///s/redis.sock: no answer within 100 ms
2026-11-28 11:56:11,574 node-0 tokenguard.store.guarded WARNING store unix:///s/redis.sock \
unavailable (store unix:///s/redis.sock: no answer within 100 ms): breaker open
2026-11-28 11:56:11,575 node-0 tokenguard.observe.feed WARNING usage feed: cannot publish
"""


def test_store_trouble_is_counted_from_the_node_logs(tmp_path: Path) -> None:
    log = tmp_path / "node-0.log"
    log.write_text("tokenguard node 0 serving\n")
    target = Target(name="3 nodes", urls=[], proc=None, node_pids=[], log_paths=[log])  # type: ignore[arg-type]
    before = trouble_before({"3 nodes": target})
    assert trouble_notes({"3 nodes": target}, before) == []
    with log.open("a") as f:
        f.write(GUARD_LINES)
    assert target.store_trouble() == (2, 1)
    (note,) = trouble_notes({"3 nodes": target}, before)
    assert "2 warning(s), 1 breaker opening(s)" in note


def test_machine_info_names_the_cpu_and_date() -> None:
    m = machine_info()
    assert m.cores >= 1 and m.usable_cores >= 1
    assert m.cpu
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", m.date)


# --- the suite, for real ----------------------------------------------------------------


def check_report(markdown: str, output: Path, names: list[str]) -> None:
    machine = machine_info()
    assert "python -m bench suite" in markdown
    assert machine.cpu in markdown
    assert f"{machine.usable_cores} cores" in markdown
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", markdown)
    # Every section names the command, the machine and when it ran.
    sections = re.split(r"\n## \d+\. ", markdown)[1:]
    assert len(sections) == len(names)
    for text in sections:
        assert "*Produced by* `python -m bench suite" in text
        assert machine.cpu in text
        assert "*ran:*" in text
        assert "This scenario failed" not in text, text
    if charts.available():
        for name in names:
            png = output.parent / "img" / f"{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"](img/{name}.png)" in markdown
    else:
        assert "matplotlib is not installed" in markdown


async def run_tiny(
    scenarios: list[str], output: Path, *, client: str, profile: Profile = TINY
) -> SuiteResult:
    """``run_suite`` with the TINY profile (or ``profile``), quietly."""
    return await run_suite(
        profile,
        scenarios=scenarios,
        output=output,
        client=client,
        command="python -m bench suite --tiny",
        progress=None,
    )


def assert_every_section_ran(result: SuiteResult) -> None:
    """No scenario failed; a failure shows each section's own error."""
    assert result.ok, {s.key: s.error for s in result.sections if s.error}


def no_children_left(before: set[int]) -> None:
    """No process the suite started outlives it (``before``: this process's children
    when the test began, e.g. session-wide redis-servers of other test files)."""
    leftovers = sorted(set(children(os.getpid())) - before)
    # trio's run_process and the suite reap everything they start.
    assert not leftovers, leftovers


@pytest.mark.slow
async def test_suite_tiny_startup_decisions_memory(tmp_path: Path) -> None:
    before = set(children(os.getpid()))
    output = tmp_path / "docs" / "performance.md"
    with trio.fail_after(4 * START_TIMEOUT):
        result = await run_tiny(["startup", "decisions", "tokens", "memory"], output, client="load")
    assert_every_section_ran(result)
    markdown = output.read_text()
    assert markdown == result.markdown
    check_report(markdown, output, ["startup", "decisions", "tokens", "memory"])
    assert "`tokenguard serve --nodes 3`" in markdown
    assert "python -m bench decisions --store memory://" in markdown
    assert "Decisions/s, 8 rules / 3 rules" in markdown
    assert "redis-benchmark" in markdown  # its figures, or why there are none
    assert "Resident memory per node process" in markdown
    assert "python -m bench tokens --rounds 1" in markdown
    assert "| prompt counting time, cache on / off, conversation |" in markdown
    goals = {g.name: g for s in result.sections for g in s.goals}
    assert all(g.met is not None for g in goals.values())
    no_children_left(before)


@pytest.mark.slow
@pytest.mark.skipif(find_wrk() is None, reason="wrk is not installed (apt-get install wrk)")
async def test_suite_tiny_stores_with_wrk(tmp_path: Path) -> None:
    before = set(children(os.getpid()))
    output = tmp_path / "performance.md"
    with trio.fail_after(4 * START_TIMEOUT):
        result = await run_tiny(["stores", "rules"], output, client="wrk")
    assert_every_section_ran(result)
    check_report(result.markdown, output, ["stores", "rules"])
    assert "wrk -t1 -c32 -d1s" in result.markdown
    assert "Throughput, 1 node, memory store / limits off" in result.markdown
    assert "1 node, 8 rules / 3 rules, Redis store" in result.markdown
    assert "`bench8.toml` (the `rules` scenario)" in result.markdown
    stores, rules = result.sections
    for section, variants in (
        (stores, ("off", "memory", "redis")),
        (rules, ("memory", "memory-8", "redis", "redis-8")),
    ):
        for variant in variants:
            (run,) = section.data["throughput"][variant]
            assert run["requests"] > 0
            assert sum(run["errors"].values()) == 0  # every answer a 200
    assert set(rules.data["ratios"]) == {"memory", "redis"}
    no_children_left(before)


@pytest.mark.slow
async def test_suite_tiny_proxy_and_feed(tmp_path: Path) -> None:
    """The proxy and feed benchmarks as suite sections: their own reports, the figures
    in the headline and goals, every process gone afterwards."""
    before = set(children(os.getpid()))
    output = tmp_path / "performance.md"
    with trio.fail_after(4 * START_TIMEOUT):
        result = await run_tiny(["proxy", "feed"], output, client="load")
    assert_every_section_ran(result)
    markdown = result.markdown
    sections = re.split(r"\n## \d+\. ", markdown)[1:]
    assert len(sections) == 2
    assert "python -m bench proxy --seconds 1 --rounds 1" in markdown
    assert "python -m bench feed --seconds 1 --rounds 1" in markdown
    assert "| proxy node / straight to its upstream |" in markdown
    proxy_section, feed_section = result.sections
    rounds = proxy_section.data["proxy"]["rounds"]
    assert {r["kind"] for r in rounds} == {"direct", "proxy"}
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in rounds)
    assert proxy_section.data["ratio"] > 0
    figures = feed_section.data["feed"]
    assert set(figures["ratios"]) == {"keys", "keys-batch", "admin", "admin-batch"}
    assert all(ratio > 0 for ratio in figures["ratios"].values())
    goals = {g.name: g for g in feed_section.goals}
    assert "Usage feed: delivery latency node to node, median" in goals
    assert all(g.met is not None for g in goals.values())
    no_children_left(before)


@pytest.mark.slow
async def test_suite_tiny_sweeps_nodes_and_accuracy_with_the_python_client(
    tmp_path: Path,
) -> None:
    """The scenarios that need no wrk and no other test runs: each section's table,
    headline ratios and goals, every process gone afterwards."""
    before = set(children(os.getpid()))
    output = tmp_path / "performance.md"
    profile = attrs.evolve(
        TINY,
        sweep_levels=(1, 4),
        sweep_seconds=1,
        stream_shares=(0.0, 1.0),
        stream_seconds=1,
        nodes_rounds=1,
        nodes_seconds=1,
        accuracy_seconds=3.0,
        accuracy_concurrency=4,
    )
    names = ["concurrency", "streaming", "nodes", "accuracy"]
    with trio.fail_after(4 * START_TIMEOUT):
        result = await run_tiny(names, output, client="load", profile=profile)
    assert_every_section_ran(result)
    check_report(result.markdown, output, names)
    markdown = result.markdown
    assert "| connections | limits off req/s | memory req/s | (vs off) |" in markdown
    assert "| streamed | limits off req/s |" in markdown
    assert "| nodes | req/s (median) | range | vs 1 node (paired) |" in markdown
    assert "| dimension | limit / window | admitted in the run |" in markdown
    assert "| 100% streamed, Redis store / limits off |" in markdown
    assert "| 3 nodes, Redis store / 1 node |" in markdown
    concurrency, streaming, nodes, accuracy = result.sections
    assert set(concurrency.data) == {"1", "4"}
    assert set(streaming.data) == {"0", "1"}
    assert set(nodes.data["runs"]) == {"1 node", "2 nodes", "3 nodes"}
    for runs in nodes.data["runs"].values():
        (run,) = runs
        assert run["requests"] > 0
    assert accuracy.data["summary"]["requests"] > 0
    assert [g.name for g in accuracy.goals] == [
        "Accuracy, 3 nodes on one key: definite over-admission",
        "Accuracy: rate-limit header inconsistencies",
    ]
    no_children_left(before)


@pytest.mark.slow
async def test_suite_tiny_streams_section_reports_levels_goals_and_the_audit(
    tmp_path: Path,
) -> None:
    before = set(children(os.getpid()))
    output = tmp_path / "performance.md"
    profile = attrs.evolve(TINY, streams_levels=(3,), streams_audit=4)
    with trio.fail_after(4 * START_TIMEOUT):
        result = await run_tiny(["streams"], output, client="load", profile=profile)
    assert result.ok
    check_report(result.markdown, output, ["streams"])
    assert "python -m bench streams --streams 3 --audit --audit-streams 4" in result.markdown
    (section,) = result.sections
    (level,) = section.data["levels"]
    assert level["direct"]["completed"] == level["proxy"]["completed"] == 3
    assert section.data["audit"]["definite_excess"] == 0
    assert [g.met for g in section.goals] == [True]  # the audit's; no 1,000 or 2,000 level
    no_children_left(before)
