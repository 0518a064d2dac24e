"""One request of a load run, sent and read (:func:`send_one`), and the seeded
choices that plan it."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import attrs
import httpx
import trio

from bench.load.options import KEPT_HEADERS, PROMPT_OVERHEAD, SURFACE_PATHS, SURFACES, LoadOptions
from bench.load.records import Plan, RequestRecord, error_kind
from tokenguard.upstreams.mock import WORDS


def make_prompt(rng: random.Random, tokens: int) -> str:
    """Words that are one token each (the mock's own), so the count is about ``tokens``."""
    words = max(1, tokens - PROMPT_OVERHEAD)
    return "".join(rng.choices(WORDS, k=words)).lstrip()


def output_reservation(plan: Plan) -> int | None:
    """The output tokens the server reserves for a plan, as ``Pipeline.output_reservation``
    computes them (n is always 1 here); ``None`` when the key's limits are unknown."""
    if plan.max_tokens is not None:
        return plan.max_tokens
    limits = plan.key.limits
    if limits is None:
        return None
    per_choice = limits.default_max_tokens
    if limits.output_tpm is not None:
        per_choice = max(1, min(per_choice, limits.output_tpm))
    return per_choice


class Planner:
    """Draws plans in request order from one seeded generator."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.issued = 0

    def next(self) -> Plan:
        o, rng = self.options, self.rng
        key = rng.choice(o.keys)
        url = rng.choice(o.urls)
        prompt_tokens = o.prompt_tokens.draw(rng)
        max_tokens = None if o.max_tokens is None else o.max_tokens.draw(rng)
        stream = rng.random() < o.stream_share
        surfaces = SURFACES[o.surface]
        # (drawn only for a mix: a run of one surface draws as it always did)
        surface = rng.choice(surfaces) if len(surfaces) > 1 else surfaces[0]
        prompt = make_prompt(rng, prompt_tokens)
        body: dict[str, Any] = {"model": o.model}
        if surface == "responses":
            # a string input is counted as chat's one-message prompt
            body["input"] = prompt
            if max_tokens is not None:
                body["max_output_tokens"] = max_tokens
            if stream:
                body["stream"] = True  # the usage comes in the terminal event
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
        plan = Plan(
            id=self.issued,
            key=key,
            url=url,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            stream=stream,
            body=json.dumps(body, separators=(",", ":")).encode(),
            surface=surface,
        )
        self.issued += 1
        return plan


def _read_usage(data: Any) -> tuple[int | None, int | None]:
    """(input, output tokens) of a chat or Responses ``usage`` block."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None, None
    if "input_tokens" in usage:
        return usage.get("input_tokens"), usage.get("output_tokens")
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _error_message(body: bytes) -> str | None:
    """The ``error.message`` of an OpenAI error body, if it is one."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


async def _read_stream(response: httpx.Response) -> tuple[int | None, int | None, int, bool]:
    """Parse SSE until ``[DONE]`` (chat) or a terminal event (Responses): (prompt,
    completion tokens, content chunks, done)."""
    prompt = completion = None
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return prompt, completion, chunks, True
        event = json.loads(payload)
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "response.output_text.delta":
            chunks += 1
        elif kind in RESPONSES_TERMINAL:  # a Responses stream ends here, no [DONE]
            prompt, completion = _read_usage(event.get("response"))
            return prompt, completion, chunks, True
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
        if event.get("usage"):
            prompt, completion = _read_usage(event)
    return prompt, completion, chunks, False


@attrs.define
class _Outcome:
    """What one request got so far: kept as it arrives, so a request cut by its deadline
    still records when it was answered, its status and its headers."""

    answered: float | None = None
    status: int | None = None
    error: str | None = None
    prompt: int | None = None
    completion: int | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    message: str | None = None
    chunks: int = 0


async def _exchange(client: httpx.AsyncClient, plan: Plan, outcome: _Outcome) -> None:
    """Send ``plan``'s request and read its answer into ``outcome``: its usage (a
    stream's from its chunks), or the error message of a refusal. Raises what httpx
    raises, and ``json.JSONDecodeError``/``UnicodeDecodeError`` for a body that is not
    JSON."""
    request_headers = {
        "authorization": f"Bearer {plan.key.secret}",
        "content-type": "application/json",
    }
    async with client.stream(
        "POST",
        f"{plan.url}{SURFACE_PATHS[plan.surface]}",
        content=plan.body,
        headers=request_headers,
    ) as response:
        outcome.answered = time.monotonic()
        status = outcome.status = response.status_code
        outcome.headers = {k: v for k, v in response.headers.items() if k.startswith(KEPT_HEADERS)}
        if plan.stream and status == 200:
            outcome.prompt, outcome.completion, outcome.chunks, done = await _read_stream(response)
            if not done or outcome.completion is None:
                outcome.error = "incomplete stream"
        elif status == 200:
            outcome.prompt, outcome.completion = _read_usage(json.loads(await response.aread()))
            if outcome.completion is None:
                outcome.error = "bad response: no usage"
        else:
            outcome.message = _error_message(await response.aread())


async def send_one(client: httpx.AsyncClient, plan: Plan, deadline: float) -> RequestRecord:
    """Send one planned request and record what happened; never raises for I/O."""
    start_wall, start = time.time(), time.monotonic()
    outcome = _Outcome()
    try:
        with trio.move_on_after(deadline) as scope:
            await _exchange(client, plan, outcome)
        if scope.cancelled_caught:
            outcome.error = "timeout"
    except httpx.HTTPError as exc:
        outcome.error = error_kind(exc)
    except (json.JSONDecodeError, UnicodeDecodeError):
        outcome.error = "bad response: not JSON"
    end = time.monotonic()
    status, error, completion = outcome.status, outcome.error, outcome.completion
    if error is None and status is not None and status not in (200, 429):
        error = f"{status // 100}xx: {status}"
    if completion is None and status == 200 and plan.stream:
        completion = outcome.chunks or None  # what arrived: a lower bound of what was charged
    return RequestRecord(
        id=plan.id,
        key=plan.key.name,
        url=plan.url,
        streamed=plan.stream,
        planned_prompt_tokens=plan.prompt_tokens,
        max_tokens=plan.max_tokens,
        start_wall=start_wall,
        start=start,
        answered=end if outcome.answered is None else outcome.answered,
        end=end,
        status=status,
        error=error,
        input_tokens=outcome.prompt,
        output_tokens=completion,
        headers=outcome.headers,
        message=outcome.message,
        reserved_output=output_reservation(plan),
        surface=plan.surface,
    )
