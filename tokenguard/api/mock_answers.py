"""Answering from the built-in mock upstream (no ``[upstream]`` route).

The dialect writes the answer (:meth:`~tokenguard.api.dialect.Dialect.mock_answer`); here
it is paced by ``[mock] token_delay_ms`` and sent, and the request settled to the tokens
the client got: a whole answer's, or, for a stream, those of the events the client took
(a client that leaves mid-stream is charged for what it was sent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

import trio
from quart import Response

from tokenguard.api.admission import Admissions
from tokenguard.api.dialect import Dialect, Exchange, MockAnswer
from tokenguard.api.responses import event_stream, json_response, stash_headers
from tokenguard.limiting.limiter import Decision


class MockAnswers:
    """Answers from the mock, paced ``token_delay`` seconds per output token."""

    def __init__(self, admissions: Admissions, token_delay: float) -> None:
        self.admissions = admissions
        self.token_delay = token_delay

    async def answer(
        self,
        dialect: Dialect,
        exchange: Exchange,
        per_choice: int,
        input_tokens: int,
        decision: Decision | None,
        *,
        key_id: str,
    ) -> Response:
        """The mock's answer to ``exchange``, at most ``per_choice`` tokens a choice, with
        ``decision``'s rate-limit headers; ``decision`` (if any) settled to what was sent.
        An answer with totals is handed to the dialect (:meth:`Dialect.answered`, for the
        key ``key_id``) before its body, or its stream's last event, is sent: a client
        that saw the end of an answer may refer to it at once, on any node."""
        answer = dialect.mock_answer(exchange, per_choice, input_tokens)
        if decision is not None:
            states = decision.admission.states
            stash_headers(dialect.conventions.ratelimit_header_fields(states))
        if exchange.stream:
            return event_stream(self._stream(dialect, exchange, answer, decision, key_id), {})
        try:
            if self.token_delay:
                await trio.sleep(self.token_delay * answer.output_tokens)
        finally:
            if decision is not None:
                await self.admissions.settle(decision, answer.output_tokens)
        if answer.totals is not None:
            await dialect.answered(key_id, exchange, answer.totals)
        return json_response(answer.body)

    async def _stream(
        self,
        dialect: Dialect,
        exchange: Exchange,
        answer: MockAnswer,
        decision: Decision | None,
        key_id: str,
    ) -> AsyncIterator[bytes]:
        sent = 0
        try:
            for event, tokens, last in _marking_last(answer.events):
                if self.token_delay and tokens:
                    await trio.sleep(self.token_delay)
                if last and answer.totals is not None:
                    await dialect.answered(key_id, exchange, answer.totals)
                yield event
                # Counted only once the event was taken: a client that left mid-stream
                # is charged for what it was sent, not for what it would have been.
                sent += tokens
        finally:
            if decision is not None:
                await self.admissions.settle(decision, sent)


def _marking_last(events: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes, int, bool]]:
    """``(event, tokens, is_last)`` for each of ``events``, one read ahead."""
    pending: tuple[bytes, int] | None = None
    for event in events:
        if pending is not None:
            yield (*pending, False)
        pending = event
    if pending is not None:
        yield (*pending, True)
