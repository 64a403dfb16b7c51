"""Consent records: the consent signals in stored events become rows of the consent ledger.

Three signals, written in the same transaction as the events that carry them:

- the track events `Consent Updated` (sent by k.js's `kilde.consent()`) and Segment's
  `Segment Consent Preference Updated`: an explicit choice, always recorded; properties
  `purposes` ({purpose: true|false|"granted"|"denied"|"withdrawn"}), `banner_version`, `gpc`;
- Segment's `context.consent.categoryPreferences` on any event: recorded when it changes;
- `context.gpc: true` (Global Privacy Control, from `navigator.globalPrivacyControl` or the
  `Sec-GPC` header): an opt-out of the plan's sale-or-sharing purposes, recorded when it changes.

These events are the privacy machinery's own, so the plan need not list them; their shape is
checked here instead. The ledger is append-only; a denial after a grant is stored as
`withdrawn`. Row ids derive from the message id, so a retried request adds nothing twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson

from kilde.pipeline.normalize import Rejection
from kilde.plan.models import Plan

CONSENT_EVENTS = ("Consent Updated", "Segment Consent Preference Updated")
STATES = ("granted", "denied", "withdrawn")
MAX_PURPOSES = 50
MAX_TEXT = 200
GPC_FALLBACK_PURPOSE = "sale_sharing"

# Insert one ledger row unless it is already there (same id) or, for signals that repeat on
# every event, unless it would not change the latest state of that person and purpose.
_INSERT = """
INSERT OR IGNORE INTO consent_ledger
    (id, user_id, anonymous_id, purpose, state, decided_at, recorded_at, source, channel,
     evidence, ip, message_id)
SELECT ?, ?, ?, ?, CASE WHEN ? = 'denied' AND prev.state = 'granted' THEN 'withdrawn' ELSE ? END,
       ?, ?, ?, ?, ?, ?, ?
