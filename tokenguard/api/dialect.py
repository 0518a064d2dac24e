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
  key is read from (:class:`OpenAIConventions` for OpenAI's APIs).

A dialect holds no per-request state and is shared by every request of its route.
Adding an API surface is one module with one :class:`Dialect` subclass, registered in
the app factory; no pipeline code is copied.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import attrs

from tokenguard.api.auth import bearer_credential
from tokenguard.api.ratelimit import openai_header_fields
from tokenguard.config.settings import UpstreamRoute
from tokenguard.errors import APIError
from tokenguard.store.window_store import RowState
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
class MockAnswer:
    """The mock's answer to one request: a whole ``body`` (``output_tokens`` long), or,
    for a stream, its ``events`` (SSE bytes, each with the output tokens it carries) in
    order, every event the answer has (usage and end-of-stream events included)."""

    output_tokens: int
    body: dict[str, Any] | None = None
    events: Iterable[tuple[bytes, int]] = ()


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
