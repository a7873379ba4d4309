"""Headless Chromium driven over the DevTools protocol, for the dashboard tests.

Bokeh pages fetch their document over a websocket and draw into canvases inside shadow
roots, so ``chromium --dump-dom`` sees neither the data nor the errors: this opens a page,
waits for a JavaScript condition, reads values out of the page, collects console errors
and uncaught exceptions, and takes screenshots.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import WebSocketClientConnection, websocket_connect

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--remote-allow-origins=*", "--hide-scrollbars",
]  # fmt: skip

#: The columns of the data source of the Bokeh model named NAME, in the page's document.
SOURCE_DATA = """
(() => {
  const doc = window.Bokeh && Bokeh.documents[0];
  const model = doc && doc.get_model_by_name(NAME);
  if (!model) return null;
  const source = model.source ?? model.renderers[0].data_source;
  const data = source.data instanceof Map ? source.data : new Map(Object.entries(source.data));
  return Object.fromEntries([...data].map(([k, v]) => [k, Array.from(v)]));
})()
"""

#: The text of a page, shadow roots included (Bokeh renders its widgets into those).
ALL_TEXT = """
(() => {
  const walk = (node) => {
    let out = "";
    if (node.shadowRoot) out += walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) out += child.textContent + " ";
      else if (!["STYLE", "SCRIPT"].includes(child.nodeName)) out += walk(child);
    }
    return out;
  };
  return walk(document.body);
})()
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium with one page.

    ``async with Chromium(profile_dir) as browser: await browser.open(url)``.
    """

    def __init__(self, profile: Path):
        self.profile = profile
        self.events: list[dict[str, Any]] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0

    async def __aenter__(self) -> Chromium:
        exe = chromium()
        assert exe, "chromium is not installed"
        self.proc = await asyncio.create_subprocess_exec(
            exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        port = None
        while port is None:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 30)
            assert line, "chromium exited before listening"
            m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(m.group(1)) if m else None
        self._drain = asyncio.create_task(self._discard(self.proc.stderr))
        targets = json.loads(
            (await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")).body
        )
        page = next(t for t in targets if t["type"] == "page")
        self.ws: WebSocketClientConnection = await websocket_connect(
            page["webSocketDebuggerUrl"], max_message_size=64 * 2**20
        )
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        self.ws.close()
        self.proc.kill()
        await self.proc.wait()
        self._drain.cancel()

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def _read(self) -> None:
        while (raw := await self.ws.read_message()) is not None:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"])
                if "error" in msg:
                    fut.set_exception(RuntimeError(msg["error"]))
                else:
                    fut.set_result(msg["result"])
            else:
                self.events.append(msg)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        await self.ws.write_message(
            json.dumps({"id": self._next_id, "method": method, "params": params})
        )
        return await asyncio.wait_for(fut, 60)

    async def open(self, url: str, width: int = 1280, height: int = 800) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        self.events.clear()
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        out = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in out:
            raise RuntimeError(out["exceptionDetails"])
        return out["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """The value of ``expression`` once it is truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout} s")
            await asyncio.sleep(0.2)

    async def wait_for_text(self, *needles: str, timeout: float = 30) -> str:
        """The page's text (shadow roots included) once it contains every needle."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            text: str = await self.evaluate(ALL_TEXT) or ""
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{missing} not on the page after {timeout} s: {text[:2000]}")
            await asyncio.sleep(0.2)

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions since the page was opened."""
        out = []
        for e in self.events:
            method, params = e["method"], e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"{params['entry']['text']} ({params['entry'].get('url')})")
        return out

    async def source_data(self, name: str) -> dict[str, list[Any]] | None:
        """The columns of the Bokeh model ``name`` (a figure or a table) in the page."""
        value: dict[str, list[Any]] | None = await self.evaluate(
            SOURCE_DATA.replace("NAME", json.dumps(name))
        )
        return value

    async def screenshot(self, path: Path) -> None:
        out = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(out["data"]))
