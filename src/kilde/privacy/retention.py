"""Retention: data is kept only as long as the plan says (GDPR Art. 5(1)(e)).

Each event and trait in the plan may say how long it is kept (`retention: 13 months`). A run
(`kilde privacy retain`, `POST /api/privacy/retain`, and once a day in the server) finds what
has expired and, by the plan's `privacy.retention_action`:

- `delete`: removes expired events (and what identity resolution read from them);
- `anonymise`: keeps expired events for aggregate reporting but removes everything that
  identifies the person: user and anonymous id, IP address, traits, context, and the URL,
  referrer and search of pages (the path stays). Other properties are kept: an event whose
  properties identify people should be deleted instead.

Bought data (`kilde import broker`) is kept only while its licence runs: once the licence
expiry date in a record's provenance has passed, the record is deleted (whatever the action:
an anonymised copy would still be the broker's data), with what identity resolution and the
profiles took from it; profiles are then rebuilt from what is left. The report lists it as
"broker data (licence expired)".

Expired traits are taken out of the events that carried them and off the profiles. Events and
traits without a retention in the plan are kept and reported, so the gap is visible. Every run
is recorded with its report (`retention_runs`); a dry run reports without changing anything.
The consent ledger and the erasure records are kept: they are the company's evidence.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kilde.pipeline.dead_letter import payload_field
from kilde.plan.models import EventSpec, Plan, retention_days
from kilde.privacy.services import Privacy
from kilde.store.database import Store
from kilde.store.writer import WriteBatch

_ANONYMISED = '{"kilde":{"anonymised":true}}'


@dataclass
class _Rule:
    what: str  # "page (any)", "track Product Viewed", "trait picture"
    retention: str
    cutoff: datetime
    where: str  # SQL condition on events
    params: list[Any]


def _event_rules(plan: Plan, now: datetime) -> tuple[list[_Rule], str, list[Any]]:
    """One rule per event with a retention; and the condition of events the plan keeps
    without a limit."""
    named: dict[str, list[str]] = {}
    for spec in plan.events:
        if spec.name is not None:
            named.setdefault(spec.type, []).append(spec.name)
    rules: list[_Rule] = []
    unlimited: list[str] = []
    unlimited_params: list[Any] = []
    for spec in plan.events:
        where, params = _matches(spec, named)
        if spec.retention is None:
            unlimited.append(f"({where})")
            unlimited_params.extend(params)
            continue
        cutoff = now - timedelta(days=retention_days(spec.retention))
        what = f"{spec.type} {spec.name or '(any)'}"
        rules.append(_Rule(what, spec.retention, cutoff, where, params))
    covered = [f"({r.where})" for r in rules] + unlimited
    covered_params = [p for r in rules for p in r.params] + unlimited_params
    # Identify, group and alias calls carry traits (handled per trait) and links between ids.
    other = "type IN ('track', 'page', 'screen')"
    if covered:
        other += " AND NOT (" + " OR ".join(covered) + ")"
    unplanned = f"({other})"
    if unlimited:
        unplanned = f"({unplanned} OR " + " OR ".join(unlimited) + ")"
    return rules, unplanned, covered_params + unlimited_params


def _matches(spec: EventSpec, named: dict[str, list[str]]) -> tuple[str, list[Any]]:
    if spec.name is not None:
        return "type = ? AND event = ?", [spec.type, spec.name]
    others = named.get(spec.type, [])
    if others:
        return "type = ? AND (event IS NULL OR NOT list_contains(?, event))", [spec.type, others]
    return "type = ?", [spec.type]


def retain(
    privacy: Privacy,
    *,
    dry_run: bool = False,
    trigger: str = "command",
    now: datetime | None = None,
) -> dict[str, Any]:
    """Apply the plan's retention now; the report of what was (or would be) done."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    plan = privacy.plan
    action = plan.privacy.retention_action
    run_id = "ret_" + uuid.uuid4().hex[:16]
    with privacy.lock:
        if dry_run:
            report = _measure(privacy.store.scalar, plan, now)
        else:
            # Counted and changed alone on the writer thread, so the report is exactly what
            # was done, even while records keep arriving.
            report = privacy.writer.exclusive(lambda: _apply(privacy.store, plan, now, action))
        report = {
            "run_id": run_id,
            "trigger": trigger,
            "dry_run": dry_run,
            "action": action,
            "at": now,
            **{k: v for k, v in report.items() if k != "_rules"},
            "seconds": round(time.perf_counter() - started, 3),
        }
        privacy.writer.write_sync(
            WriteBatch(
                statements=[
                    (
                        "INSERT INTO retention_runs VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            run_id,
                            now,
                            datetime.now(UTC),
                            trigger,
                            dry_run,
                            orjson.dumps(report).decode(),
                        ],
                    )
                ]
            )
        )
        engine = privacy.identity
        if not dry_run and report["expired_events"] and engine is not None:
            engine.rebuild()  # profiles and identities from what is left
            report["profiles_rebuilt"] = True
        return report


