"""Test support: parsing Anthropic's wire objects with the ``anthropic`` SDK's own types,
unknown fields forbidden.

The SDK's models accept extra fields (``extra="allow"``) and keep them in
``model_extra``; :func:`strictly` validates a raw dict with the SDK's type, then walks
the parsed tree and fails on any model that kept an unknown field, at any depth: what
``extra="forbid"`` applied recursively would refuse.
"""

from __future__ import annotations

from typing import Any

import pydantic
from anthropic.types import (
    Message,
    MessageTokensCount,
    RawMessageStreamEvent,
)
from anthropic.types.shared import ErrorResponse

__all__ = [
    "ErrorResponse",
    "Message",
    "MessageTokensCount",
    "RawMessageStreamEvent",
    "known_only",
    "strictly",
]


def _unknown_fields(value: Any, where: str) -> list[str]:
    if isinstance(value, pydantic.BaseModel):
        found = [f"{where}.{name}" for name in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += _unknown_fields(getattr(value, name), f"{where}.{name}")
        return found
    if isinstance(value, list | tuple):
        return [f for i, item in enumerate(value) for f in _unknown_fields(item, f"{where}.{i}")]
    if isinstance(value, dict):
        return [f for k, item in value.items() for f in _unknown_fields(item, f"{where}.{k}")]
    return []


def known_only(parsed: Any) -> Any:
    """``parsed`` (an object the SDK made), after checking that none of its models, at
    any depth, kept a field its type does not have."""
    unknown = _unknown_fields(parsed, "$")
    assert not unknown, f"fields the SDK's {type(parsed).__name__} does not have: {unknown}"
    return parsed


def strictly(kind: Any, raw: Any) -> Any:
    """``raw`` parsed as the SDK type ``kind``; an AssertionError naming every field the
    type does not know."""
    return known_only(pydantic.TypeAdapter(kind).validate_python(raw))
