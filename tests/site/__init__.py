"""The test website: a tiny shop with the k.js snippet, served on loopback, and its browser.

The site runs on its own port, so to the browser Kilde is another origin, as in real life
(same site, as when Kilde runs on a subdomain of the shop). Pages get the snippet from
`kilde.collect.tracker.snippet` and, where asked, the consent banner from the docs page, so the
documented banner is the one the browser clicks.
"""

from __future__ import annotations

import json
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
def serve_site(
    kilde_url: str, write_key: str = WEB_KEY, *, banner: bool = False, auto_page: bool = True
) -> Iterator[Site]:
    head = snippet(kilde_url, write_key, auto_page=auto_page)
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


class Relay:
    """A reverse proxy between the browser and Kilde: sees every request the browser makes.

    Playwright does not see `fetch(..., {keepalive: true})` and `sendBeacon` requests, which is
    how k.js sends events, so tests watch the wire here. `busy` answers the next that many
    `POST /v1/batch` with 503 (an overloaded collector); when Kilde cannot be reached the
    relay drops the connection, as a browser sees a collector that is down (`failed` counts);
    `down` makes every `POST /v1/batch` meet that while Kilde itself goes on running;
    while `cookie_gate` is clear, `POST /v1/cookie` waits (the collector's answer is slow).
    """

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[tuple[str, str, bytes]] = []  # (method, path without query, body)
        self.busy = 0
        self.down = False
        self.failed = 0
        self.cookie_gate = threading.Event()
        self.cookie_gate.set()
        self.lock = threading.Lock()

    def paths(self) -> list[str]:
        with self.lock:
            return [path for _, path, _ in self.seen]

    def batches(self) -> list[list[dict[str, Any]]]:
        """The messages of every POST /v1/batch that reached the relay, in order."""
        with self.lock:
            posts = [body for method, path, body in self.seen if path == "/v1/batch"]
        return [list(json.loads(body)["batch"]) for body in posts]

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?")[0]
        with self.lock:
            self.seen.append((handler.command, path, body))
            batch = handler.command == "POST" and path == "/v1/batch"
            refuse = batch and self.busy > 0
            if refuse:
                self.busy -= 1
            drop = batch and self.down
            if drop:
                self.failed += 1
        if drop:
            handler.close_connection = True
            return
        if handler.command == "POST" and path == "/v1/cookie":
            self.cookie_gate.wait(timeout=60)
        if refuse:
            data = b'{"success": false, "error": "store_busy"}'
            handler.send_response(503)
            handler.send_header("Access-Control-Allow-Origin", "*")
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in self.HOP}
        headers["Accept-Encoding"] = "identity"
        try:
            answer = httpx.request(
                handler.command,
                self.upstream + handler.path,
                headers=headers,
                content=body,
                timeout=30,
            )
        except httpx.TransportError:
            with self.lock:
                self.failed += 1
            handler.close_connection = True  # no answer at all: a network error in the browser
            return
        handler.send_response(answer.status_code)
        for name, value in answer.headers.multi_items():
            if name.lower() not in self.HOP:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(answer.content)))
        handler.end_headers()
        handler.wfile.write(answer.content)


@contextmanager
def relay(upstream: str) -> Iterator[tuple[str, Relay]]:
    """A `Relay` in front of Kilde at `upstream`, on its own port: (its address, the relay)."""
    state = Relay(upstream.rstrip("/"))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.handle(self)

        def do_POST(self) -> None:
            state.handle(self)

        def do_OPTIONS(self) -> None:
            state.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
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
