"""Mail campaigns: rendering a template per recipient, looking tokens up, counting the results.

A campaign has an id (the name given with `--campaign`), the purpose an unsubscribe opts out of,
its links (stored once; a click token carries the link id and a digest of the URL) and its
recipients. A recipient is a pseudonym, an HMAC of the user id (or, for people without an
account, of the address) under Kilde's secret key; the pseudonym and the user id it stands for
are stored, an email address never is, and neither appears in a URL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from kilde.collect.email_links import Template, parse_template
from kilde.plan.models import Plan
from kilde.signing import TokenSigner, url_digest
from kilde.store import Store

CAMPAIGN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
OPENED, CLICKED, UNSUBSCRIBED = "Email Opened", "Email Link Clicked", "Unsubscribed"
OPEN, CLICK, UNSUBSCRIBE = "email-open", "email-click", "email-unsubscribe"
PREFIX = "/e"
MAX_USER_ID = 512
_ROWS_PER_INSERT = 300


class CampaignError(Exception):
    """A render request that cannot be honoured; maps to a 4xx answer."""

    def __init__(self, status: int, code: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fix = fix


@dataclass(frozen=True)
class Recipient:
    user_id: str | None = None
    email: str | None = None


@dataclass
class Rendered:
    campaign: str
    purpose: str
    created: bool
    links: list[dict[str, Any]]
    mails: list[dict[str, Any]]
    warnings: list[str]
    statements: list[tuple[str, list[Any]]] = field(default_factory=list)


def check_campaign_id(campaign: str) -> None:
    if not CAMPAIGN_ID.match(campaign):
        raise CampaignError(
            400,
            "invalid_campaign",
            "a campaign id is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
            "name the campaign like spring-sale-2026",
        )


def check_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise CampaignError(
            400,
            "invalid_base_url",
            "base_url must be an absolute http(s) address without query or fragment",
            "pass the address where mail clients reach Kilde, e.g. https://kilde.example.com",
        )
    return base_url.rstrip("/")


def email_sources(plan: Plan) -> list[str]:
    return [s.name for s in plan.sources if s.kind == "email"]


def recipient_of(signer: TokenSigner, person: Recipient) -> tuple[str, str | None]:
    """(pseudonym, user id) of a recipient; the address itself is only hashed."""
    if person.user_id:
        return signer.pseudonym("email-recipient", "user:" + person.user_id), person.user_id
    assert person.email
    return signer.pseudonym("email-recipient", "email:" + person.email.strip().lower()), None


def check_recipients(recipients: Sequence[Recipient]) -> None:
    for index, person in enumerate(recipients):
        if not person.user_id and not (person.email and "@" in person.email):
            raise CampaignError(
                400,
                "invalid_recipient",
                f"recipient {index} has neither a user_id nor an email address",
                "give every recipient a user_id (preferred) or an email",
            )
        if person.user_id and len(person.user_id) > MAX_USER_ID:
            raise CampaignError(
                400,
                "invalid_recipient",
                f"recipient {index} has a user_id longer than {MAX_USER_ID} characters",
                "use the user id your systems send to Kilde",
            )


def _values(rows: list[list[Any]], columns: int) -> list[tuple[str, list[Any]]]:
    """Multi-row VALUES chunks: (placeholders, flat parameters)."""
    out = []
    one = "(" + ", ".join("?" for _ in range(columns)) + ")"
    for at in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[at : at + _ROWS_PER_INSERT]
        out.append((", ".join(one for _ in chunk), [v for row in chunk for v in row]))
    return out


def _click_url(base: str, tokens: list[str], link: int) -> str:
    return f"{base}{PREFIX}/c/{tokens[link]}"


def render_campaign(
    store: Store,
    signer: TokenSigner,
    plan: Plan,
    *,
    campaign: str,
    html: str,
    recipients: Sequence[Recipient],
    base_url: str,
    purpose: str | None,
    expires_at: datetime,
    now: datetime,
) -> Rendered:
    """Every recipient's copy of the mail, and the statements that record the campaign.

    The caller writes the statements (through the Writer) before handing the mails out, and
    serialises calls for one store so link ids are assigned once.
    """
    check_campaign_id(campaign)
    check_recipients(recipients)
    base = check_base_url(base_url)
    rows = store.query("SELECT purpose FROM email_campaigns WHERE id = ?", [campaign])
    known_purposes = {p.id: p for p in plan.purposes}
    if rows:
        stored_purpose = str(rows[0]["purpose"])
        if purpose and purpose != stored_purpose:
            raise CampaignError(
                409,
                "campaign_purpose_differs",
                f"campaign {campaign} was created for purpose {stored_purpose}",
                "leave purpose out, or use a new campaign id",
            )
        purpose = stored_purpose
    else:
        purpose = purpose or ("marketing_email" if "marketing_email" in known_purposes else None)
        if purpose not in known_purposes:
            raise CampaignError(
                400,
                "unknown_purpose",
                "the purpose is not declared in the collection plan",
                "pass --purpose with one of: " + ", ".join(sorted(known_purposes)),
            )
    template: Template = parse_template(html, own_prefix=f"{base}{PREFIX}/")
    if not template.has_unsubscribe:
        template.warnings.append(
            'the template has no unsubscribe link (href="kilde:unsubscribe" or '
            "data-kilde-unsubscribe); send the List-Unsubscribe header Kilde gives for each mail"
        )
    existing = {
        (str(r["url"]), r["label"]): int(r["link_id"])
        for r in store.query(
            "SELECT link_id, url, label FROM email_campaign_links WHERE campaign_id = ?",
            [campaign],
        )
    }
    next_id = max(existing.values(), default=-1) + 1
    link_ids: list[int] = []
    new_links: list[list[Any]] = []
    for link in template.links:
        key = (link.url, link.label)
        if key not in existing:
            existing[key] = next_id
            new_links.append([campaign, next_id, link.url, link.label])
            next_id += 1
        link_ids.append(existing[key])

    statements: list[tuple[str, list[Any]]] = []
    if not rows:
        statements.append(
            (
                "INSERT INTO email_campaigns (id, purpose, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [campaign, purpose, now],
            )
        )
    for marks, params in _values(new_links, 4):
        statements.append(
            (
                "INSERT INTO email_campaign_links (campaign_id, link_id, url, label) "
                f"VALUES {marks} ON CONFLICT DO NOTHING",
                params,
            )
        )

    mails: list[dict[str, Any]] = []
    people: dict[str, str | None] = {}
    for index, person in enumerate(recipients):
        recipient, user_id = recipient_of(signer, person)
        people[recipient] = user_id
        ids = {"c": campaign, "r": recipient}
        click_tokens = [
            signer.sign(
                CLICK,
                {**ids, "l": link_id, "h": url_digest(link.url)},
                expires_at=expires_at,
            )
            for link_id, link in zip(link_ids, template.links, strict=True)
        ]
        unsubscribe = f"{base}{PREFIX}/u/" + signer.sign(UNSUBSCRIBE, ids, expires_at=expires_at)
        pixel = f"{base}{PREFIX}/o/" + signer.sign(OPEN, ids, expires_at=expires_at) + ".gif"
        body = template.render(partial(_click_url, base, click_tokens), unsubscribe, pixel)
        mails.append(
            {
                "index": index,
                "recipient": recipient,
                "html": body,
                "list_unsubscribe": f"<{unsubscribe}>",
                "list_unsubscribe_post": "List-Unsubscribe=One-Click",
            }
        )
    for marks, params in _values([[campaign, r, u, now] for r, u in people.items()], 4):
        statements.append(
            (
                "INSERT INTO email_campaign_recipients (campaign_id, recipient, user_id, "
                f"rendered_at) VALUES {marks} ON CONFLICT DO NOTHING",
                params,
            )
        )
    links = [
        {"link_id": link_id, "url": link.url, "label": link.label}
        for link_id, link in zip(link_ids, template.links, strict=True)
    ]
    return Rendered(campaign, purpose, not rows, links, mails, template.warnings, statements)


# -- looking tokens up --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """What the store knows about a token's campaign, recipient and link."""

    campaign_known: bool
    purpose: str | None = None
    recipient_known: bool = False
    user_id: str | None = None
    url: str | None = None
    label: str | None = None


