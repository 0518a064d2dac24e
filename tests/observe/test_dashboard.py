"""``GET /dashboard``: the static page itself, then the page in a real browser.

The browser test runs Debian's ``chromium`` headless (``--headless --no-sandbox``),
driven over the Chrome DevTools Protocol through a websocket (trio-websocket): it loads
the page from a running node, types the token, sends traffic, and asserts that the
gauges, the chart and the rejections follow; then that the node going away shows as a
connection state. A screenshot is saved as ``test-artifacts/dashboard.png``. Without a
chromium binary the browser test is skipped, saying which package to install.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.support.usage_feed import ADMIN, Node, chat, running_node, settings_for

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TEST_TIMEOUT = 60.0


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with running_node(settings_for()) as running:
        yield running


# --- the page as served -------------------------------------------------------------------


async def test_the_page_is_served_whole_and_loads_nothing_from_elsewhere(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with httpx.AsyncClient(base_url=node.url) as client:
            page = await client.get("/dashboard")
            css = await client.get("/dashboard/dashboard.css")
            js = await client.get("/dashboard/dashboard.js")
            missing = await client.get("/dashboard/../app.py")
            unknown = await client.get("/dashboard/secrets.txt")
    assert page.status_code == css.status_code == js.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert css.headers["content-type"].startswith("text/css")
    assert js.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == unknown.status_code == 404
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "script-src 'self'" in policy  # no inline script, nothing from a CDN
    # Every resource the page names is one of ours.
    resources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert resources and all(r.startswith(("/dashboard/", "data:")) for r in resources)
    # The token is kept in a variable only: never stored, never put in a URL.
    for storage in ("localStorage.", "sessionStorage.", "document.cookie", "indexedDB."):
        assert storage not in js.text
    assert "fetch(" not in js.text and "XMLHttpRequest" not in js.text


# --- the page in a browser ------------------------------------------------------------------


def chromium_binary() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        "no chromium binary found: install Debian's `chromium` package (apt-get install chromium)"
    )


class DevTools:
    """A minimal Chrome DevTools Protocol client over the browser's websocket: commands
    by id, in one flattened session per page; events are kept in ``events``."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    async def read_forever(self) -> None:
        while True:
            try:
                message = json.loads(await self.ws.get_message())
            except ConnectionClosed:
                return  # the browser is being closed
            if "id" in message and message["id"] in self.waiting:
                self.waiting.pop(message["id"]).send_nowait(message)
            else:
                self.events.append(message)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self.waiting[call_id] = send
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        await self.ws.send_message(json.dumps(message))
        reply = await receive.receive()
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, seconds: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy (``TooSlowError`` after ``seconds``);
        return its value."""
        with trio.fail_after(seconds):
            # Polling the page: it has no way to wake us.
            while not (value := await self.evaluate(expression)):  # noqa: ASYNC110
                await trio.sleep(0.05)
        return value

    def errors(self) -> list[dict[str, Any]]:
        """Uncaught exceptions and console/log errors (CSP violations among them)."""
        found = []
        for event in self.events:
            method = event.get("method")
            params = event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(params)
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(params["entry"])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(params)
        return found


@asynccontextmanager
async def headless_chromium(profile: Path) -> AsyncIterator[DevTools]:
    """Chromium, headless, on a free DevTools port; yields a client attached to a new
    blank page. The browser is always stopped at the end (SIGTERM, then SIGKILL)."""
    binary = chromium_binary()
    argv = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        log = b""
        with trio.fail_after(30):
            while (match := re.search(rb"DevTools listening on (ws://\S+)", log)) is None:
                chunk = await process.stderr.receive_some()
                if not chunk:
                    raise RuntimeError(f"chromium exited before listening:\n{log.decode()}")
                log += chunk
        async with trio.open_nursery() as nursery:
            # Keep reading chromium's stderr, so it never blocks on a full pipe.
            async def drain() -> None:
                while await process.stderr.receive_some():  # type: ignore[union-attr]
                    pass

            nursery.start_soon(drain)
            async with open_websocket_url(match.group(1).decode(), max_message_size=2**26) as ws:
                devtools = DevTools(ws)
                nursery.start_soon(devtools.read_forever)
                target = await devtools.call("Target.createTarget", url="about:blank")
                attached = await devtools.call(
                    "Target.attachToTarget", targetId=target["targetId"], flatten=True
                )
                devtools.session = attached["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await devtools.call(f"{domain}.enable")
                yield devtools
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            # SIGTERM first: chromium then ends (and reaps) its own helper processes.
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.wait()


GAUGE = 'document.querySelector(\'.gauge[data-key="{key}"][data-dimension="{dimension}"]\')'


async def open_dashboard(devtools: DevTools, url: str) -> None:
    """Load the node's dashboard page and wait for its sign-in form."""
    await devtools.call("Page.navigate", url=f"{url}/dashboard")
    await devtools.wait_for(
        "document.readyState === 'complete' && !!document.querySelector('#auth')"
    )


