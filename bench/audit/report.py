"""The audit's report: as JSON (:func:`audit_dict`) and as text (:func:`format_audit`)."""

from __future__ import annotations

from typing import Any

import attrs

from bench.audit.findings import AuditReport
from bench.audit.observations import DIMENSION_LABELS, MAX_PROBLEM_EXAMPLES


def audit_dict(report: AuditReport) -> dict[str, Any]:
    """The report as JSON-able data, derived figures included, for ``--json``."""
    data = attrs.asdict(report)
    data["ok"] = report.ok
    data["definite_over_admissions"] = report.definite_over_admissions
    for entry, o in zip(data["over"], report.over, strict=True):
        entry["definite_excess"] = o.definite_excess
        entry["possible_excess"] = o.possible_excess
    for entry, u in zip(data["under"], report.under, strict=True):
        entry.update(
            refusals=u.refusals,
            would_fit=u.would_fit,
            max_unused=u.max_unused,
            mean_unused=u.mean_unused,
            max_unused_upper=u.max_unused_upper,
            max_unexplained=u.max_unexplained,
        )
    data["headers"]["counts"] = report.headers.counts()
    return data


def _pct(amount: float, limit: int) -> str:
    return f"{100 * amount / limit:.1f}%" if limit else "-"


def format_audit(report: AuditReport) -> str:
    """The audit as plain text for the load report (counts and percentages of limits)."""
    lines = _over_lines(report) + _under_lines(report) + _header_lines(report)
    return "\n".join(lines)


def _over_lines(report: AuditReport) -> list[str]:
    lines = [
        f"Accuracy audit (window {report.window:g} s, bucket {report.bucket:g} s; each "
        "admission lies between its send and its answer)",
        "  over-admission: most admitted within one window, definite / possible",
        f"  {'key':<16} {'dimension':<14} {'limit':>9} {'admitted':>10} "
        f"{'definite':>10} {'over':>8} {'possible':>10} {'over':>8}",
    ]
    for o in report.over:
        lines.append(
            f"  {o.key:<16} {DIMENSION_LABELS[o.dimension]:<14} {o.limit:>9} "
            f"{o.admitted_total:>10} {o.definite.amount:>10} {o.definite_excess:>8} "
            f"{o.possible.amount:>10} {o.possible_excess:>8}"
        )
    bad = [o for o in report.over if o.definite_excess]
    if bad:
        for o in bad:
            lines.append(
                f"  FAIL definite over-admission: key {o.key} {DIMENSION_LABELS[o.dimension]}: "
                f"{o.definite.amount} > limit {o.limit} (+{o.definite_excess}, "
                f"{_pct(o.definite_excess, o.limit)}) in the window from t={o.definite.anchor:.3f}"
                f"; {o.definite.windows_over} window(s) over; requests "
                f"{list(o.definite.members[:12])}{' ...' if len(o.definite.members) > 12 else ''}"
            )
    else:
        lines.append("  definite over-admission: none (ok)")
    maybe = [o for o in report.over if o.possible_excess]
    if maybe:
        worst = max(maybe, key=lambda o: o.possible_excess / o.limit)
        lines.append(
            f"  possible over-admission (not a proof; latency exceeds the server's slack): "
            f"{len(maybe)} key-dimension(s), worst +{worst.possible_excess} "
            f"({_pct(worst.possible_excess, worst.limit)}) on {worst.key} "
            f"{DIMENSION_LABELS[worst.dimension]}"
        )
    if report.unknown_outcomes:
        lines.append(
            f"  {report.unknown_outcomes} request(s) with unknown outcome (transport error or "
            "5xx): left out of definite checks; possible counts are lower bounds"
        )

    return lines


def _under_lines(report: AuditReport) -> list[str]:
    lines = [
        "  under-admission: refusals that exact accounting would have admitted;",
        "    unused = limit - requested - admitted in the window ending at the refusal;",
        "    'would fit' counts refusals with unused > 0 for certain. Expected by design:",
        "    the server holds amounts up to one bucket past the window, and output tokens",
        "    at their reservation until settled; 'unexplained' is unused beyond both (0)",
        f"  {'key':<16} {'dimension':<14} {'refusals':>9} {'would fit':>10} {'(%)':>7} "
        f"{'unused max':>11} {'(% limit)':>9} {'mean':>8} {'at most':>8} "
        f"{'unexplained':>11}",
    ]
    for u in report.under:
        if not u.refusals and not u.never_fits:
            continue
        share = f"({_pct(u.would_fit, u.refusals)})" if u.refusals else "-"
        lines.append(
            f"  {u.key:<16} {DIMENSION_LABELS[u.dimension]:<14} {u.refusals:>9} "
            f"{u.would_fit:>10} {share:>7} {u.max_unused:>11} "
            f"{'(' + _pct(u.max_unused, u.limit) + ')':>9} {u.mean_unused:>8.1f} "
            f"{u.max_unused_upper:>8} {u.max_unexplained:>11}"
            + (f"  (+{u.never_fits} never fit)" if u.never_fits else "")
        )
    if not any(u.refusals or u.never_fits for u in report.under):
        lines.append("  (no refusals)")
    for f in report.foreign:
        if f.excess:
            lines.append(
                f"  note: key {f.key}: the server counted up to {f.excess} "
                f"{DIMENSION_LABELS[f.dimension]} ({_pct(f.excess, f.limit)}) more than this "
                f"client could have caused, in {f.answers} answer(s): other traffic on the key "
                "(or an earlier run still in the window); under-admission figures overstate"
            )
    if report.unattributed_refusals:
        lines.append(f"  {report.unattributed_refusals} 429(s) naming no dimension: not audited")

    return lines


def _header_lines(report: AuditReport) -> list[str]:
    lines = []
    h = report.headers
    if h.problems:
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(h.counts().items()))
        lines.append(f"  FAIL header consistency: {len(h.problems)} problem(s) ({counts})")
        for p in h.problems[:MAX_PROBLEM_EXAMPLES]:
            lines.append(f"    request {p.request_id}: {p.kind}: {p.detail}")
    else:
        lines.append(f"  header consistency: {h.checked} answers checked, no problems (ok)")
    if report.unaudited_keys:
        lines.append(f"  keys with unknown limits, not audited: {', '.join(report.unaudited_keys)}")
    return lines
