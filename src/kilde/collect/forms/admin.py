"""Admin API for forms and surveys: list them, make personal survey links, read results."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from kilde.insights.surveys import survey_results
from kilde.plan.forms import Form
from kilde.store.writer import WriteBatch
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem

INVITE_TTL = timedelta(days=90)

router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])


def _base_url(request: Request) -> str:
    return str(getattr(request.app.state, "public_url", None) or request.base_url).rstrip("/")


def _form(request: Request, form_id: str) -> Form:
    forms: list[Form] = request.app.state.pipeline.plan.forms
    form = next((f for f in forms if f.id == form_id), None)
    if form is None:
        raise HttpProblem(
            404,
            "unknown_form",
            "there is no form with that id in the collection plan",
            "list the forms with GET /api/forms or `kilde forms list`",
        )
    return form


@router.get("/forms")
def list_forms(request: Request) -> dict[str, Any]:
    base = _base_url(request)
    return {
        "forms": [
            {
                "id": f.id,
                "kind": f.kind,
                "title": f.title,
                "source": f.source,
                "url": f"{base}/f/{f.id}",
                "fields": [x.name for x in f.fields],
                "consents": [c.purpose for c in f.consents],
            }
            for f in request.app.state.pipeline.plan.forms
        ]
    }


class InviteRequest(BaseModel):
    user_id: str | None = Field(None, max_length=512)
    email: str | None = Field(None, max_length=320)


@router.post("/forms/{form_id}/invites")
async def make_invite(request: Request, form_id: str, body: InviteRequest) -> dict[str, Any]:
    """A personal link: it carries a signed invite id only; who it is for stays in the store."""
    from kilde.collect.forms.routes import _signer  # one signer per app, shared with the routes

    form = _form(request, form_id)
    if not body.user_id and not body.email:
        raise HttpProblem(
            400,
            "missing_recipient",
            "say whom the link is for",
            "send user_id or email in the JSON body",
        )
    invite_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    token = _signer(request).sign(
        "survey-invite", {"f": form.id, "i": invite_id}, expires_at=now + INVITE_TTL
    )
    email = body.email.strip().lower() if body.email else None
    batch = WriteBatch(
        statements=[
            (
                "INSERT INTO form_invites (id, form_id, user_id, email, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [invite_id, form.id, body.user_id, email, now],
            )
        ]
    )
    await request.app.state.writer.write(batch)
    return {"url": f"{_base_url(request)}/f/{form.id}?t={token}", "expires_at": now + INVITE_TTL}


@router.get("/forms/{form_id}/results")
def results(request: Request, form_id: str) -> dict[str, Any]:
    form = _form(request, form_id)
    rows = request.app.state.store.query(
        "SELECT properties FROM events WHERE type = 'track' AND event = ? "
        "AND json_extract_string(properties, '$.form_id') = ?",
        [form.event_name, form.id],
    )
    answers = []
    for row in rows:
        properties = orjson.loads(row["properties"])
        if isinstance(properties.get("answers"), dict):
            answers.append(properties["answers"])
    return survey_results(form, answers)
