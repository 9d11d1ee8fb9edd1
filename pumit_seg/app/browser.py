"""A headless-Chromium check of a local HTML page: every image loaded, no script, console or network
error, and an optional full-page screenshot. Talks the Chrome DevTools protocol over a pipe, so it needs
Debian's chromium package and nothing from PyPI.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pumit_seg.atomic import atomic_path

__all__ = ["BrowserCheck", "check_in_browser", "find_chromium"]

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless Chromium on a closed network: no sandbox (root), no GPU, no background connections.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
)  # fmt: skip
PAGE_WIDTH = 1280  # CSS pixels of the browser window for the check and the screenshot


@dataclass
class BrowserCheck:
    """What headless Chromium saw: every <img> (src, loaded, natural width) and every error."""

    images: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and all(i["loaded"] for i in self.images)


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _DevToolsPipe:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe``: JSON messages ended by NUL bytes."""

    def __init__(self, chromium: str, timeout: float):
        self.timeout = timeout
        self.user_data = tempfile.mkdtemp(prefix="pumit-chromium-")
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()
        # the browser expects its ends as fd 3 (commands) and 4 (replies): keep ours clear of 3 and 4
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_read, from_browser_write)]
        for fd in (to_browser_read, from_browser_write):
            os.close(fd)

        def wire_fds():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.user_data}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # not pass_fds: it would check fds 3 and 4 in the parent, where they may not exist; the ends
            # dup2'ed in the child are inheritable, every other descriptor of ours is close-on-exec
            close_fds=False,
            preexec_fn=wire_fds,
        )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium: {method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str | None = None) -> dict:
        for event in self.events:
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        while True:
            event = self._receive()
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read], [], [], remaining)[0]:
                raise TimeoutError(f"Chromium sent nothing for {self.timeout:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.user_data, ignore_errors=True)


def _event_errors(events: list[dict], session: str) -> list[str]:
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(
                f"script exception: {details.get('text')} {details.get('exception', {}).get('description', '')}"
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(
                "console error: "
                + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source')} error: {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            errors.append(f"failed load: {params.get('errorText')} ({params.get('type')})")
    return errors


def check_in_browser(
    html_file: str | os.PathLike,
    screenshot: str | os.PathLike | None = None,
    chromium: str | None = None,
    timeout: float = 60.0,
) -> BrowserCheck:
    """Load `html_file` in headless Chromium; report every image's state and every error; optionally save a
    full-page PNG screenshot. Raises FileNotFoundError without a Chromium."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(
            f"no Chromium found ({', '.join(CHROMIUM_CANDIDATES)}): install Debian's chromium package "
            "(make test does it: apt-get install -y chromium)"
        )
    url = Path(html_file).resolve().as_uri()
    browser = _DevToolsPipe(chromium, timeout)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": PAGE_WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.events.clear()
        navigation = browser.send("Page.navigate", {"url": url}, session=session)
        if navigation.get("errorText"):
            return BrowserCheck(errors=[f"navigation to {url} failed: {navigation['errorText']}"])
        browser.wait_for("Page.loadEventFired", session)
        expression = (
            "JSON.stringify(Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
            "loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth, height: i.naturalHeight})))"
        )
        value = browser.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
        )
        check = BrowserCheck(
            images=json.loads(value["result"]["value"]), errors=_event_errors(browser.events, session)
        )
        if screenshot is not None:
            size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = browser.send(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True,
                 "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
                session=session,
            )  # fmt: skip
            check.screenshot = Path(screenshot)
            check.screenshot.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(check.screenshot) as tmp, open(tmp, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        return check
    finally:
        browser.close()


