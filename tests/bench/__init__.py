"""Tests for the bench package: the accuracy audit and the load client.

pytest (in its default "prepend" import mode) imports this directory as the top-level
package ``bench``, because ``tests/`` has no ``__init__.py`` and so ``tests/`` itself is
put on ``sys.path``; that shadows the real ``bench`` package at the repository root.
Adding the real package's directory to this package's ``__path__`` makes ``bench.audit``
and ``bench.load`` resolve to the real modules all the same. (With a ``tests/__init__.py``
or ``--import-mode=importlib`` this is unnecessary, and harmless.)
"""

from pathlib import Path

_REAL_BENCH = str(Path(__file__).resolve().parents[2] / "bench")
if _REAL_BENCH not in __path__:
    __path__.append(_REAL_BENCH)
