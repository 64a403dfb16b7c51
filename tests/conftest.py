"""Shared fixtures: a real `kilde serve` on loopback over a real DuckDB file.

`kilde_server` starts one server per test session (datasette's pattern); tests that need their
own store (crash tests, plan changes) start one with `start_server`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
ADMIN_TOKEN = "kat_test-admin-token-0123456789abcdef"
WEB_KEY = "demo-web-write-key"
BACKEND_KEY = "demo-backend-write-key"
APP_KEY = "demo-app-write-key"
START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    plan_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no shutdown hooks, no flush; what was acknowledged must survive this."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def kilde(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `kilde` CLI against this server's data directory and plan."""
        result = subprocess.run(
            [sys.executable, "-m", "kilde.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            server_tail = "\n".join(self.log_text().splitlines()[-30:])
            raise AssertionError(
                f"kilde {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
                f"\n--- server log, last lines ---\n{server_tail}"
            )
        return result


def start_server(
    data_dir: Path, plan_path: Path = DEMO_PLAN, port: int | None = None, **extra_env: str
) -> Server:
    port = port or free_port()
    env = {
        **os.environ,
        "KILDE_DATA": str(data_dir),
        "KILDE_PLAN": str(plan_path),
        "KILDE_ADMIN_TOKEN": ADMIN_TOKEN,
        "KILDE_PORT": str(port),
        **extra_env,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kilde.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    # Generous: on a busy 2-core machine importing the app alone can take 15 s.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kilde serve exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return Server(url, data_dir, plan_path, process, log_path, env)
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(
        f"kilde serve did not answer within {START_TIMEOUT} s:\n{log_path.read_text()}"
    )


@pytest.fixture(scope="session")
def kilde_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("kilde")
    server = start_server(base / "data")
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server with its own data directory and a copy of the demo plan it may edit."""
    plan = tmp_path / "kilde.yaml"
    shutil.copy(DEMO_PLAN, plan)
    server = start_server(tmp_path / "data", plan)
    yield server
    server.stop()


def run_kilde(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `kilde` CLI as a user would, with no server unless `env` points at one."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KILDE_")}
    return subprocess.run(
        [sys.executable, "-m", "kilde.cli", *args],
        env={**base, "COLUMNS": "200", **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
