"""The ``proxy`` scenario: requests through a proxy node vs straight to its (mock)
upstream (``python -m bench proxy``, which starts both nodes itself).
"""

from __future__ import annotations

import attrs

from bench import proxy
from bench.suite.context import Suite
from bench.suite.section import Section


async def scenario_proxy(suite: Suite) -> Section:
    section = suite.section("proxy", "Proxy mode: through a proxy node vs straight to its upstream")
    p = suite.profile
    options = proxy.ProxyBenchOptions(
        seconds=p.proxy_seconds,
        rounds=p.proxy_rounds,
        python_client=suite.client.client_bound,
    )
    result = await proxy.run(options)
    o = result.options
    section.intro = (
        "Requests per second through a proxy node (limits on, memory store, `[upstream]` = "
        "a mock node) versus straight to that mock node (`--no-limits`), taking turns: "
        f"{o.connections} connections, {o.rounds} round(s) of {o.seconds:g} s per kind, chat "
        f"bodies of ~{o.prompt_tokens} prompt tokens, `max_tokens` {o.max_tokens}, no "
        "streams (`python -m bench proxy`, which starts both nodes itself)."
    )
    section.commands = [f"python -m bench proxy --seconds {o.seconds:g} --rounds {o.rounds}"]
    proxy_cpu = result.median_cpu_ms("proxy", "proxy")
    section.body = [
        *proxy.format_report(result).splitlines()[2:],
        "",
        "The figure that depends least on the machine is the proxy node's CPU per request, "
        f"here **{proxy_cpu:.2f} ms**: a good part of it in httpx2 sending the "
        "request and reading the answer, the rest the node's own admission, settlement and "
        "HTTP serving. In front of a real model server, whose replies take 100s of ms, it "
        "is a per-node ceiling (one core proxies about 1,000 / that many requests per "
        "second) rather than added latency.",
    ]
    errors = sum(r.errors for r in result.rounds)
    if errors:
        section.notes.append(f"{errors} request(s) failed during the measurement")
    section.ratios = [("proxy node / straight to its upstream", result.ratio)]
    section.data = {"proxy": attrs.asdict(result), "ratio": result.ratio}
    return section
