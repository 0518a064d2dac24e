"""An API dialect: what one API surface says on the wire, and nothing else.

tokenguard serves several APIs (OpenAI's chat completions, legacy completions and
embeddings; more to come) through ONE request pipeline (:mod:`tokenguard.api.pipeline`):
authenticate, read the body, validate it, count its input, reserve its output, admit
(all rows or none), answer from the mock or relay from an upstream, settle. What
differs between the APIs is only the wire format, and that is a :class:`Dialect`:

* how a request body is validated (a 400 naming the field, before the limiter) and what
  the pipeline needs of it: an :class:`Exchange`;
* how its input tokens are counted (:meth:`Dialect.count_input`, which may run in a
  worker thread) and how many replies its upstream generates;
* the body sent upstream in proxy mode (:meth:`Dialect.forward`: no length field above
  the reservation) and the upstream path;
* the mock's answer, whole or streamed (:meth:`Dialect.mock_answer`);
* where an upstream's answer says what it spent (:meth:`Dialect.usage_of`,
  :meth:`Dialect.reply_output`, and a :class:`~tokenguard.upstreams.relay.StreamMeter`
  for each relayed stream);
* the API family's conventions: its error body, its rate-limit headers and where the
  key is read from (:class:`OpenAIConventions` for OpenAI's APIs), and the headers an
  upstream of that family is sent (:meth:`Dialect.upstream_headers`: the route's
  credential, and what the client says that the upstream must hear);
* optionally a token-counting route (:attr:`Dialect.count_path`) that answers the
  count admission would use, admitted in the requests dimension only;
* for an API whose requests refer to earlier answers by id (the Responses API's
  ``previous_response_id``): the input such a reference brings in
  (:meth:`Dialect.carried_input`), and what an answer with an id spent
  (:class:`AnswerTotals`, kept by :meth:`Dialect.answered`). The default: none.

A dialect holds no per-request state and is shared by every request of its route; one
that keeps state across requests gets the node's store and settings when it is built
(:meth:`Dialect.build`).
Adding an API surface is one module with one :class:`Dialect` subclass, registered in
the app factory; no pipeline code is copied.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self

import attrs

from tokenguard.api.auth import bearer_credential
from tokenguard.api.ratelimit import openai_header_fields
from tokenguard.config.settings import Settings, UpstreamRoute
from tokenguard.errors import APIError
from tokenguard.store.rows import RowState
from tokenguard.store.window_store import WindowStore
from tokenguard.upstreams.forwarding import forwarded_body
from tokenguard.upstreams.relay import StreamMeter
from tokenguard.upstreams.usage import ReportedUsage

Headers = list[tuple[bytes, bytes]]


@attrs.frozen
class Exchange:
    """One validated request, as the pipeline sees it whatever its dialect.

    ``per_choice``: the longest reply per generated choice the request names (in any
    length field an upstream reads); ``None`` when it names none (the key's
    ``default_max_tokens`` is reserved then). ``choices``: the replies the upstream
    generates, and bills, for it (0: an endpoint with no output, such as embeddings).
    ``request``: the dialect's own validated form of the body. ``end_user``: the end
    user the body names (:func:`tokenguard.api.end_user.end_user_of`), ``None``: none.
    """

    body: dict[str, Any]
    model: str
    stream: bool
    per_choice: int | None
    choices: int
    request: Any
    end_user: str | None = None


@attrs.frozen
class AnswerTotals:
    """What one answer with an id spent (``input_tokens``, ``output_tokens``), for a later
    request that refers to it; ``response``: the answer object itself, when the node
    keeps it (the mock's), and ``items``: the input it answered."""

    id: str
    model: str
    input_tokens: int
    output_tokens: int
    response: dict[str, Any] | None = None
    items: tuple[Any, ...] = ()


@attrs.frozen
class MockAnswer:
    """The mock's answer to one request: a whole ``body`` (``output_tokens`` long), or,
    for a stream, its ``events`` (SSE bytes, each with the output tokens it carries) in
    order, every event the answer has (usage and end-of-stream events included).
    ``totals``: what the answer spent under its id, for a dialect that keeps them (kept
    before the body is sent, or before a stream's last event)."""

    output_tokens: int
    body: dict[str, Any] | None = None
    events: Iterable[tuple[bytes, int]] = ()
    totals: AnswerTotals | None = None


class Conventions(abc.ABC):
    """An API family's conventions: the credential, the error body, the rate-limit
    headers. Shared by the dialects of one family (and by the routes that are no
    dialect's, such as ``/v1/usage``, which speak OpenAI's)."""

    missing_key_message: ClassVar[str]

    @abc.abstractmethod
    def credential(self, headers: Any) -> str:
        """The API key a request carries (``headers``: quart's request headers); a 401 or
        400 :class:`APIError` when there is none or it is malformed."""

    @abc.abstractmethod
    def error_body(self, error: APIError) -> dict[str, Any]:
        """The JSON body of an error answer."""

    @abc.abstractmethod
    def ratelimit_header_fields(self, states: tuple[RowState, ...]) -> Headers:
        """The rate-limit headers of an answer to an admitted request (ASGI pairs)."""

    def ratelimit_headers(self, states: tuple[RowState, ...]) -> dict[str, str]:
        """:meth:`ratelimit_header_fields` as a ``{name: value}`` dict of str."""
        return {
            name.decode("ascii"): value.decode("ascii")
            for name, value in self.ratelimit_header_fields(states)
        }

    def has_ratelimit_headers(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` already carry this family's rate-limit headers."""
        return any(name.startswith("x-ratelimit-") for name in headers)


class OpenAIConventions(Conventions):
    """OpenAI's: ``Authorization: Bearer KEY``, ``{"error": {...}}`` bodies, and the
    ``x-ratelimit-*`` headers (:func:`tokenguard.api.ratelimit.openai_header_fields`)."""

    def credential(self, headers: Any) -> str:
        return bearer_credential(headers)

    def error_body(self, error: APIError) -> dict[str, Any]:
        return error.body()

    def ratelimit_header_fields(self, states: tuple[RowState, ...]) -> Headers:
        return openai_header_fields(states)


OPENAI = OpenAIConventions()
"""OpenAI's conventions: stateless, shared by every OpenAI dialect and route."""


class Dialect(abc.ABC):
    """One API surface's wire format (see the module docstring). Subclasses set the
    class attributes and implement the abstract methods; the rest have OpenAI's
    behaviour."""

    surface: ClassVar[str]
    """A short name for metrics, logs and feed events: ``chat``, ``completions`` ..."""
    path: ClassVar[str]
    """The route tokenguard serves it on: ``/v1/chat/completions``."""
    upstream_path: ClassVar[str]
    """Where proxy mode forwards it, after the route's ``base_url``."""
    conventions: ClassVar[Conventions] = OPENAI
    family: ClassVar[str] = "openai"
    """The API family (an upstream route's ``dialect``): only a route of this family
    serves this surface's models."""
    count_path: ClassVar[str | None] = None
    """A route answering the request's input tokens (``None``: none); see
    :meth:`parse_count`, :meth:`count_answer`."""
    count_upstream_path: ClassVar[str | None] = None
    """Where a route whose ``count_tokens = "upstream"`` forwards :attr:`count_path`."""

    def upstream_headers(self, route: UpstreamRoute, request_headers: Any) -> dict[str, str]:
        """The headers an upstream request carries besides its content type: the
        route's credential as the family sends it (OpenAI's ``Authorization: Bearer``),
        and anything of the client's (``request_headers``) the upstream must see."""
        if route.api_key is None:
            return {}
        return {"authorization": f"Bearer {route.api_key}"}

    def parse_count(self, body: Any) -> Exchange:
        """Validate a body sent to :attr:`count_path` (a 400 naming the field): by
        default, as a body of :attr:`path`."""
        return self.parse(body)

    def count_answer(self, input_tokens: int) -> dict[str, Any]:
        """The body :attr:`count_path` answers with."""
        raise NotImplementedError(f"{self.surface} has no token-counting route")

    @classmethod
    def build(cls, store: WindowStore, settings: Settings) -> Self:
        """The dialect a node serves with. Most keep nothing across requests and need
        neither; one that does (records in the ``store``) or reads its routes'
        settings overrides this."""
        return cls()

    @abc.abstractmethod
    def parse(self, body: Any) -> Exchange:
        """Validate a parsed JSON body; a 400 :class:`APIError` naming the field."""

    @abc.abstractmethod
    def count_input(self, exchange: Exchange) -> int:
        """The request's input tokens, as its API bills them. Synchronous and
        thread-safe: the pipeline runs it in a worker thread for a large body."""

    @abc.abstractmethod
    def mock_answer(self, exchange: Exchange, per_choice: int, input_tokens: int) -> MockAnswer:
        """The mock's answer: at most ``per_choice`` output tokens per choice."""

    # -- answers a later request refers to by id (none by default)

    async def carried_input(self, exchange: Exchange, key_id: str) -> int:
        """Input tokens the request brings in by referring to earlier answers of the key
        ``key_id`` (not in its body), as its API bills them. A 400 :class:`APIError`
        naming the field when the mock does not know the reference."""
        return 0

    async def answered(self, key_id: str, exchange: Exchange, totals: AnswerTotals) -> None:
        """Keep what an answer of the key ``key_id`` spent, under its id (by default,
        nothing is kept: no request of the dialect refers to an earlier answer)."""
        return None

    def answer_totals(self, exchange: Exchange, body: Any) -> AnswerTotals | None:
        """What a whole 2xx upstream answer spent under its id (``None``: no id)."""
        return None

    def stream_totals(self, exchange: Exchange, meter: StreamMeter) -> AnswerTotals | None:
        """What a relayed stream's answer spent under its id, as ``meter`` read it."""
        return None

    # -- proxy mode: what is sent, and what the answer says it spent

    def forward(
        self, exchange: Exchange, per_choice: int | None, route: UpstreamRoute
    ) -> dict[str, Any]:
        """The body sent upstream: no length field above ``per_choice`` (the output
        reserved per choice; ``None`` when nothing was reserved, limits off), one named
        in the route's ``output_limit_field``, only the route's ``forward_fields`` if it
        has them (:func:`tokenguard.upstreams.forwarding.forwarded_body`)."""
        return forwarded_body(
            exchange.body,
            per_choice=per_choice,
            limit_field=route.output_limit_field,
            allowed=route.forward_fields,
        )

    def asking_usage(self, body: dict[str, Any]) -> dict[str, Any]:
        """A streamed body that asks the upstream for its usage at the end (to settle
        to it; the relayed stream drops it if the client did not ask):
        ``stream_options.include_usage``."""
        options = body.get("stream_options")
        return {**body, "stream_options": {**(options or {}), "include_usage": True}}

    @abc.abstractmethod
    def meter(self, exchange: Exchange) -> StreamMeter:
        """A fresh reader of one relayed stream's events (what it generated, its usage,
        which events the client does not get)."""

    def usage_of(self, body: Any) -> ReportedUsage | None:
        """What a whole upstream answer says it spent (``usage``), or ``None``."""
        return ReportedUsage.of_openai(body.get("usage") if isinstance(body, dict) else None)

    @abc.abstractmethod
    def reply_output(self, model: str, body: Any) -> int:
        """The output tokens of a whole answer, counted by tokenguard (the answer
        reported no usage)."""
