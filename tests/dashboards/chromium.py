"""Open a page in headless Chromium and report what a reader would see, through the DevTools protocol.

:func:`inspect_page` starts ``chromium --headless --remote-debugging-port=0`` with a throw-away profile, connects
to the page target's WebSocket (aiohttp, which MLflow already depends on), enables the Runtime, Log, Network and
Page domains *before* navigating (so nothing logged during the load is missed), loads the page, waits for the
load event and for every image to decode, and returns a :class:`PageReport`: the document's title and headings,
each ``<img>``'s ``complete`` / ``naturalWidth`` / ``naturalHeight``, every console error, uncaught exception,
browser log error and failed network request, and a PNG screenshot of the whole page.

Only the standard library and aiohttp are used; :func:`find_chromium` returns None where no browser is
installed (tests skip then).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1280,900")

_PAGE_STATE = """
(async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  return {
    title: document.title,
    h1: Array.from(document.querySelectorAll('h1')).map(h => h.textContent),
    h2: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
    images: images.map(img => ({alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
                                naturalHeight: img.naturalHeight, src: img.src.slice(0, 40)})),
    tables: Array.from(document.querySelectorAll('table')).map(t => ({id: t.id, rows: t.rows.length})),
    bodyHeight: document.body.scrollHeight,
    text: document.body.innerText,
  };
})()
"""


@dataclass
class PageReport:
    """What the page showed and what went wrong while it loaded."""

    title: str
    h1: list[str]
    h2: list[str]
    images: list[dict[str, Any]]
    tables: list[dict[str, Any]]
    body_height: int
    text: str
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class _DevTools:
    """A minimal DevTools protocol client: numbered calls, events collected as they arrive."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            message = await self._receive(deadline, method)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    async def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            message = await self._receive(deadline, method)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message

    async def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        import aiohttp

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"DevTools: no answer to {what}")
        message = await asyncio.wait_for(self.ws.receive(), remaining)
        if message.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"DevTools connection closed while waiting for {what}: {message.type}")
        return json.loads(message.data)

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                found.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                found.append(f"network: {params.get('errorText')} ({params.get('type')})")
        return found


def _devtools_port(profile: Path, process: subprocess.Popen, timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with status {process.returncode} before opening DevTools")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open DevTools within {timeout:.0f} s")


def _page_socket(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                targets = json.loads(response.read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise TimeoutError("chromium has no page target")


async def _wait_for_text(tools: _DevTools, texts: list[str], timeout: float) -> None:
    """Poll the page's visible text until it contains every one of ``texts`` (a single-page app renders after the
    load event, and its parts one after another)."""
    deadline = time.monotonic() + timeout
    probe = f"document.body !== null && {json.dumps(texts)}.every(t => document.body.innerText.includes(t))"
    while time.monotonic() < deadline:
        result = await tools.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, timeout)
        if result.get("result", {}).get("value") is True:
            return
        await asyncio.sleep(0.25)


async def _inspect(socket_url: str, url: str, screenshot: Path | None, timeout: float,
                   wait_for_text: str | Sequence[str] | None = None) -> PageReport:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(socket_url, max_msg_size=0) as ws:
        tools = _DevTools(ws)
        for domain in ("Runtime", "Log", "Network", "Page"):
            await tools.call(f"{domain}.enable")
        await tools.call("Page.navigate", {"url": url})
        await tools.wait_event("Page.loadEventFired", timeout)
        if wait_for_text is not None:
            texts = [wait_for_text] if isinstance(wait_for_text, str) else list(wait_for_text)
            await _wait_for_text(tools, texts, timeout)
        result = await tools.call("Runtime.evaluate", {"expression": _PAGE_STATE, "awaitPromise": True,
                                                       "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page state script failed: {result['exceptionDetails']}")
        state = result["result"]["value"]
        path = None
        if screenshot is not None:
            shot = await tools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                    timeout)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            path = screenshot
        await asyncio.sleep(0.2)  # let late console / log events arrive
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError, RuntimeError):
            await tools.call("Runtime.evaluate", {"expression": "1"}, 5)
        return PageReport(title=state["title"], h1=state["h1"], h2=state["h2"], images=state["images"],
                          tables=state["tables"], body_height=int(state["bodyHeight"]), text=state["text"],
                          errors=tools.errors(), screenshot=path)


def inspect_page(page: str | Path, *, chromium: str | None = None, screenshot: Path | None = None,
                 timeout: float = 90.0, wait_for_text: str | Sequence[str] | None = None) -> PageReport:
    """Load ``page`` (a file path or URL) in a fresh headless Chromium and report on it; with ``wait_for_text`` (a
    text or several), once the page shows all of it (or ``timeout`` passed: the report then shows what it did
    show)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium executable found")
    url = page if isinstance(page, str) and "://" in page else Path(page).resolve().as_uri()
    profile = Path(tempfile.mkdtemp(prefix="fuse-chromium-"))
    log = open(profile.parent / f"{profile.name}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = _devtools_port(profile, process, timeout)
        socket_url = _page_socket(port, timeout)
        return asyncio.run(_inspect(socket_url, url, screenshot, timeout, wait_for_text))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(log.name)
