"""The privacy API under /api/privacy (admin token): access, erasure, suppression, consent,
do-not-sell, the consent gate's counts, retention, the request tracker, the register, the audit
log. People are always named in the JSON body, never in the URL.

Its lifespan also puts the audit log in front of every admin endpoint (see kilde.privacy.audit),
keeps the consent gate's view of the ledger fresh, and runs retention once a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from kilde.pipeline.normalize import Envelope
from kilde.privacy import audit, do_not_sell, erasure, export, ledger, register, requests, retention
from kilde.privacy.enforcement import check_use
from kilde.privacy.ledger import ADMIN_SOURCE
from kilde.privacy.requests import RequestError
from kilde.privacy.services import Privacy
from kilde.privacy.subjects import Subject, SubjectError, parse_request
from kilde.store.writer import StoreUnavailableError, WriteBatch
from kilde.thread_names import NamedThread
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem, JsonResponse

log = logging.getLogger("kilde.privacy")
DAY = 86400.0


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


async def _retention_schedule(app: FastAPI) -> None:
    """Once a day (KILDE_RETENTION_EVERY seconds), checked every KILDE_RETENTION_CHECK."""
    every = _seconds("KILDE_RETENTION_EVERY", DAY)
    check = _seconds("KILDE_RETENTION_CHECK", 3600.0)
    while True:
        await asyncio.sleep(check)
        try:
            privacy = Privacy.of(app.state)
            last = await asyncio.to_thread(retention.last_run_at, privacy)
            if last is None or datetime.now(UTC) - last >= timedelta(seconds=every):
                report = await asyncio.to_thread(retention.retain, privacy, trigger="schedule")
                log.info(
                    "retention: %d expired events, %d expired trait values (%s)",
                    report["expired_events"],
                    report["expired_traits"],
                    report["action"],
                )
        except Exception as exc:  # try again at the next check
            log.error("scheduled retention failed: %s", type(exc).__name__)


def _consent_refresh(app: FastAPI, stop: threading.Event) -> None:
    """Re-read the ledger and identity links for the consent gate now and then."""
    every = _seconds("KILDE_CONSENT_REFRESH", 60.0)
    while not stop.wait(every):
        try:
            app.state.pipeline.privacy.consent.load(app.state.store)
        except Exception as exc:
            log.error("refreshing consent state failed: %s", type(exc).__name__)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.dependency_overrides[require_admin] = audit.audited_admin
    app.state.privacy_lock = threading.RLock()
    stop = threading.Event()
    refresher = NamedThread(
        target=_consent_refresh, args=(app, stop), name="kilde-consent", daemon=True
    )
    refresher.start()
    task = None
    if os.environ.get("KILDE_RETENTION_SCHEDULE", "1") != "0":
        task = asyncio.create_task(_retention_schedule(app))
    try:
        yield
    finally:
        stop.set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


router = APIRouter(
    prefix="/api/privacy",
    dependencies=[Depends(require_admin)],
    lifespan=_lifespan,
    tags=["privacy"],
)


def _privacy(request: Request) -> Privacy:
    return Privacy.of(request.app.state)


def _problem(exc: SubjectError | RequestError) -> HttpProblem:
    return HttpProblem(exc.status, exc.code, exc.message, exc.fix or "")


class Person(BaseModel):
    """Name the person by one of these (in the body, so no personal data is in a URL)."""

    identifier: str | None = Field(
        None, max_length=1000, description="email, user id, phone, profile id or type:value"
    )
    email: str | None = Field(None, max_length=1000)
    user_id: str | None = Field(None, max_length=1000)
    anonymous_id: str | None = Field(None, max_length=1000)
    phone: str | None = Field(None, max_length=1000)
    external_id: str | None = Field(None, max_length=1000)
    profile_id: str | None = Field(None, max_length=100)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k in _PERSON_FIELDS}


_PERSON_FIELDS = set(Person.model_fields)


def _subject(request: Request, privacy: Privacy, person: Person) -> Subject:
    try:
        subject = privacy.subject(person.fields())
    except SubjectError as exc:
        raise _problem(exc) from None
    request.state.audit_subject = privacy.subject_hash(subject)
    return subject


# -- access -------------------------------------------------------------------------------------


class ExportBody(Person):
    request_id: str | None = Field(None, max_length=40)
    format: Literal["zip", "json"] = "zip"


@router.post("/export")
def export_person(request: Request, body: ExportBody) -> Response:
    """Everything Kilde holds on the person: a ZIP of JSON and CSV with a summary page."""
    privacy = _privacy(request)
    subject = _subject(request, privacy, body)
    if body.request_id:
        try:
            requests.check_for(privacy, body.request_id, "access", subject)
        except RequestError as exc:
            raise _problem(exc) from None
    try:
        found = export.export(privacy, body.fields(), request_id=body.request_id)
    except SubjectError as exc:
        raise _problem(exc) from None
    request.state.audit_personal = True
    request.state.audit_detail = {"request_id": body.request_id, "counts": found.counts()}
    if body.request_id:
        privacy.writer.write_sync(
            WriteBatch(
                statements=[
                    requests.close_statement(
                        body.request_id, f"exported {sum(found.counts().values())} items"
                    )
                ]
            )
        )
    if body.format == "json":
        return JsonResponse({"summary": found.summary(), "sections": _sections(found)})
    return Response(
        found.zip_bytes(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{found.name}.zip"'},
    )


def _sections(found: export.Export) -> dict[str, Any]:
    return {name: found.data[name] for name, _, _ in export.SECTIONS}


# -- erasure and suppression -------------------------------------------------------------------


class EraseBody(Person):
    request_id: str | None = Field(None, max_length=40)
    compact: bool = Field(True, description="rewrite the database file so no trace is left")


@router.post("/erase")
def erase_person(request: Request, body: EraseBody) -> dict[str, Any]:
    """Remove the person from every table and file, compact the store, suppress them."""
    privacy = _privacy(request)
    subject = _subject(request, privacy, body)
    if body.request_id:
        try:
            requests.check_for(privacy, body.request_id, "erasure", subject)
        except RequestError as exc:
            raise _problem(exc) from None
    try:
        report = erasure.erase(
            privacy,
            body.fields(),
            request_id=body.request_id,
            actor=audit.actor_of(request),
            compact=body.compact,
        )
    except SubjectError as exc:
        raise _problem(exc) from None
    request.state.audit_detail = {
        "erasure_id": report["erasure_id"],
        "status": report["status"],
        "rows_removed": report["rows_removed"],
        "request_id": body.request_id,
    }
    if body.request_id:
        privacy.writer.write_sync(
            WriteBatch(
                statements=[
                    requests.close_statement(body.request_id, f"erased ({report['erasure_id']})")
                ]
            )
        )
    return report


class SuppressBody(Person):
    remove: bool = Field(False, description="take the person off the list instead")
    request_id: str | None = Field(None, max_length=40, description="the opt_out request")


def _answering(privacy: Privacy, request_id: str | None, kind: str, subject: Subject) -> None:
    """Refuse before acting when the request named is not one this action may answer."""
    if request_id:
        try:
            requests.check_for(privacy, request_id, kind, subject)
        except RequestError as exc:
            raise _problem(exc) from None


def _close(privacy: Privacy, request_id: str | None, outcome: str) -> None:
    if request_id:
        statement = requests.close_statement(request_id, outcome)
        privacy.writer.write_sync(WriteBatch(statements=[statement]))


@router.post("/suppress")
def suppress(request: Request, body: SuppressBody) -> dict[str, Any]:
    """Stop (or resume) collecting a person without erasing what is held."""
    privacy = _privacy(request)
    try:
        given, _ = parse_request(body.fields(), privacy.normaliser())
        subject = privacy.subject(body.fields())
    except SubjectError as exc:
        if exc.code != "person_not_found":
            raise _problem(exc) from None
        subject = Subject(given=given)
    identifiers = sorted({*subject.given, *subject.identifiers})
    request.state.audit_subject = privacy.subject_hash(subject) if identifiers else None
    suppression = privacy.screen.suppression
    if not body.remove:
        _answering(privacy, body.request_id, "opt_out", subject)
    if body.remove:
        hashes = suppression.hashes_of(identifiers)
        privacy.writer.write_sync(
            WriteBatch(
                statements=[
                    ("DELETE FROM suppression_list WHERE list_contains(?, hash)", [list(hashes)])
                ]
            )
        )
        suppression.forget(hashes)
        return {"removed": len(hashes), "entries": len(suppression)}
    hashes = suppression.add(identifiers)
    privacy.writer.write_sync(WriteBatch(statements=suppression.rows(hashes, "admin", None)))
    _close(privacy, body.request_id, f"suppressed: not collected again ({len(hashes)} identifiers)")
    return {"suppressed": len(hashes), "entries": len(suppression)}


@router.get("/suppression")
def suppression_list(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    """The list (hashes only), and what it kept out per source and day."""
    store = _privacy(request).store
    entries = store.query(
        "SELECT left(hash, 12) AS hash, id_type, added_at, reason, erasure_id, hits, last_hit_at "
        "FROM suppression_list ORDER BY added_at DESC LIMIT ?",
        [limit],
    )
    counts = store.query(
        "SELECT day, source, channel, records FROM suppression_counts "
        "ORDER BY day DESC, source LIMIT 1000"
    )
    total = store.scalar("SELECT count(*) FROM suppression_list")
    dropped = store.scalar("SELECT coalesce(sum(records), 0) FROM suppression_counts")
    return {"entries": total, "dropped": dropped, "list": entries, "by_source": counts}


@router.get("/erasures")
def erasures(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    rows = _privacy(request).store.query(
        "SELECT id, requested_at, completed_at, request_id, identifiers, profiles, removed, "
        "compacted FROM erasures ORDER BY requested_at DESC LIMIT ?",
        [limit],
    )
    return {"erasures": rows}


# -- consent, do-not-sell, the gate, checks at use ---------------------------------------------


class ConsentBody(Person):
    purposes: dict[str, bool] = Field(
        description='each purpose granted (true) or refused (false), e.g. {"advertising": false}'
    )
    evidence: str = Field(
        "admin", max_length=200, description="how the choice was made, e.g. 'letter 2026-05-01'"
    )


async def _record_consent(
    request: Request, privacy: Privacy, subject: Subject, choices: dict[str, bool], evidence: str
) -> dict[str, Any]:
    users, anonymous = ledger.person_ids(subject)
    if not users and not anonymous:
        raise HttpProblem(
            409,
            "no_ledger_id",
            "the consent ledger records choices by user id, anonymous id or email address, and "
            "this person has none of them",
            "name the person by their email address or user id",
        )
    message = ledger.consent_message(
        dict(choices),
        users[0] if users else None,
        None if users else anonymous[0],
        evidence=evidence,
        at=datetime.now(UTC).isoformat(),
    )
    env = Envelope(received_at=datetime.now(UTC), channel="admin")
    try:
        result = await privacy.pipeline.ingest([message], ADMIN_SOURCE, env)
    except StoreUnavailableError as exc:
        raise HttpProblem(503, "store_busy", exc.message, "retry in a second") from None
    outcome = result.outcomes[0]
    privacy.screen.consent.link_all(users, anonymous)  # the gate knows them all as one now
    if outcome.status != "stored":
        raise HttpProblem(
            409,
            "not_recorded",
            "the choice was not recorded: " + (outcome.reason or outcome.status),
            outcome.fix or "check the person is not on the suppression list",
        )
    return {"recorded": True, "purposes": choices}


@router.post("/consent")
async def record_consent(request: Request, body: ConsentBody) -> dict[str, Any]:
    """Record a person's choice made by mail, phone or in a shop (the ledger's admin source)."""
    privacy = _privacy(request)
    unknown = [p for p in body.purposes if privacy.plan.purpose(p) is None]
    if unknown or not body.purposes:
        raise HttpProblem(
            400,
            "unknown_purpose",
            "name purposes of the collection plan",
            "use one of: " + ", ".join(p.id for p in privacy.plan.purposes),
            path="purposes",
        )
    subject = _subject(request, privacy, body)
    return await _record_consent(request, privacy, subject, body.purposes, body.evidence)


@router.post("/consent/state")
def consent_state(request: Request, body: Person) -> dict[str, Any]:
    """The person's consent history (the evidence) and current state per purpose."""
    privacy = _privacy(request)
    subject = _subject(request, privacy, body)
    rows = ledger.history(privacy.store, subject)
    return {"current": ledger.current(rows), "records": rows, "count": len(rows)}