async def submit_token(devtools: DevTools, token: str) -> None:
    """Type ``token`` into the sign-in form and submit it, as a user would."""
    await devtools.evaluate(
        f"document.querySelector('#token').value = {json.dumps(token)};"
        "document.querySelector('#auth').requestSubmit(); true"
    )


async def signed_in_as_admin(devtools: DevTools, url: str) -> None:
    """The dashboard open and live on the admin token."""
    await open_dashboard(devtools, url)
    await submit_token(devtools, ADMIN)
    await devtools.wait_for("document.querySelector('#state').dataset.state === 'live'")


async def gauge(devtools: DevTools, key: str, dimension: str) -> tuple[str, str] | None:
    value = await devtools.evaluate(
        f"(() => {{ const g = {GAUGE.format(key=key, dimension=dimension)};"
        " return g ? [g.dataset.used, g.dataset.limit] : null; })()"
    )
    return None if value is None else tuple(value)


def websocket_frames(devtools: DevTools) -> tuple[list[str], list[str]]:
    """The URLs of the websockets the page opened, and the text of every frame it got."""
    urls, frames = [], []
    for event in devtools.events:
        params = event.get("params", {})
        if event.get("method") == "Network.webSocketCreated":
            urls.append(params["url"])
        elif event.get("method") == "Network.webSocketFrameReceived":
            frames.append(params["response"]["payloadData"])
    return urls, frames


async def test_the_dashboard_follows_traffic_in_a_real_browser(node: Node, tmp_path: Path) -> None:
    # The page asks for the batched mode; publishing every 0.5 s (not 20 ms) makes sure
    # the traffic below arrives batched, several events to a message.
    node.feed.publish_seconds = 0.5
    with trio.fail_after(TEST_TIMEOUT):
        async with headless_chromium(tmp_path / "profile") as devtools:
            await open_dashboard(devtools, node.url)
            assert await devtools.evaluate("document.querySelector('#state').dataset.state") == (
                "disconnected"
            )
            # A wrong token: refused, and shown as such.
            await submit_token(devtools, "sk-wrong")
            await devtools.wait_for("document.querySelector('#state').dataset.state === 'refused'")
            assert "invalid token" in await devtools.evaluate(
                "document.querySelector('#state-text').textContent"
            )
            # The admin token, typed in and submitted.
            await submit_token(devtools, ADMIN)
            await devtools.wait_for("document.querySelector('#state').dataset.state === 'live'")
            assert await devtools.evaluate("document.querySelector('#token').value") == ""

            async with httpx.AsyncClient() as client:
                for _ in range(3):
                    assert (
                        await chat(client, node.url, "sk-alpha", max_tokens=40)
                    ).status_code == 200
                await devtools.wait_for(
                    f"{GAUGE.format(key='alpha', dimension='requests')}?.dataset.used === '3'"
                )
                assert await gauge(devtools, "alpha", "requests") == ("3", "1000")
                assert (await chat(client, node.url, "sk-tiny", max_tokens=10)).status_code == 200
                assert (await chat(client, node.url, "sk-tiny", max_tokens=10)).status_code == 429
                usage = (
                    await client.get(
                        f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-alpha"}
                    )
                ).json()["dimensions"]
            # The gauges change with the traffic, and end where the node says usage is.
            await devtools.wait_for(
                "document.querySelectorAll('#rejections tbody tr').length === 1"
            )
            await devtools.wait_for(
                f"{GAUGE.format(key='alpha', dimension='output_tokens')}?.dataset.used === "
                f"'{usage['output_tokens']['used']}'"
            )
            assert await gauge(devtools, "alpha", "input_tokens") == (
                str(usage["input_tokens"]["used"]),
                "1000000",
            )
            assert await gauge(devtools, "tiny", "requests") == ("1", "1")
            assert await gauge(devtools, "tiny", "input_tokens") == ("", "")  # unlimited
            rejection = await devtools.evaluate(
                "[...document.querySelectorAll('#rejections tbody tr td')]"
                ".map(td => td.textContent)"
            )
            assert rejection[1:7] == ["tiny", "gpt-4o", "requests", "1 / 1", "1", rejection[6]]
            assert rejection[6].endswith(" s")
            # The chart has drawn something.
            drawn = await devtools.evaluate(
                "(() => { const c = document.querySelector('.key[data-key=\"alpha\"] canvas');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()"
            )
            assert drawn > 100
            # The token was kept nowhere but in the page's memory.
            assert await devtools.evaluate(
                "localStorage.length === 0 && sessionStorage.length === 0 && document.cookie === ''"
                f" && !document.documentElement.outerHTML.includes({json.dumps(ADMIN)})"
            )
            assert devtools.errors() == []  # no CSP violation, no failed load, no exception
            urls, frames = websocket_frames(devtools)
            assert urls and all(url.endswith("/v1/usage/stream?batch=1") for url in urls)
            assert any("\n" in frame for frame in frames)  # batched, and followed above
            ARTIFACTS.mkdir(exist_ok=True)
            shot = await devtools.call("Page.captureScreenshot", format="png")
            (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))

            # The node goes away: the page says so, and keeps trying.
            node.shutdown.set()
            await devtools.wait_for(
                "document.querySelector('#state').dataset.state === 'reconnecting'"
            )


