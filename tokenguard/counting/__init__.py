"""Offline token counting for OpenAI-compatible requests: what a prompt is billed for.

* **No network access, ever**, and corrupt or mismatched package data fails loudly
  (:mod:`~tokenguard.counting.encodings`: the shipped tiktoken encodings, and which one
  counts a model).
* **Counting never raises on odd input**, and results are deterministic non-negative
  ints (:mod:`~tokenguard.counting.text`).
* Chat prompts as OpenAI's cookbook counts them, tool definitions at least their JSON
  (:mod:`~tokenguard.counting.chat_prompt`); image, audio and file parts
  (:mod:`~tokenguard.counting.media`).
* Long texts' counts are remembered (:mod:`~tokenguard.counting.count_cache`).

The names below are the package's interface; the modules are its parts.
"""

from tokenguard.counting.chat_prompt import count_chat_prompt, tool_json
from tokenguard.counting.count_cache import COUNT_CACHE, CountCache
from tokenguard.counting.encodings import (
    EncodingDataError,
    encoding_for_model,
    encoding_name_for,
    preload,
)
from tokenguard.counting.text import count_text

__all__ = [
    "COUNT_CACHE",
    "CountCache",
    "EncodingDataError",
    "count_chat_prompt",
    "count_text",
    "encoding_for_model",
    "encoding_name_for",
    "preload",
    "tool_json",
]
