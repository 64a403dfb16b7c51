"""Dashboard page times: `kilde serve` on loopback with the demo shop, a logged-in user.

    .venv/bin/python bench/dashboard.py [--customers 2000] [--rounds 15]

For each page: the median and the 90th percentile of the full answer's time (HTML rendered on
the server, charts included), over `--rounds` sequential requests after one warm-up. The
baseline, measured in the same run against the same server and store, is `GET /api/stats`
with the admin token: the cheapest admin API call over the events table. Each page's figure
is printed with its ratio to that baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO_PLAN = ROOT / "src" / "kilde" / "demo" / "kilde.yaml"
ADMIN_TOKEN = "kat_bench-admin-token-0123456789abcdef"
PASSWORD = "bench-password-long-enough"
# Each page and the admin API call its main figures come from (None: several small ones, or
# shown on the line before). The slow insights tabs answer at once and fetch their panel.
PAGES: tuple[tuple[str, tuple[str, str, dict[str, object] | None] | None], ...] = (
    ("/", ("GET", "/api/overview", None)),
    ("/live", ("GET", "/api/events?limit=50", None)),
    ("/profiles", None),
    ("/segments", ("GET", "/api/segments", None)),
    ("/insights?tab=rfm", ("GET", "/api/insights/rfm", None)),
    (
        "/insights?tab=funnel",
        (
            "POST",
            "/api/insights/funnel",
            {"steps": ["Product Viewed", "Product Added", "Checkout Started", "Order Completed"]},
        ),
    ),
    ("/insights/panel?tab=funnel", None),  # the funnel tab's figures, fetched by the page
    ("/insights?tab=retention", ("GET", "/api/insights/retention?periods=12", None)),
    ("/insights/panel?tab=retention", None),
    ("/insights?tab=attribution", ("GET", "/api/insights/attribution", None)),
    ("/insights/panel?tab=attribution", None),
    ("/quality", ("GET", "/api/bad-events?limit=1000", None)),
    ("/privacy", ("GET", "/api/privacy/requests", None)),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(
    client: httpx.Client, path: str, rounds: int, method: str = "GET", body: object = None
) -> tuple[float, float]:
    def once() -> float:
        started = time.perf_counter()
        answer = client.request(method, path, json=body)
        elapsed = (time.perf_counter() - started) * 1000
        answer.raise_for_status()
        return elapsed

    once()  # warm-up
    times = sorted(once() for _ in range(rounds))
    return statistics.median(times), times[max(0, int(len(times) * 0.9) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kilde-bench-dashboard-"))
    port = free_port()
    env = {
        **os.environ,
        "KILDE_DATA": str(work / "data"),
        "KILDE_PLAN": str(DEMO_PLAN),
        "KILDE_ADMIN_TOKEN": ADMIN_TOKEN,
        "KILDE_PORT": str(port),
    }
    kilde = [sys.executable, "-m", "kilde.cli"]
    server = subprocess.Popen(
        [*kilde, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        subprocess.run(
            [*kilde, "demo", "--customers", str(args.customers)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=600
        )
        admin.post("/api/profiles/refresh").raise_for_status()
        admin.post("/api/insights/refresh").raise_for_status()
        admin.post(
            "/api/users", json={"username": "bench", "password": PASSWORD, "role": "admin"}
        ).raise_for_status()
        events = admin.get("/api/stats").json()["events"]
        browser = httpx.Client(base_url=url, timeout=600)
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text)
        assert token is not None
        browser.post(
            "/login", data={"username": "bench", "password": PASSWORD, "csrf_token": token[1]}
        )
        base_median, base_p90 = timed(admin, "/api/stats", args.rounds)
        print(f"store: {args.customers} customers, {events} events; {args.rounds} rounds each")
        print(
            f"{'page':28} {'median ms':>10} {'p90 ms':>8} {'x baseline':>11} "
            f"{'its API ms':>11} {'page/API':>9}"
        )
        print(f"{'GET /api/stats (baseline)':28} {base_median:10.1f} {base_p90:8.1f} {1.0:11.1f}")
        for path, source in PAGES:
            median, p90 = timed(browser, path, args.rounds)
            line = f"{path:28} {median:10.1f} {p90:8.1f} {median / base_median:11.1f}"
            if source is not None:
                method, api_path, body = source
                api_median, _ = timed(admin, api_path, args.rounds, method, body)
                line += f" {api_median:11.1f} {median / api_median:9.2f}"
            print(line)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
