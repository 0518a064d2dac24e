"""What an upstream says it spent, and how that compares with tokenguard's own count.

:class:`ReportedUsage` is an answer's usage in the limiter's terms (input tokens that
count against input limits, output tokens), whatever the API's own field names; each
dialect reads its API's usage block into one. :class:`InputDrift` remembers, per model,
how tokenguard's input count compared with the upstream's, and logs a difference (at
most a line per model every :data:`DRIFT_LOG_SECONDS`), so a miscounted model shows up.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from tokenguard.observe.log_throttle import LogThrottle

log = logging.getLogger("tokenguard.upstreams.usage")

DRIFT_LOG_SECONDS = 10.0
DRIFT_MODELS = 1024  # models are client input: the per-model drift table is bounded


def token_count(value: Any) -> int | None:
    """``value`` if it is a count of tokens (a non-negative int, not a bool), else
    ``None``: an upstream's usage block is read defensively."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@attrs.frozen
class ReportedUsage:
    """An upstream's own account of an answer: ``input_tokens`` as they count against
    input limits, ``output_tokens``; ``None`` for a figure absent or invalid.
    ``cache_read_tokens``: prompt tokens read from the upstream's prompt cache that are
    NOT in ``input_tokens`` (Anthropic's ``cache_read_input_tokens``; a route whose
    ``cached_input_counts`` is true counts them as input too, see :meth:`limited_input`).
    ``input_tokens + cache_read_tokens`` is the whole prompt, what tokenguard counted.
    ``cached_input_tokens``: how many OF the input tokens were prompt-cache hits
    (OpenAI's ``cached_tokens``). Both kinds of hits are priced at ``cached_input`` in
    spend rows; 0 when not reported."""

    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int = 0
    cached_input_tokens: int = 0

    @property
    def prompt_tokens(self) -> int | None:
        """The whole prompt the upstream read (cached or not); ``None`` when unknown."""
        if self.input_tokens is None:
            return None
        return self.input_tokens + self.cache_read_tokens

    def limited_input(self, cached_input_counts: bool) -> int | None:
        """The input tokens that count against input limits: ``input_tokens``, plus the
        cache reads when ``cached_input_counts``."""
        if self.input_tokens is None or not cached_input_counts:
            return self.input_tokens
        return self.input_tokens + self.cache_read_tokens

    @classmethod
    def of_openai(cls, usage: Any) -> ReportedUsage | None:
        """An OpenAI chat or completions ``usage`` block (``prompt_tokens``,
        ``completion_tokens``); ``None`` when there is none."""
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
        return cls(
            token_count(usage.get("prompt_tokens")),
            token_count(usage.get("completion_tokens")),
            cached_input_tokens=cached or 0,
        )

    @classmethod
    def of_anthropic(cls, usage: Any) -> ReportedUsage | None:
        """An Anthropic ``usage`` block: ``input_tokens`` (uncached) plus
        ``cache_creation_input_tokens`` count as input, as Anthropic's own input limits
        count them; ``cache_read_input_tokens`` are kept apart. ``None`` when there is
        none. (A missing or invalid cache figure counts as 0.)"""
        if not isinstance(usage, dict):
            return None
        uncached = token_count(usage.get("input_tokens"))
        created = token_count(usage.get("cache_creation_input_tokens")) or 0
        read = token_count(usage.get("cache_read_input_tokens")) or 0
        return cls(
            None if uncached is None else uncached + created,
            token_count(usage.get("output_tokens")),
            cache_read_tokens=read,
        )

    @classmethod
    def of_responses(cls, usage: Any) -> ReportedUsage | None:
        """An OpenAI Responses ``usage`` block (``input_tokens``, of them
        ``input_tokens_details.cached_tokens`` cache hits, and ``output_tokens`` with its
        reasoning tokens); ``None`` when there is none."""
        if not isinstance(usage, dict):
            return None
        details = usage.get("input_tokens_details")
        cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
        return cls(
            token_count(usage.get("input_tokens")),
            token_count(usage.get("output_tokens")),
            cached_input_tokens=cached or 0,
        )


@attrs.define
class ModelDrift:
    """One model's input-token drift: how many upstream answers reported usage, how
    many of them disagreed with tokenguard's count, and the net difference."""

    reported: int = 0
    differed: int = 0
    net: int = 0  # sum of (upstream's input tokens - tokenguard's count)
    log_throttle: LogThrottle = attrs.field(factory=lambda: LogThrottle(DRIFT_LOG_SECONDS))


class InputDrift:
    """Per model (at most :data:`DRIFT_MODELS`), how tokenguard's input-token count
    compares with the upstream's; a difference is logged, throttled per model."""

    def __init__(self) -> None:
        self.models: dict[str, ModelDrift] = {}

    def record(self, model: str, counted: int, reported: int) -> None:
        drift = self.models.get(model)
        if drift is None:
            if len(self.models) >= DRIFT_MODELS:
                self.models.clear()
            drift = self.models[model] = ModelDrift()
        drift.reported += 1
        if reported == counted:
            return
        drift.differed += 1
        drift.net += reported - counted
        if drift.log_throttle.ready() is not None:
            log.warning(
                "input tokens of model %r: counted %d, the upstream reported %d (%+d); "
                "%d of %d answers differed, net %+d tokens; settled to the upstream's count",
                model,
                counted,
                reported,
                reported - counted,
                drift.differed,
                drift.reported,
                drift.net,
            )
