"""OpenAI's "prompt" union, which legacy completions and embeddings take their text as.

A prompt is a string, an array of strings, an array of token ids, or an array of
token-id arrays; :func:`parse_prompt` checks and normalises it (a 400 naming the field
otherwise), :func:`prompt_tokens` counts what the API bills as its input: a string's
tokens in the model's encoding, a token array's length.
"""

from __future__ import annotations

from typing import Any

from tokenguard.api.request_body import check_text
from tokenguard.counting import count_text
from tokenguard.errors import invalid

# A prompt, normalised: each item a string or a tuple of token ids.
Prompt = tuple[str | tuple[int, ...], ...]

TOKEN_ID_CEILING = 2**31 - 1


def token_array(value: list[Any], param: str) -> tuple[int, ...]:
    if not value:
        raise invalid(f"{param} must not be an empty token array", param)
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int):
            raise invalid(f"{param} must be an array of integer token ids", param)
        if not 0 <= token <= TOKEN_ID_CEILING:
            raise invalid(f"{param} has a token id out of range: {token}", param)
    return tuple(value)


def parse_prompt(value: Any, param: str, *, max_items: int | None = None) -> Prompt:
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
        return (token_array(value, param),)
    if max_items is not None and len(value) > max_items:
        raise invalid(f"{param} may have at most {max_items} items, got {len(value)}", param)
    items: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(item, str):
            check_text(item, where)
            items.append(item)
        elif isinstance(item, list):
            items.append(token_array(item, where))
        else:
            raise invalid(f"{where} must be a string or an array of token ids", where)
    return tuple(items)


def prompt_tokens(model: str, prompt: Prompt, suffix: str | None = None) -> int:
    """Input tokens of a prompt as the API bills them: each string's tokens in the
    model's encoding (and the suffix's, once per prompt), each token array's length."""
    total = 0
    for item in prompt:
        total += count_text(model, item) if isinstance(item, str) else len(item)
        if suffix:
            total += count_text(model, suffix)
    return total
