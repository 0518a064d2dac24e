"""The request body every API surface shares: the fields all of them read.

Everything here runs before the limiter: a body that fails any check is refused with a
400 naming the field (``param``) and consumes no quota. The body itself is read with the
strict JSON reader (:func:`tokenguard.strict_json.parse_json`). A reply's length is read
from every field a known OpenAI-compatible server reads as one
(:data:`~tokenguard.upstreams.forwarding.OUTPUT_LENGTH_FIELDS`), since the upstream may
honour any of them; the choices it generates from every field that asks for more
(:func:`generated_choices`).
"""

from __future__ import annotations

import json
from typing import Any

from tokenguard.errors import invalid
from tokenguard.strict_json import check_text, parse_json
from tokenguard.upstreams.forwarding import MIN_LENGTH_FIELD, OUTPUT_LENGTH_FIELDS

MAX_TOKENS_CEILING = 2**31 - 1
MAX_N = 128  # OpenAI's own cap on `n`
MAX_BEST_OF = 20  # OpenAI's cap on `best_of`
# A model name is refused beyond this, before anything keeps it (a cache, a metric
# label, a log line, a feed event): real ones are far shorter.
MAX_MODEL_CHARS = 256


def positive_int(body: dict[str, Any], name: str, ceiling: int) -> int | None:
    """``body[name]`` as an integer in ``1..ceiling``, ``None`` when absent or null;
    anything else is a 400 naming ``name``."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {json.dumps(value)}", name)
    if value < 1:
        raise invalid(f"{name} must be at least 1, got {value}", name)
    if value > ceiling:
        raise invalid(f"{name} must be at most {ceiling}, got {value}", name)
    return value


def request_model(body: Any) -> str:
    """The ``model`` of a request body, checked: the body is a JSON object and its model
    a non-empty, valid-Unicode string; otherwise a 400 (naming ``model`` when it is the
    model that is wrong)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", "model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model must be a non-empty string", "model")
    if len(model) > MAX_MODEL_CHARS:
        raise invalid(
            f"model must be at most {MAX_MODEL_CHARS} characters long, got {len(model)}",
            "model",
        )
    check_text(model, "model")
    return model


def output_length(body: dict[str, Any]) -> int | None:
    """The longest reply per choice that ``body`` asks for, in any of
    :data:`OUTPUT_LENGTH_FIELDS` (the largest: an upstream may honour any one of them);
    ``None`` when it names none. Each must be an integer in ``1..MAX_TOKENS_CEILING``
    and ``min_tokens`` one in ``0..MAX_TOKENS_CEILING``, or it is a 400 naming it."""
    longest = None
    for name in OUTPUT_LENGTH_FIELDS:
        value = positive_int(body, name, MAX_TOKENS_CEILING)
        if value is not None and (longest is None or value > longest):
            longest = value
    floor = body.get(MIN_LENGTH_FIELD)
    whole = isinstance(floor, int) and not isinstance(floor, bool)
    if floor is not None and not (whole and 0 <= floor <= MAX_TOKENS_CEILING):
        raise invalid(
            f"{MIN_LENGTH_FIELD} must be an integer from 0 to {MAX_TOKENS_CEILING}",
            MIN_LENGTH_FIELD,
        )
    return longest


def generated_choices(body: dict[str, Any]) -> tuple[int, int]:
    """``(n, generated)``: the choices a request gets back, and the choices an upstream
    generates (and bills) for each of its prompts: the largest of ``n``, ``n_cmpl``
    (llama.cpp's own name for ``n``, which wins over it there) and ``best_of`` (vLLM and
    legacy completions generate that many, and return the best ``n``). A 400 naming
    the field when one is not an integer in range, or ``best_of`` is below ``n``."""
    n = positive_int(body, "n", MAX_N) or 1
    n_cmpl = positive_int(body, "n_cmpl", MAX_N) or 1
    best_of = positive_int(body, "best_of", MAX_BEST_OF)
    if best_of is not None and best_of < n:
        raise invalid(f"best_of ({best_of}) must be at least n ({n})", "best_of")
    return n, max(n, n_cmpl, best_of or 1)


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` of a request body: ``stream`` a boolean (null is
    false), ``stream_options`` an object allowed only when streaming, its
    ``include_usage`` a boolean; otherwise a 400 naming the field."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid(
            "stream_options.include_usage must be a boolean", "stream_options.include_usage"
        )
    return stream, include_usage


__all__ = [
    "MAX_MODEL_CHARS",
    "check_text",
    "generated_choices",
    "output_length",
    "parse_json",
    "positive_int",
    "request_model",
    "stream_flags",
]
