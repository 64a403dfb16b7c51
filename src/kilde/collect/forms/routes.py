"""Hosted forms and surveys at /f/{form_id}.

GET renders an accessible form that works without JavaScript (and in an iframe). POST validates
on the server, re-renders with the person's values and errors tied to fields, and on success
sends one identify (the traits), one `Form Submitted`/`Survey Answered` event and the consent
choices (one per box: unticked is a denial) through `Pipeline.ingest` in one transaction.
Purposes marked `double_opt_in` become active only after the emailed link is clicked.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import defaultdict, deque
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from kilde.collect.forms.mailer import SmtpSettings, send_mail
from kilde.collect.forms.validation import HONEYPOT, Submission, validate
from kilde.collect.segment_api import client_ip
from kilde.pipeline import Envelope, Pipeline
from kilde.pipeline.dead_letter import dead_letter_row
from kilde.pipeline.enrich import protect_ip
from kilde.plan.forms import Form
from kilde.signing import TokenError, TokenSigner
from kilde.store.writer import WriteBatch
from kilde.web.errors import JsonResponse

log = logging.getLogger("kilde.forms")

MAX_BODY = 64 * 1024
CSRF_TTL = 4 * 3600
CONFIRM_TTL = 7 * 86400
RATE_WINDOW = 600.0  # seconds; the limit per window is Settings.form_rate_limit

templates = Environment(
    loader=PackageLoader("kilde.web", "templates"), autoescape=select_autoescape(["html"])
)
router = APIRouter()


class RateLimiter:
    """Submissions per client address and form in a sliding window (in memory, per process)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._noted: dict[tuple[str, str], float] = {}

    def allow(self, key: tuple[str, str]) -> bool:
        if self.limit <= 0:
            return True
        now = time.monotonic()
        hits = self._hits[key]
        while hits and now - hits[0] > self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

    def first_refusal(self, key: tuple[str, str]) -> bool:
        """Whether this is the first refused post of `key` in the window (the one to keep)."""
        now = time.monotonic()
        last = self._noted.get(key)
        if last is not None and now - last <= self.window:
            return False
        self._noted[key] = now
        return True


def _limiter(request: Request) -> RateLimiter:
    state = request.app.state
    limiter = getattr(state, "form_limiter", None)
    if limiter is None:
        limiter = state.form_limiter = RateLimiter(state.settings.form_rate_limit, RATE_WINDOW)
    return limiter


def _page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    plan = request.app.state.pipeline.plan
    html = templates.get_template(f"forms/{template}").render(company=plan.company, **context)
    # Embeddable by iframe on any site; never cached, since pages carry a CSRF token.
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": "frame-ancestors *"}
    return HTMLResponse(html, status_code=status, headers=headers)


# What a script posting a form (Accept: application/json) gets instead of a page.
PROBLEMS = {
    "Form not found": ("unknown_form", "check the form id; `kilde forms list` shows the forms"),
    "This link does not work": (
        "invalid_link",
        "use the link exactly as it was sent, or ask for a new one",
    ),
    "Too many submissions": ("rate_limited", "wait a few minutes before sending this form again"),
    "Form not accepted": (
        "form_not_accepted",
        "send the form from its own page, or list your site in the form's allowed_origins; "
        "send only its fields and consent.PURPOSE=yes",
    ),
    "Too much text": ("payload_too_large", f"send at most {MAX_BODY // 1024} KB per post"),
    "Unreadable form": (
        "unreadable_form",
        "post application/x-www-form-urlencoded or multipart/form-data without files, in UTF-8",
    ),
    "Form unavailable": (
        "form_unavailable",
        "the answers are in the dead letter; fix the form in the plan and replay them",
    ),
}


def _wants_json(request: Request) -> bool:
    """A script that asks for JSON (and not for HTML) gets JSON; browsers get pages."""
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _json(status: int, body: dict[str, Any]) -> Response:
    headers = {"Cache-Control": "no-store"}
    return JsonResponse({"success": status < 400, **body}, status_code=status, headers=headers)


def _message(request: Request, heading: str, message: str, status: int) -> Response:
    if _wants_json(request):
        if status < 400:
            return _json(status, {"message": message})
        code, fix = PROBLEMS.get(heading, ("form_error", "see the message"))
        return _json(status, {"error": code, "message": message, "fix": fix})
    return _page(request, "message.html", status, title=heading, heading=heading, message=message)


def _form(request: Request, form_id: str) -> Form | None:
    plan = request.app.state.pipeline.plan
    return next((f for f in plan.forms if f.id == form_id), None)


class BadToken(Exception):
    """A form, invitation or confirmation token that cannot be honoured; says why to a person."""


