"""The request log: one structured line per request, and nothing secret in any line.

What is shown, on a real node process (``tokenguard serve --log-format json``) driven by
the official ``openai`` SDK: each request is one JSON line with its node, method, path,
status, key name, model, tokens (input, output reserved, output settled: a stream's
once it ended), latency and rate-limit decision; a 429 says which dimension refused;
probes are not logged; and neither the API key, nor a wrong one, nor a word of the
prompt appears anywhere in the node's output. In one process: the text format quotes
what a client chose (a model name cannot forge a line), and ``--log-format`` reaches
the nodes of a cluster.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.processes import (
    START_TIMEOUT,
    free_ports,
    running_tokenguard,
    wait_healthy,
    write_config,
)
from tokenguard.api.app import create_app
from tokenguard.cli import main as cli
from tokenguard.cli import serve
from tokenguard.config.loading import parse_settings
from tokenguard.observe.logs import JsonFormatter, RequestLine, TextFormatter

SECRET = "sk-log-test-0123456789-secret"
WRONG = "sk-log-test-wrong-key-987654"
PROMPT_WORD = "Zanzibarquokka"  # a word no log line may ever contain
MESSAGES = [{"role": "user", "content": f"Tell me about the {PROMPT_WORD} please"}]
FIELDS = {
    "ts",
    "level",
    "logger",
    "node",
    "event",
    "method",
    "path",
    "status",
    "key",
    "model",
    "input_tokens",
    "output_reserved",
    "output_settled",
    "latency_ms",
    "decision",
    "surface",
    "request_id",
}
CHAT = "/v1/chat/completions"


def request_lines(output: str) -> list[dict[str, Any]]:
    """The node's JSON request lines, in order."""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


@pytest.mark.slow
async def test_a_json_line_per_request_with_its_fields_and_no_secret(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "tokenguard.toml",
        f'[[keys]]\nkey = "{SECRET}"\nname = "logger"\nrpm = 3\noutput_tpm = 10000\n',
    )
    port = free_ports()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--config", str(config), "--port", str(port), "--log-format", "json"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=SECRET, max_retries=0, timeout=10)

    def plain() -> Any:
        return client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)

    def streamed() -> Any:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk.usage for chunk in stream if chunk.usage][-1]

    async with running_tokenguard(args, output_path=tmp_path / "node.out") as proc:
        with trio.fail_after(START_TIMEOUT + 30):
            await wait_healthy(url)
            completion = await trio.to_thread.run_sync(plain)
            usage = await trio.to_thread.run_sync(streamed)
            await trio.to_thread.run_sync(plain)
            with pytest.raises(openai.RateLimitError):
                await trio.to_thread.run_sync(plain)
            async with httpx.AsyncClient(base_url=url) as http:
                wrong = {"Authorization": f"Bearer {WRONG}"}
                body = {"model": "gpt-4o", "messages": MESSAGES}
                assert (await http.post(CHAT, json=body, headers=wrong)).status_code == 401
                assert (await http.get("/healthz")).status_code == 200
                assert (await http.get("/metrics")).status_code == 200
            # Each line is written once its response has ended: just after the client
            # has it.
            while len(request_lines(proc.output())) < 5:  # noqa: ASYNC110
                await trio.sleep(0.05)
        output = proc.output()

    lines = request_lines(output)
    assert [(line["status"], line["decision"]) for line in lines] == [
        (200, "admitted"),
        (200, "admitted"),
        (200, "admitted"),
        (429, "rejected:requests"),
        (401, None),
    ]  # and no line for /healthz or /metrics
    for line in lines:
        assert set(line) == FIELDS
        assert (line["node"], line["method"], line["path"]) == (0, "POST", CHAT)
        assert line["level"] == "info" and line["logger"] == "tokenguard.requests"
        assert line["ts"].endswith("Z") and line["latency_ms"] > 0
    first, stream, _, refused, unknown = lines
    assert first["key"] == "logger" and first["model"] == "gpt-4o"
    # Every answer has an x-request-id, the SDK's _request_id, in its line too.
    assert first["request_id"] == completion._request_id
    assert all(line["request_id"].startswith("req_") for line in lines)
    assert len({line["request_id"] for line in lines}) == len(lines)
    assert all(line["surface"] == "chat" for line in lines)
    assert first["input_tokens"] == completion.usage.prompt_tokens
    assert first["output_reserved"] == 7
    assert first["output_settled"] == completion.usage.completion_tokens
    # A stream's line comes at its end, with what was settled.
    assert stream["input_tokens"] == usage.prompt_tokens
    assert (stream["output_reserved"], stream["output_settled"]) == (5, usage.completion_tokens)
    assert refused["key"] == "logger" and refused["output_settled"] is None
    assert refused["input_tokens"] == completion.usage.prompt_tokens
    assert unknown["key"] is None and unknown["model"] is None
    # The node's other lines are JSON too.
    starts = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any("listening on" in line.get("message", "") for line in starts)
    # Never a key, a wrong key, the Authorization header or the prompt.
    for secret in (SECRET, WRONG, PROMPT_WORD, "Bearer"):
        assert secret not in output


