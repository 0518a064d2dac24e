"""The throughput clients: wrk (:class:`WrkClient`), or :mod:`bench.load` without it.

Both measure ``urls`` for ``seconds`` at ``connections`` connections and return a
:class:`~bench.wrk.WrkResult`; both print an equivalent command for the report, and
``note`` is the sentence every throughput section says about its client.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from bench.load.options import KeySpec, LoadOptions, TokenRange
from bench.load.run import run_load
from bench.suite.configs import TP_SECRETS
from bench.wrk import WrkResult, run_wrk, run_wrk_many, wrk_argv
from bench.wrk_script import chat_script


class WrkClient:
    """Throughput and latency through wrk: one wrk per node, ``connections`` split."""

    name = "wrk"
    client_bound = False
    note = (
        "Load from wrk (one thread per node; its own CPU cost is negligible). A request "
        "is a ~100-token prompt, a different one every time (no count is ever remembered "
        "for it: the `tokens` section measures that), `max_tokens` 64, over 8 keys whose "
        "limits are never reached."
    )

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def script(self, share: float) -> Path:
        path = self.workdir / f"chat-{share:g}.lua"
        if not path.exists():
            path.write_text(chat_script(TP_SECRETS, stream_share=share), encoding="utf-8")
        return path

    async def measure(
        self, urls: Sequence[str], *, connections: int, seconds: int, share: float
    ) -> WrkResult:
        script = self.script(share)
        if len(urls) == 1:
            return await run_wrk(urls[0], script, connections=connections, seconds=seconds)
        per_node = max(1, connections // len(urls))
        return await run_wrk_many(urls, script, connections=per_node, seconds=seconds)

    def commands(self, *, connections: int, seconds: int, share: float, nodes: int = 1) -> str:
        script = f"python -m bench.wrk --config bench.toml --stream-share {share:g} > chat.lua"
        per_node = max(1, connections // nodes)
        line = shlex.join(
            wrk_argv("http://127.0.0.1:8000", "chat.lua", connections=per_node, seconds=seconds)
        )
        if nodes > 1:
            line += f"   # one per node, at once ({nodes} nodes: ports 8000-{8000 + nodes - 1})"
        return f"{script}\n{line}"


class LoadClient:
    """The fallback without wrk: :mod:`bench.load` in this process (client-bound above a
    few hundred requests per second: the figures then measure the client)."""

    name = "bench.load"
    client_bound = True
    note = (
        "**Client-bound:** wrk is not installed, so `bench.load` (about 1-2 ms of client "
        "CPU per request) generated the load: these figures measure the client as much "
        "as the nodes. Install wrk (`apt-get install wrk`) and rerun."
    )

    async def measure(
        self, urls: Sequence[str], *, connections: int, seconds: int, share: float
    ) -> WrkResult:
        options = LoadOptions(
            urls=tuple(urls),
            keys=tuple(KeySpec(name=f"tp-{i}", secret=s) for i, s in enumerate(TP_SECRETS)),
            duration=float(seconds),
            concurrency=connections,
            prompt_tokens=TokenRange(100, 100),
            max_tokens=TokenRange(64, 64),
            stream_share=share,
        )
        result = await run_load(options)
        s = result.summary
        failed = sum(v for k, v in s.statuses.items() if k not in ("200", "error"))
        latency = {k: v for k, v in s.latency.items() if k in ("p50", "p95", "p99", "max", "mean")}
        return WrkResult(
            requests=s.requests,
            seconds=s.wall_seconds,
            latency=latency,
            errors={"status": failed, "transport": s.statuses.get("error", 0)},
        )

    def commands(self, *, connections: int, seconds: int, share: float, nodes: int = 1) -> str:
        urls = " ".join(f"--url http://127.0.0.1:{8000 + i}" for i in range(nodes))
        return (
            f"python -m bench load --config bench.toml {urls} --duration {seconds} "
            f"--concurrency {connections} --prompt-tokens 100 --max-tokens 64 "
            f"--stream-share {share:g}"
        )
