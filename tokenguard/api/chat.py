"""Chat-completion requests: strict JSON parsing and validation into a :class:`ChatRequest`.

Everything here runs before the limiter: a body that fails any check is refused with a
400 naming the field (``param``) and consumes no quota. The JSON reader is stricter than
Python's default, because a lenient reader is a quota bypass: duplicate keys (we and the
upstream could read different ``max_tokens``), ``NaN``/``Infinity``, lone surrogates and
absurd nesting are refused. The checks of the fields every endpoint shares
(:func:`request_model`, :func:`positive_int`, :func:`stream_flags`, :func:`check_text`,
and the reply's length and choices: :func:`output_length`, :func:`generated_choices`)
serve the legacy completions and embeddings too (:mod:`tokenguard.api.prompts`). A reply's
length is read from every field a known OpenAI-compatible server reads as one
(:data:`OUTPUT_LENGTH_FIELDS`), since the upstream may honour any of them.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from tokenguard.api.errors import APIError, invalid
from tokenguard.counting.tokens import tool_json

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_TOKENS_CEILING = 2**31 - 1
MAX_N = 128  # OpenAI's own cap on `n`
MAX_BEST_OF = 20  # OpenAI's cap on `best_of`
# A model name is refused beyond this, before anything keeps it (a cache, a metric
# label, a log line, a feed event): real ones are far shorter.
MAX_MODEL_CHARS = 256

# The body fields through which the OpenAI-compatible servers tokenguard knows cap a
# reply's length, per choice. Each one a request names counts (the reservation is the
# largest), and none is forwarded above the reservation (tokenguard.upstreams.forwarding):
#   max_tokens             OpenAI, vLLM, llama.cpp, SGLang, TGI, Ollama
#   max_completion_tokens  OpenAI, vLLM (wins over max_tokens), llama.cpp, SGLang
#   max_output_tokens      OpenAI's and vLLM's Responses API
#   n_predict              llama.cpp's server (wins over both of the first two)
#   max_new_tokens         text-generation-inference, SGLang's native API
OUTPUT_LENGTH_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n_predict",
    "max_new_tokens",
)
# A floor on the reply's length (vLLM, SGLang, TensorRT-LLM): lowered to the
# reservation when it is above it (tokenguard.upstreams.forwarding).
MIN_LENGTH_FIELD = "min_tokens"


@attrs.frozen
class ChatRequest:
    """A validated chat-completion request; ``body`` is the parsed JSON, untouched."""

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    # Per choice: the largest of the request's OUTPUT_LENGTH_FIELDS; None when it names
    # none of them.
    max_tokens: int | None
    n: int  # choices returned
    choices: int  # choices the upstream generates (and bills): see generated_choices
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None
    functions: list[dict[str, Any]] | None
    # The compact JSON of each tool definition, then of each legacy function, as the
    # validator serialised them (the tokenizer counts them, and need not serialise again).
    tool_texts: tuple[str, ...] = ()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise invalid(f"duplicate key {key!r} in the JSON body", param=key)
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise invalid(f"{name} is not valid JSON: numbers must be finite")


def parse_json(data: bytes) -> Any:
    """Parse a request body as strict JSON; raise a 400 :class:`APIError` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise invalid(
            f"We could not parse the JSON body of your request: {exc.msg} at line "
            f"{exc.lineno} column {exc.colno}."
        ) from None
    except RecursionError:
        raise invalid("the JSON body is nested too deeply") from None


def check_text(value: str, param: str) -> None:
    """Refuse (400 naming ``param``) a string that is not encodable UTF-8 (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} contains a lone surrogate (invalid Unicode)", param) from None


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


def _check_content(content: Any, param: str, *, required: bool) -> None:
    if content is None:
        if required:
            raise invalid(f"{param} is required", param)
        return
    if isinstance(content, str):
        check_text(content, param)
        return
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or an array of content parts", param)
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{where} must be an object with a string `type`", where)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.text must be a string", f"{where}.text")
            check_text(part["text"], f"{where}.text")


def _check_message(i: int, message: Any) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object", param)
    role = message.get("role")
    if not isinstance(role, str):
        raise invalid(f"{param}.role is required and must be a string", f"{param}.role")
    if role not in ROLES:
        raise invalid(
            f"{param}.role must be one of {', '.join(sorted(ROLES))}; got {role!r}",
            f"{param}.role",
        )
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise invalid(f"{param}.name must be a string", f"{param}.name")
        check_text(name, f"{param}.name")
    # Only an assistant turn may have no content (it made tool or function calls).
    _check_content(message.get("content"), f"{param}.content", required=role != "assistant")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise invalid(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
    for j, call in enumerate(tool_calls or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            where = f"{param}.tool_calls[{j}]"
            raise invalid(f"{where}.function.name must be a string", where)
        if not isinstance(fn.get("arguments", ""), str):
            where = f"{param}.tool_calls[{j}].function.arguments"
            raise invalid(f"{where} must be a string", where)


def _check_tools(body: dict[str, Any], name: str, texts: list[str]) -> list[dict[str, Any]] | None:
    """``body[name]`` (``tools`` or ``functions``), checked; appends each definition's
    compact JSON (what :func:`tokenguard.counting.tokens.tool_json` makes) to ``texts``."""
    tools = body.get(name)
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid(f"{name} must be an array", name)
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"{name}[{j}] must be an object", f"{name}[{j}]")
        fn = tool.get("function", tool) if name == "tools" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{name}[{j}] needs a function name", f"{name}[{j}]")
        text = tool_json(tool)
        check_text(text, f"{name}[{j}]")
        texts.append(text)
    return tools


def validate_chat(body: Any) -> ChatRequest:
    """Check a parsed body against the chat-completions schema (the parts we rely on)."""
    model = request_model(body)
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages is required", "messages")
    if not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", "messages")
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    for i, message in enumerate(messages):
        _check_message(i, message)
    max_tokens = output_length(body)
    n, choices = generated_choices(body)
    stream, include_usage = stream_flags(body)
    tool_texts: list[str] = []
    tools = _check_tools(body, "tools", tool_texts)
    functions = _check_tools(body, "functions", tool_texts)
    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        n=n,
        choices=choices,
        stream=stream,
        include_usage=include_usage,
        tools=tools,
        functions=functions,
        tool_texts=tuple(tool_texts),
    )


__all__ = [
    "OUTPUT_LENGTH_FIELDS",
    "APIError",
    "ChatRequest",
    "check_text",
    "generated_choices",
    "output_length",
    "parse_json",
    "positive_int",
    "request_model",
    "stream_flags",
    "validate_chat",
]
