"""Tests for bench.load against real node processes (``python -m tokenguard serve``).

Each server is a subprocess on a free port, killed in its fixture's ``finally``. Every
run is small and bounded (a few hundred requests, a ``trio.fail_after``) and finishes in
a few seconds, far within one window, which is 10 minutes long so that a busy machine
stays inside it too: a key limited to N requests per window must have exactly N
admitted, and nothing may expire during a test.

To run the same checks against other nodes, pass their URLs to :func:`check_rpm_run`'s
caller: the load client takes any list of base URLs (see ``test_rpm_key_three_nodes``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs
import httpx
import pytest
import trio

from bench.load.cli import options_from_args
from bench.load.options import (
    LoadOptions,
    TokenRange,
    UsageError,
    keys_from_config,
    parse_key,
    parse_range,
)
from bench.load.report import format_report, write_json
from bench.load.run import run_load
from bench.load.summary import LoadResult
from bench.ports import free_ports
from tokenguard.model import Limits, digest_of

REPO = Path(__file__).resolve().parents[2]
RPM = 40

CONFIG = f"""
[window]
seconds = 600
bucket_seconds = 50

[[keys]]
key = "sk-bench-rpm"
name = "rpm-bound"
rpm = {RPM}
input_tpm = 20000
output_tpm = 20000

[[keys]]
key = "sk-bench-in"
name = "in-bound"
rpm = 1000
input_tpm = 3000

[[keys]]
key = "sk-bench-out"
name = "out-bound"
rpm = 1000
output_tpm = 1500
default_max_tokens = 64

[[keys]]
key = "sk-bench-mix-in"
name = "mix-in"
rpm = 1000
input_tpm = 3000

[[keys]]
key = "sk-bench-mix-out"
name = "mix-out"
rpm = 1000
output_tpm = 1500
default_max_tokens = 64

[[keys]]
key = "sk-bench-cli"
name = "cli"
rpm = 10

[[keys]]
key = "sk-bench-liar"
name = "liar"
rpm = 20

[[keys]]
key = "sk-bench-interrupt"
name = "interrupt"
rpm = 5

[[keys]]
sha256 = "{"ab" * 32}"
name = "hashed-only"
rpm = 5
"""


def _wait_healthy(proc: subprocess.Popen, urls: list[str], log: Path, seconds: float) -> None:
    """Until every URL's /healthz answers with its own node id, or fail with the log."""
    deadline = time.monotonic() + seconds
    pending = dict(enumerate(urls))
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy after {seconds} s:\n{log.read_text()}")
        for node, url in list(pending.items()):
            try:
                answer = httpx.get(f"{url}/healthz", timeout=1.0)
                if answer.status_code == 200 and answer.json().get("node") == node:
                    del pending[node]
            except httpx.HTTPError:
                pass
        time.sleep(0.1)


