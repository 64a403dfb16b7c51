"""Dashboard users, sessions, CSRF and roles.

- Users are staff, added with `kilde users add` (admin API `/api/users`, admin only). Their
  passwords are kept as argon2id hashes (argon2-cffi), each with its own salt and parameters.
- A login makes a server-side session: the cookie holds 256 random bits, the store only their
  SHA-256 (HttpOnly, SameSite=Lax, Secure over https). Sessions end after `SESSION_HOURS`, or
  after `IDLE_HOURS` without a request, at logout, and when the user is removed or gets a new
  password.
- Every form and action carries a CSRF token derived from the session cookie (an HMAC of it),
  so a page on another site cannot act for a logged-in user. The login form itself uses a
  double-submit cookie.
- Roles: admin (everything), analyst (everything but personal-data export and erasure, and user
  management), viewer (aggregates only: no profiles, no event or dead-letter payloads, no
  changes). The same roles hold on the admin API when it is called with the session cookie
  (`authorize_api`, called by `require_admin`); the bearer admin token keeps every right.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from kilde.store import Store
from kilde.store.writer import WriteBatch
from kilde.web.errors import HttpProblem

Role = Literal["admin", "analyst", "viewer"]
ROLES: tuple[str, ...] = get_args(Role)
# What an endpoint or page exposes or does:
# aggregate: counts and charts; personal: data about a person (profiles, payloads, ids);
# change: actions that change data or settings (replay, segments, imports, plan reload);
# privacy: personal-data export and erasure; admin: users and anything not classified.
Level = Literal["aggregate", "personal", "change", "privacy", "admin"]
ROLE_LEVELS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"aggregate"}),
    "analyst": frozenset({"aggregate", "personal", "change"}),
    "admin": frozenset(get_args(Level)),
}
LEVEL_TEXT = {
    "aggregate": "aggregate figures",
    "personal": "personal data",
    "change": "changes to data or settings",
    "privacy": "personal-data export and erasure",
    "admin": "user administration",
}

COOKIE = "kilde_session"
LOGIN_COOKIE = "kilde_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_HOURS = 12
IDLE_HOURS = 2
TOUCH_SECONDS = 300
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Compared against when the user does not exist, so a wrong name costs as long as a wrong
# password and the answer's timing does not tell which names exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class User:
    username: str
    role: str

    def can(self, level: str) -> bool:
        return level in ROLE_LEVELS.get(self.role, frozenset())


@dataclass(frozen=True)
class Session:
    user: User
    token: str  # the cookie's value, only ever held in memory for this request

    @property
    def csrf(self) -> str:
        return csrf_for(self.token)


class UserError(Exception):
    def __init__(self, status: int, code: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.problem = HttpProblem(status, code, message, fix)


# -- the API's levels ---------------------------------------------------------------------------
# Which level each admin API route exposes when it is called with a session cookie. Routes not
# listed are for admins only: a new endpoint is closed to analysts and viewers until someone
# decides what it shows.

_A, _P, _C, _X = "aggregate", "personal", "change", "privacy"
API_LEVELS: dict[tuple[str, str], str] = {
    # admin_api
    ("GET", "/api/stats"): _A,
    ("GET", "/api/plan"): _A,
    ("GET", "/api/bad-events"): _A,  # reasons and counts; the payload is on the next route
    ("GET", "/api/bad-events/{letter_id}"): _P,
    ("GET", "/api/events"): _P,
    ("POST", "/api/bad-events/replay"): _C,
    ("POST", "/api/plan/reload"): _C,
    # consent, forms, email
    ("GET", "/api/consent"): _P,
    ("GET", "/api/forms"): _A,
    ("GET", "/api/forms/{form_id}/results"): _A,
    ("POST", "/api/forms/{form_id}/invites"): _C,
    ("GET", "/api/email/campaigns"): _A,
    ("GET", "/api/email/campaigns/{campaign}/report"): _A,
    ("POST", "/api/email/campaigns/{campaign}/render"): _C,
    # imports
    ("GET", "/api/imports"): _A,
    ("GET", "/api/imports/{run_id}"): _A,
    ("GET", "/api/imports/{run_id}/rejects"): _P,
    ("POST", "/api/imports"): _C,
    ("POST", "/api/imports/chunks"): _C,
    ("POST", "/api/imports/{run_id}/finish"): _C,
    ("POST", "/api/imports/uploads"): _C,
    ("POST", "/api/imports/uploads/{upload_id}/run"): _C,
    # profiles and identity
    ("GET", "/api/identity/status"): _A,
    ("GET", "/api/identity/report"): _P,
    ("POST", "/api/profiles/lookup"): _P,
    ("GET", "/api/profiles"): _P,
    ("POST", "/api/profiles/search"): _P,
    ("GET", "/api/profiles/{profile_id}"): _P,
    ("GET", "/api/profiles/{profile_id}/events"): _P,
    ("GET", "/api/merge-conflicts"): _P,
    ("POST", "/api/profiles/{profile_id}/unmerge"): _C,
    ("POST", "/api/profiles/rebuild"): _C,
    ("POST", "/api/profiles/refresh"): _C,
    # activation
    ("GET", "/api/destinations"): _A,
    ("GET", "/api/destinations/{name}/deliveries"): _P,
    ("POST", "/api/destinations/{name}/run"): _C,
    ("POST", "/api/destinations/{name}/test"): _C,
    ("POST", "/api/destinations/{name}/replay"): _C,
    # insights (segments, RFM, CLV, churn, funnels, ...)
    ("GET", "/api/segments"): _A,
    ("GET", "/api/segments/{segment_id}"): _A,  # the rule and the membership history
    ("GET", "/api/segments/{segment_id}/members"): _P,
    ("POST", "/api/segments/preview"): _P,  # the sample names profiles
    ("PUT", "/api/segments/{segment_id}"): _C,
    ("DELETE", "/api/segments/{segment_id}"): _C,
    ("POST", "/api/segments/refresh"): _C,
    ("POST", "/api/insights/refresh"): _C,
    ("GET", "/api/insights/status"): _A,
    ("GET", "/api/insights/rfm"): _A,
    ("GET", "/api/insights/clv"): _P,  # the most valuable customers by profile id
    ("GET", "/api/insights/churn"): _A,
    ("GET", "/api/insights/preferences"): _A,
    ("POST", "/api/insights/funnel"): _A,
    ("GET", "/api/insights/retention"): _A,
    ("GET", "/api/insights/attribution"): _A,
    ("GET", "/api/insights/campaigns"): _A,
    ("GET", "/api/insights/trends"): _A,
    # privacy
    ("POST", "/api/privacy/export"): _X,
    ("POST", "/api/privacy/erase"): _X,
    ("POST", "/api/privacy/suppress"): _X,
    ("POST", "/api/privacy/retain"): _X,
    ("GET", "/api/privacy/suppression"): _A,  # hashes and counts
    ("GET", "/api/privacy/erasures"): _A,  # hashes and counts
    ("GET", "/api/privacy/gate"): _A,
    ("GET", "/api/privacy/retention"): _A,
    ("GET", "/api/privacy/register"): _A,
    ("POST", "/api/privacy/consent"): _C,
    ("POST", "/api/privacy/consent/state"): _P,
    ("POST", "/api/privacy/do-not-sell"): _C,
    ("POST", "/api/privacy/do-not-sell/status"): _P,
    ("POST", "/api/privacy/check"): _P,
    ("GET", "/api/privacy/requests"): _P,
    ("GET", "/api/privacy/requests/{request_id}"): _P,
    ("POST", "/api/privacy/requests"): _C,
    ("POST", "/api/privacy/requests/{request_id}"): _C,
    ("GET", "/api/privacy/audit"): _P,
    # the dashboard's own
    ("GET", "/api/overview"): _A,
    ("GET", "/api/me"): _A,
}


def api_level(method: str, route_path: str) -> str:
    method = "GET" if method == "HEAD" else method
    return API_LEVELS.get((method, route_path), "admin")


def classify(method: str, route_path: str, level: Level) -> None:
    """Declare the level of an API route (for routers that land after this table was written)."""
    API_LEVELS.setdefault((method, route_path), level)


# -- passwords and users ------------------------------------------------------------------------


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(
            400,
            "weak_password",
            f"the password is shorter than {MIN_PASSWORD} characters",
            "choose a longer password; a phrase of several words is easy to type and hard to guess",
        )
    if len(password) > MAX_PASSWORD:
        raise UserError(400, "password_too_long", "the password is too long", "use a shorter one")


def check_username(username: str) -> None:
    if not _USERNAME.match(username):
        raise UserError(
            400,
            "invalid_username",
            "a user name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter "
            "or digit",
            "choose another user name",
        )


def check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(400, "invalid_role", "unknown role", "use one of " + ", ".join(ROLES))


def list_users(store: Store) -> list[dict[str, Any]]:
    return store.query(
        "SELECT username, role, created_at, updated_at, last_login_at, "
        "(SELECT count(*) FROM dashboard_sessions s WHERE s.username = u.username "
        " AND s.expires_at > now()) AS sessions "
        "FROM dashboard_users u ORDER BY username"
    )


def _exists(store: Store, username: str) -> bool:
    return bool(store.scalar("SELECT 1 FROM dashboard_users WHERE username = ?", [username]))


def add_user(store: Store, writer: Any, username: str, password: str, role: str) -> None:
    check_username(username)
    check_role(role)
    check_password_rules(password)
    if _exists(store, username):
        raise UserError(
            409,
            "user_exists",
            "a user with that name exists",
            "choose another name, or `kilde users password NAME` to change the password",
        )
    now = datetime.now(UTC)
    writer.write_sync(
        WriteBatch(
            statements=[
                (
                    "INSERT INTO dashboard_users (username, password_hash, role, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?)",
                    [username, hash_password(password), role, now, now],
                )
            ]
        )
    )


def _missing_user() -> UserError:
    return UserError(
        404, "unknown_user", "there is no such user", "list them with `kilde users list`"
    )


def remove_user(store: Store, writer: Any, username: str) -> None:
    if not _exists(store, username):
        raise _missing_user()
    writer.write_sync(
        WriteBatch(
            statements=[
                ("DELETE FROM dashboard_sessions WHERE username = ?", [username]),
                ("DELETE FROM dashboard_users WHERE username = ?", [username]),
            ]
        )
    )


def update_user(
    store: Store, writer: Any, username: str, *, password: str | None, role: str | None
) -> None:
    """A new password (which ends the user's sessions) and/or a new role."""
    if not _exists(store, username):
        raise _missing_user()
    now = datetime.now(UTC)
    statements: list[tuple[str, list[Any]]] = []
    if role is not None:
        check_role(role)
        statements.append(
            (
                "UPDATE dashboard_users SET role = ?, updated_at = ? WHERE username = ?",
                [role, now, username],
            )
        )
    if password is not None:
        check_password_rules(password)
        statements.append(
            (
                "UPDATE dashboard_users SET password_hash = ?, updated_at = ? WHERE username = ?",
                [hash_password(password), now, username],
            )
        )
        statements.append(("DELETE FROM dashboard_sessions WHERE username = ?", [username]))
    if statements:
        writer.write_sync(WriteBatch(statements=statements))


def verify_login(store: Store, writer: Any, username: str, password: str) -> User | None:
    """The user if the password is theirs; rehashes when the parameters got stronger."""
    rows = store.query(
        "SELECT username, role, password_hash FROM dashboard_users WHERE username = ?",
        [username],
    )
    stored = rows[0]["password_hash"] if rows else _DUMMY_HASH
    try:
        _hasher.verify(stored, password[:MAX_PASSWORD])
    except (VerificationError, InvalidHashError):
        return None
    if not rows:
        return None
    now = datetime.now(UTC)
    statements: list[tuple[str, list[Any]]] = [
        ("UPDATE dashboard_users SET last_login_at = ? WHERE username = ?", [now, username])
    ]
    if _hasher.check_needs_rehash(stored):
        statements.append(
            (
                "UPDATE dashboard_users SET password_hash = ? WHERE username = ?",
                [hash_password(password), username],
            )
        )
    writer.write_sync(WriteBatch(statements=statements))
    return User(rows[0]["username"], rows[0]["role"])


# -- sessions -----------------------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_for(token: str) -> str:
    return hmac.new(token.encode(), b"kilde-dashboard-csrf", hashlib.sha256).hexdigest()


def create_session(writer: Any, user: User) -> str:
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    writer.write_sync(
        WriteBatch(
            statements=[
                ("DELETE FROM dashboard_sessions WHERE expires_at < ?", [now]),
                (
                    "INSERT INTO dashboard_sessions (id, username, created_at, last_seen_at, "
                    "expires_at) VALUES (?, ?, ?, ?, ?)",
                    [_digest(token), user.username, now, now, now + timedelta(hours=SESSION_HOURS)],
                ),
            ]
        )
    )
    return token


def session_of(store: Store, writer: Any, token: str | None) -> Session | None:
    """The live session a cookie value stands for, touched at most every few minutes."""
    if not token or len(token) > 200:
        return None
    rows = store.query(
        "SELECT u.username, u.role, s.last_seen_at, s.expires_at FROM dashboard_sessions s "
        "JOIN dashboard_users u ON u.username = s.username WHERE s.id = ?",
        [_digest(token)],
    )
    if not rows:
        return None
    row = rows[0]
    now = datetime.now(UTC)
    if row["expires_at"] <= now or row["last_seen_at"] + timedelta(hours=IDLE_HOURS) <= now:
        end_session(writer, token)
        return None
    if (now - row["last_seen_at"]).total_seconds() > TOUCH_SECONDS:
        writer.write_sync(
            WriteBatch(
                statements=[
                    (
                        "UPDATE dashboard_sessions SET last_seen_at = ? WHERE id = ?",
                        [now, _digest(token)],
                    )
                ]
            )
        )
    return Session(User(row["username"], row["role"]), token)


def end_session(writer: Any, token: str) -> None:
    writer.write_sync(
        WriteBatch(statements=[("DELETE FROM dashboard_sessions WHERE id = ?", [_digest(token)])])
    )


def request_session(request: Request) -> Session | None:
    """The session of this request's cookie (cached on the request)."""
    cached: object = getattr(request.state, "dashboard_session", False)
    if cached is None or isinstance(cached, Session):
        return cached
    state = request.app.state
    session = session_of(state.store, state.writer, request.cookies.get(COOKIE))
    request.state.dashboard_session = session
    if session is not None:
        request.state.user = session.user  # the audit log names the dashboard user
    return session


def is_https(request: Request) -> bool:
    if request.url.scheme == "https":
        return True
    trust = getattr(request.app.state.settings, "trust_proxy", False)
    return bool(trust and request.headers.get("x-forwarded-proto", "").lower() == "https")


def cookie_options(request: Request) -> dict[str, Any]:
    return {"httponly": True, "samesite": "lax", "secure": is_https(request), "path": "/"}


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(str(given), session.csrf)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site (Origin header)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    hosts = {request.headers.get("host", "")}
    if getattr(request.app.state.settings, "trust_proxy", False):
        hosts.add(request.headers.get("x-forwarded-host", "").split(",")[0].strip())
    return origin.split("://", 1)[-1] in hosts - {""}


# -- login throttling ---------------------------------------------------------------------------


class LoginThrottle:
    """At most `limit` failed logins per client address and user name in `window` seconds."""

    def __init__(self, limit: int = 10, window: float = 900.0) -> None:
        self.limit = limit
        self.window = window
        self._fails: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._fails.setdefault(key, deque())
        while times and times[0] < now - self.window:
            times.popleft()
        return times

    def blocked(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return len(self._recent(key, time.monotonic())) >= self.limit

    def failed(self, key: tuple[str, str]) -> None:
        with self._lock:
            if len(self._fails) > 10_000:
                self._fails.clear()
            self._recent(key, time.monotonic()).append(time.monotonic())

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._fails.pop(key, None)


def throttle(request: Request) -> LoginThrottle:
    found = getattr(request.app.state, "login_throttle", None)
    if found is None:
        found = request.app.state.login_throttle = LoginThrottle()
    assert isinstance(found, LoginThrottle)
    return found


# -- the admin API with a session cookie -------------------------------------------------------


def authorize_api(request: Request) -> None:
    """Let a logged-in dashboard user call the admin API within their role.

    Called by `require_admin` when a request has no Authorization header but a session cookie.
    """
    session = request_session(request)
    if session is None:
        raise HttpProblem(
            401,
            "session_expired",
            "the dashboard session has ended",
            "log in again at /login, or send Authorization: Bearer <admin token>",
        )
    route = request.scope.get("route")
    level = api_level(request.method, str(getattr(route, "path", request.url.path)))
    if not session.user.can(level):
        raise HttpProblem(
            403,
            "forbidden_for_role",
            f"the role {session.user.role} does not allow {LEVEL_TEXT[level]}",
            "ask an admin for another role, or use the admin token",
        )
    if request.method not in _SAFE_METHODS and (
        not csrf_ok(session, request.headers.get(CSRF_HEADER)) or not same_origin(request)
    ):
        raise HttpProblem(
            403,
            "csrf_failed",
            "a change through the API with a session cookie needs the CSRF token",
            "send the X-CSRF-Token header with the token from the dashboard page (GET /api/me)",
        )


# -- /api/users (admin) and /api/me ------------------------------------------------------------


# Mounted by routes.py behind `require_admin` (so the audit log sees these calls too).
router = APIRouter(prefix="/api", tags=["users"])


class NewUser(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=MAX_PASSWORD)
    role: Role = "viewer"


class UserChange(BaseModel):
    password: str | None = Field(None, max_length=MAX_PASSWORD)
    role: Role | None = None


def _call(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except UserError as exc:
        raise exc.problem from None


@router.get("/users")
def users(request: Request) -> dict[str, Any]:
    return {"users": list_users(request.app.state.store), "roles": list(ROLES)}


@router.post("/users", status_code=201)
def create_user(request: Request, body: NewUser) -> dict[str, Any]:
    state = request.app.state
    _call(add_user, state.store, state.writer, body.username, body.password, body.role)
    return {"username": body.username, "role": body.role}


@router.post("/users/{username}")
def change_user(request: Request, username: str, body: UserChange) -> dict[str, Any]:
    """A new password (the user's sessions end) and/or a new role."""
    state = request.app.state
    _call(update_user, state.store, state.writer, username, password=body.password, role=body.role)
    return {"username": username, "changed": [k for k in ("password", "role") if getattr(body, k)]}


@router.delete("/users/{username}")
def delete_user(request: Request, username: str) -> dict[str, Any]:
    state = request.app.state
    _call(remove_user, state.store, state.writer, username)
    return {"removed": username}


@router.get("/me")
def me(request: Request) -> dict[str, Any]:
    """Who the caller is: a dashboard user (with the CSRF token for API changes) or the token."""
    session = getattr(request.state, "dashboard_session", None)
    if not isinstance(session, Session):
        return {"kind": "admin_token", "role": "admin"}
    return {
        "kind": "session",
        "username": session.user.username,
        "role": session.user.role,
        "levels": sorted(ROLE_LEVELS[session.user.role]),
        "csrf_token": session.csrf,
    }
