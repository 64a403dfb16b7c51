"""Dashboard users, sessions, CSRF and roles over HTTP, on a server of their own.

`kilde users` makes the users; logins go through the login form like a browser's; the admin
API is called with the session cookie, as the dashboard's scripts call it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kilde.web.dashboard import auth
from tests.conftest import Server, start_server
from tests.dashboard_support import csrf_of, login, users

PASSWORD = "a-long-enough-password"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    found = start_server(tmp_path_factory.mktemp("users") / "data", KILDE_TRUST_PROXY="1")
    for role in ("admin", "analyst", "viewer"):
        _api_add(found, f"{role}1", role)
    yield found
    found.stop()


def _api(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.admin, timeout=60)


def _api_add(server: Server, name: str, role: str, password: str = PASSWORD) -> httpx.Response:
    """The same as `kilde users add` (which calls this endpoint), without a process start."""
    with _api(server) as api:
        return api.post("/api/users", json={"username": name, "password": password, "role": role})


def _names(server: Server) -> set[str]:
    with _api(server) as api:
        return {u["username"] for u in api.get("/api/users").json()["users"]}


def test_users_cli_add_list_password_remove(server: Server) -> None:
    assert (
        users(
            server, "add", "kari", "--role", "analyst", "--password-stdin", password=PASSWORD
        ).returncode
        == 0
    )
    listed = users(server, "list", "--json")
    assert listed.returncode == 0
    rows = {u["username"]: u for u in __import__("json").loads(listed.stdout)}
    assert rows["kari"]["role"] == "analyst"
    assert "password" not in listed.stdout and "argon2" not in listed.stdout
    client = login(server, "kari", PASSWORD)
    assert client.get("/api/stats").status_code == 200
    # A new password ends the user's sessions, and the old password stops working.
    new = "another-long-password"
    assert users(server, "password", "kari", "--password-stdin", password=new).returncode == 0
    assert client.get("/api/stats").status_code == 401
    assert _login_status(server, "kari", PASSWORD) == 401
    client = login(server, "kari", new)
    # Removing the user ends their sessions too.
    assert users(server, "remove", "kari").returncode == 0
    assert client.get("/api/stats").status_code == 401
    assert "kari" not in _names(server)


def test_users_cli_refuses_bad_input(server: Server) -> None:
    weak = users(server, "add", "short", "--password-stdin", password="short")
    assert weak.returncode == 1 and "shorter than 10" in weak.stderr
    missing = users(server, "remove", "nobody")
    assert missing.returncode == 1 and "no such user" in missing.stderr
    for name, role, password, code in (
        ("admin1", "viewer", PASSWORD, "user_exists"),
        ("bad name!", "viewer", PASSWORD, "invalid_username"),
        ("x1", "viewer", "x" * 2000, "invalid_request"),
    ):
        answer = _api_add(server, name, role, password)
        assert answer.status_code in (400, 409) and answer.json()["error"] == code, name
        assert password not in answer.text
    assert _api_add(server, "x2", "root").status_code == 400
    assert not {"short", "bad name!", "x1", "x2"} & _names(server)


def _login_status(server: Server, name: str, password: str, **headers: str) -> int:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        return client.post(
            "/login",
            data={"username": name, "password": password, "csrf_token": token.group(1)},
            headers=headers,
        ).status_code


def test_session_cookie_flags(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        answer = client.post(
            "/login",
            data={"username": "viewer1", "password": PASSWORD, "csrf_token": token.group(1)},
        )
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and "kilde_session=" in v
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback
    with httpx.Client(base_url=server.url, timeout=60) as client:
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        answer = client.post(
            "/login",
            data={"username": "viewer1", "password": PASSWORD, "csrf_token": token.group(1)},
            headers={"X-Forwarded-Proto": "https"},  # behind a TLS proxy (KILDE_TRUST_PROXY)
        )
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and "kilde_session=" in v
    )
    assert "Secure" in cookie


def test_login_needs_its_csrf_cookie_and_is_throttled(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        refused = client.post("/login", data={"username": "admin1", "password": PASSWORD})
        assert refused.status_code == 403 and "kilde_session" not in client.cookies
    assert _api_add(server, "target", "viewer").status_code == 201
    statuses = [_login_status(server, "target", "wrong-password-guess") for _ in range(10)]
    assert statuses == [401] * 10
    assert _login_status(server, "target", PASSWORD) == 429  # even the right one, for a while


def test_pages_need_login_and_carry_security_headers(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/", "/live", "/profiles", "/segments", "/insights", "/quality", "/privacy"):
            answer = client.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert client.get("/static/vendor/htmx.min.js").status_code == 200
        assert client.get("/static/../app.py").status_code == 404
    client = login(server, "admin1", PASSWORD)
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "cdn" not in page.text.lower() and "https://" not in page.text


def test_forms_without_csrf_or_from_another_site_do_nothing(server: Server) -> None:
    client = login(server, "admin1", PASSWORD)
    token = csrf_of(client)
    new_user = {"action": "add", "username": "sneaky", "password": PASSWORD, "role": "admin"}
    no_token = client.post("/users", data=new_user)
    assert no_token.status_code == 403 and "expired" in no_token.text
    cross_site = client.post(
        "/users", data={**new_user, "csrf_token": token}, headers={"Origin": "https://evil.example"}
    )
    assert cross_site.status_code == 403
    assert "sneaky" not in _names(server)
    done = client.post("/users", data={**new_user, "csrf_token": token})
    assert done.status_code == 200 and "Added sneaky" in done.text
    assert "sneaky" in _names(server)
    # Logging out needs the token too, and ends the session.
    assert client.post("/logout").status_code == 403
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert client.get("/api/stats").status_code == 401


def test_roles_on_the_admin_api_with_a_session(server: Server) -> None:
    viewer, analyst, admin = (
        login(server, f"{r}1", PASSWORD) for r in ("viewer", "analyst", "admin")
    )
    # Aggregates for everyone.
    for client in (viewer, analyst, admin):
        assert client.get("/api/stats").status_code == 200
        assert client.get("/api/overview").status_code == 200
    # Personal data: not for viewers.
    for path in ("/api/events", "/api/bad-events/dl_x", "/api/profiles/p_00000000000000000000"):
        answer = viewer.get(path)
        assert answer.status_code == 403 and answer.json()["error"] == "forbidden_for_role", path
        assert analyst.get(path).status_code in (200, 404), path
    for path in (  # who is in a segment, the most valuable customers, requests, the audit log
        "/api/segments/high-value-at-risk/members",
        "/api/insights/clv",
        "/api/privacy/requests",
        "/api/privacy/audit",
    ):
        answer = viewer.get(path)
        assert answer.status_code == 403 and answer.json()["error"] == "forbidden_for_role", path
        assert analyst.get(path).status_code != 403, path
    lookup = {"email": "someone@example.com"}
    assert (
        viewer.post(
            "/api/profiles/lookup", json=lookup, headers={"X-CSRF-Token": csrf_of(viewer)}
        ).status_code
        == 403
    )
    assert (
        analyst.post(
            "/api/profiles/lookup", json=lookup, headers={"X-CSRF-Token": csrf_of(analyst)}
        ).status_code
        == 200
    )
    # Personal-data export and erasure, and users: admins only.
    export = {"email": "someone@example.com", "format": "json"}
    for client in (viewer, analyst):
        answer = client.post(
            "/api/privacy/export", json=export, headers={"X-CSRF-Token": csrf_of(client)}
        )
        assert answer.status_code == 403, answer.text
        assert client.get("/api/users").status_code == 403
    assert admin.get("/api/users").status_code == 200
    answer = admin.post(
        "/api/privacy/export", json=export, headers={"X-CSRF-Token": csrf_of(admin)}
    )
    assert answer.status_code == 404 and answer.json()["error"] != "forbidden_for_role"  # nobody
    # Changes through the API with a cookie need the CSRF header.
    answer = admin.post("/api/plan/reload")
    assert answer.status_code == 403 and answer.json()["error"] == "csrf_failed"
    assert (
        admin.post("/api/plan/reload", headers={"X-CSRF-Token": csrf_of(admin)}).status_code == 200
    )
    assert (
        viewer.post("/api/plan/reload", headers={"X-CSRF-Token": csrf_of(viewer)}).status_code
        == 403
    )
    # A session cookie that is not one answers 401, like a wrong token.
    with httpx.Client(base_url=server.url, cookies={"kilde_session": "forged"}) as forged:
        assert forged.get("/api/stats").status_code == 401


def test_passwords_are_argon2id_hashes() -> None:
    stored = auth.hash_password(PASSWORD)
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert stored != auth.hash_password(PASSWORD)  # salted


def test_nothing_personal_in_the_server_log(server: Server) -> None:
    client = login(server, "analyst1", PASSWORD)
    client.post(
        "/profiles",
        data={"csrf_token": csrf_of(client), "q": "private.person@example.com", "kind": "email"},
    )
    assert "private.person" not in server.log_text()
    assert PASSWORD not in server.log_text()
    assert not list(Path(server.data_dir).glob("*password*"))


def test_first_admin_with_a_generated_password(server: Server) -> None:
    """What `make run` does: a first admin with a made-up password, only when there is none."""
    again = users(server, "add", "first", "--role", "admin", "--generate", "--if-none")
    assert again.returncode == 0 and "exist already" in again.stdout
    assert "first" not in _names(server)
    made = users(server, "add", "second", "--role", "admin", "--generate")
    assert made.returncode == 0, made.stderr
    password = re.search(r"password \(shown once\): (\S+)", made.stdout)
    assert password is not None
    client = login(server, "second", password.group(1))
    assert client.get("/api/users").status_code == 200


def test_sessions_end_after_idle_hours_and_at_their_age_limit(tmp_path: Path) -> None:
    """Sessions are kept on the server: one left idle for over two hours and one older than
    twelve hours stop working, a fresh one goes on (the store's clock is moved, not Kilde's)."""
    import duckdb

    data = tmp_path / "data"
    first = start_server(data)
    try:
        _api_add(first, "sleepy", "viewer")
        clients = {name: login(first, "sleepy", PASSWORD) for name in ("idle", "old", "fresh")}
        for client in clients.values():
            assert client.get("/api/stats").status_code == 200
        tokens = {name: dict(client.cookies)["kilde_session"] for name, client in clients.items()}
    finally:
        first.stop()
    with duckdb.connect(str(data / "kilde.duckdb")) as db:
        for name, column, hours in (("idle", "last_seen_at", 3), ("old", "expires_at", 1)):
            db.execute(
                f"UPDATE dashboard_sessions SET {column} = now() - INTERVAL {hours} HOUR "
                "WHERE id = ?",
                [auth._digest(tokens[name])],
            )
    again = start_server(data)
    try:
        for name, status in (("idle", 401), ("old", 401), ("fresh", 200)):
            with httpx.Client(base_url=again.url, cookies={"kilde_session": tokens[name]}) as c:
                assert c.get("/api/stats").status_code == status, name
                page = c.get("/", follow_redirects=False)
                assert (page.status_code == 303) == (status == 401), name
    finally:
        again.stop()


def test_login_goes_back_only_to_a_page_of_this_site(server: Server) -> None:
    for given, expected in (
        ("/profiles", "/profiles"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("/privacy?identifier=someone@example.com", "/privacy"),  # no query kept
    ):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            form = client.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert token
            answer = client.post(
                "/login",
                data={
                    "username": "analyst1",
                    "password": PASSWORD,
                    "csrf_token": token.group(1),
                    "next": given,
                },
            )
        assert answer.status_code == 303 and answer.headers["location"] == expected, given
