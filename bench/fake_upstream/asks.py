"""What a request asks a fake upstream for: how many tokens to generate, how many
sequences, and the input it is billed for; or why its flavour's server refuses it.

* **It reads the output length as its flavour's server does.**

  - ``llama`` (llama.cpp's server, ``tools/server/server-task.cpp``,
    ``params_from_json_cmpl``): ``n_predict``, else ``max_completion_tokens``, else
    ``max_tokens``; a field that is absent, ``null`` or of another type falls through to
    the next (llama.cpp's ``json_value``); a negative value or none at all generates
    until the context is full (``--context-tokens``). ``n`` other than 1, and
    ``best_of`` on ``/v1/completions``, are refused with a 400, as llama.cpp's
    OpenAI-compatible parsers do. The usage chunk of a stream comes when
    ``stream_options.include_usage`` is true.
  - ``vllm`` (``vllm/entrypoints/openai/protocol.py``, ``serving_engine.py``): chat reads
    ``max_completion_tokens or max_tokens`` (the first that is set and not 0),
    completions ``max_tokens`` (16 when absent); none: the context left after the
    prompt. A length must be an integer >= 1 that fits the context with the prompt,
    ``min_tokens`` at most the length, ``n`` >= 1, ``best_of`` >= ``n``: 400 otherwise.
    ``best_of`` sequences are generated (and billed), ``n`` returned. A stream's usage
    chunk comes when ``stream_options`` is given with ``include_usage`` (true by
    default there), as vLLM's.

* **Billed input is a generous, documented measure**, in the model's encoding
  (:func:`tokenguard.counting.count_text`): per chat message 3 tokens, plus the tokens of
  its ``role``, of its text (a string ``content``, or each text part's ``text``), of
  each other content part as compact JSON (images included, data URLs and all), and of
  every other field of the message as compact JSON (``name``, ``tool_calls`` ...);
  plus 3 for the reply's priming, plus ``tools``, ``functions``, ``tool_choice`` and
  ``response_format`` as compact JSON (``$defs`` and all). For a plain message this is
  exactly OpenAI's count; anything richer costs at least what OpenAI's scheme says.
  A completion's prompt: the tokens of each string, the length of each token array,
  and the ``suffix``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from tokenguard.counting import count_text
from tokenguard.counting.chat_prompt import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE

FLAVOURS = ("llama", "vllm")
DEFAULT_CONTEXT_TOKENS = 131072
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "response_format")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class Refused(Exception):
    """A request the flavour's server refuses: 400, not billed."""


@attrs.frozen
class Ask:
    """A validated request: what to generate and how to answer."""

    path: str
    model: str
    stream: bool
    include_usage: bool
    input_tokens: int
    choices: int  # returned
    sequences: int  # generated and billed (best_of)
    per_sequence: int


def _message_tokens(model: str, message: Any) -> int:
    if not isinstance(message, dict):
        return TOKENS_PER_MESSAGE + count_text(model, compact_json(message))
    total = TOKENS_PER_MESSAGE
    rest = {k: v for k, v in message.items() if k not in ("role", "content")}
    if isinstance(message.get("role"), str):
        total += count_text(model, message["role"])
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    for part in parts:
        if isinstance(part, str):
            total += count_text(model, part)
        elif isinstance(part, dict) and part.get("type") == "text" and "text" in part:
            total += count_text(model, part["text"] if isinstance(part["text"], str) else "")
        elif part is not None:
            total += count_text(model, compact_json(part))
    if rest:
        total += count_text(model, compact_json(rest))
    return total


