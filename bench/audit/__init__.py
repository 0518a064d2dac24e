"""The accuracy audit of a load run: pure functions from observed requests to a verdict.

The server's guarantee (:mod:`tokenguard.store.window_store`): for each key and each limited
dimension, within ANY interval of ``window`` seconds (closed: an amount admitted at
``t`` is still counted at ``t + window``), the admitted amounts add up to at most the
limit. This module checks that guarantee from the outside, from what a client saw, and
also measures the opposite error: refusals of requests that would have fit.

**Timing.** The client cannot see when the server admitted a request, only that it
happened after the request was sent (``start``) and before its answer's headers arrived
(``end``): admission moment ``t_i`` lies in ``[start_i, end_i]``. All times are one
client clock (monotonic seconds); the store's clock (Redis ``TIME``) runs at the same
rate, which is all the audit needs, since it compares only durations.

**Amounts.** requests: 1 per admitted request (status 200). input tokens:
``usage.prompt_tokens`` of an admitted request (the server's own count, which is what
it charged). output tokens: ``usage.completion_tokens`` (what the reservation was
settled to; the settled amount stays in the bucket the reservation was charged to).
An admitted request whose usage is unknown (a broken stream) counts 0 tokens: a lower
bound, so it cannot cause a false alarm.

**Outcomes.** 200 is admitted; 429 is refused; other 4xx come before the limiter and
are not admitted. A transport error or 5xx leaves the outcome unknown: the server may
have admitted it. Unknown outcomes are left out of the *definite* checks (no false
alarm) and counted as possibly admitted (1 request, tokens unknown) in the *possible*
ones; the report says how many there were, because then "possible" is a lower bound.

**Over-admission.** A set S of admitted requests (one key, one dimension)

* is *definitely* within one window iff ``max(end_i) - min(start_i) <= window``:
  whatever the true moments, they all lie in ``[min start, max end]``;
* is *possibly* within one window iff ``max(start_i) - min(end_i) <= window``: the
  moments can then be placed, each within its interval, in one window
  ``[min end, min end + window]``.

*Definite over-admission* is a definitely-within-one-window set whose amounts exceed
the limit: proof that the server broke its guarantee, whatever other traffic the key
had (other traffic only adds to the true amounts). It must be zero.
*Possible over-admission* is a possibly-within-one-window set over the limit: not a
proof of anything, since the server keeps amounts for between ``window`` and
``window + bucket`` seconds and the client's uncertainty (latency) can exceed that
slack; it is reported so a reader sees how close the run came. Both are found by a
sweep: every maximal definite set is ``{i : start_i >= L, end_i <= L + window}`` for
``L`` the start of one of its members (likewise for possible sets with ends), so one
pass over the anchors, with one pointer adding requests in order of end and one
removing them in order of start, finds the peak in ``O(n log n)``.

**Under-admission.** For a 429 that names dimension D with its requested amount ``q``
(the 429 body says "Rate limit reached ... on requests per min ... Limit L, Used U,
Requested q"), exact accounting would have admitted it iff the amount admitted in the
window ending at the refusal, plus ``q``, fit under ``L``. The refusal moment is
uncertain too, so two bounds are given per refusal:

* *unused, at least* = ``L - q - (amounts possibly in that window)``, counting every
  admission whose interval meets ``[start_r - window, end_r]``;
* *unused, at most* = ``L - q - (amounts definitely in that window)``, counting only
  admissions that certainly fell in ``[end_r - window, start_r]``.

A positive lower bound means the server refused something that would have fit. That is
expected, by design, in two cases: the server remembers an amount for up to one bucket
longer than the window (so whatever was admitted in the bucket just before the window
still counts), and it holds output tokens at their reservation (``max_tokens``) until
the request settles. So each refusal also gets

* *unexplained* = ``L - q - (amounts possibly still held)``, counting every admission
  whose interval meets ``[start_r - window - bucket, end_r]``, output tokens at their
  reservation when the client knows it: what even the bucket slack and the reservations
  cannot explain. It should be 0; more means the store counted more than this client
  caused (other traffic on the key, or an over-counting store).

**Headers.** Every answer's ``x-ratelimit-*`` headers are cross-checked: they parse as
non-negative integers; ``limit`` equals the configured limit; on an admitted answer the
request's own amount is already counted (``remaining <= limit - amount``); on a 429 the
named dimension has ``remaining < requested`` and agrees with the body's "Used"; the
``-tokens`` triple is one of the input or output triples; and the store never counts
less than the client knows it admitted: ``limit - remaining`` (the server's used, when
``remaining > 0``) is at least the amounts of admissions definitely before this answer
and definitely still in its window (``end_j <= start_i`` and ``start_j >= end_i -
window``). A shortfall there means a lost update in the store.

**Other traffic.** Under-admission figures assume this client was the key's only user
in the window. Each answer's server-side used amount is therefore compared with all
this client possibly had held (see :class:`ForeignUsage`); a surplus is reported as a
note, since it inflates "unused" and "unexplained".

**Verdict.** :attr:`AuditReport.ok` is false on any definite over-admission or header
inconsistency; possible over-admission, under-admission and foreign usage are figures.

**Upstream billing (proxy mode).** :func:`audit_billing` checks the same guarantee
against what an upstream really billed (``bench/proxy_audit.py``): each billed request is
a :class:`Billing` whose amounts are the upstream's, and whose admission lies between
its client's send (``start``) and the upstream's receipt of it (``end``): tokenguard
forwards a request only once admitted. Definite and possible sets are as above; a
definite set billed more than a limit is spending the limiter let through.

**Modules.** :mod:`~bench.audit.observations` (the inputs), :mod:`~bench.audit.sweep`
(the one-window sweeps), :mod:`~bench.audit.headers` (the header cross-check),
:mod:`~bench.audit.verdict` (:func:`~bench.audit.verdict.audit`, the whole audit),
:mod:`~bench.audit.findings` (what it finds), :mod:`~bench.audit.billing` (proxy mode)
and :mod:`~bench.audit.report` (JSON and text).
"""
