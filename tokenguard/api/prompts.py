"""Requests of the non-chat endpoints: legacy completions and embeddings.

Both take their text as OpenAI's "prompt" union: a string, an array of strings, an array
of token ids, or an array of token-id arrays. As for chat (:mod:`tokenguard.api.chat`),
everything is checked before the limiter, and a body that fails a check is a 400 naming
the field (``param``) that consumes no quota. :func:`prompt_tokens` counts what the API
bills as input: a string's tokens in the model's encoding, a token array's length.
"""

from __future__ import annotations

from typing import Any

import attrs

from tokenguard.api.chat import (
    check_text,
    generated_choices,
    output_length,
    positive_int,
    request_model,
    stream_flags,
)
from tokenguard.api.errors import invalid
from tokenguard.counting.tokens import count_text

# A prompt, normalised: each item a string or a tuple of token ids.
Prompt = tuple[str | tuple[int, ...], ...]

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's cap on an embeddings batch
TOKEN_ID_CEILING = 2**31 - 1
ENCODING_FORMATS = ("float", "base64")


@attrs.frozen
class CompletionRequest:
    """A validated ``POST /v1/completions`` body; ``body`` is the parsed JSON, untouched.

    ``choices`` is how many completions the upstream generates (and bills): every prompt
    of a batch times ``generated`` (:func:`tokenguard.api.chat.generated_choices`: the
    largest of ``n``, ``n_cmpl`` and ``best_of``).
    """

    body: dict[str, Any]
    model: str
    prompt: Prompt
    suffix: str | None
    # Per choice: the largest of the request's length fields (tokenguard.api.chat.
    # OUTPUT_LENGTH_FIELDS), or OpenAI's default of 16 when it names none.
    max_tokens: int
    n: int
    generated: int  # per prompt
    stream: bool
    include_usage: bool

    @property
    def choices(self) -> int:
        return len(self.prompt) * self.generated


@attrs.frozen
class EmbeddingRequest:
    """A validated ``POST /v1/embeddings`` body; ``body`` is the parsed JSON, untouched."""

    body: dict[str, Any]
    model: str
    input: Prompt
    dimensions: int | None
    encoding_format: str


def _token_array(value: list[Any], param: str) -> tuple[int, ...]:
    if not value:
        raise invalid(f"{param} must not be an empty token array", param)
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int):
            raise invalid(f"{param} must be an array of integer token ids", param)
        if not 0 <= token <= TOKEN_ID_CEILING:
            raise invalid(f"{param} has a token id out of range: {token}", param)
    return tuple(value)


def _prompt(value: Any, param: str, *, max_items: int | None = None) -> Prompt:
    """OpenAI's prompt union, normalised to a tuple of strings and token tuples."""
    if value is None:
        raise invalid(f"{param} is required", param)
    if isinstance(value, str):
        check_text(value, param)
        return (value,)
    if not isinstance(value, list) or not value:
        raise invalid(
            f"{param} must be a string, an array of strings, an array of token ids or an "
            "array of token-id arrays, and not empty",
            param,
        )
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return (_token_array(value, param),)
    if max_items is not None and len(value) > max_items:
        raise invalid(f"{param} may have at most {max_items} items, got {len(value)}", param)
    items: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(item, str):
            check_text(item, where)
            items.append(item)
        elif isinstance(item, list):
            items.append(_token_array(item, where))
        else:
            raise invalid(f"{where} must be a string or an array of token ids", where)
    return tuple(items)


def validate_completion(body: Any) -> CompletionRequest:
    """Check a parsed ``/v1/completions`` body (the parts the limiter relies on)."""
    model = request_model(body)
    prompt = _prompt(body.get("prompt"), "prompt")
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise invalid("suffix must be a string", "suffix")
        check_text(suffix, "suffix")
    max_tokens = output_length(body)
    n, generated = generated_choices(body)
    stream, include_usage = stream_flags(body)
    return CompletionRequest(
        body=body,
        model=model,
        prompt=prompt,
        suffix=suffix,
        max_tokens=DEFAULT_COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens,
        n=n,
        generated=generated,
        stream=stream,
        include_usage=include_usage,
    )


def validate_embedding(body: Any) -> EmbeddingRequest:
    """Check a parsed ``/v1/embeddings`` body (the parts the limiter relies on)."""
    model = request_model(body)
    inputs = _prompt(body.get("input"), "input", max_items=MAX_EMBEDDING_INPUTS)
    for i, item in enumerate(inputs):
        if item == "":
            where = "input" if len(inputs) == 1 else f"input[{i}]"
            raise invalid(f"{where} must not be an empty string", where)
    dimensions = positive_int(body, "dimensions", 65536)
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise invalid(
            f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got "
            f"{encoding_format!r}",
            "encoding_format",
        )
    return EmbeddingRequest(
        body=body,
        model=model,
        input=inputs,
        dimensions=dimensions,
        encoding_format=encoding_format,
    )


def prompt_tokens(model: str, prompt: Prompt, suffix: str | None = None) -> int:
    """Input tokens of a prompt as the API bills them: each string's tokens in the
    model's encoding (and the suffix's, once per prompt), each token array's length."""
    total = 0
    for item in prompt:
        total += count_text(model, item) if isinstance(item, str) else len(item)
        if suffix:
            total += count_text(model, suffix)
    return total
