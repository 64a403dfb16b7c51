"""The admin API: bearer token, health, stats, and the events listing with its filters."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, APP_KEY, BACKEND_KEY, WEB_KEY, Server, start_server


def get(
    server: Server, path: str, token: str | None = ADMIN_TOKEN, **params: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{server.url}{path}", params=params, headers=headers)


def batch(server: Server, key: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/batch", json={"batch": messages}, auth=(key, ""))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def all_pages(server: Server, limit: int, **filters: Any) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        params = {**filters, "limit": limit, **({"cursor": cursor} if cursor else {})}
        body = get(server, "/api/events", **params).json()
        pages.append(body["events"])
        assert body["count"] == len(body["events"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not end"


# -- the token ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "missing_admin_token"),
        ({"Authorization": "Bearer"}, "missing_admin_token"),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, "missing_admin_token"),
        ({"Authorization": "Bearer kat_not-the-token"}, "invalid_admin_token"),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, "invalid_admin_token"),
    ],
)
@pytest.mark.parametrize("path", ["/api/stats", "/api/events", "/api/bad-events", "/api/plan"])
def test_admin_endpoints_need_the_bearer_token(
    kilde_server: Server, path: str, headers: dict[str, str], error: str
) -> None:
    response = httpx.get(f"{kilde_server.url}{path}", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert body["success"] is False
    assert body["error"] == error
    assert "kilde admin token" in body["fix"]


def test_replay_needs_the_token_too(kilde_server: Server) -> None:
    response = httpx.post(f"{kilde_server.url}/api/bad-events/replay", json={})
    assert response.status_code == 401


def test_health_needs_no_token(kilde_server: Server) -> None:
    response = httpx.get(f"{kilde_server.url}/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", response.json()["version"])


def test_token_rotation_makes_the_old_token_fail(own_server: Server) -> None:
    assert get(own_server, "/api/stats").status_code == 200
    result = own_server.kilde("admin", "token")
    [new_token] = re.findall(r"kat_[A-Za-z0-9_\-]{20,}", result.stdout)
    assert new_token != ADMIN_TOKEN

    old = get(own_server, "/api/stats")
    assert old.status_code == 401
    assert old.json()["error"] == "invalid_admin_token"
    assert get(own_server, "/api/stats", token=new_token).status_code == 200
    # The token is stored hashed, never in clear.
    stored = "".join(p.read_text(errors="replace") for p in own_server.data_dir.glob("*token*"))
    assert new_token not in stored and ADMIN_TOKEN not in stored

    # The CLI with the old token is told what to do; with the new one it works.
    refused = own_server.kilde("stats", check=False)
    assert refused.returncode != 0
    assert "admin token" in refused.stdout + refused.stderr
    assert own_server.kilde("stats", "--json", "--token", new_token).returncode == 0

    # Rotating again retires the second token as well.
    own_server.kilde("admin", "token")
    assert get(own_server, "/api/stats", token=new_token).status_code == 401


# -- stats --------------------------------------------------------------------------------------


def test_stats_count_events_per_source_and_type_and_dead_letters(own_server: Server) -> None:
    empty = get(own_server, "/api/stats").json()
    assert (empty["events"], empty["flagged"], empty["dead_letters_pending"]) == (0, 0, 0)

    batch(
        own_server,
        WEB_KEY,
        [
            {"type": "page", "anonymousId": "a-1", "name": "Home"},
            {"type": "page", "anonymousId": "a-1", "name": "Tents"},
            {"type": "track", "anonymousId": "a-1", "event": "Product Viewed",
             "properties": {"product_id": "p-1"}},
            {"type": "track", "anonymousId": "a-1", "event": "Not In Plan"},
        ],
    )  # fmt: skip
    batch(own_server, BACKEND_KEY, [{"type": "identify", "userId": "u-1", "traits": {}}])
    batch(own_server, APP_KEY, [{"type": "track", "userId": "u-1", "event": "Not In Plan"}])

    stats = get(own_server, "/api/stats").json()
    assert stats["events"] == 5
    assert stats["flagged"] == 1
    assert stats["dead_letters_pending"] == 1
    counts = {(r["source"], r["type"]): r["events"] for r in stats["by_source_and_type"]}
    assert counts == {
        ("app", "track"): 1,
        ("backend", "identify"): 1,
        ("web", "page"): 2,
        ("web", "track"): 1,
    }
    assert stats["dead_letters"] == [{"source": "web", "status": "pending", "dead_letters": 1}]
    for row in stats["by_source_and_type"]:
        assert datetime.fromisoformat(row["last_received"]) > datetime.now(UTC) - timedelta(
            minutes=5
        )

    table = own_server.kilde("stats").stdout
    assert "5 events, 1 pending dead letters" in table
    assert "identify" in table and "backend" in table


# -- events: filters and pages -------------------------------------------------------------------

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server with 60 known events: 3 users, 2 sources, all types, some at the same time."""
    from tests.conftest import start_server

    server = start_server(tmp_path_factory.mktemp("listing") / "data")
    run = uuid.uuid4().hex[:6]
    web: list[dict[str, Any]] = []
    backend: list[dict[str, Any]] = []
    for i in range(60):
        user = f"{run}-user-{i % 3}"
        when = T0 + timedelta(minutes=i // 4)  # four events share each minute
        message: dict[str, Any] = {"messageId": f"{run}-{i:02d}", "timestamp": when.isoformat()}
        if i % 5 == 0:
            message.update(type="identify", userId=user, traits={"city": "Oslo"})
            backend.append(message)
        elif i % 5 == 1:
            message.update(type="page", anonymousId=f"{run}-anon-{i % 2}", name="Home")
            web.append(message)
        elif i % 5 == 2:
            order = {"order_id": f"o-{i}", "revenue": 10, "currency": "NOK"}
            message.update(type="track", userId=user, event="Order Completed", properties=order)
            backend.append(message)
        else:
            message.update(type="track", userId=user, event="Signed In")
            web.append(message)
    assert batch(server, WEB_KEY, web)["stored"] == len(web)
    assert batch(server, BACKEND_KEY, backend)["stored"] == len(backend)
    yield server, run
    server.stop()


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["message_id"] for e in events]


