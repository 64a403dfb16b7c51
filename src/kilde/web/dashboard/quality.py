"""Data quality and the plan: dead letters grouped by reason with replay, the collection plan
with the Art. 30 register of processing, and file imports with progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from kilde.collect.importers import api as import_api
from kilde.collect.importers.base import KINDS
from kilde.plan import Plan
from kilde.web import activate_api, admin_api
from kilde.web.dashboard.base import Page, page_route
from kilde.web.dashboard.optional import call, module

router = APIRouter()
MAX_LETTERS = 1000


def _groups(letters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pending dead letters by reason, the most frequent first."""
    groups: dict[str, dict[str, Any]] = {}
    for letter in letters:
        group = groups.setdefault(
            letter["reason"],
            {"reason": letter["reason"], "letters": [], "sources": set(), "paths": set()},
        )
        group["letters"].append(letter)
        group["sources"].add(letter["source"] or "(unknown)")
        if letter["path"]:
            group["paths"].add(letter["path"])
    result = sorted(groups.values(), key=lambda g: (-len(g["letters"]), g["reason"]))
    for i, group in enumerate(result):
        group["n"] = i
        group["sources"] = sorted(group["sources"])
        group["paths"] = sorted(group["paths"])
        group["latest"] = max(x["received_at"] for x in group["letters"])
    return result


def register_rows(plan: Plan) -> list[dict[str, Any]] | None:
    """The Art. 30 register's activities (the privacy stage's `register`), if installed."""
    found = module("kilde.privacy.register")
    activities: Callable[[Plan], list[dict[str, Any]]] | None = getattr(found, "activities", None)
    return activities(plan) if activities is not None else None


def _replay(page: Page) -> dict[str, Any]:
    ids = page.fields("ids")
    body = admin_api.ReplayRequest(ids=ids or None, source=None, reload_plan=True)
    return admin_api.replay_bad_events(page.request, body)


@page_route(router, "/quality", "aggregate", methods=("GET", "POST"))
def quality_page(page: Page) -> Response:
    result: dict[str, Any] | None = None
    if page.form is not None:
        if not page.user.can("change"):
            return page.render(
                "error.html",
                403,
                title="Not for your role",
                message=f"Your role ({page.user.role}) cannot replay dead letters.",
                fix="Ask an analyst or an admin.",
            )
        if page.field("action") == "reload":
            admin_api.reload_plan(page.request)
            result = {"reloaded": True}
        elif page.field("action") == "destination":
            name = page.field("destination")
            body = activate_api.RunRequest(full=False)
            ran = call(activate_api.run_destination, page.request, name, body)
            result = {"destination": name, "ran": ran}
        else:
            result = _replay(page)
    listing = admin_api.bad_events(
        page.request, status="pending", source=None, limit=MAX_LETTERS, offset=0
    )
    replayed = admin_api.bad_events(page.request, status="replayed", source=None, limit=1, offset=0)
    plan: Plan = page.state.pipeline.plan
    return page.render(
        "quality.html",
        title="Data quality & plan",
        result=result,
        groups=_groups(listing["dead_letters"]),
        pending=listing["total"],
        replayed_total=replayed["total"],
        shown=len(listing["dead_letters"]),
        summary=admin_api.plan(page.request),
        plan=plan,
        register=register_rows(plan),
        imports=import_api.runs(page.request, source=None, limit=20)["imports"],
        kinds=KINDS,
        import_sources=[s.name for s in plan.sources],
        destinations=activate_api.list_destinations(page.request)["destinations"],
    )


@page_route(router, "/quality/dead-letters/{letter_id}", "personal")
def dead_letter(page: Page) -> Response:
    letter = admin_api.bad_event(page.request, page.request.path_params["letter_id"])
    return page.render("dead_letter.html", letter=letter)


@page_route(router, "/quality/imports", "aggregate")
def import_runs(page: Page) -> Response:
    runs = import_api.runs(page.request, source=None, limit=20)["imports"]
    return page.render("import_runs.html", imports=runs)
