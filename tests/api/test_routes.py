"""Every route of the app and the credential it needs, from one table.

The table below is the app's whole surface: a route the app serves without an entry here
fails :func:`test_every_route_is_in_the_table`, so a new route cannot ship without a
decision about who may call it. Each entry is then checked for real: without
credentials, with a wrong key, with a right one.

Admin: the node's app has no admin HTTP route. Its admin-only part is the usage feed's
all-keys view, which exists only when an admin token is configured (checked in
tests/observe/test_feed_access.py, ``test_no_admin_view_without_an_admin_token``) and
whose token is compared with ``hmac.compare_digest`` (checked here). The admin API is a separate app
on its own listener (tokenguard/admin.py): ``ADMIN_ROUTES`` is its whole surface, every
route needing the admin token (compared with ``hmac.compare_digest``), and every route
refused (403) when no admin token is configured.
"""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from quart.testing.connections import WebsocketDisconnectError

from drivers.memory import MemoryStore
from tokenguard.api import admin as admin_module
from tokenguard.api.admin import create_admin_app
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.limiting.keyring import Keyring
from tokenguard.observe import feed as feed_module

ADMIN = "an-admin-token-of-some-length"
CONFIG: dict[str, Any] = {
    "feed": {"admin_token": ADMIN},
    "keys": [{"key": "sk-route", "name": "route", "rpm": 100}],
}

# (rule, method) -> who may call it:
#   "public": anyone (liveness, readiness, metrics, the dashboard's static files);
#   "key":    an API key, as a Bearer token (401 otherwise);
#   "anthropic-key": an API key in x-api-key (or as a Bearer token), with an
#             anthropic-version header (401 in Anthropic's shape otherwise);
#   "feed":   websocket; an API key (its own events) or the admin token (every key),
#             in the Authorization header or a first message; refused with 1008.
ROUTES = {
    ("/v1/chat/completions", "POST"): "key",
    ("/v1/usage", "GET"): "key",
    ("/v1/models", "GET"): "key",
    ("/v1/completions", "POST"): "key",
    ("/v1/embeddings", "POST"): "key",
    ("/v1/messages", "POST"): "anthropic-key",
    ("/v1/messages/count_tokens", "POST"): "anthropic-key",
    ("/v1/responses", "POST"): "key",
    ("/v1/responses/input_tokens", "POST"): "key",
    ("/v1/responses/<response_id>", "GET"): "key",
    ("/v1/responses/<response_id>", "DELETE"): "key",
    ("/v1/responses/<response_id>/input_items", "GET"): "key",
    ("/v1/models/<path:model_id>", "GET"): "key",
    ("/v1/usage/stream", "GET"): "feed",
    ("/healthz", "GET"): "public",
    ("/readyz", "GET"): "public",
    # Open unless [metrics] token is set (then a bearer token:
    # tests/observe/test_metrics_counters.py).
    ("/metrics", "GET"): "public",
    ("/dashboard", "GET"): "public",
    ("/dashboard/<name>", "GET"): "public",
    ("/static/<path:filename>", "GET"): "public",
}
EXAMPLES = {
    "/v1/responses/<response_id>": "/v1/responses/resp_unknown",
    "/v1/responses/<response_id>/input_items": "/v1/responses/resp_unknown/input_items",
    "/v1/models/<path:model_id>": "/v1/models/gpt-4o",
    "/dashboard/<name>": "/dashboard/dashboard.js",
    "/static/<path:filename>": "/static/dashboard.js",
}


@pytest.fixture
def app():  # type: ignore[no-untyped-def]
    return create_app(parse_settings(CONFIG, "<test>", environ={}), MemoryStore())


def served(app: Any) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((rule.rule, method))
    return routes


def test_every_route_is_in_the_table(app: Any) -> None:
    assert served(app) == set(ROUTES)


async def call(client: Any, path: str, method: str, headers: dict[str, str]) -> Any:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if path in ("/v1/completions", "/v1/embeddings"):
        body = {"model": "gpt-4o", "prompt" if path == "/v1/completions" else "input": "hi"}
    if path.startswith("/v1/responses"):
        body = {"model": "gpt-4o", "input": "hi"}
    if method == "POST":
        return await client.post(path, json=body, headers=headers)
    if method == "DELETE":
        return await client.delete(path, headers=headers)
    return await client.get(path, headers=headers)


@pytest.mark.parametrize(("route", "method"), sorted(k for k, v in ROUTES.items() if v == "key"))
async def test_key_routes_need_a_key(app: Any, route: str, method: str) -> None:
    client = app.test_client()
    path = EXAMPLES.get(route, route)
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Bearer {ADMIN}"}):
        answer = await call(client, path, method, headers)
        assert answer.status_code == 401, (route, headers)
        assert (await answer.get_json())["error"]["code"] == "invalid_api_key"
    answer = await call(client, path, method, {"Authorization": "Bearer sk-route"})
    # (a response id nobody made is not found, once the key is known)
    assert answer.status_code == (404 if "<response_id>" in route else 200)


@pytest.mark.parametrize(
    ("route", "method"), sorted(k for k, v in ROUTES.items() if v == "anthropic-key")
)
async def test_anthropic_routes_need_a_key(app: Any, route: str, method: str) -> None:
    client = app.test_client()
    body = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    version = {"anthropic-version": "2023-06-01"}
    for headers in ({}, {"x-api-key": "sk-wrong"}, {"x-api-key": ADMIN}):
        answer = await client.post(route, json=body, headers={**version, **headers})
        assert answer.status_code == 401, (route, headers)
        assert (await answer.get_json())["error"]["type"] == "authentication_error"
    answer = await client.post(route, json=body, headers={**version, "x-api-key": "sk-route"})
    assert answer.status_code == 200


