"""Chat requests to real nodes, load against them, and their answers checked.

:func:`chat` posts one chat completion; :func:`load_forever` keeps clients sending to
each node in turn, recording every :class:`Answer` (its node, status, time, body and
``retry-after``); :func:`wait_ready` waits for ``/readyz``; :func:`assert_openai_429`
and :func:`assert_openai_error` check OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import trio

MODEL = "gpt-4o"


async def chat(
    client: httpx.AsyncClient, url: str, key: str, content: str = "hi", **extra: Any
) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return await client.post(
        f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert_openai_error_body(response.json(), code)


def assert_openai_error_body(body: Any, code: str | None = None) -> None:
    """``body`` is OpenAI's error shape (and its code ``code``, if given)."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body


async def readyz(client: httpx.AsyncClient, url: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(f"{url}/readyz")
    return response.status_code, response.json()


async def wait_ready(client: httpx.AsyncClient, urls: list[str]) -> None:
    """Wait until every node's /readyz answers 200 (the caller bounds the wait)."""
    for url in urls:
        while (await readyz(client, url))[0] != 200:  # noqa: ASYNC110 (polling HTTP)
            await trio.sleep(0.02)


# --- real processes: Redis killed or hung under load ---------------------------------------


@attrs.define
class Answer:
    at: float
    node: int
    status: int  # -1: no HTTP answer at all
    seconds: float
    body: dict[str, Any] | None = None
    retry_after: str | None = None


def assert_openai_429(answer: Answer) -> None:
    """A refused answer in OpenAI's shape, ``rate_limit_exceeded``, with a retry-after."""
    assert_openai_error_body(answer.body, "rate_limit_exceeded")
    assert answer.retry_after is not None and int(answer.retry_after) >= 1, answer


async def load_forever(
    urls: list[str], key: str, answers: list[Answer], clients: int, pause: float
) -> None:
    """``clients`` tasks, each sending one request to the next node, then pausing."""

    async def one(start: int) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            i = start
            while True:
                node = i % len(urls)
                i += 1
                began = trio.current_time()
                try:
                    response = await chat(client, urls[node], key, max_tokens=5)
                except httpx.TransportError:
                    answers.append(Answer(began, node, -1, trio.current_time() - began))
                else:
                    body = response.json() if response.status_code != 200 else None
                    answers.append(
                        Answer(
                            began,
                            node,
                            response.status_code,
                            trio.current_time() - began,
                            body,
                            response.headers.get("retry-after"),
                        )
                    )
                await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        for c in range(clients):
            nursery.start_soon(one, c)