_LIVE = "NOT (user_id IS NULL AND anonymous_id IS NULL AND context = ?)"
# Records bought from a data broker whose licence has expired (before the given date).
_BROKER_EXPIRED = (
    "json_extract_string(context, '$.provenance.tier') = 'broker' AND "
    "TRY_CAST(json_extract_string(context, '$.provenance.licence_expires_on') AS DATE) < ?"
)
BROKER_EXPIRED = "broker data (licence expired)"
Scalar = Callable[[str, list[Any]], Any]


def _measure(scalar: Scalar, plan: Plan, now: datetime) -> dict[str, Any]:
    """What has expired now, per event and trait of the plan."""
    rules, unplanned, unplanned_params = _event_rules(plan, now)
    events: list[dict[str, Any]] = []
    for rule in rules:
        expired = scalar(
            f"SELECT count(*) FROM events WHERE {rule.where} AND timestamp < ? AND {_LIVE}",
            [*rule.params, rule.cutoff, _ANONYMISED],
        )
        events.append(
            {
                "event": rule.what,
                "retention": rule.retention,
                "cutoff": rule.cutoff,
                "expired": int(expired or 0),
            }
        )
    broker = scalar(f"SELECT count(*) FROM events WHERE {_BROKER_EXPIRED}", [now.date()])
    if broker:
        events.append(
            {
                "event": BROKER_EXPIRED,
                "retention": "until the licence expires",
                "cutoff": now,
                "expired": int(broker),
            }
        )
    traits: list[dict[str, Any]] = []
    for spec in plan.traits:
        if spec.retention is None:
            continue
        cutoff = now - timedelta(days=retention_days(spec.retention))
        path = _path(spec.name)
        in_events = scalar(
            "SELECT count(*) FROM events WHERE timestamp < ? AND ("
            "json_exists(traits, ?) OR json_exists(context, ?))",
            [cutoff, path, "$.traits" + path[1:]],
        )
        in_profiles = scalar(
            "SELECT count(*) FROM profile_traits WHERE name = ? AND observed_at < ?",
            [spec.name, cutoff],
        )
        traits.append(
            {
                "trait": spec.name,
                "retention": spec.retention,
                "cutoff": cutoff,
                "events": int(in_events or 0),
                "profiles": int(in_profiles or 0),
            }
        )
    kept = scalar(f"SELECT count(*) FROM events WHERE {unplanned}", unplanned_params)
    return {
        "events": events,
        "traits": traits,
        "expired_events": sum(e["expired"] for e in events),
        "expired_traits": sum(t["events"] + t["profiles"] for t in traits),
        "kept_without_retention": int(kept or 0),
        "_rules": rules,
    }


def _apply(store: Store, plan: Plan, now: datetime, action: str) -> dict[str, Any]:
    """On the writer thread: measure, then change, in one transaction."""
    con = store.cursor()

    def scalar(sql: str, params: list[Any]) -> Any:
        row = con.execute(sql, params).fetchone()
        return row[0] if row else None

    try:
        con.execute("BEGIN TRANSACTION")
        report = _measure(scalar, plan, now)
        for sql, params in _statements(report["_rules"], report["traits"], action, _LIVE):
            con.execute(sql, params)
        if any(e["event"] == BROKER_EXPIRED for e in report["events"]):
            for sql, params in _broker_statements(now):
                con.execute(sql, params)
        con.execute("COMMIT")
    except Exception:
        with contextlib.suppress(Exception):
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return report