def test_events_are_newest_first(listing: Any) -> None:
    server, _ = listing
    events = get(server, "/api/events", limit=1000).json()["events"]
    assert len(events) == 60
    keys = [(e["timestamp"], e["message_id"]) for e in events]
    assert keys == sorted(keys, reverse=True)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"source": "backend"}, lambda i: i % 5 in (0, 2)),
        ({"source": "web"}, lambda i: i % 5 not in (0, 2)),
        ({"type": "identify"}, lambda i: i % 5 == 0),
        ({"type": "page"}, lambda i: i % 5 == 1),
        ({"event": "Order Completed"}, lambda i: i % 5 == 2),
        ({"type": "track", "event": "Signed In"}, lambda i: i % 5 in (3, 4)),
        ({"user_id": "{run}-user-1"}, lambda i: i % 3 == 1 and i % 5 != 1),
        ({"anonymous_id": "{run}-anon-1"}, lambda i: i % 5 == 1 and i % 2 == 1),
        ({"source": "web", "user_id": "{run}-user-2"}, lambda i: i % 3 == 2 and i % 5 in (3, 4)),
        ({"since": "2026-06-01T12:10:00Z"}, lambda i: i // 4 >= 10),
        ({"until": "2026-06-01T12:03:00Z"}, lambda i: i // 4 < 3),
        (
            {"since": "2026-06-01T14:05:00+02:00", "until": "2026-06-01T12:07:00Z"},
            lambda i: 5 <= i // 4 < 7,
        ),
        ({"source": "nowhere"}, lambda i: False),
    ],
)
def test_events_filters(listing: Any, filters: dict[str, str], expected: Any) -> None:
    server, run = listing
    params = {k: v.format(run=run) for k, v in filters.items()}
    events = get(server, "/api/events", limit=1000, **params).json()["events"]
    assert sorted(ids(events)) == [f"{run}-{i:02d}" for i in range(60) if expected(i)]


@pytest.mark.parametrize(
    ("limit", "filters"),
    [(7, {}), (4, {}), (1, {"source": "backend"}), (5, {"since": "2026-06-01T12:05:00Z"})],
)
def test_cursor_pagination_has_no_duplicates_and_no_gaps(
    listing: Any, limit: int, filters: dict[str, str]
) -> None:
    server, _ = listing
    everything = ids(get(server, "/api/events", limit=1000, **filters).json()["events"])
    pages = all_pages(server, limit, **filters)
    assert all(len(page) == limit for page in pages[:-1])
    assert 1 <= len(pages[-1]) <= limit
    paged = [m for page in pages for m in ids(page)]
    assert paged == everything  # same order, nothing twice, nothing left out


