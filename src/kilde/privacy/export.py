"""Subject access and portability (GDPR Art. 15 and 20, CCPA right to know): one ZIP file.

Everything Kilde holds on the person, each kind in JSON (complete, machine-readable, for
portability) and CSV (for a spreadsheet), with `index.html`, a page that says in plain words
what the company holds, where it came from, why, for how long, who it was shared with, and what
the person can do. Read in one transaction, so the file is one consistent moment of the store
(a consent withdrawn while the export runs is in it entirely or not at all).

Sections: profile, traits (with the source and time of each value), identities, consents (the
ledger's history and the current state, do-not-sell), events (raw, every field), form answers
(and survey invitations), imports (records from company files and bought data, with their
provenance and import runs), segments (memberships with entry and exit times), scores (computed
traits, RFM, lifetime value, churn), dead letters, email (campaigns they were a recipient of),
shared_with (deliveries and audience syncs to destinations).
"""

from __future__ import annotations

import contextlib
import csv
import io
import zipfile
from datetime import UTC, datetime
from typing import Any

import duckdb
import jinja2
import orjson

from kilde import __version__
from kilde.errors import ConfigError
from kilde.identity.keyed import ONE_IDENTIFIER
from kilde.pipeline.dead_letter import payload_field
from kilde.plan.models import Plan
from kilde.privacy.do_not_sell import sale_purposes
from kilde.privacy.ledger import REFUSED, current
from kilde.privacy.services import Privacy
from kilde.privacy.subjects import RECIPIENT, Subject, SubjectError, expand

FORM_EVENTS = ("Form Submitted", "Survey Answered")
IMPORT_KINDS = ("import", "broker")
SECTIONS = (
    ("profile", "Profile", "The unified profile Kilde keeps of you."),
    ("traits", "What we know about you", "Each value with where and when it came from."),
    ("identities", "Your identifiers", "Email addresses, ids and devices linked to you."),
    ("consents", "Your consent choices", "Every choice you made, with its evidence."),
    ("events", "Activity", "Everything recorded about what you did, every field."),
    ("form_answers", "Form and survey answers", "What you filled in on our forms."),
    ("imports", "From company records and bought data", "Records imported from files."),
    ("segments", "Segments", "Groups of customers you belong or belonged to."),
    ("scores", "Derived scores", "What we computed from your data (e.g. lifetime value)."),
    ("dead_letters", "Rejected records", "Data about you that did not fit our plan."),
    ("email", "Email campaigns", "Tracked mails you received."),
    ("shared_with", "Shared with", "Data sent to other tools or companies."),
)
_JSON_COLUMNS = ("properties", "traits", "context", "integrations", "plan_issues", "value")


def export(privacy: Privacy, body: dict[str, Any], *, request_id: str | None = None) -> Export:
    """The ZIP for the person a request body names; SubjectError when nobody is found."""
    privacy.catch_up()
    with privacy.lock:
        subject = expand(privacy.store, privacy.subject(body))
        con = privacy.store.cursor()
        try:
            con.execute("BEGIN TRANSACTION")  # one snapshot for every section
            data = _collect(con, privacy, subject)
            con.execute("COMMIT")
        finally:
            con.close()
    if not subject.known and not any(data[n] for n, _, _ in SECTIONS if n != "identities"):
        raise SubjectError(
            404,
            "person_not_found",
            "Kilde holds nothing under that identifier",
            fix="check it: a whole email address, user id, phone number or profile id",
        )
    return Export(privacy.plan, subject, data, request_id)


