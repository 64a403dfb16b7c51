"""Privacy: the request tracker with its legal deadlines, export and erasure (admins, with
confirmation), recent erasures and the audit log: all through the privacy API's functions.

People are named in the POSTed form, never in a URL; the export answers the ZIP itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from kilde.web.dashboard.base import Page, page_route
from kilde.web.dashboard.optional import call, privacy
from kilde.web.errors import HttpProblem

router = APIRouter()

KINDS = ("access", "erasure", "correction", "opt_out")
LAWS = (("gdpr", "GDPR (30 days)"), ("ccpa", "CCPA (45 days)"))
STATES = ("open", "in_progress", "done", "refused")
VERIFICATIONS = ("pending", "verified", "failed")
ERASE_WORD = "ERASE"


def _person(page: Page, api: Any, model: Any, **extra: Any) -> Any:
    identifier = page.field("identifier")
    if not identifier:
        raise HttpProblem(
            400, "missing_identifier", "name the person", "type an email, user id, phone or id"
        )
    return model(identifier=identifier[:1000], **extra)


def _confirmed(page: Page) -> None:
    if page.field("confirm") != "yes":
        raise HttpProblem(
            400,
            "not_confirmed",
            "the action was not confirmed",
            "tick the box that confirms the person's identity was verified",
        )


def _action(page: Page, api: Any) -> tuple[str, Response | None, dict[str, Any] | None]:
    """Run the posted action; a notice, or a response to send instead (the export's ZIP)."""
    action = page.field("action")
    request = page.request
    request_id = page.field("request_id") or None
    if action in ("export", "erase") and not page.user.can("privacy"):
        raise HttpProblem(
            403,
            "forbidden_for_role",
            f"the role {page.user.role} does not allow personal-data export or erasure",
            "ask an admin",
        )
    if action in ("new_request", "update_request") and not page.user.can("change"):
        raise HttpProblem(403, "forbidden_for_role", "your role cannot change requests", "ask")
    if action == "export":
        _confirmed(page)
        body = _person(page, api, api.ExportBody, request_id=request_id, format="zip")
        response: Response = call(api.export_person, request, body)
        response.headers["Cache-Control"] = "no-store"
        return "", response, None
    if action == "erase":
        _confirmed(page)
        if page.field("typed") != ERASE_WORD:
            raise HttpProblem(
                400,
                "not_confirmed",
                f"erasure needs the word {ERASE_WORD} typed in the box",
                "an erasure cannot be undone; type the word to go ahead",
            )
        body = _person(page, api, api.EraseBody, request_id=request_id, compact=True)
        report: dict[str, Any] = call(api.erase_person, request, body)
        return f"Erased: {report.get('status', 'done')}.", None, report
    if action == "new_request":
        identifier = page.field("identifier")
        person = api.Person(identifier=identifier[:1000]) if identifier else None
        kind, law = page.field("kind"), page.field("law")
        if kind not in KINDS or law not in dict(LAWS):
            raise HttpProblem(400, "invalid_request", "unknown kind or law", "pick from the lists")
        created = call(
            api.new_request,
            request,
            api.NewRequest(kind=kind, law=law, person=person, note=page.field("note") or None),
        )
        return (
            f"Request {created.get('id', '')} logged; due {created.get('due_at', '')}.",
            None,
            None,
        )
    if action == "update_request":
        state = page.field("state") or None
        verification = page.field("verification") or None
        if (state and state not in STATES) or (verification and verification not in VERIFICATIONS):
            raise HttpProblem(400, "invalid_update", "unknown state", "pick from the lists")
        update = api.RequestUpdate(
            state=state,
            verification=verification,
            outcome=page.field("outcome") or None,
            extend=page.field("extend") == "yes",
        )
        call(api.update_request, request, page.field("request_id"), update)
        return "Request updated.", None, None
    return "", None, None


@page_route(router, "/privacy", "personal", methods=("GET", "POST"))
def privacy_page(page: Page) -> Response:
    api = privacy(page.request)
    if api is None:
        return page.render("unavailable.html", title="Privacy", what="Privacy", api="privacy")
    notice, report, problem = "", None, ""
    if page.form is not None:
        try:
            notice, response, report = _action(page, api)
        except HttpProblem as exc:
            problem = f"{exc.message}. {exc.fix}"
            response = None
        if response is not None:
            return response
    show = page.request.query_params.get("show", "open")
    show = show if show in ("open", "all") else "open"
    listing = call(api.list_requests, page.request, state=show, overdue=False, limit=200)
    audit = call(api.audit_log, page.request, limit=100, personal_only=False, action=None)
    erasures = call(api.erasures, page.request, limit=20)
    return page.render(
        "privacy.html",
        title="Privacy",
        notice=notice,
        problem=problem,
        report=report,
        requests=listing,
        show=show,
        audit=audit["entries"],
        erasures=erasures["erasures"],
        kinds=KINDS,
        laws=LAWS,
        states=STATES,
        verifications=VERIFICATIONS,
        erase_word=ERASE_WORD,
    )
