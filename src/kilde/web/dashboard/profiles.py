"""Profiles: search by any identifier (sent by POST, so nothing personal lands in a URL) and a
profile page with identities, traits with provenance, consents, segments, insights and the
timeline: all from the profiles API's functions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from kilde.web import profiles_api
from kilde.web.dashboard.base import Page, page_route
from kilde.web.errors import HttpProblem

router = APIRouter()

ID_TYPES = ("user_id", "email", "phone", "anonymous_id", "external_id")
TIMELINE_PAGE = 25
# Insight figures shown on top of a profile when the insights stage provides them.
HEADLINE = (
    ("rfm_group", "RFM group"),
    ("clv", "Lifetime value"),
    ("churn_risk", "Churn risk"),
    ("p_alive", "Probability active"),
    ("expected_purchases", "Expected purchases"),
)
PREFERENCES = (
    ("favourite_categories", "Favourite categories"),
    ("favourite_products", "Favourite products"),
    ("preferred_channel", "Preferred channel"),
    ("preferred_time", "Preferred time"),
    ("recommended_products", "Recommended next"),
)


@page_route(router, "/profiles", "personal", methods=("GET", "POST"))
def profiles_page(page: Page) -> Response:
    found: list[dict[str, Any]] | None = None
    problem = ""
    text, kind = page.field("q"), page.field("kind", "any")
    if page.form is not None:
        try:
            if kind in ID_TYPES:
                body = profiles_api.Lookup(**{kind: text})
                found = profiles_api.lookup_profiles(page.request, body)["profiles"]
            elif len(text) >= 2:
                search = profiles_api.Search(query=text[:200], limit=50)
                found = profiles_api.search_profiles(page.request, search)["profiles"]
            else:
                problem = "Type at least two characters to search."
        except HttpProblem as exc:
            problem = f"{exc.message}. {exc.fix}"
    status = profiles_api.identity_status(page.request)
    return page.render(
        "profiles.html",
        title="Profiles",
        found=found,
        problem=problem,
        q=text,
        kind=kind,
        id_types=ID_TYPES,
        identity=status,
    )


def _timeline(page: Page, profile_id: str, cursor: str | None) -> dict[str, Any]:
    return profiles_api.profile_events(page.request, profile_id, limit=TIMELINE_PAGE, cursor=cursor)


@page_route(router, "/profiles/{profile_id}", "personal")
def profile_page(page: Page) -> Response:
    profile_id = page.request.path_params["profile_id"]
    profile = profiles_api.get_profile(page.request, profile_id)
    timeline = _timeline(page, profile["profile_id"], None)
    computed = dict(profile.get("computed") or {})
    segments = profile.get("segments") or computed.pop("segments", None) or []
    computed.pop("segments", None)
    headline = [(label, key, computed.get(key)) for key, label in HEADLINE if key in computed]
    preferences = [(label, computed.get(key)) for key, label in PREFERENCES if key in computed]
    shown = {k for k, _ in HEADLINE} | {k for k, _ in PREFERENCES}
    others = {k: v for k, v in computed.items() if k not in shown}
    return page.render(
        "profile.html",
        title=f"Profile {profile['profile_id']}",
        p=profile,
        headline=headline,
        preferences=preferences,
        others=others,
        segments=segments,
        timeline=timeline,
        has_insights=any(k in computed for k in ("rfm_group", "clv", "churn_risk")),
    )


@page_route(router, "/profiles/{profile_id}/timeline", "personal")
def timeline_more(page: Page) -> Response:
    profile_id = page.request.path_params["profile_id"]
    cursor = page.request.query_params.get("cursor") or None
    timeline = _timeline(page, profile_id, cursor)
    return page.render("profile_timeline.html", timeline=timeline, profile_id=profile_id)