def _signer(request: Request) -> TokenSigner:
    state = request.app.state
    signer = getattr(state, "token_signer", None)
    if signer is None:
        signer = state.token_signer = TokenSigner.for_data_dir(state.settings.data_dir)
    return signer


def _sign(request: Request, purpose: str, data: dict[str, Any], ttl: int) -> str:
    expires = datetime.now(UTC) + timedelta(seconds=ttl)
    return _signer(request).sign(purpose, data, expires_at=expires)


def _verify(request: Request, purpose: str, token: str) -> dict[str, Any]:
    try:
        return _signer(request).verify(purpose, token)
    except TokenError as exc:
        if exc.code == "expired":
            raise BadToken("This link has expired.") from None
        raise BadToken(
            "This link is not valid. Please use the link exactly as you received it."
        ) from None


def _render(
    request: Request,
    form: Form,
    *,
    status: int = 200,
    sub: Submission | None = None,
    token: str | None = None,
    problem: str | None = None,
) -> Response:
    if status >= 400 and _wants_json(request):
        if problem:
            return _json(
                status,
                {"error": "expired_page", "message": problem, "fix": "load the form again"},
            )
        return _json(
            status,
            {
                "error": "invalid_fields",
                "message": "some answers need correcting",
                "fix": "correct the fields named in `fields` and send the form again",
                # The rule each answer breaks, never the answer itself.
                "fields": sub.errors if sub else {},
            },
        )
    csrf = _sign(request, "form-csrf", {"f": form.id}, CSRF_TTL)
    return _page(
        request,
        "form.html",
        status,
        title=form.title,
        form=form,
        action=f"/f/{form.id}",
        csrf=csrf,
        token=token,
        raw=sub.raw if sub else {},
        errors=sub.errors if sub else {},
        consents=sub.consents if sub else {},
        problem=problem,
        script_url="/f/static/forms.js",
    )


