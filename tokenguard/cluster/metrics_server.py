"""The supervisor's metrics (``serve --nodes N --metrics-port P``) and the tiny HTTP
server that answers their scrapes.

:class:`SupervisorCollector` reads the supervisor's children when scraped: each node's
up/down and restarts, and the embedded Redis's. :func:`serve_metrics` is a raw HTTP/1.1
responder on trio (no thread, unlike ``prometheus_client.start_http_server``) for
``GET /metrics`` only, one response per connection; with a token configured, a scrape
must send it as a bearer token (:func:`tokenguard.bearer.bearer_matches`). Every metric
is documented in ``docs/metrics.md``; a node serves its own on its API port
(:mod:`tokenguard.observe.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenguard.bearer import bearer_matches

if TYPE_CHECKING:
    from tokenguard.cluster.supervisor import Supervisor


class SupervisorCollector(Collector):
    """The supervisor's children, read when scraped: node restarts and up/down, and the
    embedded Redis's (when there is one)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "tokenguard_supervisor_node_up",
            "1 while the node passes its health probes, else 0.",
            labels=["node"],
        )
        restarts = CounterMetricFamily(
            "tokenguard_supervisor_node_restarts",
            "Times the supervisor restarted the node (it exited or failed its probes).",
            labels=["node"],
        )
        for node_id, child in enumerate(self.supervisor.node_children):
            up.add_metric([str(node_id)], 1 if child.healthy else 0)
            restarts.add_metric([str(node_id)], child.restarts)
        yield up
        yield restarts
        yield GaugeMetricFamily(
            "tokenguard_supervisor_nodes", "Node processes supervised.", value=self.supervisor.nodes
        )
        redis = self.supervisor.redis_child
        if redis is not None:
            yield GaugeMetricFamily(
                "tokenguard_supervisor_redis_up",
                "1 while the embedded redis-server answers PING, else 0.",
                value=1 if redis.healthy else 0,
            )
            yield CounterMetricFamily(
                "tokenguard_supervisor_redis_restarts",
                "Times the supervisor restarted the embedded redis-server.",
                value=redis.restarts,
            )


def supervisor_registry(supervisor: Supervisor) -> CollectorRegistry:
    """A registry holding the supervisor's metrics only."""
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(supervisor))
    return registry


# --- a scrape endpoint without a web framework ---------------------------------------------

MAX_HEAD_BYTES = 16384
SCRAPE_TIMEOUT = 10.0


def _response(status: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


def scrape_response(head: bytes, registry: CollectorRegistry, token_digest: str | None) -> bytes:
    """The whole HTTP response to one request head (request line and headers)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    plain = "text/plain; charset=utf-8"
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n", plain)
    method, target = parts[0], parts[1].split("?", 1)[0]
    if target != "/metrics":
        return _response("404 Not Found", b"only /metrics is served here\n", plain)
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET /metrics\n", plain, "allow: GET\r\n")
    authorization = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "authorization":
            authorization = value
    if not bearer_matches(authorization, token_digest):
        return _response(
            "401 Unauthorized",
            b"a metrics token is required: Authorization: Bearer <[metrics] token>\n",
            plain,
            'www-authenticate: Bearer realm="tokenguard metrics"\r\n',
        )
    body = generate_latest(registry)
    response = _response("200 OK", body, CONTENT_TYPE_LATEST)
    return response[: len(response) - len(body)] if method == "HEAD" else response


async def _answer_scrape(
    stream: trio.SocketStream, registry: CollectorRegistry, token_digest: str | None
) -> None:
    async with stream:
        with trio.move_on_after(SCRAPE_TIMEOUT):
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    if len(head) > MAX_HEAD_BYTES:
                        return
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
                response = scrape_response(head.split(b"\r\n\r\n", 1)[0], registry, token_digest)
                await stream.send_all(response)
            except (OSError, trio.BrokenResourceError):
                return


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    token_digest: str | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` from ``registry`` on ``host:port`` until cancelled;
    ``task_status.started(port)`` once listening (the real port when asked for 0).

    With ``token_digest``, a scrape must send ``Authorization: Bearer <token>`` (401
    otherwise). Each connection gets one response and is closed; a client that sends
    no complete request head within ``SCRAPE_TIMEOUT`` seconds is dropped. Raises
    ``OSError`` if the address cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _answer_scrape(stream, registry, token_digest)

    task_status.started(bound)
    await trio.serve_listeners(handler, listeners)