class DoNotSellBody(Person):
    opt_out: bool = True
    evidence: str = Field("do-not-sell request", max_length=200)
    request_id: str | None = Field(None, max_length=40, description="the opt_out request")


@router.post("/do-not-sell")
async def set_do_not_sell(request: Request, body: DoNotSellBody) -> dict[str, Any]:
    """Record an opt-out of sale or sharing (or its end) for a person."""
    privacy = _privacy(request)
    subject = _subject(request, privacy, body)
    purposes = do_not_sell.sale_purposes(privacy.plan)
    choices = dict.fromkeys(purposes, not body.opt_out)
    if body.opt_out:
        _answering(privacy, body.request_id, "opt_out", subject)
    await _record_consent(request, privacy, subject, choices, body.evidence)
    if body.opt_out:
        _close(privacy, body.request_id, "opted out of sale or sharing")
    return do_not_sell.status(privacy.store, privacy.plan, subject)


@router.post("/do-not-sell/status")
def do_not_sell_status(request: Request, body: Person) -> dict[str, Any]:
    privacy = _privacy(request)
    subject = _subject(request, privacy, body)
    return do_not_sell.status(privacy.store, privacy.plan, subject)


class CheckBody(Person):
    purpose: str
    sale: bool | None = None
    profile_ids: list[str] | None = Field(None, max_length=10000)


