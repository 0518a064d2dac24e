"""Real proxy nodes for the tests: tokenguard in front of an OpenAI-compatible upstream.

:func:`node` runs one ``tokenguard serve`` and yields its URL and process;
:func:`proxy_node` runs one of :func:`proxy_config` (three exact models routed to a
``base_url``, the key :data:`PROXY_KEY`), given the upstream's credential
:data:`UPSTREAM_SECRET` through :data:`SECRET_ENV`; :func:`upstream_config` is a mock
node that accepts that credential. :func:`used` reads the proxy key's usage,
:func:`sdk` is the official openai client of a node, :func:`settings_of` parses a
config's TOML text.
"""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import trio

from tests.support.metrics_samples import node_metric
from tests.support.processes import free_ports, running_tokenguard, wait_healthy, write_config
from tokenguard.config.loading import parse_settings

UPSTREAM_SECRET = "sk-upstream-credential-4242"
SECRET_ENV = "TG_TEST_UPSTREAM_KEY"
PROXY_KEY = "sk-proxy-client"
DEFAULT_MAX_TOKENS = 50
MESSAGES = [{"role": "user", "content": "Tell me about rate limits, through a proxy"}]


def upstream_config(token_delay_ms: float = 0) -> str:
    return f"""
[mock]
token_delay_ms = {token_delay_ms}

[[keys]]
key = "{UPSTREAM_SECRET}"
name = "proxy-node"
rpm = 100000
"""


def proxy_config(
    base_url: str,
    *,
    read_timeout: float = 10,
    extra: str = "",
    default: bool = True,
    route_extra: str = "",
) -> str:
    """A proxy node's config: three exact models routed to ``base_url`` (through the
    default route, or each on its own with ``default=False``: other models get 404);
    ``route_extra``: more fields of that route."""
    route = f"""base_url = "{base_url}"
api_key_env = "{SECRET_ENV}"
connect_timeout = 2
read_timeout = {read_timeout}
{route_extra}
"""
    models = ("gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
    tables = "".join(f'[upstream.models."{m}"]\n' + ("" if default else route) for m in models)
    return f"""
[upstream]
{route if default else ""}
{tables}
{extra}

[[keys]]
key = "{PROXY_KEY}"
name = "client"
rpm = 50
input_tpm = 100000
output_tpm = 100000
default_max_tokens = {DEFAULT_MAX_TOKENS}
"""


@contextlib.asynccontextmanager
async def node(
    workdir: Path, name: str, config: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """A real ``tokenguard serve`` node; yields its URL and process."""
    path = write_config(workdir / f"{name}.toml", config)
    port = free_ports()
    args = ["serve", "--config", str(path), "--port", str(port)]
    async with running_tokenguard(args, output_path=workdir / f"{name}.out", env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(20):
            await wait_healthy(url)
        yield url, proc


def proxy_node(workdir: Path, base_url: str, **kwargs: Any) -> Any:
    return node(workdir, "proxy", proxy_config(base_url, **kwargs), {SECRET_ENV: UPSTREAM_SECRET})


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)


async def used(url: str) -> dict[str, int]:
    """The proxy key's used amount per dimension, from the proxy's /v1/usage."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            f"{url}/v1/usage", headers={"Authorization": f"Bearer {PROXY_KEY}"}
        )
    assert response.status_code == 200
    return {name: d["used"] for name, d in response.json()["dimensions"].items() if d}


async def texts_counted(client: httpx.AsyncClient, url: str) -> float:
    """How many long texts the node has counted with tiktoken (its token-count cache's
    misses, from /metrics)."""
    return await node_metric(client, url, "tokenguard_token_count_cache_misses_total")


def in_thread(fn: Any) -> Any:
    return trio.to_thread.run_sync(fn)


# --- configuration ----------------------------------------------------------------------


def settings_of(text: str, environ: dict[str, str] | None = None) -> Any:
    return parse_settings(tomllib.loads(text), "proxy.toml", environ or {})
