"""The import graph is the one docs/design.md draws: no package imports one above it.

The picture is read from the first mermaid ``flowchart`` of docs/design.md: its solid
arrows (``a --> b``: package ``a`` imports package ``b``) and, transitively, what those
import. Every package may also import the leaves (:data:`LEAVES`), except the ones
:data:`RESTRICTED` holds to less. Every ``import`` and ``from ... import`` in
``tokenguard/`` and ``drivers/`` is read with :mod:`ast` (inside functions and under
``TYPE_CHECKING`` too) and checked against that: an upward import (the store importing
the API, the counting importing the store...) fails the test that names its line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

# The leaves: small modules every package may use. Each imports at most these.
LEAVES: dict[str, set[str]] = {
    "tokenguard.model": set(),
    "tokenguard.errors": set(),
    "tokenguard.loopback": set(),
    "tokenguard.log_throttle": set(),
    "tokenguard.bearer": {"tokenguard.model"},
    "tokenguard.strict_json": {"tokenguard.errors"},
}
# Packages held to less than the leaves: all they may import besides their own modules.
RESTRICTED: dict[str, set[str]] = {
    "drivers": {"tokenguard.store", "tokenguard.model"},
    "tokenguard.counting": {"tokenguard.model"},
}
# Units that are no package of the picture.
ENTRY_POINTS: dict[str, set[str]] = {"tokenguard.__main__": {"tokenguard.cli"}, "tokenguard": set()}

# Known exceptions, each with its way out: (importing module, imported unit).
EXCEPTIONS = {
    # Re-exports LogThrottle for upstreams/usage.py until it imports tokenguard.log_throttle.
    ("tokenguard.observe.log_throttle", "tokenguard.log_throttle"),
}


def drawn_edges(markdown: str) -> dict[str, set[str]]:
    """The solid arrows of the first mermaid flowchart: unit -> the units it imports.

    A node id names a unit: ``drivers``, ``model`` (the leaves), else a package of
    tokenguard (``store`` is ``tokenguard.store``)."""
    match = re.search(r"```mermaid\nflowchart[^\n]*\n(.*?)```", markdown, re.S)
    assert match, "docs/design.md has no mermaid flowchart"
    edges: dict[str, set[str]] = {}
    for line in match.group(1).splitlines():
        arrow = re.match(r"\s*(\w+)(?:\[[^\]]*\])?\s*-->\s*(\w+)", line)
        node = re.match(r"\s*(\w+)\[", line)
        if arrow:
            edges.setdefault(arrow.group(1), set()).add(arrow.group(2))
            edges.setdefault(arrow.group(2), set())
        elif node:
            edges.setdefault(node.group(1), set())
    return edges


def allowed_imports(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Unit -> every unit it may import: what the picture draws, transitively, and the
    leaves (less for :data:`RESTRICTED`)."""

    def unit(node: str) -> str:
        return node if node in ("drivers", "model") else f"tokenguard.{node}"

    def below(node: str, seen: set[str]) -> set[str]:
        for target in edges[node] - seen:
            seen.add(target)
            below(target, seen)
        return seen

    allowed = {unit(node): {unit(t) for t in below(node, set())} for node in edges}
    allowed.pop("model", None)
    for name, targets in allowed.items():
        targets.discard("model")
        targets |= set(LEAVES)
        if name in RESTRICTED:
            targets &= RESTRICTED[name]
    return {**allowed, **LEAVES, **ENTRY_POINTS}


ALLOWED = allowed_imports(drawn_edges(DESIGN.read_text("utf-8")))


def unit_of(module: str) -> str | None:
    """The unit a dotted module name belongs to; ``None`` outside the product."""
    parts = module.split(".")
    if parts[0] == "drivers":
        return "drivers"
    if parts[0] != "tokenguard":
        return None
    return "tokenguard" if len(parts) == 1 else f"tokenguard.{parts[1]}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str) -> list[tuple[int, str]]:
    """Every absolute module name ``source`` imports, with its line number."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"line {node.lineno}: relative import (write it whole)")
            if node.module is not None:
                found.append((node.lineno, node.module))
    return found


def violations(module: str, source: str) -> list[str]:
    """The imports of ``module`` (its ``source``) that :data:`ALLOWED` forbids."""
    unit = unit_of(module)
    assert unit is not None and unit in ALLOWED, f"{module}: no unit in ALLOWED"
    bad = []
    for line, name in imported_modules(source):
        if name.split(".")[0] in ("bench", "tests"):
            bad.append(f"{module}:{line} imports {name} (the product never imports those)")
            continue
        target = unit_of(name)
        if target is None or target == unit or (module, target) in EXCEPTIONS:
            continue
        if target not in ALLOWED[unit]:
            bad.append(f"{module}:{line} imports {name} ({unit} may not import {target})")
    return bad


def product_files() -> list[Path]:
    return sorted([*(ROOT / "tokenguard").rglob("*.py"), *(ROOT / "drivers").rglob("*.py")])


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_the_packages_below_it(path: Path) -> None:
    assert violations(module_name(path), path.read_text("utf-8")) == []


def test_every_package_of_tokenguard_has_a_place_in_the_picture() -> None:
    units = {unit_of(module_name(path)) for path in product_files()}
    assert units - set(ALLOWED) == set()


def test_the_picture_has_no_cycle() -> None:
    """Bottom to top: every package can be placed after all it imports."""
    placed: set[str] = set()
    pending = drawn_edges(DESIGN.read_text("utf-8"))
    while pending:
        ready = [unit for unit, deps in pending.items() if deps - {unit} <= placed]
        assert ready, f"a cycle among {sorted(pending)}"
        for unit in ready:
            placed.add(unit)
            del pending[unit]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("tokenguard.store.guarded", "from tokenguard.api.app import create_app\n"),
        ("tokenguard.counting.text", "import tokenguard.store.window_store\n"),
        ("tokenguard.config.settings", "def f():\n    from tokenguard.limiting import rules\n"),
        ("drivers.redis.store", "from tokenguard.limiting.limiter import Limiter\n"),
        ("tokenguard.api.admin", "from tokenguard.cli.keys import config_entry\n"),
        ("tokenguard.model", "from bench.ports import free_ports\n"),
        ("tokenguard.limiting.rules", "from tokenguard.observe.metrics import Metrics\n"),
    ],
)
def test_an_upward_import_is_reported(module: str, source: str) -> None:
    assert len(violations(module, source)) == 1