@router.post("/check")
def check(request: Request, body: CheckBody) -> dict[str, Any]:
    """May this purpose use the person's (or these profiles') data now?"""
    privacy = _privacy(request)
    profiles = body.profile_ids or _subject(request, privacy, body).profile_ids
    result = check_use(privacy.store, privacy.plan, profiles, body.purpose, sale=body.sale)
    return {"purpose": body.purpose, "profiles": result}


@router.get("/gate")
def gate(request: Request, days: int = Query(30, ge=1, le=3650)) -> dict[str, Any]:
    """What the consent gate and the suppression list kept out, per purpose and source."""
    privacy = _privacy(request)
    since = (datetime.now(UTC) - timedelta(days=days)).date()
    by_purpose = privacy.store.query(
        "SELECT purpose, kind, sum(records)::BIGINT AS records FROM consent_gate_counts "
        "WHERE day >= ? GROUP BY ALL ORDER BY purpose, kind",
        [since],
    )
    by_source = privacy.store.query(
        "SELECT day, source, purpose, kind, records FROM consent_gate_counts WHERE day >= ? "
        "ORDER BY day DESC, source, purpose",
        [since],
    )
    suppressed = privacy.store.query(
        "SELECT source, channel, sum(records)::BIGINT AS records FROM suppression_counts "
        "WHERE day >= ? GROUP BY ALL ORDER BY source",
        [since],
    )
    return {
        "mode": privacy.plan.privacy.consent_gate,
        "days": days,
        "withheld_by_purpose": by_purpose,
        "withheld_by_day_and_source": by_source,
        "suppressed_by_source": suppressed,
        "people_with_consent_records": len(privacy.screen.consent),
        "suppression_entries": len(privacy.screen.suppression),
    }


