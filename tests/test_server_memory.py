"""The server holds only what it uses: scipy (about 40 MB) is loaded when a lifetime-value model
is first fitted, not at start."""

from __future__ import annotations

import random
from pathlib import Path

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
