"""The proxy accuracy audit: hostile clients against three proxy nodes in front of an honest
upstream, and what that upstream billed per key and per sliding window, against the limits.

``python -m bench load --proxy-audit llama|vllm [--duration 60] [--concurrency 16]
[--seed 0] [--behaviours plain,length_fields,tools,abandon,stall] [--json FILE]`` starts

* an honest fake upstream (``bench/fake_upstream/``, its own process, the flavour
  named; it generates and bills every token it is asked for, whatever the client does),
  paced at :data:`TTFT` then :data:`TOKENS_PER_SECOND`;
* ``tokenguard serve --nodes 3 --reuse-port`` (an embedded Redis; the nodes share one
  port, and the kernel spreads the client's connections over them) in front of it, with
  three keys
  whose limits (:data:`LIMITS`, per :data:`WINDOW`-second window in
  :data:`BUCKET`-second buckets) the load hits over and over, a route whose
  ``client_idle_timeout`` is :data:`CLIENT_IDLE_TIMEOUT` and the other defaults;

then sends ``--concurrency`` requests at a time for ``--duration`` seconds, each from a
key and of a behaviour drawn from one ``random.Random(--seed)``:

``plain``          a chat, ``max_tokens`` 16-256, streamed one time in three, read whole;
``length_fields``  ``max_tokens`` 4 and a length field the upstream may read instead:
                   ``n_predict`` or ``max_new_tokens`` 1024, or ``best_of`` 8 (issue #15,
                   hole 1);
``tools``          a tool whose schema holds ~3,000 tokens of text in ``$defs`` (hole 2);
``abandon``        a stream of 256-1024 tokens whose client takes 1-5 events and hangs up
                   (hole 3);
``stall``          a stream of 20,000-25,000 tokens (more than the socket buffers between
                   the node and its client hold, up to a few MiB on loopback) whose
                   client reads nothing, on a socket with a 4 KiB receive buffer, for
                   :data:`STALL_HOLD` seconds, then reads what is left (holes 3 and 4:
                   the node must cut it once its send has waited ``client_idle_timeout``).

Each prompt names its key and request (``tokenguard-key: NAME tokenguard-request: ID``),
so the upstream's ledger says what it billed for whom. Once every generation is done,
:func:`bench.audit.billing.audit_billing` compares, per key and dimension, what the upstream
billed within any window with the limit: a request was admitted between its send and
the upstream's receipt of it, so a set of them certainly within one window that was
billed more than the limit is **definite over-spend**, spending the limiter let through
(the existing audit's definition). It must be 0. "Possible" over-spend (sets that could
have been within one window) is a figure, as in the load audit.

Exit status: 0, 1 on definite over-spend, 3 when nothing reached the upstream, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.audit.billing import Billing, audit_billing
from bench.audit.findings import OverAdmission
from bench.audit.observations import DIMENSION_LABELS
from bench.fake_upstream.asks import FLAVOURS
from bench.ports import SUITE_PORTS, free_ports
from bench.stalled_client import read_to_end, stalled_request
from tokenguard.cluster.redis_server import stop_process
from tokenguard.model import Limits

BEHAVIOURS = ("plain", "length_fields", "tools", "abandon", "stall")
KEYS = ("alice", "bob", "carol")
MODEL = "gpt-4o"
WINDOW, BUCKET = 10, 1
LIMITS = Limits(rpm=40, input_tpm=4000, output_tpm=60000)
CLIENT_IDLE_TIMEOUT = 2.0
STALL_HOLD = CLIENT_IDLE_TIMEOUT + 8.0
TTFT, TOKENS_PER_SECOND = 0.05, 5000.0
START_TIMEOUT = 60.0
NODES = 3
CHAT_LINE = "POST /v1/chat/completions "  # a node's request log line for a chat
# A schema that costs ~3,000 tokens of text, all of it in $defs.
BIG_DEFS = {"Note": {"type": "string", "description": " ".join(["schema"] * 3000)}}


def secret_of(key: str) -> str:
    return f"sk-proxy-audit-{key}"


def audit_config(upstream_url: str) -> str:
    limits = (
        "".join(
            f"{field} = {value}\n"
            for field, value in (("rpm", LIMITS.rpm), ("input_tpm", LIMITS.input_tpm))
        )
        + f"output_tpm = {LIMITS.output_tpm}\ndefault_max_tokens = 256\n"
    )
    keys = "".join(f'[[keys]]\nkey = "{secret_of(k)}"\nname = "{k}"\n{limits}\n' for k in KEYS)
    return f"""[window]