# -- retention ------------------------------------------------------------------------------------


class RetainBody(BaseModel):
    dry_run: bool = False


@router.post("/retain")
def retain(request: Request, body: RetainBody) -> dict[str, Any]:
    """Delete or anonymise what is past its retention in the plan; report what was done."""
    report = retention.retain(_privacy(request), dry_run=body.dry_run)
    request.state.audit_detail = {
        "dry_run": body.dry_run,
        "expired_events": report["expired_events"],
        "expired_traits": report["expired_traits"],
    }
    return report


@router.get("/retention")
def retention_runs(request: Request, limit: int = Query(20, ge=1, le=500)) -> dict[str, Any]:
    return {"runs": retention.runs(_privacy(request), limit)}


# -- the request tracker -------------------------------------------------------------------------


class NewRequest(BaseModel):
    kind: Literal["access", "erasure", "correction", "opt_out"]
    law: Literal["gdpr", "ccpa"] = "gdpr"
    person: Person | None = Field(None, description="who it is about (kept as a hash)")
    received_at: datetime | None = None
    note: str | None = Field(None, max_length=500)


@router.post("/requests")
def new_request(request: Request, body: NewRequest) -> dict[str, Any]:
    """Log a data subject request as received; the legal deadline starts running."""
    privacy = _privacy(request)
    try:
        return requests.create(
            privacy,
            kind=body.kind,
            law=body.law,
            person=body.person.fields() if body.person else None,
            received_at=body.received_at,
            note=body.note,
        )
    except (SubjectError, RequestError) as exc:
        raise _problem(exc) from None


