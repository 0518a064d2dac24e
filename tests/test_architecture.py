"""The import graph is the one docs/design.md draws: no package imports one above it.

Every ``import`` and ``from ... import`` in ``tokenguard/`` and ``drivers/`` is read with
:mod:`ast` (those inside functions and under ``TYPE_CHECKING`` too) and checked against
:data:`ALLOWED`: what each unit (a package of ``tokenguard``, a top-level module of it,
or ``drivers``) may import besides itself. An upward import (the store importing the
API, the counting importing the store...) fails the test that names it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The leaves: small modules every layer may use. Each imports at most other leaves.
LEAVES = {
    "tokenguard.model": set(),
    "tokenguard.errors": set(),
    "tokenguard.loopback": set(),
    "tokenguard.log_throttle": set(),
    "tokenguard.bearer": {"tokenguard.model"},
    "tokenguard.strict_json": {"tokenguard.errors"},
}
LEAF_NAMES = set(LEAVES)

# Unit -> the units it may import (besides itself), bottom to top as in docs/design.md.
ALLOWED: dict[str, set[str]] = {
    **LEAVES,
    "tokenguard.counting": set(),
    "tokenguard.config": {"tokenguard.model"},
    "tokenguard.store": {"tokenguard.model", "tokenguard.config", "tokenguard.log_throttle"},
    "drivers": {"tokenguard.store", "tokenguard.model"},
    "tokenguard.limiting": {"tokenguard.model", "tokenguard.config", "tokenguard.store"},
    "tokenguard.observe": LEAF_NAMES
    | {"tokenguard.config", "tokenguard.counting", "tokenguard.store", "tokenguard.limiting"},
    "tokenguard.upstreams": LEAF_NAMES
    | {"tokenguard.config", "tokenguard.counting", "tokenguard.observe"},
    "tokenguard.api": LEAF_NAMES
    | {
        "tokenguard.config",
        "tokenguard.counting",
        "tokenguard.store",
        "tokenguard.limiting",
        "tokenguard.observe",
        "tokenguard.upstreams",
    },
    "tokenguard.cluster": LEAF_NAMES
    | {
        "tokenguard.config",
        "tokenguard.counting",
        "tokenguard.store",
        "tokenguard.limiting",
        "tokenguard.observe",
        "tokenguard.api",
    },
    "tokenguard.cli": LEAF_NAMES
    | {
        "tokenguard.config",
        "tokenguard.store",
        "tokenguard.limiting",
        "tokenguard.observe",
        "tokenguard.api",
        "tokenguard.cluster",
    },
    "tokenguard.__main__": {"tokenguard.cli"},
    "tokenguard": set(),
}

# Known exceptions, each with its way out: (importing module, imported unit).
EXCEPTIONS = {
    # Re-exports LogThrottle for upstreams/usage.py until it imports tokenguard.log_throttle.
    ("tokenguard.observe.log_throttle", "tokenguard.log_throttle"),
}


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


def test_the_allowed_graph_has_no_cycle() -> None:
    """Bottom to top: every unit can be placed after all it may import."""
    placed: set[str] = set()
    pending = dict(ALLOWED)
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
