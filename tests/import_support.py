"""Helpers for the importer tests: run `kilde import` against a real server, read results."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import Server

SAMPLES = Path(__file__).resolve().parent.parent / "docs" / "samples"


def kilde_import(
    server: Server, kind: str, file: Path, *args: str, json: bool = True
) -> tuple[int, dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """Run the CLI through the server; (exit code, the --json summary if any, the process)."""
    extra = ["--json"] if json else []
    result = server.kilde("import", kind, str(file), *args, *extra, check=False)
    summary = None
    if json and result.stdout.strip().startswith("{"):
        summary = orjson.loads(result.stdout)
    return result.returncode, summary, result


def events(server: Server, **params: Any) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{server.url}/api/events",
        params={"limit": 1000, **params},
        headers=server.admin,
        timeout=TIMEOUT,
    )
    answer.raise_for_status()
    found: list[dict[str, Any]] = answer.json()["events"]
    return found


def dead_letters(server: Server, source: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{server.url}/api/bad-events",
        params={"source": source, "limit": 1000},
        headers=server.admin,
        timeout=TIMEOUT,
    )
    answer.raise_for_status()
    letters: list[dict[str, Any]] = answer.json()["dead_letters"]
    return letters


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


class FixedAnalyzer:
    """A stand-in model for the plug-in test: every text scores 0.5."""

    name = "fixed-test-model"

    def analyze(self, text: str) -> object:
        from kilde.insights.sentiment import Sentiment

        return Sentiment(0.5, "positive")


def fixed_analyzer() -> FixedAnalyzer:
    return FixedAnalyzer()


# The server may be slow to answer on a busy machine; the tests wait rather than fail.
TIMEOUT = 120


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=TIMEOUT, **kwargs)


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, url, timeout=TIMEOUT, **kwargs)