@router.get("/f/static/forms.js")
def forms_script() -> Response:
    script = (resources.files("kilde.web") / "static" / "forms.js").read_bytes()
    return Response(
        script,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/f/{form_id}")
def show_form(request: Request, form_id: str, t: str | None = None) -> Response:
    form = _form(request, form_id)
    if form is None:
        return _message(request, "Form not found", "There is no form at this address.", 404)
    if t is not None:
        try:
            _invite(request, form, t)
        except BadToken as exc:
            return _message(request, "This link does not work", str(exc), 400)
    return _render(request, form, token=t)


def _invite(request: Request, form: Form, token: str) -> dict[str, Any]:
    """The personal invitation a survey link carries; raises BadToken when forged or used."""
    claims = _verify(request, "survey-invite", token)
    if claims.get("f") != form.id:
        raise BadToken("This link is not for this survey.")
    rows = request.app.state.store.query(
        "SELECT user_id, email, used_at FROM form_invites WHERE id = ? AND form_id = ?",
        [claims.get("i"), form.id],
    )
    if not rows:
        raise BadToken("This link is not known.")
    if rows[0]["used_at"] is not None:
        raise BadToken("This survey has already been answered with this link. Thank you!")
    return {"id": claims["i"], "user_id": rows[0]["user_id"], "email": rows[0]["email"]}


@router.post("/f/{form_id}")
async def submit_form(request: Request, form_id: str) -> Response:
    form = _form(request, form_id)
    if form is None:
        return _message(request, "Form not found", "There is no form at this address.", 404)
    ip = client_ip(request) or "unknown"
    limiter = _limiter(request)
    if not limiter.allow((ip, form.id)):
        # The first refused post of a window goes to the dead letter, so a flood shows there;
        # the rest are refused unread (keeping each would let the flood fill the store).
        if limiter.first_refusal((ip, form.id)):
            fields = await _read_fields(request)
            if not isinstance(fields, Response):
                env = Envelope(
                    received_at=datetime.now(UTC),
                    channel="form",
                    ip=client_ip(request),
                    user_agent=request.headers.get("user-agent"),
                )
                reason = (
                    f"rate limit: more than {limiter.limit} posts from one address to this form "
                    f"in {RATE_WINDOW / 60:g} minutes; later ones in this window are not kept"
                )
                await _dead_letter(request, form, fields, env, reason)
        return _message(
            request,
            "Too many submissions",
            "This address has sent this form too often. Please wait a few minutes.",
            429,
        )
    fields = await _read_fields(request)
    if isinstance(fields, Response):
        return fields
    env = Envelope(
        received_at=datetime.now(UTC),
        channel="form",
        ip=client_ip(request),
        user_agent=request.headers.get("user-agent"),
    )
    token = next(iter(fields.get("t") or []), None)

    csrf = next(iter(fields.get("csrf") or []), None)
    origin = request.headers.get("origin")
    # A browser says where a post comes from (Sec-Fetch-Site). The hosted page, also inside an
    # iframe, posts from its own origin; another site may post only when the plan allows it,
    # even with a valid token copied from the page (a forged post in someone's browser).
    site = request.headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site") and origin not in form.allowed_origins:
        await _dead_letter(request, form, fields, env, "cross-site post from a site not allowed")
        return _message(
            request,
            "Form not accepted",
            "This form must be sent from its own page or from a site the plan allows.",
            403,
        )
    if csrf is not None:
        try:
            claims = _verify(request, "form-csrf", csrf)
            if claims.get("f") != form.id:
                raise BadToken("not this form's token")
        except BadToken:
            return _render(
                request,
                form,
                status=403,
                token=token,
                problem="This page has expired. Please fill in the form again.",
            )
    elif origin is None or origin not in form.allowed_origins:
        reason = "post without the page's token " + (
            "and without an Origin" if origin is None else "from a site not allowed"
        )
        await _dead_letter(request, form, fields, env, reason)
        return _message(
            request,
            "Form not accepted",
            "This form must be sent from its own page or from a site the plan allows.",
            403,
        )

    if fields.get(HONEYPOT, [""])[0]:
        await _dead_letter(request, form, fields, env, "spam: the hidden honeypot field was filled")
        return _message(request, form.title, form.thank_you, 200)  # tell bots nothing

    sub = validate(form, fields)
    if sub.tampered:
        await _dead_letter(request, form, fields, env, "tampered form: " + "; ".join(sub.tampered))
        return _message(
            request,
            "Form not accepted",
            "The form was changed before it was sent. Please use the form on our page.",
            400,
        )
    invite = None
    if token is not None:
        try:
            invite = _invite(request, form, token)
        except BadToken as exc:
            return _message(request, "This link does not work", str(exc), 400)
    if sub.errors:
        return _render(request, form, status=400, sub=sub, token=token)
    if invite is None:
        return await _store(request, form, sub, env, invite)
    # A link answers once: while one answer with it is being stored, a second (a double
    # click, a replay) is refused; after that the store says the invitation is used.
    answering = _answering(request)
    if invite["id"] in answering:
        return _message(
            request,
            "This link does not work",
            "This survey is being answered with this link right now.",
            409,
        )
    answering.add(invite["id"])
    try:
        return await _store(request, form, sub, env, invite)
    finally:
        answering.discard(invite["id"])


def _answering(request: Request) -> set[str]:
    """Invitations whose answers are being stored right now (in this process)."""
    state = request.app.state
    answering: set[str] | None = getattr(state, "form_invites_answering", None)
    if answering is None:
        answering = state.form_invites_answering = set()
    return answering


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than MAX_BODY (declared or streamed)."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


async def _read_fields(request: Request) -> dict[str, list[str]] | Response:
    """The posted fields (urlencoded or multipart without files), or the page saying why not."""
    body = await _read_body(request)
    if body is None:
        return _message(request, "Too much text", "The answers are too long to accept.", 413)
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        data = await Request(request.scope, replay).form(
            max_files=0, max_fields=200, max_part_size=MAX_BODY
        )
    except Exception:
        return _message(request, "Unreadable form", "The submission could not be read.", 400)
    fields: dict[str, list[str]] = defaultdict(list)
    for key, value in data.multi_items():
        if isinstance(value, str):
            fields[key].append(value)
    return fields


async def _dead_letter(
    request: Request, form: Form, fields: dict[str, list[str]], env: Envelope, reason: str
) -> None:
    pipeline: Pipeline = request.app.state.pipeline
    kept = Envelope(
        env.received_at, env.channel, protect_ip(env.ip, pipeline.plan.privacy.ip), env.user_agent
    )
    row = dead_letter_row(
        {"form_id": form.id, "fields": fields},
        source=form.source,
        env=kept,
        code="form_rejected",
        reason=reason,
        path=None,
        message_type="form",
    )
    await pipeline.writer.write(WriteBatch(dead_letters=[row]))
    log.info("form %s submission rejected", form.id)


async def _store(
    request: Request,
    form: Form,
    sub: Submission,
    env: Envelope,
    invite: dict[str, Any] | None,
) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    plan = pipeline.plan
    source = plan.source(form.source)
    if source is None:
        return _message(request, "Form unavailable", "This form is not set up correctly.", 503)
    ids: dict[str, str] = {}
    if invite and invite["user_id"]:
        ids["userId"] = invite["user_id"]
    visitor = request.cookies.get("kilde_aid")
    ids["anonymousId"] = visitor if visitor and len(visitor) <= 64 else str(uuid.uuid4())
    by_name = {f.name: f for f in form.fields}
    traits = {by_name[n].trait: v for n, v in sub.values.items() if by_name[n].trait}
    answers = {n: v for n, v in sub.values.items() if not by_name[n].trait}
    if invite and invite["email"] and "email" not in traits:
        traits["email"] = invite["email"]  # joins the answers to the person it was sent to
    double = {p.id for p in plan.purposes if p.double_opt_in}
    active = {p: granted for p, granted in sub.consents.items() if not (granted and p in double)}
    awaiting = sorted(p for p, granted in sub.consents.items() if granted and p in double)
    now = env.received_at.isoformat()
    context: dict[str, Any] = {"kilde": {"form_id": form.id, "tier": "first_party"}}
    records: list[dict[str, Any]] = []
    if traits:
        records.append(
            {"type": "identify", "traits": traits, "timestamp": now, "context": context, **ids}
        )
    properties: dict[str, Any] = {"form_id": form.id, "answers": answers}
    if awaiting:
        properties["consents_awaiting_confirmation"] = awaiting
    submitted_id = f"form-{uuid.uuid4()}"
    records.append(
        {
            "type": "track",
            "event": form.event_name,
            "messageId": submitted_id,
            "properties": properties,
            "timestamp": now,
            "context": context,
            **ids,
        }
    )
    if active:
        # One ledger row per consent box: ticked is granted, unticked is denied.
        records.append(consent_record(form, active, ids, now, evidence=f"form:{form.id}"))
    batch, outcomes = pipeline.batch_for(records, source, env)
    rejected = [o for o in outcomes if o.status == "dead_lettered"]
    if rejected:
        # Nothing half-stored: keep the whole submission as dead letters (to replay once the
        # plan is fixed) and store none of it: no event, no trait and no consent ledger row.
        kept = dataclasses.replace(env, ip=protect_ip(env.ip, plan.privacy.ip))
        letters = list(batch.dead_letters)
        for outcome in outcomes:
            if outcome.status in ("stored", "flagged"):
                letters.append(
                    dead_letter_row(
                        records[outcome.index],
                        source=source.name,
                        env=kept,
                        code="form_rejected",
                        reason="kept with the rest of its form submission, which does not fit "
                        f"the plan: {rejected[0].reason}",
                        path=None,
                        message_type=None,
                        ip_policy=plan.privacy.ip,
                    )
                )
        log.warning("form %s does not fit the plan: %s", form.id, rejected[0].reason)
        await pipeline.writer.write(WriteBatch(dead_letters=letters))
        return _message(
            request,
            "Form unavailable",
            "Your answers were kept, but this form is not set up correctly yet. "
            "Please try again later.",
            503,
        )
    if invite:
        batch.statements.append(
            (
                "UPDATE form_invites SET used_at = ? WHERE id = ? AND used_at IS NULL",
                [env.received_at, invite["id"]],
            )
        )
    await pipeline.writer.write(batch)
    email = next((v for n, v in sub.values.items() if by_name[n].type == "email"), None)
    suppressed = any(o.status == "suppressed" for o in outcomes)
    # Never mail someone who was erased; say so when no mail could go out.
    if (
        awaiting
        and email
        and not suppressed
        and not await _send_confirmation(request, form, email, submitted_id, awaiting)
    ):
        return _message(
            request,
            form.title,
            "Thank you. We could not send the confirmation mail just now, so your "
            "subscription is not active yet. Please try again later.",
            200,
        )
    return _message(request, form.title, form.thank_you, 200)


def consent_record(
    form: Form,
    choices: dict[str, bool],
    ids: dict[str, str],
    at: str,
    *,
    evidence: str,
    message_id: str | None = None,
) -> dict[str, Any]:
    """A `Consent Updated` event: the consent ledger records one row per purpose."""
    record: dict[str, Any] = {
        "type": "track",
        "event": "Consent Updated",
        "properties": {"purposes": choices, "banner_version": evidence},
        "timestamp": at,
        "context": {"kilde": {"form_id": form.id, "tier": "first_party"}},
        **ids,
    }
    if message_id:
        record["messageId"] = message_id
    return record


async def _send_confirmation(
    request: Request, form: Form, email: str, submitted_id: str, purposes: list[str]
) -> bool:
    """Mail the confirmation link; False when no mail could be sent.

    The link names the stored submission (its event's message id), not the person: who
    confirms is read from that event when the button is pressed, so no identifier of the
    person is in the link, and a submission erased meanwhile cannot be confirmed.
    """
    smtp = SmtpSettings.from_env()
    if smtp is None:
        log.warning("double opt-in for form %s, but KILDE_SMTP_HOST is not set", form.id)
        return False
    token = _sign(
        request,
        "form-confirm",
        {"f": form.id, "m": submitted_id, "c": purposes},
        CONFIRM_TTL,
    )
    base = str(getattr(request.app.state, "public_url", None) or request.base_url).rstrip("/")
    link = f"{base}/f/{form.id}/confirm?t={token}"
    plan = request.app.state.pipeline.plan
    html = templates.get_template("forms/confirm_mail.html").render(
        company=plan.company, form=form, link=link
    )
    text = f"Please confirm your subscription to {plan.company.name}:\n\n{link}\n"
    try:
        await run_in_threadpool(send_mail, smtp, email, f"Please confirm: {form.title}", text, html)
    except OSError as exc:
        log.error("confirmation mail for form %s failed: %s", form.id, type(exc).__name__)
        return False
    return True


def _confirming(request: Request, form: Form, claims: dict[str, Any]) -> dict[str, str] | None:
    """Who confirms: the ids of the submission the link was sent for, if it is still stored."""
    if "m" not in claims:  # links mailed before they named the submission carried the ids
        user = {"userId": claims["u"]} if claims.get("u") else {}
        return {"anonymousId": claims["a"], **user}
    rows = request.app.state.store.query(
        "SELECT user_id, anonymous_id FROM events WHERE message_id = ? AND source = ? "
        "AND type = 'track' AND event = ? LIMIT 1",
        [claims["m"], form.source, form.event_name],
    )
    if not rows:
        return None
    ids = {"anonymousId": rows[0]["anonymous_id"]} if rows[0]["anonymous_id"] else {}
    if rows[0]["user_id"]:
        ids["userId"] = rows[0]["user_id"]
    return ids or None


def _confirmation(request: Request, form: Form, token: str) -> dict[str, Any]:
    claims = _verify(request, "form-confirm", token)
    if claims.get("f") != form.id:
        raise BadToken("This link is not for this form.")
    return claims


@router.get("/f/{form_id}/confirm")
def confirm_page(request: Request, form_id: str, t: str = "") -> Response:
    """The mailed link shows a button; only pressing it (a POST) records the consent.

    Mail scanners and link previews open links by themselves: a GET never records consent.
    """
    form = _form(request, form_id)
    if form is None:
        return _message(request, "Form not found", "There is no form at this address.", 404)
    try:
        claims = _confirmation(request, form, t)
    except BadToken as exc:
        return _message(request, "This link does not work", str(exc), 400)
    if _confirming(request, form, claims) is None:
        return _message(
            request,
            "This link does not work",
            "This request is no longer on record. Please fill in the form again.",
            400,
        )
    return _page(
        request,
        "confirm.html",
        title="Please confirm",
        form=form,
        action=f"/f/{form.id}/confirm",
        token=t,
    )


@router.post("/f/{form_id}/confirm")
async def confirm(request: Request, form_id: str) -> Response:
    form = _form(request, form_id)
    if form is None:
        return _message(request, "Form not found", "There is no form at this address.", 404)
    fields = await _read_fields(request)
    if isinstance(fields, Response):
        return fields
    t = next(iter(fields.get("t") or []), "")
    try:
        claims = _confirmation(request, form, t)
    except BadToken as exc:
        return _message(request, "This link does not work", str(exc), 400)
    pipeline: Pipeline = request.app.state.pipeline
    source = pipeline.plan.source(form.source)
    if source is None:
        return _message(request, "Form unavailable", "This form is not set up correctly.", 503)
    env = Envelope(
        received_at=datetime.now(UTC),
        channel="form",
        ip=client_ip(request),
        user_agent=request.headers.get("user-agent"),
    )
    ids = _confirming(request, form, claims)
    if ids is None:
        return _message(
            request,
            "This link does not work",
            "This request is no longer on record. Please fill in the form again.",
            400,
        )
    record = consent_record(
        form,
        dict.fromkeys(claims["c"], True),
        ids,
        env.received_at.isoformat(),
        evidence=f"double-opt-in:form:{form.id}",
        # The same link clicked twice records one confirmation (messageId dedupe).
        message_id="confirm-" + uuid.uuid5(uuid.NAMESPACE_URL, t).hex,
    )
    result = await pipeline.ingest([record], source, env)
    if result.rejected:
        return _message(
            request, "Form unavailable", "This confirmation could not be recorded yet.", 503
        )
    return _message(request, "Thank you", "Your subscription is confirmed.", 200)
