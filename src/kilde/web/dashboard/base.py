"""What every dashboard page shares: templates, the login and role guard, CSRF, static files.

A page is a plain function `(page: Page) -> Response`, registered with `@page_route`. It runs in
a worker thread (the store is read synchronously, as the admin API's routes do); the guard
before it makes sure that a user is logged in, that their role allows the page's level and, for
POST, that the form carries the session's CSRF token and comes from this site.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.responses import HTMLResponse, RedirectResponse, Response

from kilde.errors import KildeError
from kilde.web.dashboard.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LEVEL_TEXT,
    Level,
    Session,
    csrf_ok,
    request_session,
    same_origin,
)
from kilde.web.errors import HttpProblem

log = logging.getLogger("kilde.dashboard")

# Pages with personal data must not be kept by the browser or a proxy; everything is same-origin.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str
    level: str


NAV = (
    NavItem("/", "Overview", "aggregate"),
    NavItem("/live", "Live events", "aggregate"),
    NavItem("/profiles", "Profiles", "personal"),
    NavItem("/segments", "Segments", "aggregate"),
    NavItem("/insights", "Insights", "aggregate"),
    NavItem("/quality", "Data quality & plan", "aggregate"),
    NavItem("/privacy", "Privacy", "personal"),
    NavItem("/users", "Users", "admin"),
)


# -- static files -------------------------------------------------------------------------------

STATIC_FILES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "vendor/htmx.min.js": "text/javascript; charset=utf-8",
}


def _static_bytes(name: str) -> bytes:
    return (resources.files("kilde.web") / "static" / name).read_bytes()


def _static_version() -> str:
    digest = hashlib.sha256()
    for name in sorted(STATIC_FILES):
        digest.update(_static_bytes(name))
    return digest.hexdigest()[:12]


# -- formatting ---------------------------------------------------------------------------------


DASH = "\u2013"  # shown for a missing figure


def fmt_num(value: Any, digits: int = 0) -> str:
    if value is None or value == "":
        return DASH
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if (digits == 0 or isinstance(value, int)) and number.is_integer():
        return f"{int(number):,}".replace(",", "\u202f")
    return f"{number:,.{digits or 2}f}".replace(",", "\u202f")


def fmt_pct(value: Any, digits: int = 1) -> str:
    if value is None:
        return DASH
    return f"{float(value) * 100:.{digits}f}\u202f%"


def fmt_dt(value: Any, with_time: bool = True) -> str:
    if value is None or value == "":
        return DASH
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return str(value.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d"))
    return str(value)


def fmt_ago(value: Any) -> str:
    if not isinstance(value, datetime):
        return fmt_dt(value)
    seconds = (datetime.now(UTC) - value.astimezone(UTC)).total_seconds()
    for limit, unit, size in (
        (120, "s", 1),
        (7200, "min", 60),
        (172800, "h", 3600),
        (float("inf"), "days", 86400),
    ):
        if abs(seconds) < limit:
            return f"{seconds / size:.0f} {unit} ago"
    return fmt_dt(value)


def _json_pretty(value: Any) -> str:
    import orjson

    return orjson.dumps(
        value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str
    ).decode()


def _json_compact(value: Any) -> str:
    """A value on one line as JSON; dates, decimals and the like as text (Jinja's `tojson`
    fails on them, and an erasure report or a trait holds them)."""
    import orjson

    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()


templates = Environment(
    loader=PackageLoader("kilde.web", "templates/dashboard"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(
    num=fmt_num,
    pct=fmt_pct,
    dt=fmt_dt,
    ago=fmt_ago,
    pretty=_json_pretty,
    json=_json_compact,
    urlq=quote,
)
templates.globals["static_version"] = _static_version()


# -- pages --------------------------------------------------------------------------------------


@dataclass
class Page:
    request: Request
    session: Session
    form: FormData | None = None
    active: str = "/"
    notices: list[str] = field(default_factory=list)

    @property
    def user(self) -> Any:
        return self.session.user

    @property
    def state(self) -> Any:
        return self.request.app.state

    def field(self, name: str, default: str = "") -> str:
        if self.form is None:
            return default
        value = self.form.get(name)
        return value.strip() if isinstance(value, str) else default

    def fields(self, name: str) -> list[str]:
        if self.form is None:
            return []
        return [v.strip() for v in self.form.getlist(name) if isinstance(v, str) and v.strip()]

    def is_htmx(self) -> bool:
        return self.request.headers.get("hx-request") == "true"

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return render(self.request, template, self.session, status, active=self.active, **context)


def render(
    request: Request,
    template: str,
    session: Session | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    nav = [n for n in NAV if session is not None and session.user.can(n.level)]
    html = templates.get_template(template).render(
        request=request,
        session=session,
        user=session.user if session else None,
        csrf=session.csrf if session else "",
        nav=nav,
        can=(lambda level: session is not None and session.user.can(level)),
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def error_page(
    request: Request, session: Session | None, status: int, title: str, message: str, fix: str
) -> HTMLResponse:
    return render(
        request, "error.html", session, status, title=title, message=message, fix=fix, active=""
    )


def login_redirect(request: Request) -> Response:
    target = request.url.path if request.method == "GET" else "/"
    response = RedirectResponse(f"/login?next={quote(target)}", status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response


PageHandler = Callable[[Page], Response]


def page_route(
    router: APIRouter, path: str, level: Level, *, methods: tuple[str, ...] = ("GET",)
) -> Callable[[PageHandler], PageHandler]:
    """Register a page: logged-in users whose role allows `level`; POSTs need the CSRF token."""

    def register(handler: PageHandler) -> PageHandler:
        active = "/" + path.strip("/").split("/")[0] if path != "/" else "/"

        async def endpoint(request: Request) -> Response:
            form = None
            if request.method == "POST":
                form = await request.form(max_files=1, max_fields=200)
            return await run_in_threadpool(_guarded, request, form)

        def _guarded(request: Request, form: FormData | None) -> Response:
            session = request_session(request)
            if session is None:
                if request.headers.get("hx-request") == "true":
                    return Response(status_code=401, headers={"HX-Redirect": "/login"})
                return login_redirect(request)
            if not session.user.can(level):
                return error_page(
                    request,
                    session,
                    403,
                    "Not for your role",
                    f"Your role ({session.user.role}) does not allow {LEVEL_TEXT[level]}.",
                    "Ask an admin for a role that does, or go back to the overview.",
                )
            if request.method == "POST":
                given = request.headers.get(CSRF_HEADER) or (
                    form.get(CSRF_FIELD) if form is not None else None
                )
                if not csrf_ok(session, given if isinstance(given, str) else None) or not (
                    same_origin(request)
                ):
                    return error_page(
                        request,
                        session,
                        403,
                        "This form has expired",
                        "The form did not carry this session's security token (CSRF), or came "
                        "from another site, so nothing was done.",
                        "Reload the page and try again.",
                    )
            page = Page(request, session, form, active)
            try:
                response = handler(page)
            except HttpProblem as problem:
                response = error_page(
                    request,
                    session,
                    problem.status,
                    "That did not work",
                    problem.message,
                    problem.fix,
                )
            except KildeError as exc:
                response = error_page(
                    request, session, 422, "That did not work", exc.message, exc.fix or ""
                )
            except ValidationError as exc:  # a form field the API's model refuses (too long, ...)
                response = error_page(
                    request,
                    session,
                    400,
                    "That did not work",
                    invalid_fields(exc),
                    "Correct the named field and send the form again.",
                )
            except Exception as exc:  # a page, not a JSON body; the text may quote data
                log.error("page %s failed: %s", path, type(exc).__name__)
                response = error_page(
                    request,
                    session,
                    500,
                    "Something went wrong",
                    "Kilde failed to show this page.",
                    "Reload it; if it persists, report it with the time it happened.",
                )
            if request.method == "POST" or level in ("personal", "privacy", "admin"):
                audit(request, response.status_code, personal=level != "aggregate")
            return response

        router.add_api_route(
            path,
            endpoint,
            methods=list(methods),
            include_in_schema=False,
            response_class=HTMLResponse,
            name=f"dashboard:{handler.__name__}",
        )
        return handler

    return register


def invalid_fields(exc: ValidationError) -> str:
    """What was wrong with each refused field, without the values (they may be personal)."""
    parts = [
        f"{'.'.join(str(part) for part in error['loc']) or 'form'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    return "; ".join(parts[:5]) or "a field of the form was refused"


def audit(request: Request, status: int, *, personal: bool) -> None:
    """One row in the audit log (the privacy stage's) for a dashboard action or personal page.

    Route functions called by the page mark the request themselves (the person concerned as a
    salted hash, counts); without the privacy stage there is no audit log to write to.
    """
    from kilde.web.dashboard.optional import call, module

    found = module("kilde.privacy.audit")
    record = getattr(found, "_record", None) if found is not None else None
    if record is None:
        return
    if personal:
        request.state.audit_personal = True
    try:
        call(record, request, status)
    except Exception as exc:  # the page is served; the missing record is logged
        log.error("dashboard audit record failed: %s", type(exc).__name__)


def svg(markup: str) -> Markup:
    return Markup(markup)
