"""Email campaigns in the admin API, and the public tracking routes, as one router.

- `POST /api/email/campaigns/{campaign}/render`: every recipient's copy of an HTML mail, with
  tracked links, an unsubscribe link and an open pixel, plus the List-Unsubscribe headers;
- `GET /api/email/campaigns`: the campaigns with their link and recipient counts;
- `GET /api/email/campaigns/{campaign}/report`: human opens, machine opens, clicks (per link),
  unsubscribes, unique per recipient.

Recipients are sent in the request body (never in a URL) as a user id or, for people without
an account, an email address, which is only hashed into a pseudonym and never stored.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kilde.collect import email_tracking
from kilde.collect.email_campaigns import (
    CampaignError,
    Recipient,
    campaign_report,
    check_campaign_id,
    list_campaigns,
    render_campaign,
)
from kilde.errors import KildeError
from kilde.signing import app_signer
from kilde.store.writer import StoreUnavailableError, WriteBatch
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem

MAX_RECIPIENTS = 1000
MAX_HTML = 1_000_000

admin = APIRouter(prefix="/api/email", dependencies=[Depends(require_admin)], tags=["email"])


class RecipientIn(BaseModel):
    user_id: str | None = Field(None, max_length=512, description="preferred: the user's id")
    email: str | None = Field(
        None, max_length=320, description="for people without a user id; only hashed, not stored"
    )


class RenderRequest(BaseModel):
    html: str = Field(max_length=MAX_HTML, description="the mail's HTML, the same for everyone")
    recipients: list[RecipientIn] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    base_url: str | None = Field(
        None, max_length=500, description="where mail clients reach Kilde; default this server"
    )
    purpose: str | None = Field(
        None, max_length=100, description="what unsubscribing opts out of; default marketing_email"
    )
    expires_days: int = Field(365, ge=1, le=3650, description="how long the links work")


def _problem(exc: CampaignError) -> HttpProblem:
    return HttpProblem(exc.status, exc.code, exc.message, exc.fix)


def _lock(request: Request) -> asyncio.Lock:
    state = request.app.state
    lock = getattr(state, "email_render_lock", None)
    if lock is None:
        lock = state.email_render_lock = asyncio.Lock()
    assert isinstance(lock, asyncio.Lock)
    return lock


@admin.post("/campaigns/{campaign}/render")
async def render(campaign: str, body: RenderRequest, request: Request) -> dict[str, Any]:
    """Render the mail for each recipient; the campaign is created on first use."""
    state = request.app.state
    now = datetime.now(UTC)
    base_url = body.base_url or str(request.base_url)
    try:
        signer = await run_in_threadpool(app_signer, state)
    except KildeError as exc:
        raise HttpProblem(
            503, "kilde_misconfigured", exc.message, exc.fix or "check the secret key"
        ) from None
    recipients = [Recipient(r.user_id or None, r.email or None) for r in body.recipients]
    async with _lock(request):  # link ids are assigned once per campaign
        try:
            rendered = await run_in_threadpool(
                lambda: render_campaign(
                    state.store,
                    signer,
                    state.pipeline.plan,
                    campaign=campaign,
                    html=body.html,
                    recipients=recipients,
                    base_url=base_url,
                    purpose=body.purpose,
                    expires_at=now + timedelta(days=body.expires_days),
                    now=now,
                )
            )
        except CampaignError as exc:
            raise _problem(exc) from None
        try:
            await state.writer.write(WriteBatch(statements=rendered.statements))
        except StoreUnavailableError as exc:
            raise HttpProblem(
                503, "store_busy", exc.message, "retry", headers={"Retry-After": "1"}
            ) from None
    return {
        "campaign": rendered.campaign,
        "purpose": rendered.purpose,
        "created": rendered.created,
        "expires_at": now + timedelta(days=body.expires_days),
        "links": rendered.links,
        "warnings": rendered.warnings,
        "mails": rendered.mails,
    }


@admin.get("/campaigns")
def campaigns(request: Request) -> dict[str, Any]:
    return {"campaigns": list_campaigns(request.app.state.store)}


@admin.get("/campaigns/{campaign}/report")
def report(campaign: str, request: Request) -> dict[str, Any]:
    """Opens (human and machine apart), clicks per link and unsubscribes of a campaign."""
    try:
        check_campaign_id(campaign)
    except CampaignError as exc:
        raise _problem(exc) from None
    found = campaign_report(request.app.state.store, request.app.state.pipeline.plan, campaign)
    if found is None:
        raise HttpProblem(
            404,
            "unknown_campaign",
            "there is no campaign with that id",
            "list them with GET /api/email/campaigns or `kilde email campaigns`",
        )
    return found


router = APIRouter()
router.include_router(email_tracking.router)
router.include_router(admin)