@pytest.mark.parametrize(("route", "method"), sorted(k for k, v in ROUTES.items() if v == "public"))
async def test_public_routes_need_nothing_and_reveal_nothing(
    app: Any, route: str, method: str
) -> None:
    answer = await call(app.test_client(), EXAMPLES.get(route, route), method, {})
    assert answer.status_code == 200
    text = (await answer.get_data()).decode()
    assert "sk-route" not in text and ADMIN not in text


async def test_static_files_are_only_the_dashboard(app: Any) -> None:
    client = app.test_client()
    assert (await client.get("/static/dashboard.js")).status_code == 200
    for path in ("/static/../settings.py", "/static/%2e%2e/settings.py", "/static/nope"):
        assert (await client.get(path)).status_code == 404, path


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic x"}]
)
async def test_the_feed_refuses_without_a_valid_token(app: Any, headers: dict[str, str]) -> None:
    client = app.test_client()
    codes: list[int] = []
    try:
        async with client.websocket("/v1/usage/stream", headers=headers) as ws:
            if not headers:
                await ws.send("not an auth message")
            message = await ws.receive()
            raise AssertionError(f"got {message!r} before the close")
    except* WebsocketDisconnectError as group:
        codes += [exc.args[0] for exc in group.exceptions]
    assert codes == [1008]


def spy_on_compare_digest(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[tuple[str, str]]:
    """The pairs ``module`` passes to ``hmac.compare_digest`` from now on (still compared)."""
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(module.hmac, "compare_digest", spy)
    return compared


def test_the_admin_token_is_compared_in_constant_time(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared = spy_on_compare_digest(monkeypatch, feed_module)
    feed = app.extensions["tokenguard"].feed
    assert feed.viewer_for(ADMIN, None).role == "admin"
    assert feed.viewer_for("not-the-admin-token", None) == "invalid token"
    assert len(compared) == 2


# --- the admin API (its own app, on its own listener) -----------------------------------

# (rule, method) -> "admin": the admin token, as a Bearer token (401 otherwise; 403 for
# everyone when no admin token is configured).
ADMIN_ROUTES = {
    ("/admin/keys", "GET"): "admin",
    ("/admin/keys", "POST"): "admin",
    ("/admin/keys/<path:name>", "GET"): "admin",
    ("/admin/keys/<path:name>", "PATCH"): "admin",
    ("/admin/keys/<path:name>", "DELETE"): "admin",
    ("/admin/tiers", "GET"): "admin",
    ("/admin/tiers/<path:name>", "GET"): "admin",
    ("/admin/tiers/<path:name>", "PUT"): "admin",
}
ADMIN_EXAMPLES = {
    "/admin/keys/<path:name>": "/admin/keys/route",
    "/admin/tiers/<path:name>": "/admin/tiers/none-yet",
}


def admin_app_for(config: dict[str, Any]) -> Any:
    settings = parse_settings(config, "<test>", environ={})
    store = MemoryStore()
    limiter = create_app(settings, store).extensions["tokenguard"].limiter
    return create_admin_app(settings, store, Keyring(settings, store), limiter)


@pytest.fixture
def admin_app():  # type: ignore[no-untyped-def]
    return admin_app_for(CONFIG)


def test_every_admin_route_is_in_the_table(admin_app: Any) -> None:
    assert served(admin_app) == set(ADMIN_ROUTES)


async def admin_call(client: Any, path: str, method: str, headers: dict[str, str]) -> Any:
    return await client.open(path, method=method, json={"rpm": 1}, headers=headers)


@pytest.mark.parametrize(("route", "method"), sorted(ADMIN_ROUTES))
async def test_admin_routes_need_the_admin_token(admin_app: Any, route: str, method: str) -> None:
    client = admin_app.test_client()
    path = ADMIN_EXAMPLES.get(route, route)
    for headers in ({}, {"Authorization": "Bearer sk-route"}, {"Authorization": "Bearer x"}):
        answer = await admin_call(client, path, method, headers)
        assert answer.status_code == 401, (route, headers)
        assert (await answer.get_json())["error"]["code"] == "invalid_admin_token"
    answer = await admin_call(client, path, method, {"Authorization": f"Bearer {ADMIN}"})
    assert answer.status_code not in (401, 403), (route, await answer.get_data())


@pytest.mark.parametrize(("route", "method"), sorted(ADMIN_ROUTES))
async def test_admin_routes_are_off_without_an_admin_token(route: str, method: str) -> None:
    client = admin_app_for({"keys": CONFIG["keys"]}).test_client()
    path = ADMIN_EXAMPLES.get(route, route)
    for headers in ({}, {"Authorization": "Bearer sk-route"}, {"Authorization": f"Bearer {ADMIN}"}):
        answer = await admin_call(client, path, method, headers)
        assert answer.status_code == 403, (route, headers)
        assert (await answer.get_json())["error"]["code"] == "admin_disabled"


async def test_the_admin_api_compares_its_token_in_constant_time(
    admin_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared = spy_on_compare_digest(monkeypatch, admin_module)
    client = admin_app.test_client()
    ok = await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    bad = await client.get("/admin/keys", headers={"Authorization": "Bearer nope"})
    missing = await client.get("/admin/keys")
    assert (ok.status_code, bad.status_code, missing.status_code) == (200, 401, 401)
    assert len(compared) == 3  # every attempt, even one with no token at all