class Export:
    """The collected sections, and the ZIP made of them."""

    def __init__(
        self, plan: Plan, subject: Subject, data: dict[str, Any], request_id: str | None
    ) -> None:
        self.plan = plan
        self.subject = subject
        self.data = data
        self.request_id = request_id
        self.created_at = datetime.now(UTC)

    @property
    def name(self) -> str:
        tag = self.request_id or (self.subject.profile_ids[0] if self.subject.profile_ids else "")
        return f"kilde-export-{tag or self.created_at.strftime('%Y%m%d%H%M%S')}"

    def counts(self) -> dict[str, int]:
        return {name: len(self.data[name]) for name, _, _ in SECTIONS}

    def zip_bytes(self) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            root = self.name
            summary = self.summary()
            archive.writestr(f"{root}/index.html", self.html(summary))
            archive.writestr(f"{root}/summary.json", _json(summary))
            for name, _, _ in SECTIONS:
                rows = self.data[name]
                archive.writestr(f"{root}/{name}.json", _json(rows))
                archive.writestr(f"{root}/{name}.csv", _csv(rows))
        return buffer.getvalue()

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        used_sources = sorted({e["source"] for e in self.data["events"]})
        by_name = {s.name: s for s in plan.sources}
        specs = {e.key: e for e in plan.events}
        purposes: set[str] = set()
        for event in self.data["events"]:
            spec = specs.get((event["type"], event["event"])) or specs.get((event["type"], None))
            purposes.update(spec.purposes if spec else ())
        held = {r["name"] for r in self.data["traits"]}
        purposes.update(p for t in plan.traits if t.name in held for p in t.purposes)
        retention = {f"{e.type} {e.name or '(any)'}": e.retention for e in plan.events}
        retention |= {f"trait {t.name}": t.retention for t in plan.traits}
        destinations = getattr(plan, "destinations", [])
        consents = self.data["consent_state"]
        return {
            "generated_at": self.created_at,
            "generated_by": f"Kilde {__version__}",
            "request_id": self.request_id,
            "controller": {"name": plan.company.name, "contact": plan.company.contact},
            "profiles": self.subject.profile_ids,
            "counts": self.counts(),
            "sources": [
                {
                    "name": s,
                    "kind": by_name[s].kind if s in by_name else None,
                    "tool": by_name[s].tool if s in by_name else None,
                    "owner": by_name[s].owner if s in by_name else None,
                }
                for s in used_sources
            ],
            "purposes": [
                {
                    "id": p,
                    "legal_basis": spec.legal_basis if spec else None,
                    "description": spec.description if spec else None,
                }
                for p in sorted(purposes)
                for spec in [plan.purpose(p)]
            ],
            "retention": {k: v or "not limited in the plan" for k, v in retention.items()},
            "recipients": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "purpose": d.purpose,
                    "recipient": getattr(d, "recipient", None),
                }
                for d in destinations
            ],
            "consent": consents,
            "do_not_sell": self.data["do_not_sell"],
        }

    def html(self, summary: dict[str, Any]) -> str:
        return _PAGE.render(
            s=summary,
            sections=[(n, t, d, len(self.data[n])) for n, t, d in SECTIONS],
            traits=self.data["traits"],
            identities=self.data["identities"],
        )


# -- reading ----------------------------------------------------------------------------------


def _exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ? "
        "AND table_schema = 'main'",
        [table],
    ).fetchone()
    return bool(row and row[0])


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    result = con.execute(sql, params)
    names = [d[0] for d in result.description or []]
    rows = [dict(zip(names, row, strict=True)) for row in result.fetchall()]
    for row in rows:
        for key in _JSON_COLUMNS:
            if isinstance(row.get(key), str):
                with contextlib.suppress(orjson.JSONDecodeError):
                    row[key] = orjson.loads(row[key])
    return rows