FROM (
    SELECT (
        SELECT state FROM consent_ledger
        WHERE purpose = ? AND (user_id = ? OR anonymous_id = ?)
        ORDER BY decided_at DESC, seq DESC LIMIT 1
    ) AS state
) AS prev
WHERE ? OR prev.state IS NULL OR (prev.state = 'granted') <> (? = 'granted')
"""


def _bad(message: str, path: str) -> Rejection:
    return Rejection(
        "invalid_consent",
        message,
        path=path,
        fix='send properties.purposes as {"analytics": true, "advertising": false}',
    )


def _state(value: Any, path: str) -> str:
    if value is True:
        return "granted"
    if value is False:
        return "denied"
    if isinstance(value, str) and value in STATES:
        return value
    raise _bad(f"{path} must be true, false, or one of {', '.join(STATES)}", path)


def _choices(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise _bad(f"{path} must be a non-empty object of purpose: choice", path)
    if len(value) > MAX_PURPOSES:
        raise _bad(f"{path} names more than {MAX_PURPOSES} purposes", path)
    choices = {}
    for name, choice in value.items():
        if not name or len(name) > MAX_TEXT:
            raise _bad(f"a purpose name in {path} is empty or too long", path)
        choices[name] = _state(choice, f"{path}.{name}")
    return choices


def is_consent_event(row: dict[str, Any]) -> bool:
    """True for a consent event (then the plan check is skipped); Rejection when malformed."""
    if row["type"] != "track" or row["event"] not in CONSENT_EVENTS:
        return False
    explicit_choices(row)
    version = row["properties"].get("banner_version")
    if version is not None and (not isinstance(version, str) or len(version) > MAX_TEXT):
        raise _bad(
            f"properties.banner_version must be a string of at most {MAX_TEXT} characters",
            "properties.banner_version",
        )
    return True


def _category_preferences(context: dict[str, Any]) -> Any:
    consent = context.get("consent")
    return consent.get("categoryPreferences") if isinstance(consent, dict) else None


def explicit_choices(row: dict[str, Any]) -> dict[str, str]:
    purposes = row["properties"].get("purposes")
    if purposes is not None or row["event"] == "Consent Updated":
        return _choices(purposes, "properties.purposes")
    return _choices(_category_preferences(row["context"]), "context.consent.categoryPreferences")


def _purpose_id(name: str, plan: Plan) -> str:
    """Segment's category names ("Advertising") matched to the plan's purposes."""
    if plan.purpose(name):
        return name
    wanted = name.strip().lower().replace(" ", "_").replace("-", "_")
    return next((p.id for p in plan.purposes if p.id.lower() == wanted), name)


def _preferences_evidence(context: dict[str, Any], channel: str) -> str:
    """`categoryPreferences`, or for an imported record the file and line it came from."""
    provenance = context.get("provenance")
    if channel == "import" and isinstance(provenance, dict) and provenance.get("file"):
        where = f"import:{provenance['file']}:{provenance.get('line')}"
        return where[:MAX_TEXT]
    return "categoryPreferences"


def _loads(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = orjson.loads(value)
    return value if isinstance(value, dict) else {}


def ledger_statements(
    rows: Iterable[dict[str, Any]], plan: Plan, channel: str
) -> list[tuple[str, list[Any]]]:
    """SQL statements writing the ledger rows for the consent signals in prepared event rows."""
    statements: list[tuple[str, list[Any]]] = []
    sale = [p.id for p in plan.purposes if p.sale_or_sharing] or [GPC_FALLBACK_PURPOSE]
    for row in rows:
        raw_context = row["context"]
        explicit = row["type"] == "track" and row["event"] in CONSENT_EVENTS
        # Cheap test first: most events carry no consent signal at all.
        if (
            isinstance(raw_context, str)
            and not explicit
            and '"categoryPreferences"' not in raw_context
            and '"gpc":true' not in raw_context
        ):
            continue
        context = _loads(raw_context)
        choices: dict[str, tuple[str, str]] = {}  # purpose -> (state, evidence)
        always = False
        gpc = context.get("gpc") is True
        if explicit:
            properties = _loads(row["properties"])
            parsed = {**row, "properties": properties, "context": context}
            version = properties.get("banner_version")
            evidence = version if isinstance(version, str) and version else "consent event"
            gpc = gpc or properties.get("gpc") is True
            for name, state in explicit_choices(parsed).items():
                purpose = _purpose_id(name, plan)
                forced = gpc and purpose in sale and state != "granted"
                choices[purpose] = (state, "gpc" if forced else evidence)
            always = True
        else:
            preferences = _category_preferences(context)
            if isinstance(preferences, dict):
                said = _preferences_evidence(context, channel)
                for name, value in list(preferences.items())[:MAX_PURPOSES]:
                    if isinstance(name, str) and isinstance(value, bool) and name:
                        state = "granted" if value else "denied"
                        choices[_purpose_id(name[:MAX_TEXT], plan)] = (state, said)
        if gpc:
            for purpose in sale:
                if purpose not in choices or choices[purpose][0] == "granted":
                    choices[purpose] = ("denied", "gpc")
        for purpose, (state, evidence) in choices.items():
            statements.append((_INSERT, _params(row, purpose, state, evidence, channel, always)))
    return statements


def _params(
    row: dict[str, Any], purpose: str, state: str, evidence: str, channel: str, always: bool
) -> list[Any]:
    key = f"{row['source']}\x00{row['message_id']}\x00{purpose}".encode()
    ledger_id = hashlib.sha256(key).hexdigest()[:32]
    user_id, anonymous_id = row["user_id"], row["anonymous_id"]
    return [
        ledger_id,
        user_id,
        anonymous_id,
        purpose,
        state,
        state,
        row["timestamp"],
        row["received_at"],
        row["source"],
        channel,
        evidence,
        row.get("ip"),
        row["message_id"],
        purpose,
        user_id,
        anonymous_id,
        always,
        state,
    ]
