"""The app factory: one node's HTTP surface, over a :class:`~tokenguard.api.gateway.Gateway`.

:func:`create_app` takes one :class:`~tokenguard.config.settings.Settings` and one
:class:`~tokenguard.store.window_store.WindowStore`, builds the node's objects once
(:meth:`Gateway.build`), and serves them: every dialect's route through the one request
pipeline (:mod:`tokenguard.api.pipeline`), ``/v1/usage`` and ``/v1/models``, the usage
feed's websocket, the dashboard, ``/healthz``, ``/readyz`` and ``/metrics``. There are
no module globals. Every error is answered in the request's dialect's shape, never as
an HTML page or a traceback.
"""

from __future__ import annotations

import logging
from importlib import resources

import trio
from quart import Response, g, has_request_context, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tokenguard.api.dialect import OPENAI, Conventions
from tokenguard.api.gateway import Gateway
from tokenguard.api.hardening import check_request_framing, drain_request_body
from tokenguard.api.responses import (
    close_relayed_stream,
    drop_stashed_headers,
    json_response,
    send_stashed_headers,
)
from tokenguard.bearer import bearer_matches
from tokenguard.config.settings import Settings
from tokenguard.errors import APIError, http_error
from tokenguard.limiting.keyring import Keyring
from tokenguard.log_throttle import LogThrottle
from tokenguard.observe.feed_session import serve_websocket
from tokenguard.observe.metrics import CONTENT_TYPE
from tokenguard.store.window_store import StoreError, WindowStore

log = logging.getLogger("tokenguard.api.app")

# The live dashboard: static files shipped in the package (tokenguard/static), served
# as they are. The page loads nothing from elsewhere, and may only talk to this node.
DASHBOARD_FILES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
DASHBOARD_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _where() -> str:
    """What the app is answering, for a log line: ``POST /v1/...`` or
    ``websocket /v1/usage/stream`` (error handlers serve both kinds of request)."""
    if has_request_context():
        return f"{request.method} {request.path}"
    if has_websocket_context():
        return f"websocket {websocket.path}"
    return "(no request)"


def create_app(
    settings: Settings,
    store: WindowStore,
    *,
    shutdown: trio.Event | None = None,
    keyring: Keyring | None = None,
) -> QuartTrio:
    """Build the app for one node: its settings, and the store its limiter uses.

    ``shutdown``, the node's own, closes the usage feed's websockets as soon as it is
    set (otherwise they would hold a graceful shutdown for its whole grace period).
    ``keyring``, when given, is run by the caller (a node shares it with its admin
    API); otherwise the app makes one and runs it while it serves.
    """
    app = QuartTrio("tokenguard")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=30,
    )
    # `//v1/chat/completions` must not be redirected around the limiter: it is a 404.
    app.url_map.merge_slashes = False
    gateway = Gateway.build(settings, store, closing=shutdown, keyring=keyring)
    app.extensions["tokenguard"] = gateway
    # Every HTTP request is recorded, logged once its response ended, and counted; the
    # send deadlines hold the server's own send, so they wrap everything else.
    app.asgi_app = gateway.send_deadlines.wrap(  # type: ignore[method-assign]
        gateway.request_log.wrap(close_relayed_stream(send_stashed_headers(app.asgi_app)))
    )
    # Ambiguous framing (Content-Length and Transfer-Encoding) and oversized headers
    # are refused first, before the body is read or the key looked up.
    app.before_request(check_request_framing)
    # Every answer, an early error included, leaves the connection reusable.
    app.after_request(drain_request_body)
    _add_api_routes(app, gateway)
    _add_node_routes(app, gateway)
    _run_while_serving(app, gateway, own_keyring=keyring is None)
    _add_error_handlers(app, gateway)
    return app


def _add_api_routes(app: QuartTrio, gateway: Gateway) -> None:
    """Every dialect's route through the pipeline; the key's own usage and models."""
    for dialect in gateway.dialects:
        handler = gateway.pipeline.handler(dialect)
        app.add_url_rule(dialect.path, view_func=handler, methods=["POST"])
        if dialect.count_path is not None:
            counter = gateway.pipeline.count_handler(dialect)
            app.add_url_rule(dialect.count_path, view_func=counter, methods=["POST"])
    app.add_url_rule("/v1/usage", view_func=gateway.info.usage, methods=["GET"])
    app.add_url_rule("/v1/models", view_func=gateway.info.models, methods=["GET"])
    app.add_url_rule("/v1/models/<path:model_id>", view_func=gateway.info.model, methods=["GET"])
    responses = gateway.response_routes
    app.add_url_rule("/v1/responses/<response_id>", view_func=responses.retrieve, methods=["GET"])
    app.add_url_rule(
        "/v1/responses/<response_id>",
        endpoint="delete_response",
        view_func=responses.delete,
        methods=["DELETE"],
    )
    app.add_url_rule(
        "/v1/responses/<response_id>/input_items",
        view_func=responses.input_items,
        methods=["GET"],
    )

    @app.websocket("/v1/usage/stream")
    async def usage_stream() -> Response | None:
        # A Response here (a refused Origin) is sent as an HTTP answer to the handshake.
        return await serve_websocket(gateway.feed, websocket._get_current_object())


