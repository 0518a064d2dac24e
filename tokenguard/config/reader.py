"""Reading one TOML table of a config: known keys taken, the rest refused.

Every problem is a :class:`~tokenguard.config.settings.ConfigError` whose message names
the source (the file), the key as a dotted TOML path, and what is wrong. A key left in
the table when :meth:`TableReader.done` is called is an unknown key: an error, so a
typo never silently leaves a limit off.
"""

from __future__ import annotations

from typing import Any

from tokenguard.config.settings import ConfigError


class TableReader:
    """Walks one TOML table (``path``, dotted; ``""``: the top level of ``source``),
    taking known keys and refusing the rest; every refusal raises ConfigError."""

    def __init__(self, source: str, path: str, table: Any) -> None:
        self.source, self.path = source, path
        if not isinstance(table, dict):
            self.fail(f"must be a table, got {type(table).__name__}")
        self.table = dict(table)

    def where(self, key: str | None = None) -> str:
        if key is None:
            return self.path or "top level"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, problem: str, key: str | None = None) -> None:
        raise ConfigError(f"{self.source}: {self.where(key)}: {problem}")

    def int(self, key: str, default: Any, *, minimum: int = 1) -> Any:
        value = self.table.pop(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"must be an integer, got {value!r}", key)
        if value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        return value

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        value = self.table.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"must be a number, got {value!r}", key)
        if value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        return float(value)

    def str(self, key: str, default: Any) -> Any:
        value = self.table.pop(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            self.fail(f"must be a non-empty string, got {value!r}", key)
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.table.pop(key, default)
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def sub(self, key: str) -> TableReader:
        return TableReader(self.source, self.where(key), self.table.pop(key, {}))

    def done(self) -> None:
        for key in self.table:
            self.fail("unknown key (check its spelling)", key)
