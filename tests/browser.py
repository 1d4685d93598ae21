"""Headless Chromium driven over the DevTools protocol, for the tests of report.html.

Chromium is Debian's (``/usr/bin/chromium``; ``.ci/run`` installs it as root). It is driven
through ``--remote-debugging-pipe``: DevTools messages as JSON, each ended by a NUL byte, on
file descriptors 3 (commands to the browser) and 4 (answers and events). That needs no port, no
websocket and no Python package, only the standard library.

    with Browser() as browser:
        page = browser.open(path)          # waits for the load event
        page.evaluate("document.title")    # a JavaScript value back
        page.errors                        # console errors and uncaught exceptions so far
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# the flags that work on CI's machine: no sandbox (root), no GPU, nothing that reaches the network
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
)


def find_chromium() -> str | None:
    """The Chromium executable, or None."""
    for candidate in (os.environ.get("EHRSR_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer (one line saying why)."""


@dataclass
class Page:
    """One tab: evaluate JavaScript in it, read what it logged."""

    browser: Browser
    session: str
    errors: list[str] = field(default_factory=list)  # console.error, uncaught exceptions, error log entries
    messages: list[str] = field(default_factory=list)  # every console message, for failure reports
    loads: int = 0  # load events seen

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise); a thrown
        exception raises ``BrowserError``."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: {details.get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its value."""
        end = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > end:
                raise BrowserError(f"timed out after {timeout} s waiting for {expression!r}")
            time.sleep(0.1)

    def screenshot(self, path: Path, width: int = 1300, height: int = 900) -> Path:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path


class Browser:
    """A headless Chromium with a new, empty profile, closed (and its profile removed) on exit."""

    def __init__(self, executable: str | None = None, *, timeout: float = 60.0) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("Chromium not found (tried " + ", ".join(CHROMIUM_CANDIDATES) + ")")
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._pages: dict[str, Page] = {}
        self._pid: int | None = None

    def __enter__(self) -> Browser:
        self.profile = Path(tempfile.mkdtemp(prefix="ehrsr-chromium-"))
        self.log = self.profile / "chromium.log"
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()
        # our ends above 2, 3 and 4 so that the child's dup2 onto 3 and 4 cannot clobber them
        to_browser, self._commands, self._answers, from_browser = (
            self._high(fd) for fd in (to_browser, self._commands, self._answers, from_browser))
        argv = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile / 'profile'}",
                "--remote-debugging-pipe", "about:blank"]
        self._pid = os.posix_spawn(self.executable, argv, dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_DUP2, to_browser, 3),
            (os.POSIX_SPAWN_DUP2, from_browser, 4),
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_OPEN, 2, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        ])
        os.close(to_browser)
        os.close(from_browser)
        return self

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pid is not None:
                with contextlib.suppress(BrowserError, OSError):
                    self.call("Browser.close", timeout=10)
                self._reap()
        finally:
            for fd in (self._commands, self._answers):
                with contextlib.suppress(OSError):
                    os.close(fd)
            shutil.rmtree(self.profile, ignore_errors=True)

    def _reap(self) -> None:
        assert self._pid is not None
        end = time.monotonic() + 10
        while time.monotonic() < end:
            pid, _ = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                self._pid = None
                return
            time.sleep(0.1)
        os.kill(self._pid, 9)  # our own child, by its id
        os.waitpid(self._pid, 0)
        self._pid = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- the protocol ---------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data):]

    def _receive(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = end - time.monotonic()
            ready, _, _ = select.select([self._answers], [], [], max(left, 0))
            if not ready:
                raise BrowserError(f"no answer from Chromium within {timeout} s; its log:\n{self.log_tail()}")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise BrowserError(f"Chromium closed the DevTools pipe; its log:\n{self.log_tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def _event(self, message: dict[str, Any]) -> None:
        page = self._pages.get(message.get("sessionId", ""))
        if page is None:
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Page.loadEventFired":
            page.loads += 1
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            page.messages.append(f"console.{params.get('type')}: {text}")
            if params.get("type") in ("error", "assert"):
                page.errors.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            page.errors.append(f"uncaught exception at {details.get('url')}:{details.get('lineNumber')}: {description}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            page.messages.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}")
            if entry.get("level") == "error":
                page.errors.append(f"log.error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Send one command and return its result, handling the events that arrive meanwhile."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._send(message)
        while True:
            answer = self._receive(timeout or self.timeout)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self._event(answer)

    def open(self, path: Path, timeout: float = 60.0) -> Page:
        """A new tab showing ``path`` (a file), once its load event has fired."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        self._pages[session] = page
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            page.call(domain)
        url = Path(path).resolve().as_uri()
        loads = page.loads
        page.call("Page.navigate", {"url": url})
        end = time.monotonic() + timeout
        # a load event (it may have come with the answer to navigate); about:blank's may still be
        # on its way, so also check that the page is ``url`` and loaded
        while True:
            while page.loads == loads:
                self._event(self._receive(max(end - time.monotonic(), 0.01)))
            loads = page.loads
            if page.evaluate("location.href") == url and page.evaluate("document.readyState") == "complete":
                return page