def _path(name: str) -> str:
    return "$." + '"' + name.replace('"', "") + '"'


def _statements(
    rules: list[_Rule], traits: list[dict[str, Any]], action: str, live: str
) -> list[tuple[str, list[Any]]]:
    out: list[tuple[str, list[Any]]] = []
    if rules:
        where = " OR ".join(f"({r.where} AND timestamp < ?)" for r in rules)
        params = [p for r in rules for p in [*r.params, r.cutoff]]
        out.append(
            (
                "CREATE OR REPLACE TEMP TABLE retention_expired AS SELECT source, message_id "
                f"FROM events WHERE ({where}) AND {live}",
                [*params, _ANONYMISED],
            )
        )
        for table in ("identity_records", "identity_observations"):
            out.append(
                (
                    f"DELETE FROM {table} t USING retention_expired x "
                    "WHERE t.source = x.source AND t.message_id = x.message_id",
                    [],
                )
            )
        if action == "delete":
            out.append(
                (
                    "DELETE FROM events e USING retention_expired x "
                    "WHERE e.source = x.source AND e.message_id = x.message_id",
                    [],
                )
            )
        else:
            out.append(
                (
                    "UPDATE events SET user_id = NULL, anonymous_id = NULL, previous_id = NULL, "
                    "group_id = NULL, ip = NULL, traits = '{}', context = ?, integrations = '{}', "
                    "page_url = page_path, referrer = NULL, properties = json_merge_patch("
                    'properties, \'{"url": null, "referrer": null, "search": null}\') '
                    "FROM retention_expired x "
                    "WHERE events.source = x.source AND events.message_id = x.message_id",
                    [_ANONYMISED],
                )
            )
        out.append(("DROP TABLE retention_expired", []))
    for trait in traits:
        if not (trait["events"] or trait["profiles"]):
            continue
        name, cutoff = trait["trait"], trait["cutoff"]
        path = _path(name)
        out.append(
            (
                "UPDATE events SET traits = json_merge_patch(traits, json_object(?, NULL)) "
                "WHERE timestamp < ? AND json_exists(traits, ?)",
                [name, cutoff, path],
            )
        )
        out.append(
            (
                "UPDATE events SET context = json_merge_patch(context, "
                "json_object('traits', json_object(?, NULL))) "
                "WHERE timestamp < ? AND json_exists(context, ?)",
                [name, cutoff, "$.traits" + path[1:]],
            )
        )
        out.append(
            ("DELETE FROM profile_traits WHERE name = ? AND observed_at < ?", [name, cutoff])
        )
    return out


def _broker_statements(now: datetime) -> list[tuple[str, list[Any]]]:
    """Delete bought records whose licence has expired, and what was derived from them."""
    out: list[tuple[str, list[Any]]] = [
        (
            "CREATE OR REPLACE TEMP TABLE broker_expired AS SELECT source, message_id "
            f"FROM events WHERE {_BROKER_EXPIRED}",
            [now.date()],
        )
    ]
    for table in ("identity_records", "identity_observations", "profile_traits", "events"):
        out.append(
            (
                f"DELETE FROM {table} t USING broker_expired x "
                "WHERE t.source = x.source AND t.message_id = x.message_id",
                [],
            )
        )
    # Rows of such files that were rejected wait in the dead letter with the same provenance.
    out.append(
        (
            "DELETE FROM dead_letters WHERE "
            + payload_field("$.context.provenance.tier")
            + " = 'broker' AND TRY_CAST("
            + payload_field("$.context.provenance.licence_expires_on")
            + " AS DATE) < ?",
            [now.date()],
        )
    )
    out.append(("DROP TABLE broker_expired", []))
    return out


def runs(privacy: Privacy, limit: int = 20) -> list[dict[str, Any]]:
    rows = privacy.store.query(
        "SELECT id, started_at, finished_at, trigger, dry_run, report FROM retention_runs "
        "ORDER BY started_at DESC LIMIT ?",
        [limit],
    )
    for row in rows:
        row["report"] = orjson.loads(row["report"]) if row["report"] else None
    return rows


def last_run_at(privacy: Privacy) -> datetime | None:
    found = privacy.store.scalar("SELECT max(started_at) FROM retention_runs WHERE NOT dry_run")
    return found if isinstance(found, datetime) else None
