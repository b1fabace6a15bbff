"""A small Chrome DevTools Protocol client for the dashboard's browser test: starts Debian's
headless Chromium on loopback, drives one page over the DevTools websocket (aiohttp), evaluates
JavaScript in it and takes screenshots."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import aiohttp

from tests.waiting import await_until, exited


def chromium_binary() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """`async with Chromium() as page:` a headless browser with one page target."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 60.0):
        self.width, self.height, self.timeout = width, height, timeout
        self._proc: Optional[subprocess.Popen] = None
        self._profile: Optional[tempfile.TemporaryDirectory] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._ws = None
        self._id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._events: list[dict[str, Any]] = []
        self._reader: Optional[asyncio.Task] = None

    async def __aenter__(self) -> "Chromium":
        exe = chromium_binary()
        if exe is None:
            raise BrowserError("no chromium on PATH (scripts/bootstrap.sh installs Debian's chromium)")
        self._profile = tempfile.TemporaryDirectory(prefix="moeforge-chromium-")
        profile = Path(self._profile.name)
        self._log = open(profile / "chromium.log", "w")
        # --no-sandbox: Chromium refuses to run as root with its sandbox (CI containers are root).
        self._proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT)
        port_file = profile / "DevToolsActivePort"
        try:
            await await_until(lambda: port_file.is_file() and port_file.read_text().strip(), self.timeout,
                              "chromium's DevToolsActivePort", abort=exited(self._proc))
        except AssertionError as e:
            raise BrowserError(f"chromium did not start ({e}): "
                               f"{(profile / 'chromium.log').read_text()[-2000:]}") from None
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()

        async def page_targets():
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                return [t for t in await r.json() if t.get("type") == "page"]

        try:
            pages = await await_until(page_targets, 10, "a page target in chromium")
        except AssertionError as e:
            raise BrowserError(f"chromium has no page target ({e})") from None
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        return self

    async def __aexit__(self, *exc) -> None:
        if self._reader:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()
        if self._profile is not None:
            self._profile.cleanup()

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            else:
                self._events.append(data)

    async def send(self, method: str, params: Optional[dict] = None) -> dict[str, Any]:
        self._id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._id] = fut
        await self._ws.send_str(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(fut, self.timeout)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def goto(self, url: str) -> None:
        self._events.clear()
        await self.send("Page.navigate", {"url": url})
        try:
            await await_until(lambda: any(e.get("method") == "Page.loadEventFired" for e in self._events),
                              self.timeout, f"{url} to load", every=0.05)
        except AssertionError as e:
            raise BrowserError(str(e)) from None

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        res = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                    "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression[:80]}: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, every: float = 0.1) -> Any:
        try:
            return await await_until(lambda: self.js(expression), timeout, expression, every=every)
        except AssertionError as e:
            raise BrowserError(str(e)) from None

    def console_errors(self) -> list[str]:
        out = []
        for e in self._events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(str(e["params"]["exceptionDetails"].get("exception", {}).get("description")))
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in e["params"]["args"]))
        return out

    async def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            h = await self.js("document.documentElement.scrollHeight")
            await self.send("Emulation.setDeviceMetricsOverride",
                            {"width": self.width, "height": int(h), "deviceScaleFactor": 1, "mobile": False})
            # responsive charts re-lay out to the new size: wait for two animation frames
            await self.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        data = (await self.send("Page.captureScreenshot", params))["data"]
        if full_page:
            await self.send("Emulation.setDeviceMetricsOverride",
                            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
