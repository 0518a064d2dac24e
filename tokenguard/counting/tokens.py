"""Kept only for tokenguard/api/ and tokenguard/upstreams/, which still import these
names from here: their home is the :mod:`tokenguard.counting` package. Nothing else
imports this module; it goes once they switch."""

from tokenguard.counting import count_chat_prompt, count_text, tool_json

__all__ = ["count_chat_prompt", "count_text", "tool_json"]
