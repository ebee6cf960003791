"""Renders a report in headless Chromium and says whether it loaded whole, over the DevTools
protocol.

    python -m eval.browser <report.html> [screenshot.png]

Starts `chromium --headless` on a private profile (port chosen by Chromium, read from its
DevToolsActivePort file), opens the file, waits for the load event, and returns every <img>'s
decode state (`complete`, `naturalWidth`/`naturalHeight`: 0 = a broken image), every console
error, uncaught exception and browser log error, and a full-page PNG screenshot. Nothing leaves the
machine: the page is a local file and the protocol runs on 127.0.0.1.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome")
_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
    "width: i.naturalWidth, height: i.naturalHeight})))"
)


@dataclasses.dataclass
class PageCheck:
    images: list[dict]
    errors: list[str]  # console errors, uncaught exceptions, browser log errors
    screenshot: Path | None

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["width"] == 0 or i["height"] == 0]


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BINARIES) if path), None)


class _DevTools:
    """A minimal synchronous DevTools client on one page target (websocket-client)."""

    def __init__(self, url: str, timeout: float):
        import websocket

        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, deadline: float) -> None:
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DevTools: no {method} before the deadline")
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _errors(events: list[dict]) -> list[str]:
    found = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(
                "console: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            found.append(
                f"log: {params['entry'].get('text', '')} {params['entry'].get('url', '')}".strip()
            )
    return found


def check_page(
    html_path: Path, screenshot: Path | None = None, *, timeout: float = 60.0
) -> PageCheck:
    """Loads `html_path` in headless Chromium; see the module docstring."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError(
            f"no Chromium binary on PATH ({', '.join(BINARIES)}); install the Debian "
            "`chromium` package"
        )
    url = Path(html_path).resolve().as_uri()
    deadline = time.monotonic() + timeout
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        # Own session: Chromium's helpers (zygote, renderers, crashpad) join its process group, so
        # shutdown can end all of them, not only the browser process.
        proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            while not port_file.exists() or not port_file.read_text().strip():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{binary} exited with {proc.returncode} before opening DevTools"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{binary}: no DevToolsActivePort after {timeout:.0f} s")
                time.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
                target = next(t for t in json.load(r) if t.get("type") == "page")
            client = _DevTools(target["webSocketDebuggerUrl"], timeout)
            try:
                for domain in ("Page", "Runtime", "Log"):
                    client.call(f"{domain}.enable")
                client.call("Page.navigate", url=url)
                client.wait_for("Page.loadEventFired", deadline)
                images = json.loads(
                    client.call("Runtime.evaluate", expression=_IMAGES_JS, returnByValue=True)[
                        "result"
                    ]["value"]
                )
                if screenshot is not None:
                    size = client.call("Page.getLayoutMetrics")["cssContentSize"]
                    shot = client.call(
                        "Page.captureScreenshot",
                        format="png",
                        captureBeyondViewport=True,
                        clip={
                            "x": 0,
                            "y": 0,
                            "width": size["width"],
                            "height": size["height"],
                            "scale": 1,
                        },
                    )
                    Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                return PageCheck(images, _errors(client.events), screenshot)
            finally:
                client.close()
        finally:
            _stop(proc)
    finally:
        _remove_profile(Path(profile))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (Chromium shuts down cleanly), then SIGKILL to whatever of its process group is
    left."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_profile(profile: Path, attempts: int = 50) -> None:
    """Removes the private profile. A helper that outlived the browser by a moment may still write a
    file into it while rmtree walks it (`Directory not empty`), so removal is retried for ~5 s."""
    for _ in range(attempts - 1):
        try:
            shutil.rmtree(profile)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print("usage: python -m eval.browser <report.html> [screenshot.png]", file=sys.stderr)
        return 2
    result = check_page(Path(args[0]), Path(args[1]) if len(args) > 1 else None)
    print(
        f"{len(result.images)} images, {len(result.broken_images)} broken, "
        f"{len(result.errors)} errors"
    )
    for line in result.errors:
        print(f"  {line}")
    return 1 if result.broken_images or result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