def _collect(con: duckdb.DuckDBPyConnection, privacy: Privacy, subject: Subject) -> dict[str, Any]:
    plan = privacy.plan
    profiles = subject.profile_ids
    plain = subject.values("user_id", "anonymous_id")
    users = subject.values("user_id")
    anons = subject.values("anonymous_id")
    emails = subject.values("email")
    ids_t = [i.type for i in subject.identifiers]
    ids_v = [i.value for i in subject.identifiers]
    data: dict[str, Any] = {}
    data["profile"] = _rows(
        con, "SELECT * FROM profiles WHERE list_contains(?, profile_id)", [profiles]
    )
    data["traits"] = _rows(
        con,
        "SELECT profile_id, name, value, source, tier, observed_at, message_id, candidates "
        "FROM profile_traits WHERE list_contains(?, profile_id) ORDER BY name",
        [profiles],
    )
    data["identities"] = [
        {"type": i.type, "value": i.value} | extra
        for i in subject.identifiers
        for extra in [_identity_row(con, i.type, i.value)]
    ]
    history = _rows(
        con,
        "SELECT id, user_id, anonymous_id, purpose, state, decided_at, recorded_at, source, "
        "channel, evidence, ip, message_id FROM consent_ledger "
        "WHERE list_contains(?, trim(user_id)) OR list_contains(?, trim(anonymous_id)) "
        "ORDER BY decided_at, seq",
        [users, anons],
    )
    data["consents"] = history
    state = current(history)
    data["consent_state"] = state
    sale = sale_purposes(plan)
    refused = [p for p in sale if p in state and state[p]["state"] in REFUSED]
    data["do_not_sell"] = {"flagged": bool(refused), "purposes": refused}
    events = _rows(
        con,
        "WITH ids AS (SELECT unnest(?::VARCHAR[]) AS id_type, unnest(?::VARCHAR[]) AS id_value), "
        "keys AS ("
        " SELECT source, message_id FROM events WHERE list_contains(?, trim(user_id)) "
        " OR list_contains(?, trim(anonymous_id))"
        " UNION SELECT r.source, r.message_id FROM identity_records r JOIN ids "
        " ON r.primary_type = ids.id_type AND r.primary_value = ids.id_value"
        " UNION SELECT o.source, o.message_id FROM identity_observations o JOIN ids "
        " ON o.id_type = ids.id_type AND o.id_value = ids.id_value) "
        "SELECT e.* FROM events e JOIN keys k USING (source, message_id) "
        "ORDER BY e.timestamp, e.message_id",
        [ids_t, ids_v, users, anons],
    )
    recipients = _recipients(privacy, subject)
    if recipients:
        seen = {(e["source"], e["message_id"]) for e in events}
        for event in _rows(
            con,
            "SELECT * FROM events WHERE list_contains(?, "
            "json_extract_string(properties, '$.recipient')) ORDER BY timestamp",
            [recipients],
        ):
            if (event["source"], event["message_id"]) not in seen:
                events.append(event)
    data["events"] = events
    data["form_answers"] = [
        {
            "form_id": (e["properties"] or {}).get("form_id"),
            "event": e["event"],
            "submitted_at": e["timestamp"],
            "answers": (e["properties"] or {}).get("answers"),
            "message_id": e["message_id"],
        }
        for e in events
        if e["event"] in FORM_EVENTS
    ]
    if _exists(con, "form_invites"):
        data["form_answers"] += [
            {"invitation": r["id"], "form_id": r["form_id"], **r}
            for r in _rows(
                con,
                "SELECT id, form_id, created_at, used_at FROM form_invites "
                "WHERE list_contains(?, trim(user_id)) OR list_contains(?, lower(trim(email)))",
                [users, emails],
            )
        ]
    kinds = {s.name: s.kind for s in plan.sources}
    imported = [e for e in events if kinds.get(e["source"]) in IMPORT_KINDS]
    runs = {_provenance(e).get("import_run") for e in imported} - {None}
    run_rows = (
        {
            r["id"]: r
            for r in _rows(
                con,
                "SELECT id, kind, source, file_name, tier, broker, acquired_on, "
                "licence_expires_on, purpose, lawful_basis, started_at FROM import_runs "
                "WHERE list_contains(?, id)",
                [sorted(runs)],
            )
        }
        if _exists(con, "import_runs")
        else {}
    )
    data["imports"] = [
        {
            "source": e["source"],
            "type": e["type"],
            "event": e["event"],
            "timestamp": e["timestamp"],
            "traits": e["traits"],
            "properties": e["properties"],
            "provenance": _provenance(e) or None,
            "import_run": run_rows.get(
                ((e["context"] or {}).get("provenance") or {}).get("import_run")
            ),
        }
        for e in imported
    ]
    data["segments"] = []
    if _exists(con, "segment_memberships"):
        names = (
            "(SELECT name FROM segment_definitions d WHERE d.id = m.segment_id)"
            if _exists(con, "segment_definitions")
            else "NULL"
        )
        data["segments"] = _rows(
            con,
            f"SELECT m.segment_id, {names} AS segment_name, m.entered_at, m.exited_at "
            "FROM segment_memberships m WHERE list_contains(?, m.profile_id) "
            "ORDER BY m.entered_at",
            [profiles],
        )
    scores = [{"kind": "computed traits", **row} for row in data["profile"]]
    if _exists(con, "profile_insights"):
        scores += [
            {"kind": "insights", **row}
            for row in _rows(
                con, "SELECT * FROM profile_insights WHERE list_contains(?, profile_id)", [profiles]
            )
        ]
    data["scores"] = scores
    values = [v for v in subject.values("email", "phone") if v]
    letters = _rows(
        con,
        "SELECT id, received_at, source, channel, reason, path, payload, status FROM dead_letters "
        "WHERE list_contains(?, " + payload_field("$.userId") + ") "
        "OR list_contains(?, " + payload_field("$.anonymousId") + ") "
        "OR list_has_any(?, regexp_extract_all(lower(payload), '[^\"\\s,:{}]+')) "
        "ORDER BY received_at",
        [users, anons, [v.lower() for v in values]],
    )
    data["dead_letters"] = letters
    data["email"] = []
    if _exists(con, "email_campaign_recipients"):
        data["email"] = _rows(
            con,
            "SELECT r.campaign_id, c.purpose, r.recipient, r.rendered_at "
            "FROM email_campaign_recipients r LEFT JOIN email_campaigns c ON c.id = r.campaign_id "
            "WHERE list_contains(?, trim(r.user_id)) OR list_contains(?, r.recipient) "
            "ORDER BY r.rendered_at",
            [users, recipients],
        )
    shared: list[dict[str, Any]] = []
    if _exists(con, "audience_syncs"):
        shared += [
            {"kind": "audience", **r}
            for r in _rows(
                con,
                "SELECT destination, segment, synced_at FROM audience_syncs "
                "WHERE list_contains(?, profile_id) ORDER BY synced_at",
                [profiles],
            )
        ]
    if _exists(con, "deliveries"):
        shared += [
            {"kind": "delivery", **r}
            for r in _rows(
                con,
                "SELECT destination, state, created_at, delivered_at, event FROM deliveries "
                "WHERE list_contains(?, person) ORDER BY created_at",
                [[*profiles, *plain]],
            )
        ]
    data["shared_with"] = shared
    return data