def look_up(store: Store, campaign: str, recipient: str, link_id: int | None = None) -> Hit:
    rows = store.query(
        "SELECT c.purpose, r.recipient IS NOT NULL AS recipient_known, r.user_id, l.url, l.label "
        "FROM email_campaigns c "
        "LEFT JOIN email_campaign_recipients r ON r.campaign_id = c.id AND r.recipient = ? "
        "LEFT JOIN email_campaign_links l ON l.campaign_id = c.id AND l.link_id = ? "
        "WHERE c.id = ?",
        [recipient, link_id if link_id is not None else -1, campaign],
    )
    if not rows:
        return Hit(False)
    row = rows[0]
    return Hit(
        True,
        row["purpose"],
        bool(row["recipient_known"]),
        row["user_id"],
        row["url"],
        row["label"],
    )


# -- the report ---------------------------------------------------------------------------------


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def campaign_report(store: Store, plan: Plan, campaign: str) -> dict[str, Any] | None:
    """Human opens, machine opens, clicks and unsubscribes of a campaign; None if unknown."""
    rows = store.query(
        "SELECT id, purpose, created_at FROM email_campaigns WHERE id = ?", [campaign]
    )
    if not rows:
        return None
    info = rows[0]
    recipients = int(
        store.scalar(
            "SELECT count(*) FROM email_campaign_recipients WHERE campaign_id = ?", [campaign]
        )
    )
    sources = email_sources(plan) or [""]
    marks = ", ".join("?" for _ in sources)
    base = (
        f"FROM events WHERE source IN ({marks}) AND event = ? AND properties->>'$.campaign_id' = ?"
    )
    machine = (
        "coalesce((properties->>'$.machine_open') = 'true' "
        "OR (properties->>'$.machine_click') = 'true', false)"
    )

    def counts(event: str) -> dict[str, int]:
        found = store.query(
            f"SELECT {machine} AS machine, count(*) AS hits, "
            f"count(DISTINCT properties->>'$.recipient') AS people {base} GROUP BY ALL",
            [*sources, event, campaign],
        )
        out = {"human": 0, "machine": 0, "unique_human": 0, "unique_machine": 0}
        for row in found:
            kind = "machine" if row["machine"] else "human"
            out[kind] = int(row["hits"])
            out[f"unique_{kind}"] = int(row["people"])
        out["unique_any"] = int(
            store.scalar(
                f"SELECT count(DISTINCT properties->>'$.recipient') {base}",
                [*sources, event, campaign],
            )
        )
        return out

    opens = counts(OPENED)
    opens["machine_by_rule"] = {  # type: ignore[assignment]
        str(r["rule"]): int(r["hits"])
        for r in store.query(
            f"SELECT properties->>'$.machine_rule' AS rule, count(*) AS hits {base} "
            f"AND {machine} GROUP BY ALL ORDER BY hits DESC",
            [*sources, OPENED, campaign],
        )
    }
    clicks = counts(CLICKED)
    per_link = {
        int(r["link_id"]): r
        for r in store.query(
            f"SELECT CAST(properties->>'$.link_id' AS INTEGER) AS link_id, "
            f"count(*) FILTER (WHERE NOT {machine}) AS human, "
            f"count(DISTINCT properties->>'$.recipient') FILTER (WHERE NOT {machine}) "
            f"AS unique_human, count(*) FILTER (WHERE {machine}) AS machine "
            f"{base} GROUP BY ALL",
            [*sources, CLICKED, campaign],
        )
        if r["link_id"] is not None
    }
    links = []
    for link in store.query(
        "SELECT link_id, url, label FROM email_campaign_links WHERE campaign_id = ? "
        "ORDER BY link_id",
        [campaign],
    ):
        seen = per_link.get(int(link["link_id"]), {})
        links.append(
            {
                **link,
                "human_clicks": int(seen.get("human", 0)),
                "unique_human_clickers": int(seen.get("unique_human", 0)),
                "machine_clicks": int(seen.get("machine", 0)),
            }
        )
    unsubscribed = int(
        store.scalar(
            f"SELECT count(DISTINCT properties->>'$.recipient') {base}",
            [*sources, UNSUBSCRIBED, campaign],
        )
    )
    engaged = int(
        store.scalar(
            f"SELECT count(DISTINCT properties->>'$.recipient') FROM events "
            f"WHERE source IN ({marks}) AND event IN (?, ?) "
            f"AND properties->>'$.campaign_id' = ? AND NOT {machine}",
            [*sources, OPENED, CLICKED, campaign],
        )
    )
    return {
        "campaign": info["id"],
        "purpose": info["purpose"],
        "created_at": info["created_at"],
        "recipients": recipients,
        "opens": opens,
        "clicks": clicks,
        "unsubscribes": unsubscribed,
        "engaged_humans": engaged,
        "rates": {
            "human_open_rate": _ratio(opens["unique_human"], recipients),
            "click_rate": _ratio(clicks["unique_human"], recipients),
            "click_to_open_rate": _ratio(clicks["unique_human"], opens["unique_human"]),
            "unsubscribe_rate": _ratio(unsubscribed, recipients),
        },
        "links": links,
    }


def list_campaigns(store: Store) -> list[dict[str, Any]]:
    return store.query(
        "SELECT c.id AS campaign, c.purpose, c.created_at, "
        "(SELECT count(*) FROM email_campaign_links l WHERE l.campaign_id = c.id) AS links, "
        "(SELECT count(*) FROM email_campaign_recipients r WHERE r.campaign_id = c.id) "
        "AS recipients FROM email_campaigns c ORDER BY c.created_at DESC"
    )
