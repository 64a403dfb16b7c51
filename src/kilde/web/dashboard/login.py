"""Logging in and out, and the admins' page of dashboard users (the same functions as
`/api/users` and `kilde users`)."""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from kilde.web.dashboard import auth
from kilde.web.dashboard.base import SECURITY_HEADERS, Page, page_route, render

router = APIRouter()


def _safe_next(target: Any) -> str:
    # Only paths of this site: not //host, nor /\host (a backslash), which browsers read as //host.
    if isinstance(target, str) and re.match(r"^/(?![/\\])", target):
        return target.split("?", 1)[0][:200]
    return "/"


def _login_form(
    request: Request, status: int = 200, message: str = "", username: str = ""
) -> Response:
    token = secrets.token_urlsafe(24)
    store = request.app.state.store
    no_users = not store.scalar("SELECT count(*) FROM dashboard_users")
    response = render(
        request,
        "login.html",
        None,
        status,
        title="Log in",
        login_csrf=token,
        next=_safe_next(request.query_params.get("next") or request.headers.get("x-next")),
        message=message,
        username=username,
        no_users=no_users,
        active="",
    )
    response.set_cookie(
        auth.LOGIN_COOKIE, token, max_age=3600, **(auth.cookie_options(request) | {"path": "/"})
    )
    return response


@router.get("/login", include_in_schema=False)
async def login_page(request: Request) -> Response:
    session = await run_in_threadpool(auth.request_session, request)
    if session is not None:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    return await run_in_threadpool(_login_form, request)


@router.post("/login", include_in_schema=False)
async def login(request: Request) -> Response:
    form = await request.form(max_files=0, max_fields=10)
    username = str(form.get("username") or "").strip()[:64]
    password = str(form.get("password") or "")
    given = str(form.get("csrf_token") or "")
    expected = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(given, expected) or not auth.same_origin(request):
        return await run_in_threadpool(
            _login_form, request, 403, "The login form expired. Please try again.", username
        )
    client = request.client.host if request.client else ""
    key = (client, username.lower())
    limiter = auth.throttle(request)
    if limiter.blocked(key):
        return await run_in_threadpool(
            _login_form,
            request,
            429,
            "Too many failed attempts. Wait a quarter of an hour, or ask an admin to set a new "
            "password with `kilde users password`.",
            username,
        )
    state = request.app.state
    user = await run_in_threadpool(auth.verify_login, state.store, state.writer, username, password)
    if user is None:
        limiter.failed(key)
        return await run_in_threadpool(
            _login_form, request, 401, "The user name or the password is wrong.", username
        )
    limiter.succeeded(key)
    token = await run_in_threadpool(auth.create_session, state.writer, user)
    response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
    response.headers.update(SECURITY_HEADERS)
    options = auth.cookie_options(request)
    response.set_cookie(auth.COOKIE, token, max_age=auth.SESSION_HOURS * 3600, **options)
    response.delete_cookie(auth.LOGIN_COOKIE, path="/")
    return response


@page_route(router, "/logout", "aggregate", methods=("POST",))
def logout(page: Page) -> Response:
    auth.end_session(page.state.writer, page.session.token)
    response = RedirectResponse("/login", status_code=303)
    response.headers.update(SECURITY_HEADERS)
    response.delete_cookie(auth.COOKIE, path="/")
    return response


@page_route(router, "/users", "admin", methods=("GET", "POST"))
def users_page(page: Page) -> Response:
    notice, problem = "", ""
    if page.form is not None:
        action = page.field("action")
        name = page.field("username")
        state = page.state
        try:
            if action == "add":
                auth.add_user(
                    state.store, state.writer, name, page.field("password"), page.field("role")
                )
                notice = f"Added {name}."
            elif action == "role":
                auth.update_user(
                    state.store, state.writer, name, password=None, role=page.field("role")
                )
                notice = f"{name} is now {page.field('role')}."
            elif action == "password":
                auth.update_user(
                    state.store, state.writer, name, password=page.field("password"), role=None
                )
                notice = f"New password set for {name}; their sessions have ended."
            elif action == "remove":
                if name == page.user.username:
                    problem = "You cannot remove yourself."
                else:
                    auth.remove_user(state.store, state.writer, name)
                    notice = f"Removed {name}."
        except auth.UserError as exc:
            problem = f"{exc.problem.message}. {exc.problem.fix}"
    return page.render(
        "users.html",
        title="Users",
        users=auth.list_users(page.state.store),
        roles=auth.ROLES,
        notice=notice,
        problem=problem,
    )
