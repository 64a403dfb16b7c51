"""The server's memory: it holds only what it uses (scipy, about 40 MB, is loaded when a
lifetime-value model is first fitted, not at start), and says what it holds (`/api/stats`)."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest

from kilde.store.database import Store
from tests.conftest import BACKEND_KEY, Server, start_server
from tests.test_insights_reports import api, at, send, track


def mapped_packages(server: Server) -> set[str]:
    """Top-level packages of the shared libraries the server process has mapped."""
    text = Path(f"/proc/{server.process.pid}/maps").read_text()
    found = set()
    for line in text.splitlines():
        _, _, after = line.partition("site-packages/")
        if after:
            found.add(after.split("/")[0])
    return found


def test_scipy_is_loaded_by_the_first_lifetime_value_fit_not_at_start(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", KILDE_INSIGHTS_BACKGROUND="0")
    try:
        at_start = mapped_packages(srv)
        assert "pyarrow" in at_start  # the check sees the server's libraries at all
        assert "scipy" not in at_start
        rng = random.Random(7)
        orders = []
        for customer in range(40):
            # every other customer buys again, at their own pace
            for number in range(1 + (customer % 2) * rng.randint(1, 4)):
                orders.append(
                    track(
                        f"clv-{customer}",
                        "Order Completed",
                        at(200 - 40 * number - rng.random() * 30),
                        order_id=f"o-{customer}-{number}",
                        revenue=round(50 + rng.random() * 200, 2),
                        currency="NOK",
                    )
                )
        send(srv, BACKEND_KEY, *orders)
        refreshed = api(srv, "POST", "/api/insights/refresh")
        assert refreshed["models"]["problem"] is None and refreshed["models"]["bgnbd"]
        assert api(srv, "GET", "/api/insights/clv")["distribution"]["customers"] > 0
        assert "scipy" in mapped_packages(srv)
    finally:
        srv.stop()


def resident_bytes(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def test_stats_say_how_much_memory_the_server_and_its_store_hold(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", KILDE_DEDUPE_IDS="1000")
    try:
        orders = [
            {
                "messageId": f"mem-{n}",
                **track(
                    f"mem-{n}",
                    "Order Completed",
                    at(1),
                    order_id=f"m{n}",
                    revenue=1.0,
                    currency="NOK",
                ),
            }
            for n in range(30)
        ]
        for _ in range(2):  # the second time every message is a retry
            r = httpx.post(
                f"{srv.url}/v1/batch", json={"batch": orders}, auth=(BACKEND_KEY, ""), timeout=30
            )
            assert r.status_code == 200 and not r.json()["rejected"], r.text
        stats = api(srv, "GET", "/api/stats")
        seen_by_the_system = resident_bytes(srv)
        process, store = stats["process"], stats["store"]
        assert stats["events"] == 30
        # every stored id is remembered, and a retry is not remembered twice
        assert process["remembered_message_ids"] == 30
        assert abs(process["rss_bytes"] - seen_by_the_system) < 0.1 * seen_by_the_system
        assert process["peak_rss_bytes"] >= process["rss_bytes"] * 0.9
        # the blocks just written are in DuckDB's memory, within the limit Kilde sets
        assert store["duckdb_memory_limit"] == "122.0 MiB"  # DuckDB's spelling of 128 MB
        assert 0 < store["duckdb_memory_bytes"] <= 128 * 10**6
        shown = " ".join(srv.kilde("stats").stdout.split())  # as Rich wrapped it, unwrapped
        assert "serving process:" in shown and "30 message ids remembered" in shown
    finally:
        srv.stop()


def test_heavy_analytics_get_the_larger_memory_limit_while_they_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB's cache stays small (128 MB) so a big import does not fill the server's memory
    with the blocks it wrote; insights and identity rebuilds get 384 MB while they run."""
    store = Store(tmp_path / "data")

    def limit() -> str:
        return str(store.scalar("SELECT current_setting('memory_limit')"))

    try:
        assert limit() == "122.0 MiB"
        with store.analytics_memory():
            assert limit() == "366.2 MiB"
            with store.analytics_memory():  # a second heavy job at the same time
                assert limit() == "366.2 MiB"
            assert limit() == "366.2 MiB", "the first one still runs"
        assert limit() == "122.0 MiB"
    finally:
        store.close()
    # A big machine's larger usual limit is never lowered by analytics.
    monkeypatch.setenv("KILDE_DUCKDB_MEMORY_LIMIT", "1GiB")
    big = Store(tmp_path / "big")
    try:
        with big.analytics_memory():
            assert big.scalar("SELECT current_setting('memory_limit')") == "1.0 GiB"
    finally:
        big.close()


def test_an_insights_refresh_raises_the_limit_and_gives_it_back(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", KILDE_INSIGHTS_BACKGROUND="0")
    try:
        send(
            srv,
            BACKEND_KEY,
            *[
                track(
                    f"lim-{n}",
                    "Order Completed",
                    at(5 + n),
                    order_id=f"l{n}",
                    revenue=9.0,
                    currency="NOK",
                )
                for n in range(6)
            ],
        )
        refreshed = api(srv, "POST", "/api/insights/refresh")  # ran with the larger limit
        assert refreshed["models"]["profiles_with_orders"] == 6
        # and gave it back: the cache is small again
        assert api(srv, "GET", "/api/stats")["store"]["duckdb_memory_limit"] == "122.0 MiB"
    finally:
        srv.stop()


def test_an_analytics_limit_that_is_not_a_size_is_named_and_the_default_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KILDE_DUCKDB_ANALYTICS_MEMORY_LIMIT", "plenty")
    store = Store(tmp_path / "data")
    try:
        with store.analytics_memory():
            assert store.scalar("SELECT current_setting('memory_limit')") == "366.2 MiB"
    finally:
        store.close()
    assert "KILDE_DUCKDB_ANALYTICS_MEMORY_LIMIT must be a size such as 384MB" in caplog.text
