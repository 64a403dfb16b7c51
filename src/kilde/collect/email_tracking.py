"""Email tracking: the open pixel, click redirects and unsubscribe links of rendered mails.

- `GET /e/o/<token>.gif` records `Email Opened` and always answers a 1x1 GIF that is never
  cached, whatever was wrong with the request (the reason goes to the dead letter).
- `GET /e/c/<token>` records `Email Link Clicked` and answers 302 to the URL that was signed for
  that link, and only to it; a tampered, expired or unknown token gets a 400 page without a
  Location header, so Kilde is never an open redirect.
- `GET /e/u/<token>` shows a confirmation page; `POST` (the page's button, or a mail client's
  RFC 8058 one-click `List-Unsubscribe=One-Click`) records `Unsubscribed` and a withdrawal of
  the campaign's purpose in the consent ledger, in one transaction. A GET alone changes nothing,
  because link scanners follow every link of a mail.

Every record goes through `Pipeline.ingest` from the plan's source of kind `email`. Machine
fetches (privacy proxies, prefetchers, scanners; see mail_proxies.py) are recorded with
`machine_open` / `machine_click` and the rule that matched. Tokens carry a campaign id, a
recipient pseudonym, a link id and an expiry: nothing personal in clear.
"""

from __future__ import annotations

import html
import logging
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import HTMLResponse, RedirectResponse, Response

from kilde.collect.email_campaigns import (
    CLICK,
    CLICKED,
    OPEN,
    OPENED,
    UNSUBSCRIBE,
    UNSUBSCRIBED,
    Hit,
    email_sources,
    look_up,
)
from kilde.collect.mail_proxies import classify
from kilde.errors import KildeError
from kilde.pipeline import Envelope, Pipeline
from kilde.pipeline.dead_letter import dead_letter_row
from kilde.pipeline.enrich import protect_ip
from kilde.plan.models import Source
from kilde.signing import MAX_TOKEN_LENGTH, TokenError, app_signer, url_digest
from kilde.store.writer import WriteBatch

log = logging.getLogger("kilde.email")


class _AnyText(Convertor[str]):
    """Like `path`, but also across line breaks: a token with %0A in it still reaches the route
    (and gets the GIF or the 400 page) instead of falling through to a 404."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("kilde_token", _AnyText())

router = APIRouter(prefix="/e", include_in_schema=False)

# The smallest transparent 1x1 GIF (43 bytes).
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "0",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
MAX_QUERY_BYTES = 2048
MAX_FORM_BYTES = 4096
DEFAULT_SOURCE = "email"  # dead letters name it, so they replay once the plan has it


class Refused(Exception):
    """A hit that cannot be honoured: dead-lettered with `code` and `reason`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _client_ip(request: Request) -> str | None:
    if request.app.state.settings.trust_proxy:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()[:64]
    return request.client.host if request.client else None


def _envelope(request: Request, now: datetime) -> Envelope:
    ua = request.headers.get("user-agent")
    return Envelope(
        received_at=now,
        channel="email",
        ip=_client_ip(request),
        user_agent=ua[:1024] if ua else None,
    )


def _source(pipeline: Pipeline) -> Source | None:
    names = email_sources(pipeline.plan)
    return pipeline.plan.source(names[0]) if names else None


async def _dead_letter(
    request: Request, hit: str, token: str, code: str, reason: str, now: datetime
) -> None:
    """Keep a refused hit with its reason; the token is kept (it holds nothing personal)."""
    pipeline: Pipeline = request.app.state.pipeline
    source = _source(pipeline)
    env = _envelope(request, now)
    kept = Envelope(now, env.channel, protect_ip(env.ip, pipeline.plan.privacy.ip), env.user_agent)
    payload: dict[str, Any] = {"hit": hit, "method": request.method, "token": token[:256]}
    if len(token) > 256:
        payload["token_length"] = len(token)
    query = request.scope.get("query_string", b"")
    if query:
        payload["query_bytes"] = len(query)  # its content may be anything: never kept
    row = dead_letter_row(
        payload,
        source=source.name if source else DEFAULT_SOURCE,
        env=kept,
        code=code,
        reason=reason,
        path="token",
    )
    try:
        await pipeline.writer.write(WriteBatch(dead_letters=[row]))
    except Exception as exc:  # the answer must not depend on the store
        log.warning("email %s: dead letter not written (%s)", hit, type(exc).__name__)


