"""Drive a headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: standard library only).

Used by the demo's browser test and by :mod:`demo.screenshot`. Chromium's ``--dump-dom`` / ``--screenshot`` alone
cannot wait for a result that the server computes after the page has loaded (virtual time runs out while the
request is pending), so the page is driven instead: type, click, wait until the DOM shows the result, capture.

    with Browser() as browser:
        browser.open("http://127.0.0.1:7860/")
        browser.type_into("#question textarea", "what color is the cross ?")
        browser.click("#run")
        browser.wait_for("document.querySelector('#status').innerText.includes('Done')")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

# Headless flags that work as root in a container; no outside host resolves (only 127.0.0.1 does).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def find_chromium() -> str | None:
    """The Chromium / Chrome executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page. ``requests`` lists every URL the page asked for."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 1000, timeout: float = 60):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("no chromium on PATH (Debian: apt-get install -y chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict] = []
        self._process: subprocess.Popen | None = None
        self._profile: str | None = None
        self._session: str | None = None
        self._log = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="vtc-demo-chromium-")
        to_chrome_read, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_write = os.pipe()
        flags = [*FLAGS, f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}"]
        # Chromium reads commands on fd 3 and writes replies on fd 4: a tiny Python trampoline puts the pipe ends
        # there (in either order, whatever numbers they have here) and execs Chromium.
        trampoline = (
            "import os, sys; r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
            "os.dup2(r, 3); os.dup2(w, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        command = [sys.executable, "-c", trampoline, str(to_chrome_read), str(from_chrome_write), self.executable]
        self._log = open(os.path.join(self._profile, "chromium.log"), "wb")  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [*command, *flags, "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chrome_read, from_chrome_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )

    def close(self) -> None:
        if self._process is not None:
            with contextlib.suppress(BrowserError, OSError):
                self.send("Browser.close", session=False, timeout=5)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            for fd in (self._to_chrome, self._from_chrome):
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def log_tail(self, lines: int = 15) -> str:
        """The end of Chromium's stderr (minus its D-Bus complaints in containers)."""
        if self._profile is None or not os.path.exists(os.path.join(self._profile, "chromium.log")):
            return ""
        with open(os.path.join(self._profile, "chromium.log"), errors="replace") as log:
            kept = [line for line in log.read().splitlines() if "dbus" not in line.lower()]
        return "\n".join(kept[-lines:])

    # -- protocol -----------------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float | None = None):
        """Send a DevTools command and wait for its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed the DevTools pipe; its log ends:\n{self.log_tail()}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _event(self, event: dict) -> None:
        method = event.get("method")
        params = event.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])

    def _drain(self) -> None:
        """Handle events that arrived while idle."""
        while True:
            ready, _, _ = select.select([self._from_chrome], [], [], 0)
            if not ready and b"\0" not in self._buffer:
                return
            self._event(self._read(time.monotonic() + 5))

    # -- page ---------------------------------------------------------------------------------------

    def open(self, url: str, ready: str = "document.querySelector('#run') !== null") -> None:
        """Navigate and wait until the JavaScript condition ``ready`` holds (default: the demo's button exists)."""
        self.send("Page.navigate", {"url": url})
        self.wait_for(ready)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for_text(self, selector: str, text: str, timeout: float | None = None) -> str:
        """Wait until the element's visible text contains ``text``; returns that text."""
        found = f"document.querySelector({json.dumps(selector)}).innerText"
        return self.wait_for(f"{found}.includes({json.dumps(text)}) && {found}", timeout)

    def wait_for(self, condition: str, timeout: float | None = None, interval: float = 0.2) -> Any:
        """Poll the JavaScript ``condition`` until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                value = self.evaluate(f"(() => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }})()")
            except BrowserError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {condition}")
            time.sleep(interval)
            self._drain()

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the centre of the element."""
        box = self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if not box:
            raise BrowserError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def type_into(self, selector: str, text: str) -> None:
        """Focus the field, select its content and type ``text`` over it (keyboard input, as a user would)."""
        self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.focus(); el.select(); }})()"
        )
        self.send("Input.insertText", {"text": text})

    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, full_page: bool = True) -> bytes:
        """PNG bytes of the page (the whole page, not only the window, when ``full_page``)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            height = int(self.evaluate("document.documentElement.scrollHeight"))
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": max(height, 1), "scale": 1}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