def test_pages_stay_stable_while_new_events_arrive(listing: Any) -> None:
    server, run = listing
    first = get(server, "/api/events", limit=10, source="web").json()
    # An event arrives between two page requests; it is newer, so it is not on the next page.
    batch(
        server,
        WEB_KEY,
        [{"type": "page", "anonymousId": f"{run}-late", "messageId": f"{run}-late"}],
    )
    second = get(server, "/api/events", limit=10, source="web", cursor=first["next_cursor"]).json()
    assert not set(ids(first["events"])) & set(ids(second["events"]))
    assert f"{run}-late" not in ids(second["events"])


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"cursor": "WyJ4Il0="}, "invalid_cursor"),
        ({"limit": 0}, "invalid_request"),
        ({"limit": 100000}, "invalid_request"),
        ({"since": "last tuesday"}, "invalid_request"),
    ],
)
def test_bad_listing_parameters_are_400_with_a_fix(
    kilde_server: Server, params: dict[str, Any], error: str
) -> None:
    response = get(kilde_server, "/api/events", **params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == error
    assert body["fix"]
    for value in params.values():
        assert str(value) not in body["message"]


def test_events_list_json_matches_the_api(listing: Any) -> None:
    server, run = listing
    result = server.kilde(
        "events", "list", "--json", "--user-id", f"{run}-user-0", "--limit", "100"
    )
    listed = orjson.loads(result.stdout)
    api = get(server, "/api/events", user_id=f"{run}-user-0", limit=100).json()["events"]
    assert ids(listed) == ids(api)


def test_pagination_keeps_same_message_id_from_two_sources(kilde_server: Server) -> None:
    """Dedupe is per source, so two sources may store the same messageId at the same time."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    message = {
        "type": "track",
        "userId": user,
        "event": "Signed In",
        "messageId": f"{user}-shared",
        "timestamp": T0.isoformat(),
    }
    batch(kilde_server, WEB_KEY, [message])
    batch(kilde_server, BACKEND_KEY, [message])
    pages = all_pages(kilde_server, 1, user_id=user)
    assert sorted(e["source"] for page in pages for e in page) == ["backend", "web"]


def test_stats_show_the_duckdb_settings_an_operator_chose(tmp_path: Path) -> None:
    """KILDE_DUCKDB_THREADS and KILDE_DUCKDB_MEMORY_LIMIT reach the store's DuckDB, and the
    stats say so; a thread count that is not a positive whole number is ignored with a warning
    that names the variable."""
    tuned = start_server(
        tmp_path / "tuned" / "data", KILDE_DUCKDB_THREADS="1", KILDE_DUCKDB_MEMORY_LIMIT="200MB"
    )
    try:
        store = get(tuned, "/api/stats").json()["store"]
    finally:
        tuned.stop()
    assert store["duckdb_threads"] == 1
    assert store["duckdb_memory_limit"] == "190.7 MiB"  # DuckDB's spelling of 200 MB
    wrong = start_server(tmp_path / "wrong" / "data", KILDE_DUCKDB_THREADS="two")
    try:
        threads = get(wrong, "/api/stats").json()["store"]["duckdb_threads"]
    finally:
        wrong.stop()
    default = duckdb.connect().execute("SELECT current_setting('threads')").fetchone()
    assert default is not None and threads == default[0], "DuckDB's own default"
    assert "KILDE_DUCKDB_THREADS must be a positive whole number" in wrong.log_text()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="thread names are read from /proc")
def test_the_servers_threads_carry_their_names_for_top(kilde_server: Server) -> None:
    """`top -H` and `ps -L` tell the writer and the background engines from the event loop."""
    tasks = Path(f"/proc/{kilde_server.process.pid}/task")
    names = {(task / "comm").read_text().strip() for task in tasks.iterdir()}
    assert {"kilde-writer", "kilde-identity", "kilde-insights", "kilde-consent"} <= names, names


def test_stats_say_where_acknowledgements_spend_their_time(tmp_path: Path) -> None:
    """The writer's totals: commits, the batches and events in them, and the time batches
    waited for their commit, the commits took and requests took to go on after them."""
    srv = start_server(
        tmp_path / "data", KILDE_IDENTITY_BACKGROUND="0", KILDE_INSIGHTS_BACKGROUND="0"
    )
    try:
        before = get(srv, "/api/stats").json()["writer"]
        pages = [
            [{"type": "page", "anonymousId": f"w-{n}", "messageId": f"w-{r}-{n}", "name": "Home"}
             for n in range(10)]
            for r in range(3)
        ]  # fmt: skip
        for page in pages:
            batch(srv, WEB_KEY, page)
        batch(srv, WEB_KEY, pages[0])  # a retry: acknowledged, stored once
        after = get(srv, "/api/stats").json()["writer"]
        shown = " ".join(srv.kilde("stats").stdout.split())  # as Rich wrapped it, unwrapped
    finally:
        srv.stop()
    done = {key: after[key] - before[key] for key in after}
    assert done["events"] == 30
    # every request went on after its commit: the four batches, and the audit record of the
    # first stats read (admin reads are audited, after the answer is made)
    assert done["resumed"] == 5
    assert 1 <= done["commits"] <= done["batches"]
    assert done["batches"] >= 5
    assert done["commit_seconds"] > 0 and done["resume_seconds"] > 0
    assert done["queue_seconds"] >= 0
    # the CLI prints the averages since the start
    found = re.search(r"writer since the start: ([\d,]+) commits of ([\d,]+) events", shown)
    assert found, shown
    commits = int(found[1].replace(",", ""))
    assert commits == after["commits"] + 1  # with the audit record of the second stats read
    assert int(found[2].replace(",", "")) == round(after["events"] / commits)
    assert "ms each" in shown and "requests went on" in shown
    # the four batches of plain events were answered from the acknowledgement log, and the
    # second stats read waited until the applier had put all 30 into DuckDB
    assert done["logged"] == 4
    found = re.search(
        r"([\d,]+) of the commits went through the acknowledgement log, whose events reached "
        r"DuckDB in ([\d,]+) commits of ([\d,]+) events",
        shown,
    )
    assert found, shown
    applies = int(found[2])
    assert int(found[1]) == 4 and 1 <= applies <= 3 and int(found[3]) == round(30 / applies)
