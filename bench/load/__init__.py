"""The load client: OpenAI-compatible traffic against tokenguard nodes, then a report.

``--surface chat`` (the default) sends chat completions, ``--surface responses`` the
Responses API (the same prompts as a string ``input``, ``max_output_tokens``), and
``--surface mix`` each request as one or the other at random: one key's limits are one
budget across both, and the audit checks them as one.

What a run guarantees:

* **Bounded.** It sends at most ``--requests`` requests and starts none after
  ``--duration`` seconds; every request has a total deadline (``--timeout``) on top of
  httpx's per-operation timeouts, so a run always ends.
* **Reproducible choices.** Which key, which node, the prompt size, ``max_tokens`` and
  streaming are drawn from one ``random.Random(--seed)``, in request order, so the same
  seed sends the same sequence of requests (their timing is the server's business).
* **Every request recorded.** Key name (never the secret), node URL, wall-clock and
  monotonic send / answer / end times, status, error kind, whether streamed, the usage
  the server reported (``prompt_tokens``, ``completion_tokens``; for streams from the
  final usage chunk, asked for with ``stream_options.include_usage``) and the
  ``x-ratelimit-*`` / ``retry-after*`` headers.
* **Honest about itself.** The client's own CPU time is measured against wall time;
  when it used more than :data:`CLIENT_BOUND_SHARE` of a core, the report says the run
  was client-bound, i.e. its throughput measures this client, not the server.
* **Audited.** The records go through :func:`bench.audit.verdict.audit`; the command exits 1 on
  definite over-admission or inconsistent rate-limit headers (see that module for what
  exactly is computed), 3 when no request got any HTTP answer, 2 on bad arguments.

**Modules.** :mod:`~bench.load.options` (keys, ranges, :class:`~bench.load.options.LoadOptions`),
:mod:`~bench.load.records` (what each request leaves), :mod:`~bench.load.client` (one
request, planned and sent), :mod:`~bench.load.run` (the whole run,
:func:`~bench.load.run.run_load`), :mod:`~bench.load.summary` (its figures),
:mod:`~bench.load.report` (text and JSON) and :mod:`~bench.load.cli` (the command).
"""
