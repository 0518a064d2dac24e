"""Every file path the docs name exists: README.md, CONTRIBUTING.md and docs/*.md.

A path is a word that starts with ``tokenguard/``, ``drivers/``, ``bench/`` or
``tests/`` and names a file (``tokenguard/api/pipeline.py``) or a directory
(``drivers/redis/``); a ``path:line`` or ``path::test`` suffix is dropped, and paths
with a wildcard are skipped. A module that moved leaves a stale path behind: this test
names it, with the document it is in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
PATH = re.compile(r"(?<![\w./-])((?:tokenguard|drivers|bench|tests)/[\w./*-]*[\w/*])")


def paths_in(text: str) -> set[str]:
    """The repository paths ``text`` names (see the module docstring)."""
    found = set()
    for match in PATH.finditer(text):
        path = match.group(1).split("::")[0]
        if "*" not in path:
            found.add(path)
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_document_names_exists(document: Path) -> None:
    assert document.exists()
    missing = sorted(p for p in paths_in(document.read_text("utf-8")) if not (ROOT / p).exists())
    assert missing == []


@pytest.mark.parametrize(
    ("text", "paths"),
    [
        ("see `tokenguard/api/pipeline.py`.", {"tokenguard/api/pipeline.py"}),
        ("(drivers/redis/) and bench/suite/", {"drivers/redis/", "bench/suite/"}),
        ("tests/api/test_app.py::test_x", {"tests/api/test_app.py"}),
        ("`tests/test_*.py` are globs", set()),
        ("a file my-tokenguard/x.py or docs/tokenguard/y", set()),
    ],
)
def test_paths_are_read_from_the_text_as_written(text: str, paths: set[str]) -> None:
    assert paths_in(text) == paths
