"""The same guarantee checked against what an upstream billed (proxy mode; see the
package docstring, "Upstream billing")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from bench.audit.findings import OverAdmission
from bench.audit.observations import not_before_start
from bench.audit.sweep import Span
from bench.audit.verdict import over_admission
from tokenguard.model import DIMENSIONS, Limits


@attrs.frozen
class Billing:
    """One request an upstream billed: for key ``key``, admitted at some moment within
    ``[start, end]`` (its client sent it; the upstream received it), billed
    ``input_tokens`` and ``output_tokens``."""

    id: int
    key: str
    start: float
    end: float = attrs.field(validator=not_before_start)
    input_tokens: int = 0
    output_tokens: int = 0

    def amount(self, dimension: str) -> int:
        if dimension == "requests":
            return 1
        return self.input_tokens if dimension == "input_tokens" else self.output_tokens


def audit_billing(
    bills: Iterable[Billing], limits: Mapping[str, Limits], window: float
) -> tuple[OverAdmission, ...]:
    """Per key in ``limits`` and limited dimension: the most the upstream billed within
    one window, definitely and possibly (``admitted_total`` is all it billed)."""
    by_key: dict[str, list[Billing]] = {key: [] for key in limits}
    for bill in bills:
        if bill.key in by_key:
            by_key[bill.key].append(bill)
    found = []
    for key, key_bills in by_key.items():
        for dimension in DIMENSIONS:
            limit = limits[key].limit(dimension)
            if limit is None:
                continue
            spans = [Span(b.start, b.end, b.amount(dimension), b.id) for b in key_bills]
            found.append(over_admission(key, dimension, limit, spans, spans, window))
    return tuple(found)