def _add_node_routes(app: QuartTrio, gateway: Gateway) -> None:
    """The dashboard, health, readiness and metrics."""
    settings, store = gateway.settings, gateway.store
    dashboard = {
        name: (resources.files("tokenguard").joinpath("static", name).read_bytes(), kind)
        for name, kind in DASHBOARD_FILES.items()
    }

    @app.get("/dashboard")
    @app.get("/dashboard/<name>")
    async def dashboard_file(name: str = "dashboard.html") -> Response:
        if name not in dashboard:
            raise APIError(404, f"Unknown dashboard file {name!r}.", code="unknown_url")
        body, kind = dashboard[name]
        return Response(body, content_type=kind, headers=DASHBOARD_HEADERS)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok", "node": settings.node_id})

    @app.get("/readyz")
    async def readyz() -> Response:
        # The store's state (a GuardedStore's breaker); /healthz stays a liveness check.
        status = getattr(store, "status", None)
        body = {"status": "ready", "node": settings.node_id, "store": "ok"}
        if status is not None:
            body.update(status())
        ready = body["store"] == "ok"
        if not ready:
            body["status"] = "degraded"
        return json_response(body, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        # Open unless [metrics] token is set: key names are operator data, not secrets
        # (a node on a non-loopback address without a token says so at start).
        if not bearer_matches(request.headers.get("Authorization"), settings.metrics.token_digest):
            raise APIError(
                401,
                "GET /metrics needs the metrics token: Authorization: Bearer <[metrics] token>.",
                code="invalid_metrics_token",
            )
        return Response(gateway.metrics.exposition(), content_type=CONTENT_TYPE)


def _run_while_serving(app: QuartTrio, gateway: Gateway, *, own_keyring: bool) -> None:
    """The node's background tasks, in quart-trio's lifespan nursery: the upstream pool
    and the send deadlines (proxy mode), the keyring (when it is the app's own), the
    usage feed, the admission queue (which answers its waiters 503 once the node's
    ``shutdown`` is set), and the settler (drained, shielded, when serving ends, so no refund
    that was accepted is lost; a store that never waits settles in the request)."""

    @app.before_serving
    async def start() -> None:
        if gateway.upstream is not None:
            await app.nursery.start(gateway.upstream.run)
            await app.nursery.start(gateway.send_deadlines.run)
        if own_keyring:
            await app.nursery.start(gateway.keyring.run)
        await app.nursery.start(gateway.feed.run)
        await app.nursery.start(gateway.admissions.queue.run)
        if not gateway.store.never_waits:
            await app.nursery.start(gateway.settler.run)

    @app.after_serving
    async def stop() -> None:
        gateway.settler.stop()
        gateway.feed.stop()
        if own_keyring:
            gateway.keyring.stop()
        if gateway.upstream is not None:
            gateway.send_deadlines.stop()
            gateway.upstream.stop()


def _conventions() -> Conventions:
    """The conventions of the dialect answering the current request (OpenAI's for the
    routes that are no dialect's)."""
    return getattr(g, "conventions", OPENAI)


async def _error_response(gateway: Gateway, error: APIError) -> Response:
    """An error answer in the request's dialect's shape; an authenticated request's also
    carries its rate-limit headers."""
    drop_stashed_headers()  # a failure after the answer was built: this one instead
    conventions = _conventions()
    headers = dict(error.headers)
    key = getattr(g, "key", None)
    if key is not None and not conventions.has_ratelimit_headers(headers):
        try:
            headers.update(conventions.ratelimit_headers(await gateway.limiter.usage(key)))
        except StoreError:
            pass
    return json_response(conventions.error_body(error), error.status, headers)


def _add_error_handlers(app: QuartTrio, gateway: Gateway) -> None:
    store_error_log = LogThrottle()
    settings = gateway.settings

    @app.errorhandler(APIError)
    async def on_api_error(error: APIError) -> Response:
        return await _error_response(gateway, error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        unknown_url = f"Unknown request URL: {_where()}. Please check the URL for typos."
        answer = http_error(error, unknown_url=unknown_url, max_body_bytes=settings.max_body_bytes)
        return await _error_response(gateway, answer)

    @app.errorhandler(StoreError)
    async def on_store_error(error: StoreError) -> Response:
        drop_stashed_headers()
        held = store_error_log.ready()  # at most a line a second, however many 503s
        if held is not None:
            log.error("store unavailable: %s (%d more 503s since the last line)", error, held)
        unavailable = APIError(
            503,
            "The rate-limit store is unavailable; please retry shortly.",
            "server_error",
            code="store_unavailable",
        )
        return json_response(_conventions().error_body(unavailable), 503, {"retry-after": "1"})

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        drop_stashed_headers()
        log.exception("unexpected error on %s", _where())
        failed = APIError(500, "The server had an error processing your request.", "server_error")
        return json_response(_conventions().error_body(failed), 500)
