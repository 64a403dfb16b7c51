"""The GDPR Art. 30 record of processing activities, generated from the collection plan.

One processing activity per purpose of the plan, with what Art. 30(1) asks for: the controller
and its contact, the purpose and its legal basis, the categories of people (from the kinds of
sources that collect for it) and of personal data (events and traits with their PII class),
the recipients (destinations that use the purpose), transfers, the time limits for erasure
(each event's and trait's retention) and the security measures Kilde applies. Rendered as
Markdown, HTML (`kilde plan register --format html`) or CSV, one row per activity.

Gaps are named rather than hidden: data without a retention says "not limited in the plan:
set `retention`", a purpose no event or trait uses says so.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import jinja2

from kilde.plan.models import Plan

# Who the people are, by the kind of source that collects their data.
SUBJECTS = {
    "web": "website visitors",
    "app": "app users",
    "server": "customers with an account",
    "email": "recipients of our mail",
    "form": "people who fill in our forms and surveys",
    "import": "customers and contacts in company records (orders, CRM, support)",
    "broker": "people in data bought from data companies",
}
PII = {
    "direct": "directly identifying",
    "indirect": "indirectly identifying",
    "pseudonymous": "pseudonymous",
    "sensitive": "special category (Art. 9)",
    "none": "not personal on its own",
}
FORMATS = ("md", "html", "csv")


def activities(plan: Plan) -> list[dict[str, Any]]:
    """One processing activity per purpose."""
    ip = {
        "truncate": "IP addresses truncated on arrival",
        "drop": "IP addresses not stored",
        "full": "IP addresses stored in full",
    }[plan.privacy.ip]
    gate = {
        "enforce": "data for consent-based purposes stored only with recorded consent",
        "refusals": "data of people who refused a consent-based purpose not stored",
        "off": "no consent gate at collection",
    }[plan.privacy.consent_gate]
    measures = [
        ip,
        gate,
        "every record checked against this plan; what it does not allow goes to a dead letter",
        "erased people suppressed by salted hash; erasure compacts the database files",
        "admin API behind a token; every admin action and export in an audit log",
        "email recipients and tracking links pseudonymised (HMAC)",
    ]
    destinations = list(getattr(plan, "destinations", []))
    rows = []
    for purpose in plan.purposes:
        events = [e for e in plan.events if purpose.id in e.purposes]
        traits = [t for t in plan.traits if purpose.id in t.purposes]
        kinds = sorted({s.kind for s in plan.sources})
        data = [f"event: {e.name or e.type + ' (any)'}" for e in events] + [
            f"trait: {t.name} ({PII[t.pii]})" for t in traits
        ]
        retention = [
            f"{e.name or e.type}: {e.retention or 'not limited in the plan: set `retention`'}"
            for e in events
        ] + [f"{t.name}: {t.retention or 'kept while the profile exists'}" for t in traits]
        recipients = [
            f"{d.recipient or d.name} ({d.kind})" for d in destinations if d.purpose == purpose.id
        ]
        rows.append(
            {
                "purpose": purpose.id,
                "description": purpose.description,
                "legal_basis": purpose.legal_basis
                + (" (double opt-in)" if purpose.double_opt_in else ""),
                "sale_or_sharing": purpose.sale_or_sharing,
                "data_subjects": [SUBJECTS.get(k, k) for k in kinds],
                "personal_data": data or ["none declared: no event or trait uses this purpose"],
                "recipients": recipients or ["none outside the company"],
                "transfers": "none declared",
                "retention": retention or ["nothing collected for this purpose"],
                "security": measures,
            }
        )
    return rows


def render(plan: Plan, fmt: str) -> str:
    rows = activities(plan)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        columns = list(rows[0]) if rows else []
        writer.writerow(["controller", "contact", *columns])
        for row in rows:
            writer.writerow(
                [
                    plan.company.name,
                    plan.company.contact or "",
                    *["; ".join(v) if isinstance(v, list) else v for v in row.values()],
                ]
            )
        return out.getvalue()
    template = _HTML if fmt == "html" else _MARKDOWN
    company = plan.company
    return template.render(
        controller=company.name + (f", {company.website}" if company.website else ""),
        contact=company.contact or "not set in the plan (company.contact)",
        plan=plan,
        rows=rows,
        sources=plan.sources,
        generated=datetime.now(UTC).strftime("%Y-%m-%d"),
    )


_MARKDOWN = jinja2.Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True).from_string(
    """# Record of processing activities (GDPR Art. 30)

**Controller:** {{ controller }}

**Contact for data protection:** {{ contact }}

Generated from the collection plan on {{ generated }}.

{% for r in rows %}
## {{ r.purpose }}

{{ r.description }}

| | |
|---|---|
| Legal basis | {{ r.legal_basis }} |
| Sale or sharing (CCPA) | {{ "yes" if r.sale_or_sharing else "no" }} |
| Categories of people | {{ r.data_subjects | join(", ") or "-" }} |
| Categories of personal data | {{ r.personal_data | join("; ") }} |
| Recipients | {{ r.recipients | join("; ") }} |
| Transfers to third countries | {{ r.transfers }} |
| Time limits for erasure | {{ r.retention | join("; ") }} |
| Security measures | {{ r.security | join("; ") }} |

{% endfor %}
## Sources

| Source | Kind | Owner | Tool |
|---|---|---|---|
{% for s in sources %}
| {{ s.name }} | {{ s.kind }} | {{ s.owner }} | {{ s.tool }} |
{% endfor %}
"""
)

_HTML = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Record of processing activities: {{ plan.company.name }}</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;width:100%;margin-bottom:2rem}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4;width:14rem}
</style></head><body>
<h1>Record of processing activities (GDPR Art. 30)</h1>
<p><b>Controller:</b> {{ plan.company.name }}<br>
<b>Contact for data protection:</b> {{ plan.company.contact or "not set in the plan" }}<br>
Generated from the collection plan on {{ generated }}.</p>
{% for r in rows %}
<h2>{{ r.purpose }}</h2><p>{{ r.description }}</p>
<table>
<tr><th>Legal basis</th><td>{{ r.legal_basis }}</td></tr>
<tr><th>Sale or sharing (CCPA)</th><td>{{ "yes" if r.sale_or_sharing else "no" }}</td></tr>
<tr><th>Categories of people</th><td>{{ r.data_subjects | join(", ") or "-" }}</td></tr>
<tr><th>Categories of personal data</th><td><ul>{% for d in r.personal_data %}<li>{{ d }}</li>
{% endfor %}</ul></td></tr>
<tr><th>Recipients</th><td>{{ r.recipients | join("; ") }}</td></tr>
<tr><th>Transfers to third countries</th><td>{{ r.transfers }}</td></tr>
<tr><th>Time limits for erasure</th><td><ul>{% for d in r.retention %}<li>{{ d }}</li>
{% endfor %}</ul></td></tr>
<tr><th>Security measures</th><td><ul>{% for d in r.security %}<li>{{ d }}</li>
{% endfor %}</ul></td></tr>
</table>
{% endfor %}
<h2>Sources</h2>
<table><tr><th>Source</th><th>Kind</th><th>Owner</th><th>Tool</th></tr>
{% for s in sources %}<tr><td>{{ s.name }}</td><td>{{ s.kind }}</td><td>{{ s.owner }}</td>
<td>{{ s.tool }}</td></tr>{% endfor %}</table>
</body></html>
"""
)
