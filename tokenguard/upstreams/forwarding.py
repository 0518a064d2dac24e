"""Proxy mode: the body an upstream is sent, bounded by the request's reservation.

An upstream generates what its request asks for, whatever tokenguard reserved, and the
OpenAI-compatible servers do not agree on how a reply's length is asked for (llama.cpp
reads ``n_predict`` before ``max_tokens``, vLLM ``max_completion_tokens`` before it,
text-generation-inference ``max_new_tokens``...). :func:`forwarded_body` makes the
validated body safe to send:

* every field of :data:`OUTPUT_LENGTH_FIELDS` it carries is at most the reservation per
  choice (the request was reserved for the largest of them, so this only ever bites a
  caller of this function that reserved less);
* ``min_tokens`` (a floor on the reply) is lowered to the reservation when above it;
* when it carries neither ``max_tokens`` nor ``max_completion_tokens``, the route's
  ``output_limit_field`` is set to the reservation, so a server that reads only those
  (and would otherwise generate up to its context) stops there too;
* with a route's ``forward_fields`` allow-list, only those fields are kept, plus the
  ones tokenguard needs the upstream to see (:data:`ALWAYS_FORWARDED`) and the ones
  it sets itself (the length field above; ``stream_options`` for a stream, see
  :meth:`tokenguard.api.dialect.Dialect.asking_usage`).

The choice fields (``n``, ``n_cmpl``, ``best_of``) are forwarded as they are: the
reservation counts every choice the upstream generates
(:func:`tokenguard.api.request_body.generated_choices`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["ALWAYS_FORWARDED", "MIN_LENGTH_FIELD", "OUTPUT_LENGTH_FIELDS", "forwarded_body"]

# The body fields through which the OpenAI-compatible servers tokenguard knows cap a
# reply's length, per choice. Each one a request names counts (the reservation is the
# largest), and none is forwarded above the reservation (below):
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
# reservation when it is above it (below).
MIN_LENGTH_FIELD = "min_tokens"

# What the upstream must see for the request to be the one tokenguard counted: the
# model, the prompt of each endpoint, and whether to stream.
ALWAYS_FORWARDED = frozenset({"model", "messages", "prompt", "suffix", "input", "stream"})
# The fields that cap the reply in every server tokenguard knows (one is always sent).
CAPPING_FIELDS = ("max_tokens", "max_completion_tokens")


def forwarded_body(
    body: dict[str, Any],
    *,
    per_choice: int | None,
    limit_field: str = "max_tokens",
    allowed: Collection[str] | None = None,
) -> dict[str, Any]:
    """``body`` as it may be sent upstream (a new dict; ``body`` is not changed).

    ``per_choice``: the output tokens reserved per generated choice (``None``: nothing
    was reserved, the limiter is off; lengths are left alone). ``limit_field``: the
    route's ``output_limit_field``. ``allowed``: the route's ``forward_fields`` (``None``:
    every field is forwarded).
    """
    if allowed is None:
        sent = dict(body)
    else:
        sent = {k: v for k, v in body.items() if k in allowed or k in ALWAYS_FORWARDED}
    if per_choice is None:
        return sent
    for name in OUTPUT_LENGTH_FIELDS:
        value = sent.get(name)
        if isinstance(value, int) and value > per_choice:
            sent[name] = per_choice
    floor = sent.get(MIN_LENGTH_FIELD)
    if isinstance(floor, int) and floor > per_choice:
        sent[MIN_LENGTH_FIELD] = per_choice
    if all(sent.get(name) is None for name in CAPPING_FIELDS):
        sent[limit_field] = per_choice
    return sent
