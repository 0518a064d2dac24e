"""The cross-check of every answer's ``x-ratelimit-*`` headers (see the package
docstring, "Headers")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bench.audit.findings import HeaderProblem
from bench.audit.observations import HEADER_NAMES, Observation
from bench.audit.sweep import dominance_sums
from tokenguard.model import Limits


def _parse_headers(
    obs: Observation, problems: list[HeaderProblem]
) -> dict[str, tuple[int | None, int | None]]:
    """``{header dimension name: (limit, remaining)}`` for every triple present."""
    found: dict[str, tuple[int | None, int | None]] = {}
    for name in (*HEADER_NAMES.values(), "tokens"):
        values: list[int | None] = []
        for part in ("limit", "remaining"):
            text = obs.headers.get(f"x-ratelimit-{part}-{name}")
            if text is None:
                values.append(None)
                continue
            try:
                value = int(text)
            except ValueError:
                problems.append(
                    HeaderProblem("unparsable", obs.id, f"x-ratelimit-{part}-{name}: {text!r}")
                )
                values.append(None)
                continue
            if value < 0:
                problems.append(
                    HeaderProblem("negative", obs.id, f"x-ratelimit-{part}-{name}: {value}")
                )
            values.append(value)
        if values != [None, None]:
            found[name] = (values[0], values[1])
    return found


def check_headers(
    key_obs: Sequence[Observation], limits: Limits, window: float
) -> tuple[int, list[HeaderProblem]]:
    """How many of one key's answers carried headers, and every problem found in them
    (see the package docstring, "Headers")."""
    problems: list[HeaderProblem] = []
    answered = [o for o in key_obs if o.headers]
    parsed = {o.id: _parse_headers(o, problems) for o in answered}
    admitted = [o for o in key_obs if o.admitted]
    for o in answered:
        triples = parsed[o.id]
        for dimension, name in HEADER_NAMES.items():
            limit = limits.limit(dimension)
            if limit is not None:
                triple = triples.get(name, (None, None))
                problems += _triple_problems(o, dimension, name, limit, triple)
        tokens = triples.get("tokens")
        candidates = [triples.get(n) for n in ("input-tokens", "output-tokens")]
        if tokens is not None and tokens not in candidates:
            problems.append(
                HeaderProblem(
                    "tokens triple", o.id, f"-tokens {tokens} is neither input nor output"
                )
            )
    for dimension, name in HEADER_NAMES.items():
        limit = limits.limit(dimension)
        if limit is not None:
            problems += _under_counts(answered, admitted, parsed, dimension, name, limit, window)
    return len(answered), problems


def _triple_problems(
    o: Observation,
    dimension: str,
    name: str,
    limit: int,
    triple: tuple[int | None, int | None],
) -> list[HeaderProblem]:
    """What is wrong with one answer's ``limit``/``remaining`` pair of one dimension."""
    got_limit, remaining = triple
    if got_limit is None and remaining is None:
        if o.admitted or o.status == 429:
            return [HeaderProblem("missing", o.id, f"no {name} headers")]
        return []
    problems = []
    if got_limit is not None and got_limit != limit:
        problems.append(
            HeaderProblem(
                "limit mismatch",
                o.id,
                f"x-ratelimit-limit-{name} is {got_limit}, configured {limit}",
            )
        )
    if remaining is None:
        return problems
    if remaining > limit:
        problems.append(
            HeaderProblem("above limit", o.id, f"remaining {name} {remaining} > {limit}")
        )
    if o.admitted and remaining > limit - o.amount(dimension):
        problems.append(
            HeaderProblem(
                "own amount not counted",
                o.id,
                f"admitted {o.amount(dimension)} {name} but remaining is {remaining} of {limit}",
            )
        )
    refusal = o.refusal
    if o.status != 429 or refusal is None or refusal.dimension != dimension:
        return problems
    if not refusal.never_fits and remaining >= refusal.requested:
        problems.append(
            HeaderProblem(
                "refused though it fits",
                o.id,
                f"refused on {name} asking {refusal.requested}, remaining {remaining}",
            )
        )
    if refusal.used is not None and remaining != max(0, limit - refusal.used):
        problems.append(
            HeaderProblem(
                "body disagrees",
                o.id,
                f"body says used {refusal.used} of {limit}, header remaining {remaining}",
            )
        )
    return problems


def _under_counts(
    answered: Sequence[Observation],
    admitted: Sequence[Observation],
    parsed: Mapping[int, dict[str, tuple[int | None, int | None]]],
    dimension: str,
    name: str,
    limit: int,
    window: float,
) -> list[HeaderProblem]:
    """The answers of one dimension whose server-side used amount is less than what the
    client knows it admitted and was still in the window: the store never counts less."""
    items = [(a.end, a.start, a.amount(dimension)) for a in admitted]
    checked = [
        (o, parsed[o.id][name][1])
        for o in answered
        if (o.admitted or o.status == 429)
        and name in parsed[o.id]
        and parsed[o.id][name][1] is not None
        and 0 < parsed[o.id][name][1] <= limit  # remaining 0 only bounds used from below
    ]
    sums = dominance_sums(items, [(o.start, o.end - window) for o, _ in checked])
    problems = []
    for (o, remaining), before in zip(checked, sums, strict=True):
        known = before
        if o.admitted and o.end > o.start:  # itself, unless the sum already counted it
            known += o.amount(dimension)
        used = limit - remaining
        if used < known:
            problems.append(
                HeaderProblem(
                    "store under-counts",
                    o.id,
                    f"server's used {name} is {used} but at least {known} were admitted "
                    f"in its window",
                )
            )
    return problems
