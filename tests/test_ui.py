"""The status page (GET /ui): self-contained HTML, and driven in headless Chromium against a daemon over fake
engines: it shows the models, their states, the device memory and recent evictions, and its buttons work.

Chromium is Debian's package (`scripts/setup.sh` installs it where apt-get can); the test talks to it over the
DevTools protocol with aiohttp's websocket client, so no other browser driver is needed. The screenshot is
written to the test's tmp folder (and to $VLLAMA_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.conftest import Daemon


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_is_self_contained(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 1}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        r = c.get("/ui")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        # no external assets: no script/style/image/font fetched from anywhere but this daemon's API
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
        assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page, re.I)
        assert "@import" not in page and "url(" not in page
        for path in ("/vllama/ps", "/vllama/info", "/vllama/start", "/vllama/sleep", "/vllama/stop"):
            assert path in page
        # the root: the page for a browser, Ollama's greeting for anything else
        assert c.get("/", headers={"accept": "text/html,application/xhtml+xml"}).text == page
        assert c.get("/").text == "Ollama is running"
        assert c.head("/").status_code == 200


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(data["params"]["exceptionDetails"])[:500])
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append(json.dumps(data["params"]["args"])[:500])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.pending[ident] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        reply = await asyncio.wait_for(self.pending[ident], 30)
        assert "error" not in reply, (method, reply)
        return dict(reply.get("result") or {})

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.eval("document.body.innerText")
                raise AssertionError(f"timed out waiting for {expression}; the page shows:\n{body}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (not a synthetic element.click())."""
        box = await self.wait_for(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
                if (!e || e.disabled) return null; e.scrollIntoView({{block: "center"}});
                const r = e.getBoundingClientRect(); return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()"""
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def screenshot(self) -> bytes:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])


@contextlib.asynccontextmanager
async def chromium(binary: str, profile: Path) -> AsyncIterator[Page]:
    proc = await asyncio.create_subprocess_exec(
        *[
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
            "about:blank",
        ],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (text := await asyncio.to_thread(_read, port_file)):
            assert proc.returncode is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(text.split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            target = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Runtime.enable")
                await page.send("Page.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False
                )
                try:
                    yield page
                finally:
                    page.reader.cancel()
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def state_of(model: str) -> str:
    return f"document.querySelector('tr[data-model=\"{model}\"] .state')?.textContent"


async def test_status_page_in_chromium(fake_daemon: Daemon, tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it with apt-get)")
    fake_daemon.write_models({"A": {"gpu_memory_gib": 5}, "B": {"gpu_memory_gib": 5}, "C": {"gpu_memory_gib": 1}})
    fake_daemon.start()
    with fake_daemon.client() as c:  # A, then B: B's start puts A to sleep (eviction)
        for model in ("A", "B"):
            r = c.post("/v1/embeddings", json={"model": model, "input": "hello"})
            assert r.status_code == 200, r.text

    async with chromium(binary, tmp_path / "profile") as page:
        await page.send("Page.navigate", url=f"{fake_daemon.url}/ui")
        await page.wait_for(f"{state_of('B')} === 'running'")
        assert await page.eval(state_of("A")) == "sleeping L2"
        assert await page.eval(state_of("C")) == "stopped"  # configured, never started
        # the device card: memory and the models on it
        device = await page.eval("document.querySelector('.device').innerText")
        assert "fake0" in device and "8.0 GiB" in device and "B" in device
        # the eviction is listed
        await page.wait_for("document.getElementById('evictions').innerText.includes('to make room for B')")

        await page.click('button[data-action="sleep1"][data-model="B"]')
        await page.wait_for(f"{state_of('B')} === 'sleeping L1'")
        await page.click('button[data-action="start"][data-model="C"]')
        await page.wait_for(f"{state_of('C')} === 'running'")
        await page.click('button[data-action="start"][data-model="A"]')  # wakes A
        await page.wait_for(f"{state_of('A')} === 'running'")
        png = await page.screenshot()  # A running, B asleep (L1), C running, the eviction listed
        assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
        shot = await asyncio.to_thread(save_artefact, tmp_path, "status-page.png", png)
        print(f"screenshot: {shot}")

        await page.click('button[data-action="stop"][data-model="C"]')
        await page.wait_for(f"{state_of('C')} === 'stopped'")
        # the page follows changes made elsewhere (it polls every 2 s)
        sleep = {"model": "A", "level": 1}
        r = await asyncio.to_thread(httpx.post, f"{fake_daemon.url}/vllama/sleep", json=sleep, timeout=30)
        assert r.status_code == 200
        await page.wait_for(f"{state_of('A')} === 'sleeping L1'", timeout=5)
        assert not page.errors, page.errors


def save_artefact(folder: Path, name: str, data: bytes) -> Path:
    """Write a test artefact in the test's tmp folder, and copy it to $VLLAMA_TEST_ARTIFACTS when set."""
    path = folder / name
    path.write_bytes(data)
    if os.environ.get("VLLAMA_TEST_ARTIFACTS"):
        target = Path(os.environ["VLLAMA_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path
