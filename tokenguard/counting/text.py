"""Counting text: the tokens a value encodes to, for a model.

**Counting never raises on odd input.** The HTTP layer validates request shape first;
this module is nevertheless defensive: a value of an unexpected type where text was
expected is counted as its compact JSON (or ``str()``) rather than rejected, and user
text that spells a special token such as ``<|endoftext|>`` is counted as the ordinary
text it is. Results are deterministic for a given tiktoken release and input, and every
count is a non-negative ``int``. Long texts' counts are remembered
(:mod:`tokenguard.counting.count_cache`).
"""

from __future__ import annotations

import json
from typing import Any

import tiktoken

from tokenguard.counting.count_cache import COUNT_CACHE
from tokenguard.counting.encodings import encoding_for_model


def count_text(model: str, text: str) -> int:
    """Return the number of tokens ``text`` encodes to for ``model``.

    Special-token spellings such as ``<|endoftext|>`` are counted as ordinary text (as
    the API treats user text). A non-``str`` ``text`` is counted as its JSON/``str()``
    form. Raises only :class:`~tokenguard.counting.encodings.EncodingDataError` (bad
    package data).
    """
    return count_value(encoding_for_model(model), text)


def as_text(value: Any) -> str:
    """Text the tokenizer sees for ``value``: itself if ``str``, else compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        # Circular or absurdly deep structures: still count something, never raise.
        try:
            return str(value)
        except Exception:  # a hostile __str__ must not break counting
            return type(value).__name__


def count_value(encoding: tiktoken.Encoding, value: Any) -> int:
    """The tokens ``value`` encodes to with ``encoding``, as :func:`as_text` renders it."""
    text = as_text(value)
    if not text:
        return 0
    # Ordinary encoding: "<|endoftext|>" in user text is plain text, not an error (and
    # not a special token); the same count as encode(disallowed_special=()), without
    # its per-call conversion of the special-token sets (most of a short text's cost).
    return COUNT_CACHE.count(encoding, text)