def billed_input(model: str, path: str, body: dict[str, Any]) -> int:
    """The input tokens a request is billed for (see the module docstring)."""
    if path == CHAT_PATH:
        messages = body.get("messages")
        total = REPLY_PRIMING_TOKENS + sum(
            _message_tokens(model, m) for m in (messages if isinstance(messages, list) else [])
        )
        return total + sum(
            count_text(model, compact_json(body[f]))
            for f in PROMPT_FIELDS
            if body.get(f) is not None
        )
    prompt = body.get("prompt")
    items = prompt if isinstance(prompt, list) and not _is_token_array(prompt) else [prompt]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += count_text(model, item)
        elif isinstance(item, list):
            total += len(item)
    suffix = body.get("suffix")
    return total + (count_text(model, suffix) if isinstance(suffix, str) else 0)


def _is_token_array(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def compact_json(value: Any) -> str:
    """``value`` as JSON with no spaces, non-ASCII kept: what billed input counts, and
    what the answers are written in."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _llama_int(body: dict[str, Any], field: str, default: int) -> int:
    """llama.cpp's ``json_value``: the field if it converts to a number, else the default
    (absent, null, a string, an object...). A boolean converts, as nlohmann's does."""
    value = body.get(field)
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value)
    return default


def _vllm_int(body: dict[str, Any], field: str) -> int | None:
    """A pydantic ``Optional[int]``: ``None``, an int, or a float with no fraction."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(f"{field}: Input should be a valid integer, got {value!r}")
    return value


def llama_ask(path: str, body: dict[str, Any], input_tokens: int, context: int) -> Ask:
    """What llama.cpp's server would generate for this body."""
    if _llama_int(body, "n", 1) != 1:
        raise Refused("Only one completion choice is allowed")
    if path == COMPLETIONS_PATH and "best_of" in body:
        raise Refused("Unsupported param: best_of")
    if input_tokens >= context:
        raise Refused(f"the request exceeds the available context size ({context} tokens)")
    max_tokens = _llama_int(body, "max_tokens", -1)
    n_predict = _llama_int(body, "n_predict", _llama_int(body, "max_completion_tokens", max_tokens))
    room = context - input_tokens
    per_sequence = room if n_predict < 0 else min(n_predict, room)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _ask(path, body, input_tokens, 1, 1, per_sequence, include_usage)


def vllm_ask(path: str, body: dict[str, Any], input_tokens: int, context: int) -> Ask:
    """What vLLM's OpenAI server would generate for this body."""
    if path == CHAT_PATH:
        length = _vllm_int(body, "max_completion_tokens") or _vllm_int(body, "max_tokens")
    else:
        length = _vllm_int(body, "max_tokens") if "max_tokens" in body else 16
    if input_tokens >= context:
        raise Refused(f"This model's maximum context length is {context} tokens.")
    per_sequence = context - input_tokens if length is None else length
    if per_sequence < 1:
        raise Refused(f"max_tokens must be at least 1, got {per_sequence}.")
    if input_tokens + per_sequence > context:
        raise Refused(
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {input_tokens + per_sequence} tokens."
        )
    min_tokens = _vllm_int(body, "min_tokens") or 0
    if not 0 <= min_tokens <= per_sequence:
        raise Refused("min_tokens must be less than or equal to max_tokens")
    n = _vllm_int(body, "n")
    n = 1 if n is None else n
    best_of = _vllm_int(body, "best_of")
    if n < 1:
        raise Refused(f"n must be at least 1, got {n}.")
    if best_of is not None and best_of < n:
        raise Refused(f"best_of must be greater than or equal to n, got n={n}, best_of={best_of}")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage", True) is True
    return _ask(path, body, input_tokens, n, best_of or n, per_sequence, include_usage)


def _ask(
    path: str,
    body: dict[str, Any],
    input_tokens: int,
    choices: int,
    sequences: int,
    per_sequence: int,
    include_usage: bool,
) -> Ask:
    return Ask(
        path=path,
        model=body["model"],
        stream=body.get("stream") is True,
        include_usage=include_usage,
        input_tokens=input_tokens,
        choices=choices,
        sequences=sequences,
        per_sequence=max(0, per_sequence),
    )


ASKERS = {"llama": llama_ask, "vllm": vllm_ask}
