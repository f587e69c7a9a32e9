"""A small driver for a real headless Chromium over the Chrome DevTools Protocol (no WebDriver, no download).

It needs only Debian's ``chromium`` and the ``websockets`` package: Chromium is started with a remote
debugging port of its own choosing (read back from ``DevToolsActivePort``), and the page is driven with
``Runtime.evaluate``, ``DOM.setFileInputFiles``, ``Page.captureScreenshot`` and
``Browser.setDownloadBehavior``. Used by ``tests/test_browser.py``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--window-size=1440,900",
)


def find_chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    """A DevTools command failed, or the page did not reach the awaited state."""


class Browser:
    """One headless Chromium process with one page (tab) to drive."""

    def __init__(self, binary: str | None = None, width: int = 1440, height: int = 900) -> None:
        binary = binary or find_chromium()
        if not binary:
            raise CDPError("chromium is not installed (apt-get install chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="cdp-profile-"))
        self.downloads = self.profile / "downloads"
        self.downloads.mkdir()
        self.proc = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port, browser_path = self._devtools_port()
        self.port = port
        self._ids = itertools.count(1)
        self.console: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._sockets = contextlib.ExitStack()
        self.browser_ws = self._sockets.enter_context(
            connect(f"ws://127.0.0.1:{port}{browser_path}", max_size=None, open_timeout=10)
        )
        page = self._page_target()
        self.ws: ClientConnection = self._sockets.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        )
        for domain in ("Page", "Runtime", "DOM"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send_browser("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(self.downloads))

    # --- plumbing ----------------------------------------------------------------------------------------

    def _devtools_port(self, timeout: float = 30.0) -> tuple[int, str]:
        path = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with code {self.proc.returncode}")
            if path.exists():
                lines = path.read_text().split()
                if len(lines) >= 2:
                    return int(lines[0]), lines[1]
            time.sleep(0.05)
        raise CDPError("chromium did not open its debugging port")

    def _page_target(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise CDPError("chromium has no page target")
        return pages[0]

    def _call(
        self, ws: ClientConnection, method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        msg_id = next(self._ids)
        ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method} got no answer in {timeout:.0f} s")
            msg = json.loads(ws.recv(timeout=left))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        method = msg.get("method", "")
        if method == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.console.append(f"{msg['params'].get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = msg["params"]["exceptionDetails"]
            self.console.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method:
            self.events.append(msg)
            del self.events[:-200]

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """A DevTools command to the page; returns its result."""
        return self._call(self.ws, method, params, timeout)

    def send_browser(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """A DevTools command to the browser (not the page)."""
        return self._call(self.browser_ws, method, params, timeout)

    # --- what a test does --------------------------------------------------------------------------------

    def js(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value."""
        res = self.send(
            "Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CDPError(f"JS error: {d.get('exception', {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    def goto(self, url: str, timeout: float = 30.0) -> None:
        """Navigate and wait until the document has loaded."""
        self.send("Page.navigate", url=url)
        self.wait(
            "document.readyState === 'complete' && location.href !== 'about:blank'", timeout, f"load {url}"
        )

    def wait(self, expression: str, timeout: float = 30.0, what: str = "", interval: float = 0.2) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
                if value:
                    return value
            except CDPError as exc:  # e.g. while the page navigates
                last_error = str(exc)
            time.sleep(interval)
        tail = "\n".join(self.console[-10:])
        raise CDPError(
            f"timed out after {timeout:.0f} s waiting for {what or expression} {last_error}\n{tail}"
        )

    def submit(self, form_selector: str, timeout: float = 60.0) -> None:
        """Submit a form like a user clicking its submit button, and wait for the next page."""
        self.js("window.__cdpMark = 1")
        self.js(
            f"(() => {{ const f = document.querySelector({json.dumps(form_selector)});"
            " const b = f.querySelector('[type=submit], button:not([type])'); b ? b.click() : f.submit(); })()"
        )
        self.wait(
            "window.__cdpMark === undefined && document.readyState === 'complete'", timeout, "form submission"
        )

    def fill(self, selector: str, value: Any) -> None:
        """Set an input's or select's value and fire input/change events."""
        self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            f" if (!el) throw new Error('no element ' + {json.dumps(selector)});"
            f" el.value = {json.dumps(str(value))};"
            " el.dispatchEvent(new Event('input', {bubbles: true}));"
            " el.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )

    def set_file(self, selector: str, path: str | os.PathLike) -> None:
        """Choose a file in an ``<input type=file>`` (as the file picker would)."""
        doc = self.send("DOM.getDocument", depth=-1)
        node = self.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector=selector)
        if not node.get("nodeId"):
            raise CDPError(f"no element {selector}")
        self.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(Path(path).resolve())])

    def click(self, selector: str) -> None:
        """Click an element."""
        self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            f" if (!el) throw new Error('no element ' + {json.dumps(selector)}); el.click(); }})()"
        )

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole scrollable page by default)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            m = self.send("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m["contentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": min(size["height"], 8000),
                    "scale": 1,
                },
            )
        data = self.send("Page.captureScreenshot", timeout=60, **params)["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def wait_download(self, name_suffix: str, timeout: float = 60.0) -> Path:
        """The downloaded file ending in ``name_suffix`` once Chromium has finished writing it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [p for p in self.downloads.iterdir() if p.name.endswith(name_suffix)]
            partial = [p for p in self.downloads.iterdir() if p.suffix == ".crdownload"]
            if done and not partial:
                return done[0]
            time.sleep(0.2)
        raise CDPError(f"no download ending in {name_suffix} within {timeout:.0f} s")

    def close(self) -> None:
        """Stop Chromium and remove its profile."""
        with contextlib.suppress(Exception):
            self._sockets.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, 9)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
