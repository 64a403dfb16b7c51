"""How CLI commands reach Kilde: through the running server, or in-process when none runs.

DuckDB allows one writing process, so while `kilde serve` runs every command goes through its
admin API. When no server runs, the same API is served in-process over the same store, so both
paths run the very same code.
"""

from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson

from kilde.config import Settings
from kilde.errors import KildeError

SERVER_FILE = "server.json"


def write_server_file(data_dir: Path, url: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / SERVER_FILE).write_bytes(orjson.dumps({"url": url, "pid": os.getpid()}))


def remove_server_file(data_dir: Path) -> None:
    (data_dir / SERVER_FILE).unlink(missing_ok=True)


def running_server(data_dir: Path) -> str | None:
    """The URL of the server that owns this data directory, if it answers."""
    try:
        url = str(orjson.loads((data_dir / SERVER_FILE).read_bytes())["url"])
    except (FileNotFoundError, KeyError, orjson.JSONDecodeError):
        return None
    try:
        httpx.get(f"{url}/api/health", timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    return url


class Client:
    """An HTTP client for the admin and collection API; use as a context manager."""

    def __init__(self, settings: Settings, token: str | None = None) -> None:
        self.settings = settings
        self.token = token or settings.admin_token
        self.remote = running_server(settings.data_dir)
        self._http: Any = None

    def __enter__(self) -> Client:
        if self.remote:
            if not self.token:
                raise KildeError(
                    f"a server is running at {self.remote} and this command needs its admin token",
                    fix="set KILDE_ADMIN_TOKEN or pass --token",
                )
            self._http = httpx.Client(
                base_url=self.remote,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=120,
            )
        else:
            with warnings.catch_warnings():  # Starlette prefers httpx2; httpx works the same
                warnings.simplefilter("ignore")
                from starlette.testclient import TestClient

            from kilde.web.app import create_app

            local_token = secrets.token_urlsafe(32)
            app = create_app(self.settings, extra_admin_token=local_token)
            self._http = TestClient(app, headers={"Authorization": f"Bearer {local_token}"})
            self._http.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.remote:
            self._http.close()
        else:
            self._http.__exit__(kind, exc, tb)

    def raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response itself, for pages that answer HTML (hosted forms)."""
        response: httpx.Response = self._http.request(method, path, **kwargs)
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response: httpx.Response = self._http.request(method, path, **kwargs)
        self.raise_for(response)
        return response.json()

    @staticmethod
    def raise_for(response: httpx.Response) -> None:
        """Raise the server's own message and fix for a 4xx/5xx answer (never resend to get it)."""
        method, path = response.request.method, response.request.url.path
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("message", response.text)
                fix = body.get("fix")
                problems = body.get("problems")
                if isinstance(problems, list) and problems:  # e.g. why the plan did not load
                    message += "".join(f"\n  {problem}" for problem in problems)
            except (ValueError, AttributeError):
                message, fix = response.text, None
            raise KildeError(f"{method} {path} failed ({response.status_code}): {message}", fix=fix)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)
