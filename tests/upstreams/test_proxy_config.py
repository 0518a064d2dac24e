"""Proxy mode's configuration: ``[upstream]`` routes, what they inherit, and their errors.

Each route's stream and failure policies default and are inherited; every config error
names the file and the key.
"""

from __future__ import annotations

import pytest

from tests.support.proxy_nodes import (
    settings_of,
)
from tokenguard.config.settings import ConfigError


def test_upstream_routes_and_inheritance() -> None:
    settings = settings_of(
        """
[upstream]
base_url = "https://api.example.com/v1/"
api_key_env = "MAIN_KEY"
read_timeout = 30

[upstream.models."gpt-4o*"]
connect_timeout = 1

[upstream.models."llama-3"]
base_url = "http://127.0.0.1:8080/v1"
""",
        {"MAIN_KEY": "sk-main-secret"},
    )
    upstream = settings.upstream
    assert upstream.enabled
    mini = upstream.route("gpt-4o-mini")
    assert (mini.pattern, mini.base_url, mini.connect_timeout, mini.read_timeout) == (
        "gpt-4o*",
        "https://api.example.com/v1",
        1.0,
        30.0,
    )
    assert mini.api_key == "sk-main-secret"
    # Another server: the default's credential is not sent there.
    llama = upstream.route("llama-3")
    assert (llama.base_url, llama.api_key) == ("http://127.0.0.1:8080/v1", None)
    assert upstream.route("anything-else").pattern is None
    assert upstream.model_ids() == ("llama-3",)
    assert "sk-main-secret" not in repr(settings)
    assert not settings_of("").upstream.enabled


def test_a_routes_stream_and_failure_policies_default_and_are_inherited() -> None:
    settings = settings_of(
        """
[upstream]
base_url = "https://api.example.com/v1"
client_idle_timeout = 5
on_client_gone = "drain"
key_share = 0.5

[upstream.models."llama-*"]
base_url = "http://127.0.0.1:8080/v1"
on_upstream_error = "refund"
"""
    )
    upstream = settings.upstream
    default, llama = upstream.route("gpt-4o"), upstream.route("llama-3")
    assert (default.client_idle_timeout, default.on_client_gone, default.on_upstream_error) == (
        5.0,
        "drain",
        "keep",
    )
    # Another server, yet the same policies unless it sets its own.
    assert (llama.client_idle_timeout, llama.on_client_gone, llama.on_upstream_error) == (
        5.0,
        "drain",
        "refund",
    )
    assert (upstream.max_connections, upstream.key_share) == (100, 0.5)
    bare = settings_of('[upstream]\nbase_url = "https://x/v1"').upstream
    route = bare.route("m")
    assert (route.client_idle_timeout, route.on_client_gone, route.on_upstream_error) == (
        30.0,
        "cancel",
        "keep",
    )
    assert (bare.key_share, bare.connections_per_key) == (0.25, 25)


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            '[upstream]\nbase_url = "https://x/v1"\napi_key_env = "MISSING_KEY"',
            {},
            "proxy.toml: upstream.api_key_env: the environment variable $MISSING_KEY is not set",
        ),
        (
            '[upstream]\nbase_url = "ftp://x/v1"',
            {},
            "proxy.toml: upstream.base_url: must be an http:// or https:// URL",
        ),
        (
            '[upstream]\nbase_url = "https://user:pw@x/v1"',
            {},
            "proxy.toml: upstream.base_url: must not contain a user or password",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nread_timeout = 0',
            {},
            "proxy.toml: upstream.read_timeout: must be more than 0 seconds",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nread_timout = 3',
            {},
            "proxy.toml: upstream.read_timout: unknown key",
        ),
        (
            '[upstream.models."gpt-4o"]\nread_timeout = 3',
            {},
            "proxy.toml: upstream.models.gpt-4o: needs a base_url",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."o3*"]\n'
            'output_limit_field = "max_output"',
            {},
            "proxy.toml: upstream.models.o3*.output_limit_field: must be one of max_tokens, "
            "max_completion_tokens, got 'max_output'",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\napi_key_env = "not a name"',
            {},
            "proxy.toml: upstream.api_key_env: must be an environment variable name",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\non_client_gone = "ignore"',
            {},
            "proxy.toml: upstream.on_client_gone: must be one of cancel, drain, got 'ignore'",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\n'
            'on_upstream_error = "free"',
            {},
            "proxy.toml: upstream.models.m.on_upstream_error: must be one of keep, refund, "
            "got 'free'",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nclient_idle_timeout = 0',
            {},
            "proxy.toml: upstream.client_idle_timeout: must be more than 0 seconds",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nkey_share = 0',
            {},
            "proxy.toml: upstream.key_share: must be more than 0 and at most 1, got 0",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\nkey_share = 1.5',
            {},
            "proxy.toml: upstream.key_share: must be more than 0 and at most 1, got 1.5",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\nkey_share = 0.5',
            {},
            "proxy.toml: upstream.models.m.key_share: unknown key",
        ),
        (
            '[upstream]\nbase_url = "https://x/v1"\n[upstream.models."m"]\nkey = "sk-inline"',
            {},
            "proxy.toml: upstream.models.m.key: unknown key",
        ),
    ],
)
def test_upstream_config_errors_name_file_and_key(
    text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_of(text, environ)
    assert str(caught.value).startswith(message)
