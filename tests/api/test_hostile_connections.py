"""Hostile connections against a real node process: early answers, endless bodies, slow clients.

One ``tokenguard serve`` process serves the module (tests/support/hostile_node.py).
Answers given before the body is read (401, 404) keep a pooled connection usable; a
chunked body is cut off at the byte cap; slow clients (slowloris) are measured against
normal clients' latency, which is printed, never asserted.
"""

from __future__ import annotations

import statistics
import time

import httpx
import trio

from tests.support.hostile_node import MAX_BODY, Node, hostile_node_fixture, requests_used
from tests.support.raw_http import (
    VALID,
    assert_openai_error,
    chat_body,
    let_the_server_finish,
    read_answer,
)

node = hostile_node_fixture()  # its log is checked when the module is done


async def test_early_errors_keep_a_pooled_connection_usable(node: Node) -> None:
    """Answers given before the body is read (401, 404) leave the connection usable for
    the next request: a pooled client (httpx, the openai SDK) neither hangs nor sees
    "server disconnected". Each round races the body's arrival against the answer."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "w " * 35_000}]}
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with trio.fail_after(60):
        async with httpx.AsyncClient(timeout=5, limits=one_connection) as client:
            for _ in range(25):
                answer = await client.post(
                    f"{node.url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": "Bearer sk-not-a-key"},
                )
                assert answer.status_code == 401
                assert answer.json()["error"]["code"] == "invalid_api_key"
                answer = await client.post(
                    f"{node.url}/v1/no/such/route",
                    json=body,
                    headers={"Authorization": "Bearer sk-h"},
                )
                assert answer.status_code == 404
            answer = await client.get(
                f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-h"}
            )
            assert answer.status_code == 200


async def test_an_early_answer_waits_for_the_body_and_keeps_the_connection(node: Node) -> None:
    """A 401 decided from the head alone goes out once the body has arrived (read and
    dropped), so the kept-alive connection serves the next request, twice over. (Were
    it sent at once, hypercorn would close the connection with the body unread.)"""
    body = chat_body()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Authorization: Bearer sk-not-a-key\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        async with stream:
            for _ in range(2):
                await stream.send_all(head)
                await trio.sleep(0.2)  # the app has decided its 401 by now
                await stream.send_all(body)
                answer = await read_answer(stream)
                assert answer.status == 401
                assert answer.json()["error"]["code"] == "invalid_api_key"
            await let_the_server_finish(stream)


async def test_a_chunked_body_is_cut_off_at_the_cap(node: Node) -> None:
    """A chunked body with no length: 413 as soon as it passes the cap, long before it
    ends (it would be 1 MB); nothing consumed."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-h\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"2000\r\n" + b" " * 0x2000 + b"\r\n"  # 8 KiB of JSON whitespace
    sent = 0
    async with httpx.AsyncClient(timeout=10) as client:
        before = await requests_used(client, node.url)
        with trio.fail_after(15):
            stream = await trio.open_tcp_stream("127.0.0.1", node.port)
            async with stream:
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        nonlocal sent
                        await stream.send_all(head)
                        try:
                            while sent < 1024 * 1024:
                                await stream.send_all(piece)
                                sent += 0x2000
                                await trio.sleep(0.002)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass

                    nursery.start_soon(send)
                    answer = await read_answer(stream)
                    nursery.cancel_scope.cancel()
                await let_the_server_finish(stream)
        after = await requests_used(client, node.url)
    assert answer.status == 413
    assert assert_openai_error(answer, "chunked")["code"] == "request_too_large"
    assert sent < 2 * MAX_BODY
    assert after == before


# --- slow clients ------------------------------------------------------------------------


async def median_latency(url: str, samples: int) -> float:
    took = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(samples):
            began = time.perf_counter()
            answer = await client.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": "Bearer sk-h"},
                content=VALID,
            )
            took.append(time.perf_counter() - began)
            assert answer.status_code == 200
    return statistics.median(took)


async def test_slow_clients_do_not_slow_normal_ones(node: Node) -> None:
    """300 slow connections (150 idle, 150 trickling a request head a byte every
    half second, slowloris), all held open: normal clients are still served, every
    one of their requests. Idle and trickling connections are cut after hypercorn's
    keep-alive timeout (75 s; not waited for here). The median latency with and
    without them is printed, not asserted: on a busy machine it moves with the load
    beside the test, not only with the slow clients."""
    with trio.fail_after(60):
        await median_latency(node.url, 10)  # warm up
        before = await median_latency(node.url, 60)
        opened: list[trio.SocketStream] = []
        async with trio.open_nursery() as nursery:

            async def trickle(stream: trio.SocketStream) -> None:
                head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
                await stream.send_all(head)
                while True:
                    await trio.sleep(0.5)
                    await stream.send_all(b"a")

            for i in range(300):
                stream = await trio.open_tcp_stream("127.0.0.1", node.port)
                opened.append(stream)
                if i % 2:
                    nursery.start_soon(trickle, stream)
            await trio.sleep(1.0)
            during = await median_latency(node.url, 60)
            still_open = 0
            for stream in opened:
                with trio.move_on_after(0.001):
                    if await stream.receive_some(1) == b"":
                        continue
                still_open += 1
            nursery.cancel_scope.cancel()
        for stream in opened:
            await stream.aclose()
    print(f"median latency: {before * 1000:.2f} ms alone, {during * 1000:.2f} ms with 300 slow")
    assert still_open == 300  # they were really there, all of them, all along