SPEND_CONFIG: dict[str, Any] = {
    "feed": {"admin_token": ADMIN},
    "prices": {"gpt-4o": {"input": 1.0, "output": 1.0}},  # micro-units = tokens
    "keys": [
        {"key": "sk-spender", "name": "spender", "rpm": 1000, "spend_per_day": 2.5},
        {"key": "sk-plain", "name": "plain", "rpm": 1000},
        {"key": "sk-broke", "name": "broke", "spend_per_day": 0.00005},
    ],
}


def money(micro: int) -> str:
    """Micro-units as the page writes them: 2 to 6 decimals."""
    text = f"{micro / 1_000_000:.6f}".rstrip("0")
    return text + "0" * max(0, 2 - len(text.split(".")[1]))


async def test_a_key_under_a_spend_limit_gets_a_spend_gauge_in_money(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_node(settings_for(SPEND_CONFIG)) as node,
            headless_chromium(tmp_path / "profile") as devtools,
        ):
            await signed_in_as_admin(devtools, node.url)
            async with httpx.AsyncClient() as client:
                for secret in ("sk-spender", "sk-spender", "sk-plain"):
                    answer = await chat(client, node.url, secret, max_tokens=40)
                    assert answer.status_code == 200
                prompt_tokens = answer.json()["usage"]["prompt_tokens"]
                usage = (
                    await client.get(
                        f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-spender"}
                    )
                ).json()["dimensions"]["spend"]
            assert usage["limit"] == 2_500_000 and usage["used"] > 0
            # The gauge ends at what the node says was spent (settled to the real cost).
            await devtools.wait_for(
                f"{GAUGE.format(key='spender', dimension='spend')}?.dataset.used === "
                f"'{usage['used']}'"
            )
            assert await gauge(devtools, "spender", "spend") == (str(usage["used"]), "2500000")
            text = await devtools.evaluate(
                f"{GAUGE.format(key='spender', dimension='spend')}"
                ".querySelector('.value').textContent"
            )
            assert text == f"{money(usage['used'])} / 2.50"
            # A key without a spend limit has no spend gauge, only its three.
            await devtools.wait_for(
                f"{GAUGE.format(key='plain', dimension='requests')}?.dataset.used === '1'"
            )
            assert await gauge(devtools, "plain", "spend") is None
            # A spend refusal is listed in money too.
            async with httpx.AsyncClient() as client:
                refused = await chat(client, node.url, "sk-broke", max_tokens=40)
            assert refused.status_code == 429
            await devtools.wait_for(
                "document.querySelectorAll('#rejections tbody tr').length === 1"
            )
            cells = await devtools.evaluate(
                "[...document.querySelectorAll('#rejections tbody tr td')]"
                ".map(td => td.textContent)"
            )
            assert cells[1:5] == ["broke", "gpt-4o", "spend", "0.00 / 0.00005"]
            assert cells[5] == money(prompt_tokens + 40)  # the reservation, at 1 per million
            assert devtools.errors() == []


async def test_the_dashboard_shows_requests_waiting_for_room(tmp_path: Path) -> None:
    config = {
        "feed": {"admin_token": ADMIN},
        "keys": [{"key": "sk-patient", "name": "patient", "rpm": 1, "max_wait_seconds": 120}],
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_node(settings_for(config)) as node,
            headless_chromium(tmp_path / "profile") as devtools,
        ):
            await signed_in_as_admin(devtools, node.url)
            waiting = "document.querySelector('.key[data-key=\"patient\"] .waiting')"
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT) as client:
                assert (await chat(client, node.url, "sk-patient")).status_code == 200
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat, client, node.url, "sk-patient")  # waits a window
                    await devtools.wait_for(f"{waiting}?.dataset.waiting === '1'")
                    nursery.cancel_scope.cancel()  # its client leaves
            await devtools.wait_for(f"{waiting}?.dataset.waiting === '0'")
            assert "gone after" in await devtools.evaluate(f"{waiting}.textContent")
            assert devtools.errors() == []
