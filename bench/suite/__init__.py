"""The benchmark suite: ``python -m bench suite [--quick]``.

One command starts what it needs (tokenguard nodes, supervised clusters, a private
``redis-server`` unless ``--redis URL`` is given), runs the scenarios, and writes
``docs/performance.md`` with PNG charts under ``docs/img/``. Scenarios, in run order:

``startup``      time from ``tokenguard serve`` (1 node) and ``serve --nodes 3`` to every
                 node answering ``/healthz``; resident memory at idle.
``decisions``    store-only decisions per second (``python -m bench decisions``), memory
                 and Redis drivers, 3 and 8 rules per decision; ``redis-benchmark`` on
                 the same Redis for scale.
``tokens``       prompt counting per request, the count cache on vs off: a growing chat
                 and unique prompts (``python -m bench tokens``, in this process).
``stores``       one node: limits off vs memory store vs Redis store; throughput at
                 :attr:`Profile.connections` connections, latency unloaded (1 connection).
``rules``        the memory and Redis nodes next to twins whose keys have 8 rules each.
``concurrency``  the same three nodes at 1..256 connections.
``streaming``    the same three nodes at several shares of streamed requests.
``nodes``        1 vs 2 vs 3 nodes on one Redis (the same total connections).
``accuracy``     ``bench.load`` and its audit against a 3-node cluster, one key with
                 small limits (over-admission must be 0; under-admission is measured).
``proxy``        a proxy node vs straight to its (mock) upstream (``python -m bench proxy``).
``feed``         the usage feed: 10 subscribers of each kind vs none, and delivery
                 latency node to node (``python -m bench feed``).
``memory``       (no load of its own) resident memory per process, idle and after load,
                 from samples the other scenarios take.

How it measures:

* **Side by side.** Variants that are compared are all running at once (idle when not
  measured) and measured in rounds A, B, C, B, C, A, ... (the order rotates every round);
  a ratio is computed per round from adjacent measurements and the median of those is
  the headline. Absolute figures (medians, with the min-max range) are secondary.
* **A cheap client.** Throughput and latency come from ``wrk`` (:mod:`bench.wrk`), whose
  own CPU cost is negligible. Without wrk, :mod:`bench.load` is used instead and every
  such table says it is client-bound.
* **Honest bookkeeping.** Every answer must be a 200 (the throughput keys' limits are
  never reached); anything else is reported next to the figure. Node and Redis CPU
  (from ``/proc``) are reported per run, so a reader sees what was saturated.

Guarantees: bounded (every measurement has a deadline; the full profile takes about 7
minutes on 2 cores, ``--quick`` under 2), and clean: every process the suite starts is
stopped when it ends, however it ends (SIGTERM, SIGKILL after a grace period, reaped;
descendants seen are SIGKILLed if still alive; on Linux the children also die with the
suite itself, through ``PR_SET_PDEATHSIG``).

Where things are: one module per scenario (``startup``, ``decisions``, ..., ``memory``),
each exporting its ``scenario_*`` coroutine, which fills one report section
(:mod:`~bench.suite.section`). They share ``profile`` (durations and rounds), ``machine``
(where it ran), ``targets`` (processes, nodes, the Redis), ``clients`` (wrk or
``bench.load``), ``context`` (:class:`~bench.suite.context.Suite`, what every scenario
is given), ``runs`` (measurements compared side by side), ``figures`` and ``goals``
(formatting and targets), ``configs`` (the TOML the suite writes), ``redis_benchmark``,
``report`` (the markdown), ``run`` (:func:`run_suite`) and ``cli``. tokenguard itself is
imported in ``tokenguard_parts`` alone.

A scenario coroutine takes the :class:`~bench.suite.context.Suite` and returns its
section. It raises :class:`~bench.suite.targets.SuiteError` (or ``WrkError``, ``OSError``,
``trio.TooSlowError``, ``ValueError``) when it cannot run: :func:`run_suite` then reports
the error as that scenario's section and runs the next.
"""

from bench.suite.cli import add_arguments, main
from bench.suite.profile import FULL, QUICK, Profile
from bench.suite.run import SCENARIOS, SuiteResult, run_suite

__all__ = [
    "FULL",
    "QUICK",
    "SCENARIOS",
    "Profile",
    "SuiteResult",
    "add_arguments",
    "main",
    "run_suite",
]