@router.get("/requests")
def list_requests(
    request: Request,
    state: Literal["open", "in_progress", "done", "refused", "all"] = "open",
    overdue: bool = False,
    limit: int = Query(200, ge=1, le=1000),
) -> dict[str, Any]:
    rows = requests.listing(_privacy(request), state=state, overdue=overdue, limit=limit)
    return {"requests": rows, "count": len(rows), "overdue": sum(r["overdue"] for r in rows)}


@router.get("/requests/{request_id}")
def get_request(request: Request, request_id: str) -> dict[str, Any]:
    try:
        return requests.get(_privacy(request), request_id)
    except RequestError as exc:
        raise _problem(exc) from None


class RequestUpdate(BaseModel):
    verification: Literal["pending", "verified", "failed"] | None = None
    verification_method: str | None = Field(None, max_length=200)
    state: Literal["open", "in_progress", "done", "refused"] | None = None
    outcome: str | None = Field(None, max_length=500)
    extend: bool = False
    note: str | None = Field(None, max_length=500)


@router.post("/requests/{request_id}")
def update_request(request: Request, request_id: str, body: RequestUpdate) -> dict[str, Any]:
    try:
        return requests.update(_privacy(request), request_id, **body.model_dump())
    except RequestError as exc:
        raise _problem(exc) from None


# -- register and audit ---------------------------------------------------------------------------


@router.get("/register")
def processing_register(
    request: Request, format: Literal["md", "html", "csv", "json"] = "md"
) -> Response:
    """The GDPR Art. 30 record of processing activities, from the plan."""
    plan = _privacy(request).plan
    if format == "json":
        return JsonResponse({"activities": register.activities(plan)})
    media = {"md": "text/markdown", "html": "text/html", "csv": "text/csv"}[format]
    return Response(register.render(plan, format), media_type=f"{media}; charset=utf-8")


@router.get("/audit")
def audit_log(
    request: Request,
    limit: int = Query(100, ge=1, le=10000),
    personal_only: bool = False,
    action: str | None = Query(None, max_length=200),
) -> dict[str, Any]:
    """Who did what when; the newest first."""
    rows = audit.entries(
        _privacy(request).store, limit=limit, personal_only=personal_only, action=action
    )
    return {"entries": rows, "count": len(rows)}
