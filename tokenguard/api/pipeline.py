"""The one request path every API surface takes, driven by the request's dialect.

:meth:`Pipeline.handle` is the handler of every dialect's route:

1. **Authenticate** the key as the dialect's API family sends it (a 401 in its shape);
2. **read** the body (capped at ``max_body_bytes``: 413) and parse it as strict JSON;
3. **validate** it (the dialect; a 400 naming the field): nothing is consumed before;
   its end user, for per-user limits, from the body or ``[limits] user_header``
   (:mod:`tokenguard.api.end_user`; a 400 for a bad id);
4. **route** its model in proxy mode (404 ``model_not_found`` before admission);
5. **count** its input tokens (the dialect; in a worker thread for a large body, once
   the key is known to have room: :meth:`Admissions.refuse_if_out`), and the input an
   earlier answer it refers to brings in (:meth:`Dialect.carried_input`);
6. **reserve** its output: the longest reply it names times the choices generated, else
   the key's ``default_max_tokens`` clamped to what its limits allow per choice; and,
   under a spend limit, its worst-case price (a 400 for an unpriced model, unless
   ``[limits] unpriced = "free"``);
7. **admit** every row at once, or refuse with the dialect's 429
   (:class:`~tokenguard.api.admission.Admissions`; a request whose rules allow a wait
   may wait for room first, bounded by ``x-tokenguard-max-wait``:
   :mod:`tokenguard.api.wait_headers`);
8. **answer** from the mock or relay from the upstream, and **settle** to what was
   spent (:mod:`tokenguard.api.mock_answers`, :mod:`tokenguard.api.proxy_answers`).

With ``--no-limits`` steps 5-7 are skipped (nothing is counted or admitted).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from quart import Response, g, request

from tokenguard.api.admission import Admissions
from tokenguard.api.auth import unknown_key
from tokenguard.api.dialect import Conventions, Dialect, Exchange
from tokenguard.api.end_user import checked_end_user, user_scope
from tokenguard.api.mock_answers import MockAnswers
from tokenguard.api.proxy_answers import ProxyAnswers
from tokenguard.api.request_body import parse_json
from tokenguard.api.responses import json_response, stash_queued_ms
from tokenguard.api.wait_headers import asked_priority, asked_wait
from tokenguard.config.prices import Price
from tokenguard.config.settings import Settings, UpstreamRoute
from tokenguard.errors import APIError
from tokenguard.limiting.keyring import Keyring
from tokenguard.limiting.limiter import Cost, Decision, Limiter
from tokenguard.model import ApiKey, digest_of
from tokenguard.observe.logs import RequestLog

# A request body at least this large has its prompt counted in a worker thread: tiktoken
# releases the GIL while it encodes, so the event loop goes on serving the node's other
# requests meanwhile (a 1 MiB prompt takes ~50 ms to count; one prompt after another
# would otherwise hold every other request up that long). Below it, the thread hop
# (~0.1 ms) costs more than counting in place. At most COUNTING_THREADS at once. Such a
# request's key is first checked for room (one store read), so a key already at its rpm
# or max_concurrent is refused before that work; below it, the one store call of the
# admission costs less than the check would.
COUNT_OFF_LOOP_BYTES = 64 * 1024
COUNTING_THREADS = 2


def model_not_found(model: str) -> APIError:
    """OpenAI's 404 for a model that is not served."""
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