seconds = {WINDOW}
bucket_seconds = {BUCKET}

[upstream]
base_url = "{upstream_url}/v1"
connect_timeout = 5
read_timeout = 30
client_idle_timeout = {CLIENT_IDLE_TIMEOUT}
max_connections = 16

{keys}"""


# --- hostile requests ---------------------------------------------------------------------


@attrs.frozen
class Plan:
    """One request, drawn before it is sent."""

    id: int
    key: str
    url: str
    behaviour: str
    body: dict[str, Any]
    take: int = 0  # abandon: content events taken before hanging up


def hostile_body(rng: random.Random, behaviour: str, key: str, request: int) -> dict[str, Any]:
    """The body ``behaviour`` sends (see the module docstring)."""
    marks = {"role": "system", "content": f"tokenguard-key: {key} tokenguard-request: {request}"}
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [marks, {"role": "user", "content": "Tell me about rate limits."}],
        "max_tokens": rng.randint(16, 256),
    }
    if behaviour == "plain" and rng.random() < 1 / 3:
        body.update(stream=True, stream_options={"include_usage": True})
    elif behaviour == "length_fields":
        extra = rng.choice([{"n_predict": 1024}, {"max_new_tokens": 1024}, {"best_of": 8}])
        body.update(max_tokens=4, **extra)
    elif behaviour == "tools":
        parameters = {"type": "object", "properties": {}, "$defs": BIG_DEFS}
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    elif behaviour == "abandon":
        body.update(max_tokens=rng.randint(256, 1024), stream=True)
    elif behaviour == "stall":
        body.update(max_tokens=rng.randint(20_000, 25_000), stream=True)
    return body


@attrs.define
class Sent:
    """What happened to one request, as its client saw it (times: ``time.monotonic()``)."""

    id: int
    key: str
    behaviour: str
    start: float
    end: float = 0.0
    status: int | None = None
    cut: bool | None = None  # stall: the stream ended without [DONE]
    error: str | None = None


def _status_of(response: bytes) -> int | None:
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    return int(found.group(1)) if found else None


async def _stall(plan: Plan, sent: Sent) -> None:
    async with stalled_request(plan.url, secret_of(plan.key), plan.body) as stream:
        await trio.sleep(STALL_HOLD)
        with trio.move_on_after(30):
            received = await read_to_end(stream)
    sent.status = _status_of(received)
    if sent.status == 200:
        sent.cut = b"data: [DONE]" not in received


async def _over_http(client: httpx.AsyncClient, plan: Plan, sent: Sent) -> None:
    headers = {"Authorization": f"Bearer {secret_of(plan.key)}"}
    url = f"{plan.url}/v1/chat/completions"
    async with client.stream("POST", url, json=plan.body, headers=headers) as response:
        sent.status = response.status_code
        if plan.behaviour != "abandon" or response.status_code != 200:
            await response.aread()
            return
        taken = 0
        async for line in response.aiter_lines():
            taken += line.startswith("data: {")
            if taken >= plan.take:
                return  # hangs up: the response closes with the block


async def send_planned(client: httpx.AsyncClient, plan: Plan) -> Sent:
    """Send one planned request as its behaviour says; never raises for I/O."""
    sent = Sent(id=plan.id, key=plan.key, behaviour=plan.behaviour, start=time.monotonic())
    try:
        with trio.fail_after(60):
            if plan.behaviour == "stall":
                await _stall(plan, sent)
            else:
                await _over_http(client, plan, sent)
    except (httpx.HTTPError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        sent.error = type(exc).__name__
    sent.end = time.monotonic()
    return sent


async def run_hostile_load(
    urls: Sequence[str], *, behaviours: Sequence[str], duration: float, concurrency: int, seed: int
) -> list[Sent]:
    """``concurrency`` workers sending drawn plans for ``duration`` seconds."""
    rng = random.Random(seed)
    records: list[Sent] = []
    issued = 0
    stop_at = time.monotonic() + duration

    def draw() -> Plan:
        nonlocal issued
        key, url, behaviour = rng.choice(KEYS), rng.choice(urls), rng.choice(behaviours)
        plan = Plan(issued, key, url, behaviour, hostile_body(rng, behaviour, key, issued))
        plan = attrs.evolve(plan, take=rng.randint(1, 5))
        issued += 1
        return plan

    limits = httpx.Limits(max_connections=concurrency * len(urls))
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5), limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < stop_at:
                records.append(await send_planned(client, draw()))

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return sorted(records, key=lambda r: r.id)


# --- the processes ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_command(
    argv: Sequence[str], log: Path, ready: re.Pattern[str]
) -> AsyncIterator[re.Match[str]]:
    """``argv`` (output in ``log``) until the block ends; yields the match of ``ready``
    in its output once it appears; stopped with SIGTERM (SIGKILL after 10 s)."""
    with open(log, "wb") as output:  # noqa: ASYNC230 (a local file, no await while open)
        process = await trio.lowlevel.open_process(
            list(argv), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        with trio.fail_after(START_TIMEOUT):
            while (found := ready.search(_text_of(log))) is None:
                if process.returncode is not None:
                    raise RuntimeError(f"{argv[0]} exited: {_text_of(log)}")
                await trio.sleep(0.1)
        yield found
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process, grace=10)


def _text_of(log: Path) -> str:
    return log.read_text(errors="replace")  # a small local file


async def ledger_when_done(upstream_url: str) -> list[dict[str, Any]]:
    """The upstream's ledger once every generation in it is done."""
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            entries: list[dict[str, Any]] = (await client.get(f"{upstream_url}/ledger")).json()[
                "entries"
            ]
            if all(e["done"] for e in entries):
                return entries
            await trio.sleep(0.2)


