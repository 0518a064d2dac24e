"""The limits a TOML table of limit fields gives: a tier's, a team's, a key's own.

Read the same way from the config file (:mod:`tokenguard.config.loading`), from the
key registry (:mod:`tokenguard.limiting.registry`) and from the admin API's bodies, so
that a limit field means one thing, and is checked one way, wherever it is written.
"""

from __future__ import annotations

import math
from typing import Any

from tokenguard.config.prices import from_micro, to_micro
from tokenguard.config.reader import TableReader
from tokenguard.model import MODES, PRIORITIES, RULE_FIELDS, SPEND_FIELDS, Limits, ModelRule

# The longest a request may be held for room: a window of a day rule is the longest wait
# a refusal can name, but an HTTP request held that long is a stuck one.
MAX_WAIT_SECONDS = 3600.0


def read_mode(reader: TableReader, default: str) -> str:
    mode = reader.str("mode", default)
    if mode not in MODES:
        reader.fail(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    return mode


def read_queue_fields(reader: TableReader, base: Limits) -> dict[str, Any]:
    """The admission-queue fields (:data:`~tokenguard.model.QUEUE_FIELDS`) of a table,
    each ``base``'s unless the table sets it: ``max_wait_seconds`` a finite number of
    seconds (0 or more), ``max_waiting`` a positive integer, ``priority`` one of
    :data:`~tokenguard.model.PRIORITIES`."""
    wait = base.max_wait_seconds
    if "max_wait_seconds" in reader.table:
        wait = reader.number("max_wait_seconds", 0.0)
        if not math.isfinite(wait) or wait > MAX_WAIT_SECONDS:
            problem = f"must be at most {MAX_WAIT_SECONDS:g} seconds, got {wait}"
            reader.fail(problem, "max_wait_seconds")
    waiting = reader.int("max_waiting", base.max_waiting)
    priority = reader.str("priority", base.priority)
    if priority is not None and priority not in PRIORITIES:
        reader.fail(f"must be one of {', '.join(PRIORITIES)}, got {priority!r}", "priority")
    return {"max_wait_seconds": wait, "max_waiting": waiting, "priority": priority}


def read_limits(
    reader: TableReader,
    base: Limits | None = None,
    *,
    mode: str = "enforce",
    default_max_tokens: bool = True,
) -> Limits:
    """The limits of a tier, key or team: ``base`` (a key's tier) field by field, unless
    the table sets the field. ``mode`` is the default mode (the global one) when there
    is no base. Per-model rules for a pattern the base also has override it field by
    field too. ``default_max_tokens=False`` (teams) refuses that field."""
    base = base or Limits(mode=mode)
    values = rule_values(reader, base)
    own_mode = read_mode(reader, base.mode)
    reserve = base.default_max_tokens
    if default_max_tokens:
        reserve = reader.int("default_max_tokens", base.default_max_tokens)
    queue = read_queue_fields(reader, base)
    models = _model_rules(reader.sub("models"), base.models)
    per_user = base.per_user
    if "per_user" in reader.table:
        per_user = _per_user(reader.sub("per_user"), base.per_user)
    return Limits(
        **values,
        **queue,
        default_max_tokens=reserve,
        mode=own_mode,
        models=models,
        per_user=per_user,
    )


def limits_from_table(
    table: Any,
    where: str,
    base: Limits | None = None,
    *,
    mode: str = "enforce",
    default_max_tokens: bool = True,
) -> Limits:
    """The limits a table of limit fields gives (the TOML of a tier or a key's own
    fields, parsed), over ``base`` as for a config key; ConfigError naming ``where``
    and the field. For limits stored outside the config file (the admin API's)."""
    reader = TableReader(where, "", table)
    limits = read_limits(reader, base, mode=mode, default_max_tokens=default_max_tokens)
    reader.done()
    return limits


def rule_values(reader: TableReader, parent: Limits) -> dict[str, int | None]:
    """Every limit field (:data:`RULE_FIELDS` integers, :data:`SPEND_FIELDS` currency
    amounts, held in micro-units) the table sets, else ``parent``'s."""
    values = {field: reader.int(field, getattr(parent, field)) for field in RULE_FIELDS}
    for field in SPEND_FIELDS:
        if field not in reader.table:
            values[field] = getattr(parent, field)
            continue
        amount = reader.number(field, 0.0)
        if not 0 < amount < 1e12:
            reader.fail(f"must be an amount of money above 0, got {amount:g}", field)
        else:
            values[field] = max(1, to_micro(amount))
    return values


def spend_fields(limits: Limits) -> dict[str, float]:
    """The spend limits ``limits`` sets, as the config writes them (currency units)."""
    return {f: from_micro(v) for f in SPEND_FIELDS if (v := getattr(limits, f)) is not None}


def _per_user(reader: TableReader, base: Limits | None) -> Limits | None:
    """``per_user = {rpm = 20, tpd = 100000}``: the limits of each end user, over the
    base's (a key's tier) field by field; only rule fields (no models, no mode: a
    per-user row has the mode of the limits it belongs to)."""
    values = rule_values(reader, base or Limits())
    reader.done()
    limits = Limits(**values)
    if not limits.rules():
        reader.fail(f"sets no limit (give one of {', '.join(RULE_FIELDS)})")
    return limits


def _model_rules(reader: TableReader, base: tuple[ModelRule, ...]) -> tuple[ModelRule, ...]:
    """``models = {"gpt-4o*" = {rpm = 5}}`` (or ``[....models."gpt-4o*"]`` tables)."""
    inherited = {rule.pattern: rule for rule in base}
    rules = dict(inherited)
    for pattern in list(reader.table):
        if not pattern.strip():
            reader.fail("a model pattern must not be empty", repr(pattern))
        table = reader.sub(pattern)
        parent = inherited.get(pattern)
        parent_limits = parent.limits if parent else Limits()
        values = rule_values(table, parent_limits)
        queue = read_queue_fields(table, parent_limits)
        mode = table.str("mode", parent.mode if parent else None)
        if mode is not None and mode not in MODES:
            table.fail(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
        table.done()
        limits = Limits(**values, **queue)
        if not limits.rules():
            table.fail(f"sets no limit (give one of {', '.join(RULE_FIELDS)})")
        rules[pattern] = ModelRule(pattern=pattern, limits=limits, mode=mode)
    reader.done()
    return tuple(rules.values())
