"""Admin API for destinations, and the server's delivery loop.

The loop runs beside the collector: every couple of seconds it moves new events into the
webhook outbox and sends what is due, and it syncs audiences whose schedule has come. It only
reads the events table and writes through the writer, so a slow or dead receiver never holds up
collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel

from kilde.activate.audiences import ActivationError, AudienceSync, log_statement
from kilde.activate.webhooks import WebhookDispatcher, outcome_of, sign, transport_error
from kilde.plan.destinations import Destination, interval_seconds
from kilde.plan.models import Plan
from kilde.store import WriteBatch
from kilde.web.admin_api import require_admin
from kilde.web.errors import HttpProblem

log = logging.getLogger("kilde.activate")
TICK = float(os.environ.get("KILDE_DELIVERY_TICK", "2"))


def _plan(app: FastAPI) -> Plan:
    plan: Plan = app.state.pipeline.plan
    return plan


async def _run_destination(app: FastAPI, destination: Destination, plan: Plan) -> None:
    """One round of one destination; its failures are logged, never raised."""
    try:
        if destination.kind == "webhook":
            await app.state.dispatcher.run_once(destination)
        else:
            syncer = AudienceSync(
                app.state.store, app.state.writer, plan, app.state.settings.data_dir
            )
            await asyncio.to_thread(syncer.sync, destination)
    except ActivationError as exc:  # already in the delivery log
        log.info("destination %s: %s", destination.name, exc.message)
    except Exception as exc:  # one broken destination must not stop the others
        log.error("destination %s failed: %s", destination.name, type(exc).__name__)
        with contextlib.suppress(Exception):
            message = f"{type(exc).__name__}: the run failed; see the server log"
            await app.state.writer.write(
                WriteBatch(statements=[log_statement(destination.name, "*", message)])
            )


async def _loop(app: FastAPI) -> None:
    """Each destination runs in its own task: a receiver that hangs holds up only itself."""
    last_sync: dict[str, float] = {}
    running: dict[str, asyncio.Task[None]] = {}
    try:
        while True:
            await asyncio.sleep(TICK)
            plan = _plan(app)
            dispatcher: WebhookDispatcher = app.state.dispatcher
            dispatcher.plan = plan
            for destination in plan.destinations:
                task = running.get(destination.name)
                if task is not None and not task.done():
                    continue  # its previous round is still going (a slow receiver)
                if destination.kind != "webhook":
                    if not destination.schedule:
                        continue
                    every = interval_seconds(destination.schedule)
                    if time.monotonic() - last_sync.get(destination.name, -every) < every:
                        continue
                    last_sync[destination.name] = time.monotonic()
                running[destination.name] = asyncio.create_task(
                    _run_destination(app, destination, plan)
                )
    finally:
        for task in running.values():
            task.cancel()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    state.dispatcher = WebhookDispatcher(state.store, state.writer, state.pipeline.plan)
    task = None
    if os.environ.get("KILDE_DELIVERY_BACKGROUND", "1") != "0":
        task = asyncio.create_task(_loop(app))
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], lifespan=_lifespan)


def _destination(request: Request, name: str) -> Destination:
    found = next((d for d in _plan(request.app).destinations if d.name == name), None)
    if found is None:
        raise HttpProblem(
            404,
            "unknown_destination",
            "there is no destination with that name in the collection plan",
            "list them with GET /api/destinations or `kilde destinations list`",
        )
    return found


@router.get("/destinations")
def list_destinations(request: Request) -> dict[str, Any]:
    store = request.app.state.store
    counts = {
        (r["destination"], r["state"]): r["n"]
        for r in store.query(
            "SELECT destination, state, count(*) AS n FROM deliveries GROUP BY ALL"
        )
    }
    result = []
    for d in _plan(request.app).destinations:
        last = store.query(
            "SELECT max(created_at) AS at FROM export_manifests WHERE destination = ?", [d.name]
        )
        result.append(
            {
                "name": d.name,
                "kind": d.kind,
                "purpose": d.purpose,
                "events": d.events,
                "segments": d.segments,
                "schedule": d.schedule,
                "deliveries": {
                    s: counts.get((d.name, s), 0)
                    for s in ("pending", "delivered", "skipped", "dead")
                },
                "last_export_at": last[0]["at"] if last else None,
            }
        )
    return {"destinations": result}


class RunRequest(BaseModel):
    full: bool = False


@router.post("/destinations/{name}/run")
async def run_destination(request: Request, name: str, body: RunRequest) -> dict[str, Any]:
    """Deliver what is due now (webhooks) or sync the audiences now (lists and files)."""
    destination = _destination(request, name)
    app = request.app
    if destination.kind == "webhook":
        app.state.dispatcher.plan = _plan(app)
        report = await app.state.dispatcher.run_once(destination)
        return {"destination": name, "kind": "webhook", **asdict(report)}
    syncer = AudienceSync(
        app.state.store, app.state.writer, _plan(app), app.state.settings.data_dir
    )
    try:
        reports = await asyncio.to_thread(syncer.sync, destination, full=body.full)
    except ActivationError as exc:
        raise HttpProblem(409, "cannot_sync", exc.message, exc.fix or "see the docs") from None
    return {"destination": name, "kind": destination.kind, "syncs": [asdict(r) for r in reports]}


@router.post("/destinations/{name}/test")
async def test_destination(request: Request, name: str) -> dict[str, Any]:
    """Send one signed test request (webhooks) or check the output folder (files)."""
    destination = _destination(request, name)
    if destination.kind != "webhook":
        folder = AudienceSync(
            request.app.state.store,
            request.app.state.writer,
            _plan(request.app),
            request.app.state.settings.data_dir,
        )._directory(destination)
        return {"destination": name, "ok": os.access(folder, os.W_OK), "folder": str(folder)}
    assert destination.url and destination.secret
    body = b'{"id":"test","destination":"%s","data":{"test":true}}' % name.encode()
    headers = {
        "Content-Type": "application/json",
        "Kilde-Delivery-Id": "test",
        "Kilde-Signature": sign(destination.secret, int(time.time()), body),
    }
    try:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                destination.url, content=body, headers=headers, timeout=destination.timeout
            )
    except httpx.HTTPError as exc:
        return {
            "destination": name,
            "ok": False,
            "error": transport_error(exc, destination.timeout),
        }
    outcome = outcome_of(response)
    result: dict[str, Any] = {
        "destination": name,
        "ok": response.is_success,
        "status": response.status_code,
    }
    if outcome.error:
        result["error"] = outcome.error
    return result


@router.get("/destinations/{name}/deliveries")
def deliveries(
    request: Request, name: str, state: str | None = None, limit: int = 100
) -> dict[str, Any]:
    _destination(request, name)
    where, params = "destination = ?", [name]
    if state:
        where += " AND state = ?"
        params.append(state)
    rows = request.app.state.store.query(
        "SELECT id, person IS NOT NULL AS has_person, state, attempts, last_status, last_error, "
        f"created_at, delivered_at, next_attempt_at FROM deliveries WHERE {where} "
        "ORDER BY seq DESC LIMIT ?",
        [*params, min(max(limit, 1), 1000)],
    )
    log_rows = request.app.state.store.query(
        "SELECT delivery_id, attempt, attempted_at, status, error, duration_ms FROM delivery_log "
        "WHERE destination = ? ORDER BY attempted_at DESC LIMIT ?",
        [name, min(max(limit, 1), 1000)],
    )
    return {"deliveries": rows, "log": log_rows}


@router.post("/destinations/{name}/replay")
async def replay_dead(request: Request, name: str) -> dict[str, Any]:
    _destination(request, name)
    store = request.app.state.store
    dead = store.scalar(
        "SELECT count(*) FROM deliveries WHERE destination = ? AND state = 'dead'", [name]
    )
    statement = request.app.state.dispatcher.replay_statement(name)
    await request.app.state.writer.write(WriteBatch(statements=[statement]))
    return {"destination": name, "requeued": dead}
