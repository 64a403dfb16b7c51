"""Email campaign reports: sent, human and machine opens, clicks, click-to-open, orders after.

Per campaign tracked by Kilde's email links and pixel (docs/email-tracking.md): `sent` is the
number of recipients rendered; opens and clicks count people (recipients), once each. Machine
opens (privacy proxies, prefetchers, scanners) are shown apart and never count as opens.
Click-to-open is human clickers over human openers. An order counts for a campaign when the
clicker's profile ordered within `window` after their first human click.
"""

from __future__ import annotations

from typing import Any

import ibis

from kilde.insights.data import ORDER_EVENT, profile_events

OPENED = "Email Opened"
CLICKED = "Email Link Clicked"


def campaign_reports(backend: Any, window_days: float = 7.0) -> list[dict[str, Any]]:
    ev = profile_events(backend)
    mail = ev.filter(ev.event.isin([OPENED, CLICKED]))
    props = mail.properties.cast("json")
    mail = mail.select(
        "profile_id",
        "event",
        "timestamp",
        campaign=props["campaign_id"].str,
        recipient=props["recipient"].str,
        machine=ibis.coalesce(props["machine_open"].bool, props["machine_click"].bool, False),
    )
    human_open = (mail.event == OPENED) & ~mail.machine
    machine_open = (mail.event == OPENED) & mail.machine
    human_click = (mail.event == CLICKED) & ~mail.machine
    per = mail.group_by("campaign").aggregate(
        human_opens=mail.recipient.nunique(where=human_open),
        machine_opens=mail.recipient.nunique(where=machine_open),
        clicks=mail.recipient.nunique(where=human_click),
        machine_clicks=mail.recipient.nunique(where=(mail.event == CLICKED) & mail.machine),
    )
    clicks = mail.filter(human_click)
    first_click = clicks.group_by("campaign", "profile_id").aggregate(
        clicked=clicks.timestamp.min()
    )
    orders = ev.filter(ev.event == ORDER_EVENT)
    orders = orders.select(
        "profile_id",
        ordered=orders.timestamp,
        order=orders.message_id,
        revenue=orders.properties.cast("json")["revenue"].float.fill_null(0.0),
    )
    after = first_click.join(orders, "profile_id")
    after = after.filter(
        (after.ordered >= after.clicked)
        & (after.ordered <= after.clicked + ibis.interval(seconds=int(window_days * 86400)))
    )
    bought = after.group_by("campaign").aggregate(
        orders_after_click=after.order.nunique(),
        buyers=after.profile_id.nunique(),
        revenue_after_click=after.revenue.sum(),
    )
    sent = backend.table("email_campaign_recipients")
    sent = sent.group_by(campaign=sent.campaign_id).aggregate(sent=sent.count())
    campaigns = backend.table("email_campaigns").select(
        campaign=ibis._.id, purpose=ibis._.purpose, created_at=ibis._.created_at
    )
    everyone = (
        campaigns.select(campaign=campaigns.campaign.cast("string"))
        .union(per.filter(per.campaign.notnull()).select(campaign=per.campaign.cast("string")))
        .distinct()
    )
    joined = (
        everyone.left_join(campaigns, "campaign")
        .drop("campaign_right")
        .left_join(sent, "campaign")
        .drop("campaign_right")
        .left_join(per, "campaign")
        .drop("campaign_right")
        .left_join(bought, "campaign")
        .drop("campaign_right")
    )
    rows = joined.order_by([ibis.desc("created_at"), "campaign"]).to_pyarrow().to_pylist()
    out = []
    for r in rows:
        sent_n = int(r["sent"] or 0)
        opens = int(r["human_opens"] or 0)
        clicked = int(r["clicks"] or 0)
        out.append(
            {
                "campaign": r["campaign"],
                "purpose": r["purpose"],
                "created_at": r["created_at"],
                "sent": sent_n,
                "human_opens": opens,
                "machine_opens": int(r["machine_opens"] or 0),
                "clicks": clicked,
                "machine_clicks": int(r["machine_clicks"] or 0),
                "open_rate": round(opens / sent_n, 4) if sent_n else None,
                "click_to_open": round(clicked / opens, 4) if opens else None,
                "orders_after_click": int(r["orders_after_click"] or 0),
                "buyers": int(r["buyers"] or 0),
                "revenue_after_click": round(float(r["revenue_after_click"] or 0.0), 2),
            }
        )
    return out