@contextlib.contextmanager
def tokenguard_serve(config: Path, workdir: Path, *, nodes: int = 1) -> Iterator[list[str]]:
    """Run ``tokenguard serve`` (``--nodes N`` for a cluster); yield the nodes' URLs."""
    port = free_ports(nodes)
    argv = [sys.executable, "-m", "tokenguard", "serve", "--config", str(config)]
    argv += ["--port", str(port)]
    if nodes > 1:
        argv += ["--nodes", str(nodes), "--state-dir", str(workdir / "state")]
    log = workdir / f"serve-{port}.log"
    with log.open("wb") as out:
        # Its own session, so a node left behind by a broken supervisor can be killed
        # with the group of the process this fixture started, and nothing else.
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    try:
        urls = [f"http://127.0.0.1:{port + i}" for i in range(nodes)]
        _wait_healthy(proc, urls, log, seconds=60)
        yield urls
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tokenguard.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def node(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with tokenguard_serve(config_path, tmp_path_factory.mktemp("node")) as urls:
        yield urls


@pytest.fixture(scope="module")
def cluster(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with tokenguard_serve(config_path, tmp_path_factory.mktemp("cluster"), nodes=3) as urls:
        yield urls


def rpm_options(urls: list[str], config: Path, seed: int) -> LoadOptions:
    keys, window, bucket = keys_from_config(config, only=["rpm-bound"])
    return LoadOptions(
        urls=tuple(urls),
        keys=tuple(keys),
        requests=150,
        concurrency=16,
        stream_share=0.3,
        seed=seed,
        window_seconds=window,
        bucket_seconds=bucket,
        timeout=20,
    )


def check_rpm_run(result: LoadResult, json_path: Path) -> None:
    """The checks every run of the rpm-bound key must pass, on one node or several."""
    records = result.records
    assert len(records) == 150
    assert result.summary.wall_seconds < 500  # the premise: all of it within one window
    odd = [r for r in records if r.status not in (200, 429)]
    assert not odd, f"{result.summary.errors}; e.g. {odd[0].status} {odd[0].message}"
    admitted = [r for r in records if r.status == 200]
    assert len(admitted) == RPM
    assert result.summary.by_key == {"rpm-bound": {"200": RPM, "429": 150 - RPM}}

    # Usage arrived for every admitted request, streamed ones from the final usage chunk.
    streamed = [r for r in admitted if r.streamed]
    assert streamed and len(streamed) < len(admitted)
    for r in admitted:
        assert r.input_tokens is not None and r.output_tokens is not None
        # The prompt is built from one-token words, so the server's count is close.
        assert abs(r.input_tokens - r.planned_prompt_tokens) <= 1
        assert int(r.headers["x-ratelimit-limit-requests"]) == RPM
    for r in records:
        assert r.start <= r.answered <= r.end
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(RPM))  # each admission took exactly one

    report = result.audit
    assert report.ok
    assert report.definite_over_admissions == 0
    assert report.headers.problems == ()
    assert report.headers.checked == 150
    assert all(f.excess == 0 for f in report.foreign)
    requests_under = [u for u in report.under if u.dimension == "requests"]
    assert requests_under[0].refusals == 150 - RPM
    assert requests_under[0].would_fit == 0  # nothing expired: every refusal was right
    assert requests_under[0].max_unexplained == 0
    assert report.unattributed_refusals == 0

    text = format_report(result)
    for part in ("p50", "p95", "p99", "max", "429: 110", "definite over-admission: none"):
        assert part in text
    write_json(result, json_path)
    data = json.loads(json_path.read_text())
    assert len(data["records"]) == 150
    assert data["audit"]["ok"] is True
    assert data["summary"]["statuses"] == {"200": RPM, "429": 150 - RPM}
    assert "sk-bench" not in json_path.read_text()  # secrets never written


async def test_rpm_key_single_node(node: list[str], config_path: Path, tmp_path: Path) -> None:
    with trio.fail_after(300):
        result = await run_load(rpm_options(node, config_path, seed=1))
    check_rpm_run(result, tmp_path / "result.json")
    assert result.summary.by_node == {node[0]: {"200": RPM, "429": 150 - RPM}}


@pytest.mark.slow
async def test_rpm_key_three_nodes(cluster: list[str], config_path: Path, tmp_path: Path) -> None:
    # Three node processes sharing their windows through the supervisor's Redis: the
    # key's 40 requests per minute hold across all of them together.
    with trio.fail_after(300):
        result = await run_load(rpm_options(cluster, config_path, seed=2))
    check_rpm_run(result, tmp_path / "result.json")
    assert set(result.summary.by_node) == set(cluster)
    assert all(sum(counts.values()) > 10 for counts in result.summary.by_node.values())


@pytest.mark.parametrize(("surface", "prefix"), [("chat", ""), ("mix", "mix")])
async def test_token_bound_keys(
    node: list[str], config_path: Path, surface: str, prefix: str
) -> None:
    """``mix``: each request a chat completion or a response, one budget per key (keys
    of their own: the node is the module's)."""
    in_bound, out_bound = ("mix-in", "mix-out") if prefix else ("in-bound", "out-bound")
    keys, window, bucket = keys_from_config(config_path, only=[in_bound, out_bound])
    options = LoadOptions(
        urls=tuple(node),
        keys=tuple(keys),
        requests=200,
        concurrency=16,
        max_tokens=None,  # reserve each key's default_max_tokens
        stream_share=0.5,
        seed=3,
        window_seconds=window,
        bucket_seconds=bucket,
        timeout=20,
        surface=surface,
    )
    with trio.fail_after(300):
        result = await run_load(options)
    assert {r.status for r in result.records} <= {200, 429}
    assert all(r.error is None for r in result.records)  # every stream read to its end
    surfaces = {"chat": {"chat"}, "mix": {"chat", "responses"}}[surface]
    assert {r.surface for r in result.records} == surfaces
    report = result.audit
    assert report.ok and report.headers.problems == ()
    over = {(o.key, o.dimension): o for o in report.over}
    assert 0 < over[in_bound, "input_tokens"].admitted_total <= 3000
    assert 0 < over[out_bound, "output_tokens"].admitted_total <= 1500
    for key, dimension in ((in_bound, "input_tokens"), (out_bound, "output_tokens")):
        refusals = [r for r in result.records if r.key == key and r.status == 429]
        assert refusals, f"{key} was never refused"
        assert {r.observation().refusal.dimension for r in refusals} == {dimension}
        (under,) = [u for u in report.under if u.key == key and u.dimension == dimension]
        assert under.refusals == len(refusals)
        # Output is reserved at 64 per request and settled later: what a refusal leaves
        # unused is bounded by reservations in flight (16 at most), never more.
        assert under.max_unused <= (16 * 64 if dimension == "output_tokens" else 0)
        assert under.max_unexplained == 0


async def test_each_worker_sends_a_request_even_after_the_duration(node: list[str]) -> None:
    """A run whose duration is over before its workers start (on a starved machine, a
    short one can be) still measures something: one request per worker."""
    options = LoadOptions(
        urls=tuple(node), keys=(parse_key("sk-bench-nobody,name=nobody"),), duration=0.0,
        concurrency=3, stream_share=0.0, timeout=20,
    )  # fmt: skip
    with trio.fail_after(300):
        result = await run_load(options)
    assert result.summary.requests == 3
    assert result.summary.statuses == {"401": 3}  # (a key the node does not know)


async def test_transport_errors_are_counted_by_kind() -> None:
    dead = f"http://127.0.0.1:{free_ports()}"
    options = LoadOptions(
        urls=(dead,),
        keys=(parse_key("sk-nobody,rpm=5"),),
        requests=6,
        concurrency=2,
        timeout=5,
    )
    with trio.fail_after(30):
        result = await run_load(options)
    assert result.summary.errors == {"connect error": 6}
    assert result.summary.statuses == {"error": 6}
    assert result.audit.unknown_outcomes == 6
    assert result.audit.ok  # nothing known to be admitted


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "load", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_end_to_end(node: list[str], config_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    run = _cli(
        "--url", node[0], "--config", str(config_path), "--only", "cli", "--requests", "30",
        "--concurrency", "4", "--json", str(out), cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""  # no progress line: stderr is not a terminal
    assert "definite over-admission: none (ok)" in run.stdout
    assert "p99" in run.stdout
    data = json.loads(out.read_text())
    assert data["summary"]["statuses"] == {"200": 10, "429": 20}
    # Every field of the key's Limits (windows, mode, per-model rules: tokenguard/rules.py).
    assert data["config"]["keys"] == [
        {"name": "cli", "limits": json.loads(json.dumps(attrs.asdict(Limits(rpm=10))))},
    ]


def test_cli_fails_on_over_admission(node: list[str], tmp_path: Path) -> None:
    # Told the key allows 5 per minute while the server allows 20: the audit must see
    # 20 admitted within one window, exit 1, and flag the headers' limit as well.
    run = _cli(
        "--url", node[0], "--key", "sk-bench-liar,name=liar,rpm=5", "--requests", "30",
        "--concurrency", "4", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL definite over-admission: key liar requests: 20 > limit 5 (+15" in run.stdout
    assert "limit mismatch" in run.stdout


def read_until(stream: IO[str], text: str, timeout: float) -> str:
    """Read a pipe until ``text`` is in what it gave; that. ``TimeoutError`` after
    ``timeout`` seconds, ``EOFError`` if it closes first."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"no {text!r} within {timeout} s: {seen!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            raise EOFError(f"closed before {text!r}: {seen!r}")
        seen += chunk
    return seen.decode()


def test_cli_reports_after_ctrl_c(node: list[str], config_path: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "load", "--url", node[0], "--config", str(config_path),
         "--only", "interrupt", "--duration", "60", "--concurrency", "2", "--progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Interrupted once its progress line shows refusals (rpm 5 spent), however long
        # that took.
        assert proc.stderr is not None
        started = read_until(proc.stderr, "429:", timeout=120)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        stderr = started + stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stdout + stderr
    assert "stopping" in stderr
    assert "req/s" in stderr  # the progress line was shown (--progress)
    assert "definite over-admission: none (ok)" in stdout
    assert "statuses: 200: 5, 429:" in stdout


def test_cli_usage_errors(tmp_path: Path) -> None:
    run = _cli("--url", "http://127.0.0.1:9", "--key", "sk-x,rpm=ten", cwd=tmp_path)
    assert run.returncode == 2
    assert "rpm must be an integer" in run.stderr


def test_option_parsing(config_path: Path) -> None:
    assert parse_range("20:200") == TokenRange(20, 200)
    assert parse_range("64") == TokenRange(64, 64)
    assert parse_range("none", allow_none=True) is None
    for bad in ("0:5", "9:3", "x"):
        with pytest.raises(UsageError):
            parse_range(bad)
    key = parse_key("sk-abc,name=a,rpm=3,output_tpm=50")
    assert (key.name, key.secret, key.limits) == ("a", "sk-abc", Limits(rpm=3, output_tpm=50))
    assert parse_key("sk-abc").limits is None
    assert "sk-abc" not in repr(key)

    keys, window, bucket = keys_from_config(config_path)
    names = ["rpm-bound", "in-bound", "out-bound", "mix-in", "mix-out", "cli", "liar", "interrupt"]
    assert [k.name for k in keys] == names
    assert (window, bucket) == (600, 50)
    with pytest.raises(UsageError, match="hashed-only"):
        keys_from_config(config_path, only=["hashed-only"])

    namespace = argparse.Namespace(
        url=["http://a/"], key=["sk-z,rpm=1"], config=str(config_path), only=["cli"],
        requests=None, duration=2.0, concurrency=3, prompt_tokens="10:20", max_tokens="none",
        stream_share=0.0, seed=7, model="gpt-4o", window=None, bucket=None, timeout=5.0,
        surface="mix",
    )  # fmt: skip
    options = options_from_args(namespace)
    assert options.urls == ("http://a",)
    assert [k.name for k in options.keys] == ["cli", "key-" + digest_of("sk-z")[:8]]
    assert options.total is None and options.duration == 2.0
    assert options.max_tokens is None
    assert options.surface == "mix"