class Pipeline:
    """The request path of one node's API surfaces (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        keyring: Keyring,
        limiter: Limiter,
        admissions: Admissions,
        request_log: RequestLog,
        mock: MockAnswers,
        proxy: ProxyAnswers | None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.limiter = limiter
        self.admissions = admissions
        self.request_log = request_log
        self.mock = mock
        self.proxy = proxy
        self._counting = trio.CapacityLimiter(COUNTING_THREADS)  # see COUNT_OFF_LOOP_BYTES

    def handler(self, dialect: Dialect) -> Callable[[], Awaitable[Response]]:
        """The route handler of ``dialect`` (a quart view function)."""

        async def handle() -> Response:
            return await self.handle(dialect)

        handle.__name__ = f"{dialect.surface}_handler"  # quart's endpoint name
        return handle

    async def handle(self, dialect: Dialect) -> Response:
        """One request of ``dialect``'s route, from its headers to its settlement."""
        g.conventions = dialect.conventions  # errors are answered in the dialect's shape
        self.request_log.current().surface = dialect.surface
        key = self.authenticate(dialect.conventions)
        data = await request.get_data(cache=False)
        exchange = dialect.parse(parse_json(data))
        # Before admission: an unrouted model costs nothing.
        route = self.route(exchange.model, dialect)
        decision: Decision | None = None
        input_tokens = 0
        if self.settings.limiting:
            end_user, user = self.end_user(key, exchange)
            input_tokens = await self.count_input(dialect, key, exchange, len(data), user, end_user)
            input_tokens += await dialect.carried_input(exchange, key.key_id)
            output = self.output_reservation(key, exchange, input_tokens)
            price = self.price(key, exchange.model)
            cost = Cost(requests=1, input_tokens=input_tokens, output_tokens=output, price=price)
            decision = await self.admissions.admit(
                key,
                cost,
                exchange.model,
                dialect.conventions,
                user=user,
                end_user=end_user,
                asked_wait=asked_wait(request.headers),
                asked_priority=asked_priority(request.headers),
            )
            queued_ms = self.request_log.current().queued_ms
            if queued_ms is not None:
                stash_queued_ms(queued_ms)
            per_choice = output // exchange.choices if exchange.choices else 0
        else:
            self.request_log.current().decision = "unlimited"
            per_choice = exchange.per_choice
            if per_choice is None:
                per_choice = key.limits.default_max_tokens
        if route is not None:
            assert self.proxy is not None
            return await self.proxy.answer(
                dialect,
                route,
                exchange,
                key_id=key.key_id,
                input_tokens=input_tokens,
                decision=decision,
                client_headers=request.headers,
            )
        return await self.mock.answer(
            dialect, exchange, per_choice, input_tokens, decision, key_id=key.key_id
        )

    def count_handler(self, dialect: Dialect) -> Callable[[], Awaitable[Response]]:
        """The handler of ``dialect``'s token-counting route (a quart view function)."""

        async def count() -> Response:
            return await self.count(dialect)

        count.__name__ = f"{dialect.surface}_count_handler"
        return count

    async def count(self, dialect: Dialect) -> Response:
        """A token-counting request: authenticated, read and validated as a request of
        ``dialect``, admitted as one request (no tokens: nothing is generated), answered
        with the input count admission would use, earlier answers it refers to included
        (or, on a route whose ``count_tokens = "upstream"``, the upstream's own answer,
        passed through). A body or reference that is refused costs nothing."""
        g.conventions = dialect.conventions
        key = self.authenticate(dialect.conventions)
        data = await request.get_data(cache=False)
        exchange = dialect.parse_count(parse_json(data))
        route = self.route(exchange.model, dialect)
        carried = await dialect.carried_input(exchange, key.key_id)
        decision: Decision | None = None
        headers: dict[str, str] = {}
        if self.settings.limiting:
            cost = Cost(requests=1, input_tokens=0, output_tokens=0)
            decision = await self.admissions.admit(key, cost, exchange.model, dialect.conventions)
            headers = dialect.conventions.ratelimit_headers(decision.admission.states)
        try:
            if route is not None and route.count_tokens == "upstream":
                assert self.proxy is not None
                return await self.proxy.pass_through(
                    dialect, route, exchange, key.key_id, request.headers, headers
                )
            tokens = await self.count_input(dialect, key, exchange, len(data)) + carried
        finally:
            if decision is not None:
                await self.admissions.settle(decision, 0)
        return json_response(dialect.count_answer(tokens), 200, headers)

    def authenticate(self, conventions: Conventions) -> ApiKey:
        """The key the request's credential names, or a 401/400 in ``conventions``' shape.

        Unknown keys and keys that were never valid answer identically.
        """
        token = conventions.credential(request.headers)
        # A revoked key is simply not in the keyring: the same 401 as an unknown one.
        key = self.keyring.by_digest(digest_of(token))
        if key is None:
            raise unknown_key()
        g.key = key
        self.request_log.current().key = key.name
        return key

    def route(self, model: str, dialect: Dialect) -> UpstreamRoute | None:
        """The upstream route of ``model`` in proxy mode (``None`` in mock mode); a 404
        when no route matches it, or only one of another API family than ``dialect``'s
        (tokenguard does not translate between APIs), or, in mock mode, when ``[mock]
        models`` is set and does not list it."""
        if self.proxy is None:
            served = self.settings.mock.models
            if served is not None and model not in served:
                raise model_not_found(model)
            return None
        route = self.proxy.upstream.route(model)
        if route is not None and route.dialect != dialect.family:
            raise APIError(
                404,
                f"The model `{model}` is served through the {route.dialect} API, not "
                f"{dialect.path}.",
                code="model_not_found",
                param="model",
            )
        if route is None:
            raise model_not_found(model)
        return route

    def end_user(self, key: ApiKey, exchange: Exchange) -> tuple[str | None, str | None]:
        """The request's end user: the id it names (the body's, else ``[limits]
        user_header``'s; ``None``: nobody), and the digest naming its per-user rows
        (``None`` when the key has none for this model); a 400 for an id that is too
        long, or missing under ``missing_user = "reject"``."""
        end_user = exchange.end_user
        header = self.settings.user_header
        if end_user is None and header is not None:
            end_user = checked_end_user(request.headers.get(header, ""), header)
        if not self.limiter.has_per_user(key, exchange.model):
            return end_user, None
        scope = user_scope(end_user, missing_user=self.settings.missing_user, header=header)
        return end_user, scope

    def price(self, key: ApiKey, model: str) -> Price | None:
        """The price of ``model`` when a spend limit applies to the request (``None``
        when none does, or the model has no price under ``unpriced = "free"``); a 400
        naming the model when it has none under ``unpriced = "reject"``."""
        if not self.limiter.has_spend(key, model):
            return None
        price = self.settings.prices.price(model)
        if price is None and self.settings.unpriced == "reject":
            raise APIError(
                400,
                f"The model `{model}` has no price, and a spend limit applies to this "
                f"request: the operator must price it in [prices].",
                param="model",
                code="model_not_priced",
            )
        return price

    async def count_input(
        self,
        dialect: Dialect,
        key: ApiKey,
        exchange: Exchange,
        body_size: int,
        user: str | None = None,
        end_user: str | None = None,
    ) -> int:
        """The request's input tokens: counted in place, or, when its body is
        ``COUNT_OFF_LOOP_BYTES`` or more (see there), in a worker thread once the key is
        known to have room for the request (a key already out gets its 429 uncounted)."""
        if body_size < COUNT_OFF_LOOP_BYTES:
            return dialect.count_input(exchange)
        await self.admissions.refuse_if_out(
            key, exchange.model, dialect.conventions, user=user, end_user=end_user
        )
        return await trio.to_thread.run_sync(dialect.count_input, exchange, limiter=self._counting)

    def output_reservation(self, key: ApiKey, exchange: Exchange, input_tokens: int) -> int:
        """Output tokens to reserve: the longest reply the request names (in any length
        field an upstream reads) times the choices it generates, else the key's default.

        The default is clamped to what the tightest enforced output (or total-tokens)
        limit allows per choice, so a request that names no length is never refused
        just for the default being large.
        """
        choices = exchange.choices
        if exchange.per_choice is not None:
            return exchange.per_choice * choices
        per_choice = key.limits.default_max_tokens
        cap = self.limiter.output_cap(key, exchange.model, input_tokens)
        if cap is not None and choices:
            per_choice = max(1, min(per_choice, cap // choices))
        return per_choice * choices