def _verify(request: Request, purpose: str, token: str) -> dict[str, Any]:
    if len(request.scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        raise Refused("oversized_request", f"the query string is over {MAX_QUERY_BYTES} bytes")
    if len(token) > MAX_TOKEN_LENGTH:
        raise Refused("oversized_token", f"the token is longer than {MAX_TOKEN_LENGTH} characters")
    try:
        signer = app_signer(request.app.state)
    except KildeError as exc:  # e.g. KILDE_SECRET_KEY too short: say so, never redirect
        log.error("email tracking cannot check tokens: %s", exc.message)
        raise Refused("kilde_misconfigured", exc.message) from None
    try:
        claims = signer.verify(purpose, token)
    except TokenError as exc:
        raise Refused(f"{exc.code}_token", exc.message) from None
    campaign, recipient = claims.get("c"), claims.get("r")
    if not isinstance(campaign, str) or not isinstance(recipient, str):
        raise Refused("malformed_token", "the token lacks its campaign or recipient")
    return claims


async def _hit(request: Request, claims: dict[str, Any], link: int | None = None) -> Hit:
    store = request.app.state.store
    hit: Hit = await run_in_threadpool(look_up, store, claims["c"], claims["r"], link)
    if not hit.campaign_known:
        raise Refused("unknown_campaign", "the campaign of this token is not in the store")
    return hit


def _message(
    event: str, claims: dict[str, Any], hit: Hit, properties: dict[str, Any], now: datetime
) -> dict[str, Any]:
    ids: dict[str, Any] = (
        {"userId": hit.user_id} if hit.user_id else {"anonymousId": f"kr-{claims['r']}"}
    )
    return {
        "type": "track",
        "event": event,
        **ids,
        "messageId": f"kilde-email-{uuid.uuid4().hex}",
        "timestamp": now.isoformat(),
        "properties": {"campaign_id": claims["c"], "recipient": claims["r"], **properties},
        "context": {"campaign": {"name": claims["c"], "medium": "email", "source": "kilde"}},
    }


async def _ingest(request: Request, records: list[dict[str, Any]], now: datetime) -> None:
    """Through the one entry; a missing email source or a full store never breaks the answer."""
    pipeline: Pipeline = request.app.state.pipeline
    env = _envelope(request, now)
    source = _source(pipeline)
    try:
        if source is None:
            kept = Envelope(
                now, env.channel, protect_ip(env.ip, pipeline.plan.privacy.ip), env.user_agent
            )
            rows = [
                dead_letter_row(
                    record,
                    source=DEFAULT_SOURCE,
                    env=kept,
                    code="no_email_source",
                    reason="the collection plan has no source of kind email",
                    path="source",
                    message_type="track",
                )
                for record in records
            ]
            await pipeline.writer.write(WriteBatch(dead_letters=rows))
            return
        await pipeline.ingest(records, source, env, "track")
    except Exception as exc:
        log.warning("email event not recorded (%s)", type(exc).__name__)


def _machine(request: Request) -> tuple[bool, str | None]:
    verdict = classify(
        method=request.method,
        user_agent=request.headers.get("user-agent"),
        ip=_client_ip(request),
        headers=request.headers,
    )
    return verdict.machine, verdict.rule


# -- open pixel ---------------------------------------------------------------------------------


def _gif() -> Response:
    return Response(GIF, media_type="image/gif", headers=NO_CACHE)


@router.api_route("/o/{token:kilde_token}", methods=["GET", "HEAD"])
async def email_open(token: str, request: Request) -> Response:
    now = datetime.now(UTC)
    token = token.removesuffix(".gif")
    try:
        claims = _verify(request, OPEN, token)
        hit = await _hit(request, claims)
        machine, rule = _machine(request)
        properties: dict[str, Any] = {"machine_open": machine}
        if rule:
            properties["machine_rule"] = rule
        await _ingest(request, [_message(OPENED, claims, hit, properties, now)], now)
    except Refused as refused:
        await _dead_letter(request, "open", token, refused.code, refused.reason, now)
    except Exception as exc:  # the pixel always answers
        log.error("email open failed (%s)", type(exc).__name__)
    return _gif()


# -- click redirect -----------------------------------------------------------------------------


def _page(title: str, body: str, status: int, request: Request) -> HTMLResponse:
    plan = request.app.state.pipeline.plan
    company = html.escape(plan.company.name)
    color = html.escape(plan.company.primary_color)
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{html.escape(title)} · {company}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 34rem; margin: 4rem auto; padding: 0 1rem;
       color: #1d2327; line-height: 1.5 }}
h1 {{ color: {color}; font-size: 1.5rem }}
button {{ background: {color}; color: #fff; border: 0; border-radius: .3rem; padding: .7rem 1.4rem;
          font-size: 1rem; cursor: pointer }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
<p><small>{company}</small></p></body></html>
"""
    return HTMLResponse(text, status_code=status, headers=NO_CACHE)


def _invalid_link(request: Request, refused: Refused) -> HTMLResponse:
    if refused.code == "expired_token":
        message = "This link has expired."
    elif refused.code == "kilde_misconfigured":
        return _page("Not available", "<p>Please try again later.</p>", 503, request)
    else:
        message = "This link is not valid. Please use the link exactly as you received it."
    return _page("Link not valid", f"<p>{message}</p>", 400, request)


@router.api_route("/c/{token:kilde_token}", methods=["GET", "HEAD"])
async def email_click(token: str, request: Request) -> Response:
    now = datetime.now(UTC)
    try:
        claims = _verify(request, CLICK, token)
        link, digest = claims.get("l"), claims.get("h")
        if not isinstance(link, int) or not isinstance(digest, str):
            raise Refused("malformed_token", "the token lacks its link")
        hit = await _hit(request, claims, link)
        if hit.url is None or url_digest(hit.url) != digest:
            raise Refused("unknown_link", "the link of this token is not in its campaign")
    except Refused as refused:
        await _dead_letter(request, "click", token, refused.code, refused.reason, now)
        return _invalid_link(request, refused)
    machine, rule = _machine(request)
    properties: dict[str, Any] = {"link_id": link, "url": hit.url, "machine_click": machine}
    if hit.label:
        properties["label"] = hit.label
    if rule:
        properties["machine_rule"] = rule
    await _ingest(request, [_message(CLICKED, claims, hit, properties, now)], now)
    return RedirectResponse(hit.url, status_code=302, headers=NO_CACHE)


# -- unsubscribe --------------------------------------------------------------------------------


def _purpose_text(request: Request, purpose: str | None) -> str:
    plan = request.app.state.pipeline.plan
    found = next((p for p in plan.purposes if p.id == purpose), None)
    return found.description if found else "marketing emails"


@router.get("/u/{token:kilde_token}")
async def email_unsubscribe_page(token: str, request: Request) -> Response:
    now = datetime.now(UTC)
    try:
        claims = _verify(request, UNSUBSCRIBE, token)
        hit = await _hit(request, claims)
    except Refused as refused:
        await _dead_letter(request, "unsubscribe", token, refused.code, refused.reason, now)
        return _invalid_link(request, refused)
    del claims
    what = html.escape(_purpose_text(request, hit.purpose))
    body = (
        f"<p>Stop receiving these emails? ({what})</p>"
        '<form method="post"><input type="hidden" name="confirm" value="1">'
        '<button type="submit">Unsubscribe</button></form>'
    )
    return _page("Unsubscribe", body, 200, request)


@router.post("/u/{token:kilde_token}")
async def email_unsubscribe(token: str, request: Request) -> Response:
    now = datetime.now(UTC)
    try:
        claims = _verify(request, UNSUBSCRIBE, token)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refused("oversized_request", f"the body is over {MAX_FORM_BYTES} bytes")
        hit = await _hit(request, claims)
    except Refused as refused:
        await _dead_letter(request, "unsubscribe", token, refused.code, refused.reason, now)
        return _invalid_link(request, refused)
    form = parse_qs(body.decode("latin-1"), max_num_fields=10)
    # RFC 8058 allows the one-click body as a form or as multipart/form-data.
    one_click = form.get("List-Unsubscribe") == ["One-Click"] or b"One-Click" in body
    purpose = hit.purpose or "marketing_email"
    unsubscribed = _message(
        UNSUBSCRIBED,
        claims,
        hit,
        {"purpose": purpose, "method": "one_click" if one_click else "link"},
        now,
    )
    # The consent ledger records the withdrawal (pipeline/consent.py turns this event into a
    # ledger row in the same transaction as the Unsubscribed event).
    withdrawal = _message("Consent Updated", claims, hit, {}, now)
    withdrawal["properties"] = {
        "purposes": {purpose: "withdrawn"},
        "banner_version": f"email unsubscribe, campaign {claims['c']}",
    }
    await _ingest(request, [unsubscribed, withdrawal], now)
    what = html.escape(_purpose_text(request, purpose))
    return _page(
        "You are unsubscribed", f"<p>You will no longer receive: {what}.</p>", 200, request
    )