async def test_the_text_format_quotes_what_a_client_chose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = {"keys": [{"key": SECRET, "name": "texter", "rpm": 100}]}
    client = create_app(parse_settings(config, "<test>", environ={}), MemoryStore()).test_client()
    model = 'gpt-4o" status=200\n2026-01-01 forged line'
    with caplog.at_level(logging.INFO, logger="tokenguard.requests"):
        body = {"model": model, "messages": MESSAGES, "max_tokens": 3}
        headers = {"Authorization": f"Bearer {SECRET}"}
        answer = await client.post(CHAT, json=body, headers=headers)
        assert answer.status_code == 200
    (record,) = [r for r in caplog.records if r.name == "tokenguard.requests"]
    text = record.getMessage()
    assert "\n" not in text
    assert text.startswith(f"POST {CHAT} 200 key=texter model={json.dumps(model)} ")
    assert "decision=admitted" in text and "output_settled=3" in text
    assert SECRET not in text and PROMPT_WORD not in text
    # The same record as JSON: the model as it was sent, in one line.
    line = JsonFormatter(node=4).format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["model"] == model and parsed["node"] == 4 and parsed["key"] == "texter"


def test_request_line_text_and_long_values() -> None:
    fields = {"method": "GET", "path": "/v1/usage", "status": 200, "key": None, "n": 1.5}
    assert str(RequestLine(fields)) == "GET /v1/usage 200 key=- n=1.5"
    config = {"keys": [{"key": SECRET, "name": "k"}]}
    gateway = create_app(parse_settings(config, "<t>", environ={}), MemoryStore()).extensions[
        "tokenguard"
    ]
    record = gateway.request_log.current()  # outside a request: a detached record
    record.path = "/" + "x" * 1000
    assert len(record.fields()["path"]) == 203


def test_json_formatter_other_records_and_tracebacks() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "tokenguard.api.app", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    line = json.loads(JsonFormatter(None).format(record))
    assert line["message"] == "failed x" and line["level"] == "error" and line["node"] is None
    assert "ValueError: boom" in line["exc"] and "event" not in line


def test_log_format_reaches_the_nodes_of_a_cluster(tmp_path: Path) -> None:
    parser = cli.build_parser()
    base = ["serve", "--nodes", "2", "--state-dir", str(tmp_path)]
    json_args = serve._cluster(parser.parse_args([*base, "--log-format", "json"])).node_args
    assert json_args[json_args.index("--log-format") + 1] == "json"
    assert "--log-format" not in serve._cluster(parser.parse_args(base)).node_args  # text
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--log-format", "xml"])


def test_the_text_format_is_loggings_own_with_a_cached_second() -> None:
    fmt = "%(asctime)s node-1 %(name)s %(levelname)s %(message)s"
    record = logging.LogRecord(
        "tokenguard.cluster.node", logging.INFO, "", 0, "up on %s", ("x",), None
    )
    assert TextFormatter("node-1 ").format(record) == logging.Formatter(fmt).format(record)
    later = logging.LogRecord("tokenguard.cluster.node", logging.INFO, "", 0, "again", None, None)
    later.created, later.msecs = record.created + 1.25, 250.0
    assert TextFormatter("node-1 ").format(later) == logging.Formatter(fmt).format(later)