def billings(ledger: Sequence[dict[str, Any]], sent: Sequence[Sent]) -> tuple[list[Billing], int]:
    """The ledger's entries as :class:`Billing` (admitted between the client's send and
    the upstream's receipt), and how many entries name no request the load sent."""
    starts = {str(s.id): s.start for s in sent}
    bills, unmatched = [], 0
    for i, entry in enumerate(ledger):
        start = starts.get(entry["request"] or "")
        if start is None or entry["key"] is None:
            unmatched += 1
            continue
        bills.append(
            Billing(
                id=i,
                key=entry["key"],
                start=start,
                end=max(start, entry["started"]),
                input_tokens=entry["input_tokens"],
                output_tokens=entry["output_tokens"],
            )
        )
    return bills, unmatched


# --- the run and its report ---------------------------------------------------------------


@attrs.frozen
class ProxyAuditOptions:
    flavour: str
    duration: float = 60.0
    concurrency: int = 16
    seed: int = 0
    behaviours: tuple[str, ...] = BEHAVIOURS


@attrs.frozen
class ProxyAuditResult:
    options: ProxyAuditOptions
    sent: tuple[Sent, ...]
    over: tuple[OverAdmission, ...]
    billed_requests: int
    unmatched: int
    per_node: tuple[int, ...] = ()  # chat requests each node logged

    @property
    def definite_overspend(self) -> int:
        return sum(o.definite_excess for o in self.over)


async def run_proxy_audit(options: ProxyAuditOptions, directory: Path) -> ProxyAuditResult:
    fake = [sys.executable, "-m", "bench", "fake-upstream", "--flavour", options.flavour]
    fake += ["--port", "0", "--ttft", str(TTFT), "--tokens-per-second", str(TOKENS_PER_SECOND)]
    ready = re.compile(r"upstream on (http://\S+)")
    async with running_command(fake, directory / "upstream.log", ready) as found:
        upstream_url = found.group(1)
        config = directory / "proxy-audit.toml"
        config.write_text(audit_config(upstream_url))
        # The three nodes share one port, as behind a load balancer: the kernel spreads
        # the connections over them.
        port = free_ports(within=SUITE_PORTS)
        serve = [sys.executable, "-m", "tokenguard", "serve", "--nodes", str(NODES)]
        serve += ["--reuse-port"]
        serve += ["--port", str(port), "--state-dir", str(directory / "state")]
        serve += ["--config", str(config)]
        healthy = re.compile(r"nodes healthy after")
        async with running_command(serve, directory / "nodes.log", healthy):
            urls = [f"http://127.0.0.1:{port}"]
            sent = await run_hostile_load(
                urls,
                behaviours=options.behaviours,
                duration=options.duration,
                concurrency=options.concurrency,
                seed=options.seed,
            )
        with trio.fail_after(120):
            ledger = await ledger_when_done(upstream_url)
    bills, unmatched = billings(ledger, sent)
    over = audit_billing(bills, {k: LIMITS for k in KEYS}, WINDOW)
    per_node = tuple(
        _text_of(directory / "state" / "logs" / f"node-{i}.log").count(CHAT_LINE)
        for i in range(NODES)
    )
    return ProxyAuditResult(options, tuple(sent), over, len(bills), unmatched, per_node)