def _provenance(event: dict[str, Any]) -> dict[str, Any]:
    context = event["context"]
    found = context.get("provenance") if isinstance(context, dict) else None
    return found if isinstance(found, dict) else {}


def _identity_row(con: duckdb.DuckDBPyConnection, id_type: str, value: str) -> dict[str, Any]:
    rows = _rows(
        con,
        f"{ONE_IDENTIFIER}SELECT min(first_seen) AS first_seen, max(last_seen) AS last_seen "
        "FROM held WHERE id_type = ?",
        [value, id_type],
    )
    return rows[0] if rows else {}


def _recipients(privacy: Privacy, subject: Subject) -> list[str]:
    try:
        signer = privacy.signer_of()
    except ConfigError:
        return []
    out = [signer.pseudonym("email-recipient", "user:" + u) for u in subject.values("user_id")]
    out += [signer.pseudonym("email-recipient", "email:" + e) for e in subject.values("email")]
    return sorted(set(out) | {i.value for i in subject.identifiers if i.type == RECIPIENT})


# -- writing ----------------------------------------------------------------------------------


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
    return str(value)


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


_PAGE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Your data at {{ s.controller.name }}</title>
<style>
body{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}
th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} small{color:#666}
</style></head><body>
<h1>Your data at {{ s.controller.name }}</h1>
<p>This file holds everything {{ s.controller.name }} keeps about you in its customer data
platform, as of {{ s.generated_at.strftime("%d %B %Y, %H:%M UTC") }}.
{% if s.request_id %}It answers your request {{ s.request_id }}.{% endif %}
Each part is here twice: as a <b>.json</b> file (complete, for moving it to another service) and
as a <b>.csv</b> file (for a spreadsheet).</p>

<h2>What is in this file</h2>
<table><tr><th>Part</th><th>What it is</th><th>Items</th><th>Files</th></tr>
{% for name, title, description, count in sections %}
<tr><td>{{ title }}</td><td>{{ description }}</td><td>{{ count }}</td>
<td>{{ name }}.json, {{ name }}.csv</td></tr>
{% endfor %}</table>

<h2>What we know about you</h2>
{% if traits %}<table><tr><th>Detail</th><th>Value</th><th>From</th><th>Since</th></tr>
{% for t in traits %}<tr><td>{{ t.name }}</td><td>{{ t.value }}</td><td>{{ t.source }}</td>
<td>{{ t.observed_at }}</td></tr>{% endfor %}</table>
{% else %}<p>No personal details.</p>{% endif %}

<h2>How we recognise you</h2>
{% if identities %}<ul>{% for i in identities %}<li>{{ i.type }}: {{ i.value }}</li>
{% endfor %}</ul>{% else %}<p>No identifiers.</p>{% endif %}

<h2>Where your data came from</h2>
{% if s.sources %}<table><tr><th>Source</th><th>Kind</th><th>Tool</th></tr>
{% for src in s.sources %}<tr><td>{{ src.name }}</td><td>{{ src.kind }}</td>
<td>{{ src.tool }}</td></tr>{% endfor %}</table>{% else %}<p>No recorded activity.</p>{% endif %}

<h2>Why we use it</h2>
{% if s.purposes %}<table><tr><th>Purpose</th><th>Legal basis</th><th>What for</th></tr>
{% for p in s.purposes %}<tr><td>{{ p.id }}</td><td>{{ p.legal_basis }}</td>
<td>{{ p.description }}</td></tr>{% endfor %}</table>{% else %}<p>-</p>{% endif %}

<h2>Your choices</h2>
{% if s.consent %}<table><tr><th>Purpose</th><th>Your choice</th><th>When</th><th>How</th></tr>
{% for purpose, c in s.consent.items() %}<tr><td>{{ purpose }}</td><td>{{ c.state }}</td>
<td>{{ c.decided_at }}</td><td>{{ c.channel }} {{ c.evidence or "" }}</td></tr>{% endfor %}
</table>{% else %}<p>You have not made any consent choice with us.</p>{% endif %}
<p>Sale or sharing of your data:
<b>{{ "you opted out" if s.do_not_sell.flagged else "you have not opted out" }}</b>.</p>

<h2>Who receives data</h2>
{% if s.recipients %}<ul>{% for r in s.recipients %}<li>{{ r.recipient or r.name }}
({{ r.kind }}, for {{ r.purpose }})</li>{% endfor %}</ul>
{% else %}<p>We do not send customer data to other companies from this platform.</p>{% endif %}

<h2>How long we keep it</h2>
<table><tr><th>Data</th><th>Kept for</th></tr>
{% for what, how_long in s.retention.items() %}<tr><td>{{ what }}</td><td>{{ how_long }}</td>
</tr>{% endfor %}</table>

<h2>Your rights</h2>
<p>You may ask us to correct this data, to erase it, to stop using it for a purpose, or to
stop selling or sharing it, and you may complain to a data protection authority.
Contact: {{ s.controller.contact or s.controller.name }}.</p>
<p><small>{{ s.generated_by }}</small></p>
</body></html>
"""
)
