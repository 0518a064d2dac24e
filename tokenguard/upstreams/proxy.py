"""Proxy mode: forwarding admitted requests to the upstream servers.

An :class:`Upstream` holds one node's ``httpx2.AsyncClient`` (a connection pool with
HTTP/1.1 keep-alive, running on trio through anyio) for as long as :meth:`Upstream.run`
runs, and sends each request to the route its model picks
(:meth:`tokenguard.config.settings.UpstreamSettings.route`), with the headers its dialect
gives (the route's credential as its API family sends it:
:meth:`tokenguard.api.dialect.Dialect.upstream_headers`) and the route's connect/read
timeouts.

Guarantees:

* What the upstream receives is the JSON tokenguard validated and counted, re-serialised
  (never the client's raw bytes).
* No key holds more than its share of the pool (:mod:`tokenguard.upstreams.pool_shares`,
  ``[upstream] key_share``): a request of a key past its share waits for one of that
  key's own requests to end, at most ``connect_timeout``, then gets a 429 (type
  ``concurrency``); a request that waits as long for the pool itself gets a 503
  ``upstream_busy``, said as such, never as a read timeout.
* A connection error is a 502, a timeout a 504, both in OpenAI's error shape
  (:class:`UpstreamFailure`, which says whether the request may have reached the
  upstream), raised before any byte reaches the client.
* A stream is relayed event by event as it arrives (:mod:`tokenguard.upstreams.relay`),
  metered by the request's dialect, whether the client takes its events or not. When
  the client leaves first (or is cut for stalling), the route's ``on_client_gone``
  decides: ``cancel`` closes the upstream response at once, ``drain`` reads it on,
  relaying nothing, to its end (at most ``read_timeout``). The upstream response and the
  key's slot are always released, however the stream ends.
* The credential never appears in a repr, a log line or an error message.

Every upstream call ends in one ``on_result(model, seconds, outcome)`` call, if set (for
metrics): ``outcome`` is ``"ok"``, ``"http_<status>"`` (a non-2xx answer, passed through
to the client), ``"timeout"``, ``"connect_error"``, ``"pool_timeout"`` (no connection of
the pool freed in time), ``"key_share"`` (the key's share stayed full), ``"dropped"`` (a
stream broken mid-way) or ``"client_closed"`` (the client left, or was cut, mid-stream).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import httpx2
import trio

from tokenguard.config.settings import UpstreamRoute, UpstreamSettings
from tokenguard.errors import APIError
from tokenguard.upstreams.pool_shares import PoolShares, ShareTimeout, Slot
from tokenguard.upstreams.relay import RelayedStream, StreamMeter, StreamTally, close_response
from tokenguard.upstreams.usage import InputDrift

log = logging.getLogger("tokenguard.upstreams.proxy")

# Upstream response headers a client may rely on; the upstream's own x-ratelimit-* are
# dropped (tokenguard's replace them), and so is everything hop-by-hop.
PASSTHROUGH_HEADERS = (
    "retry-after",
    "retry-after-ms",
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
    "request-id",  # Anthropic's x-request-id
)

ResultObserver = Callable[[str, float, str], None]


@attrs.define(eq=False)
class UpstreamFailure(APIError):
    """tokenguard's own answer when the upstream could not answer: a 502, 503 or 504 in
    OpenAI's shape (or the 429 of a key past its share of the pool). ``outcome`` names it
    for metrics; ``sent`` says whether the request may have reached the upstream (a
    timeout or a broken connection after it went out), which may then bill it."""

    outcome: str = "connect_error"
    sent: bool = False


# Never sent: no connection was made, or none was free.
UNSENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout)


def _failure(exc: httpx2.HTTPError, route: UpstreamRoute, pool_size: int) -> UpstreamFailure:
    """The client's error for a failed upstream call. The message names the route's
    host, never its credential."""
    where = httpx2.URL(route.base_url).host
    sent = not isinstance(exc, UNSENT)
    if isinstance(exc, httpx2.PoolTimeout):
        return UpstreamFailure(
            503,
            f"All {pool_size} connections of this node to the upstream servers are in use; "
            f"none freed within {route.connect_timeout:g} s. Please retry shortly.",
            "server_error",
            code="upstream_busy",
            headers={"retry-after": "1"},
            outcome="pool_timeout",
        )
    if isinstance(exc, httpx2.ConnectTimeout):
        message = (
            f"The upstream server ({where}) did not accept a connection within "
            f"{route.connect_timeout:g} s."
        )
        return _timeout(message, sent)
    if isinstance(exc, httpx2.TimeoutException):
        message = f"The upstream server ({where}) did not answer within {route.read_timeout:g} s."
        return _timeout(message, sent)
    return UpstreamFailure(
        502,
        f"The upstream server ({where}) could not be reached: {type(exc).__name__}.",
        "server_error",
        code="upstream_unavailable",
        outcome="connect_error",
        sent=sent,
    )


def _timeout(message: str, sent: bool) -> UpstreamFailure:
    return UpstreamFailure(
        504, message, "server_error", code="upstream_timeout", outcome="timeout", sent=sent
    )


def _share_full(slots: int, waited: float) -> UpstreamFailure:
    return UpstreamFailure(
        429,
        f"This key already holds its share of this node's upstream connections ({slots} "
        f"at once); none of them freed within {waited:g} s. Please try again once one "
        "of its requests has ended.",
        "concurrency",
        code="rate_limit_exceeded",
        headers={"retry-after": "1"},
        outcome="key_share",
    )


@attrs.frozen
class UpstreamReply:
    """A whole upstream answer: status, the headers to pass on, the body's bytes."""

    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON, or ``None`` when it is not JSON."""
        try:
            return json.loads(self.content)
        except ValueError:
            return None


def passthrough_headers(response: httpx2.Response) -> dict[str, str]:
    headers = {
        name: response.headers[name] for name in PASSTHROUGH_HEADERS if name in response.headers
    }
    headers["content-type"] = response.headers.get("content-type", "application/json")
    return headers


class Upstream:
    """The upstream servers of one node, and the pool of connections to them.

    :meth:`run` owns the client; requests may be sent only while it runs (a
    ``RuntimeError`` otherwise). ``on_result`` may be set at any time (see the module
    docstring).
    """

    def __init__(self, settings: UpstreamSettings, on_result: ResultObserver | None = None):
        self.settings = settings
        self.on_result = on_result
        self.drift = InputDrift()
        self.shares = PoolShares(settings.connections_per_key)
        self._client: httpx2.AsyncClient | None = None
        self._serving = trio.CancelScope()

    def route(self, model: str) -> UpstreamRoute | None:
        return self.settings.route(model)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connection pool open until cancelled; ``started()`` once usable."""
        limits = httpx2.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
            keepalive_expiry=30.0,
        )
        # httpx2 logs every request at INFO: the request log already has one line each.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        # Redirects are answers to pass on, not to follow with a credential attached.
        async with httpx2.AsyncClient(limits=limits, follow_redirects=False) as client:
            self._client = client
            try:
                with self._serving:
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._client = None

    def stop(self) -> None:
        """End :meth:`run` (the app stops serving): the pool's connections close."""
        self._serving.cancel()

    def report(self, model: str, started: float, outcome: str) -> None:
        if self.on_result is not None:
            self.on_result(model, trio.current_time() - started, outcome)

    async def _take_slot(self, route: UpstreamRoute, key: str, model: str, started: float) -> Slot:
        """A slot of ``key``'s share of the pool, waited for at most ``connect_timeout``
        (the pool's own wait); the 429 of :func:`_share_full` otherwise."""
        try:
            return await self.shares.acquire(key, route.connect_timeout)
        except ShareTimeout:
            failure = _share_full(self.shares.slots, route.connect_timeout)
            self.report(model, started, failure.outcome)
            raise failure from None

    async def _open(
        self,
        route: UpstreamRoute,
        path: str,
        body: dict[str, Any] | None,
        model: str,
        started: float,
        extra_headers: Mapping[str, str],
        method: str = "POST",
    ) -> httpx2.Response:
        """Send a request with ``extra_headers`` (the credential among them; ``body``
        ``None``: one without a body, such as a GET); the
        response's headers are read, its body is not."""
        client = self._client
        if client is None:
            raise RuntimeError("the upstream client is not running (Upstream.run)")
        headers = {"content-type": "application/json", "accept": "application/json"}
        headers.update(extra_headers)
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        timeout = httpx2.Timeout(
            route.read_timeout, connect=route.connect_timeout, pool=route.connect_timeout
        )
        request = client.build_request(
            method, route.base_url + path, content=content, headers=headers, timeout=timeout
        )
        try:
            return await client.send(request, stream=True)
        except httpx2.HTTPError as exc:
            failure = _failure(exc, route, self.settings.max_connections)
            self.report(model, started, failure.outcome)
            raise failure from None

    async def post(
        self,
        route: UpstreamRoute,
        path: str,
        body: dict[str, Any],
        model: str,
        *,
        key: str,
        headers: Mapping[str, str],
    ) -> UpstreamReply:
        """Forward a request for ``key`` (a key id: whose share of the pool it takes),
        with ``headers`` (the dialect's: the credential among them), and read the whole
        answer (any status); raise an :class:`UpstreamFailure` when the upstream cannot
        be reached or times out, or the pool or the key's share stays full."""
        return await self._whole(route, "POST", path, body, model, key, headers)

    async def fetch(
        self,
        route: UpstreamRoute,
        method: str,
        path: str,
        model: str,
        *,
        key: str,
        headers: Mapping[str, str],
    ) -> UpstreamReply:
        """A request without a body (``GET``, ``DELETE``: an object the upstream made,
        such as a stored response) for ``key``, with ``headers`` as :meth:`post`, read
        whole; raises as :meth:`post`."""
        return await self._whole(route, method, path, None, model, key, headers)

    async def _whole(
        self,
        route: UpstreamRoute,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        model: str,
        key: str,
        headers: Mapping[str, str],
    ) -> UpstreamReply:
        """One request in a slot of ``key``'s share, its answer read whole."""
        started = trio.current_time()
        slot = await self._take_slot(route, key, model, started)
        try:
            response = await self._open(route, path, body, model, started, headers, method)
            return await self._read_whole(route, response, model, started)
        finally:
            slot.release()

    async def _read_whole(
        self, route: UpstreamRoute, response: httpx2.Response, model: str, started: float
    ) -> UpstreamReply:
        """Read an opened answer whole and close it; its outcome is reported either way,
        and a read that fails raises the :class:`UpstreamFailure` of :func:`_failure`."""
        try:
            content = await response.aread()
        except httpx2.HTTPError as exc:
            failure = _failure(exc, route, self.settings.max_connections)
            self.report(model, started, failure.outcome)
            raise failure from None
        finally:
            await close_response(response)
        self.report(model, started, _outcome(response.status_code))
        return UpstreamReply(response.status_code, passthrough_headers(response), content)

    async def stream(
        self,
        route: UpstreamRoute,
        path: str,
        body: dict[str, Any],
        model: str,
        *,
        key: str,
        headers: Mapping[str, str],
        meter: StreamMeter,
        finish: Callable[[StreamTally], Awaitable[None]],
    ) -> UpstreamReply | RelayedStream:
        """Forward a streamed request for ``key``. A 200 event stream is returned as a
        :class:`~tokenguard.upstreams.relay.RelayedStream` read by ``meter`` (the caller
        must iterate or ``aclose`` it; ``finish`` is awaited once it ends, with its
        tally; the key's slot is held until then); any other answer is read whole and
        returned as an :class:`UpstreamReply`. Raises as :meth:`post`."""
        started = trio.current_time()
        slot = await self._take_slot(route, key, model, started)
        try:
            response = await self._open(route, path, body, model, started, headers)
            kind = response.headers.get("content-type", "")
            if response.status_code == 200 and kind.startswith("text/event-stream"):
                relayed = RelayedStream(
                    response,
                    meter=meter,
                    finish=finish,
                    report=lambda outcome: self.report(model, started, outcome),
                    release=slot.release,
                    drain_seconds=route.read_timeout if route.on_client_gone == "drain" else None,
                )
                slot = None  # the stream releases it
                return relayed
            return await self._read_whole(route, response, model, started)
        finally:
            if slot is not None:
                slot.release()


def _outcome(status: int) -> str:
    return "ok" if 200 <= status < 300 else f"http_{status}"