def format_report(result: ProxyAuditResult) -> str:
    o = result.options
    statuses = Counter(
        (s.behaviour, str(s.status) if s.error is None else s.error) for s in result.sent
    )
    stalls = [s for s in result.sent if s.behaviour == "stall" and s.status == 200]
    lines = [
        f"Proxy accuracy audit: fake {o.flavour} upstream, 3 nodes, {len(result.sent)} requests "
        f"in {o.duration:g} s, concurrency {o.concurrency}, seed {o.seed}; window {WINDOW} s "
        f"({BUCKET} s buckets); limits per key: rpm {LIMITS.rpm}, input_tpm "
        f"{LIMITS.input_tpm}, output_tpm {LIMITS.output_tpm}",
        "  requests by behaviour and outcome: "
        + ", ".join(f"{b} {s}: {n}" for (b, s), n in sorted(statuses.items())),
        f"  stalled streams the node cut (no [DONE]): {sum(1 for s in stalls if s.cut)} of "
        f"{len(stalls)} admitted",
        "  chat requests each node served: " + ", ".join(map(str, result.per_node)),
        f"  the upstream billed {result.billed_requests} requests"
        + (f" ({result.unmatched} not matched to a request sent)" if result.unmatched else ""),
        "  billed within one window, definite / possible:",
        f"  {'key':<8} {'dimension':<14} {'limit':>7} {'billed':>9} {'definite':>9} "
        f"{'over':>7} {'possible':>9} {'over':>7}",
    ]
    for over in result.over:
        lines.append(
            f"  {over.key:<8} {DIMENSION_LABELS[over.dimension]:<14} {over.limit:>7} "
            f"{over.admitted_total:>9} {over.definite.amount:>9} {over.definite_excess:>7} "
            f"{over.possible.amount:>9} {over.possible_excess:>7}"
        )
    verdict = "none (ok)" if result.definite_overspend == 0 else f"{result.definite_overspend} FAIL"
    lines.append(f"  definite over-spend: {verdict}")
    return "\n".join(lines)


def parse_behaviours(text: str) -> tuple[str, ...]:
    chosen = tuple(b.strip() for b in text.split(",") if b.strip())
    unknown = set(chosen) - set(BEHAVIOURS)
    if not chosen or unknown:
        raise ValueError(f"--behaviours: choose from {', '.join(BEHAVIOURS)}, got {text!r}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The proxy mode's own options, on ``load``'s parser (which has the rest)."""
    parser.add_argument(
        "--proxy-audit",
        metavar="FLAVOUR",
        help="instead: the proxy accuracy audit: 3 nodes in front of an honest fake FLAVOUR "
        "(llama or vllm) upstream, hostile clients, what it billed vs the limits "
        "(bench/proxy_audit.py; --duration, --concurrency, --seed, --json apply)",
    )
    parser.add_argument(
        "--behaviours",
        default=",".join(BEHAVIOURS),
        help="with --proxy-audit: the client behaviours drawn from (all)",
    )


def main(args: argparse.Namespace) -> int:
    """``python -m bench load --proxy-audit FLAVOUR``: run, print, write JSON; exit code."""
    if args.proxy_audit not in FLAVOURS:
        print(f"bench load: --proxy-audit is one of {', '.join(FLAVOURS)}", file=sys.stderr)
        return 2
    try:
        behaviours = parse_behaviours(args.behaviours)
    except ValueError as exc:
        print(f"bench load: {exc}", file=sys.stderr)
        return 2
    options = ProxyAuditOptions(
        flavour=args.proxy_audit,
        duration=args.duration or 60.0,
        concurrency=args.concurrency,
        seed=args.seed,
        behaviours=behaviours,
    )
    with tempfile.TemporaryDirectory(prefix="tg-proxy-audit-") as tmp:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        result = trio.run(run_proxy_audit, options, Path(tmp))
    print(format_report(result))
    if args.json_path:
        data = {
            "options": attrs.asdict(options),
            "sent": [attrs.asdict(s) for s in result.sent],
            "over": [attrs.asdict(o) for o in result.over],
            "definite_overspend": result.definite_overspend,
        }
        Path(args.json_path).write_text(json.dumps(data, indent=1), encoding="utf-8")
    if result.billed_requests == 0:
        return 3
    return 0 if result.definite_overspend == 0 else 1
