"""Helpers for the dashboard tests: users made with the CLI, logins over HTTP and in Chromium."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ROOT, Server

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
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
DOC_IMAGES = ROOT / "docs" / "images"
PASSWORDS = {
    "admin": "admin-pass-correct-horse",
    "analyst": "analyst-pass-battery-staple",
    "viewer": "viewer-pass-paper-clip",
}


def users(
    server: Server, *args: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`kilde users ...` against the server, the password (if any) on standard input."""
    return subprocess.run(
        [sys.executable, "-m", "kilde.cli", "users", *args],
        input=(password + "\n") if password is not None else None,
        env={**server.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def add_user(server: Server, name: str, role: str, password: str) -> None:
    result = users(server, "add", name, "--role", role, "--password-stdin", password=password)
    assert result.returncode == 0, result.stdout + result.stderr


def login(server: Server, name: str, password: str) -> httpx.Client:
    """An HTTP client logged in through the login form (double-submit CSRF included)."""
    client = httpx.Client(base_url=server.url, timeout=60)
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token, form.text
    answer = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": token.group(1), "next": "/"},
    )
    assert answer.status_code == 303, answer.text
    assert "kilde_session" in client.cookies
    return client


def csrf_of(client: httpx.Client) -> str:
    token = client.get("/api/me").json()["csrf_token"]
    assert isinstance(token, str)
    return token


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"
