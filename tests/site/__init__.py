"""The test website: a tiny shop with the k.js snippet, served on loopback, and its browser.

The site runs on its own port, so to the browser Kilde is another origin, as in real life
(same site, as when Kilde runs on a subdomain of the shop). Pages get the snippet from
`kilde.collect.tracker.snippet` and, where asked, the consent banner from the docs page, so the
documented banner is the one the browser clicks.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
from playwright.sync_api import Browser, sync_playwright

from kilde.collect.tracker import snippet
from tests.conftest import ROOT, WEB_KEY, Server, free_port

SITE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T = TypeVar("T")


def docs_banner() -> str:
    """The consent banner exactly as docs/website-tracking.md shows it."""
    text = (ROOT / "docs" / "website-tracking.md").read_text()
    match = re.search(r"<!-- file: banner.html -->\s*\n```html\n(.*?)\n```", text, re.S)
    assert match, "the docs page lost its banner example"
    return match.group(1)


@dataclass
class Site:
    url: str
    server: ThreadingHTTPServer

    def page(self, path: str) -> str:
        return f"{self.url}{path}"


@contextmanager
def serve_site(kilde_url: str, write_key: str = WEB_KEY, *, banner: bool = False) -> Iterator[Site]:
    head = snippet(kilde_url, write_key)
    body = docs_banner() if banner else ""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.split("?")[0].lstrip("/") or "index.html"
            file = SITE / name
            if not (file.suffix == ".html" and file.is_file()):
                file = SITE / "index.html"  # single-page app: every address serves the app
            html = file.read_text().replace("<!--KILDE-SNIPPET-->", head)
            data = html.replace("<!--KILDE-BANNER-->", body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(f"http://127.0.0.1:{server.server_address[1]}", server)
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (no browser download)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for(probe: Callable[[], T | None], timeout: float = 30, what: str = "it") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def events(server: Server, **params: str) -> list[dict[str, Any]]:
    """Stored events, oldest first."""
    answer = httpx.get(
        f"{server.url}/api/events", params={**params, "limit": "1000"}, headers=server.admin
    )
    answer.raise_for_status()
    return list(reversed(answer.json()["events"]))


def ledger(server: Server, **params: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/api/consent", params=params, headers=server.admin)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result
