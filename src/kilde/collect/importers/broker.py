"""Files bought from data companies: identify calls that carry their provenance.

Every record says where it came from (broker, file, line, acquisition date, licence expiry,
purpose and its lawful basis from the plan) in `context.provenance` with tier "broker", and the
import run records the same for the whole file. A licence that has already expired stops the
import. Keeping broker traits below first-party ones, letting them expire with the licence and
never importing them for people who were erased or opted out are the work of identity
resolution and the privacy module, which read this provenance.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from kilde.collect.importers.base import ImportFailed
from kilde.collect.importers.contacts import ContactConverter
from kilde.collect.importers.mapping import BrokerTerms
from kilde.plan.models import Plan, Source


def broker_provenance(
    terms: BrokerTerms, plan: Plan, source: Source, today: date | None = None
) -> dict[str, Any]:
    """Check the broker terms against the plan; return what every record keeps."""
    if source.kind != "broker":
        raise ImportFailed(
            f"source {source.name!r} is of kind {source.kind}, not broker",
            fix="import bought data into a source of kind broker in the plan",
        )
    missing = [
        option
        for option, value in (
            ("--broker", terms.name),
            ("--acquired", terms.acquired),
            ("--licence-expires", terms.licence_expires),
            ("--purpose", terms.purpose),
        )
        if not value
    ]
    if missing:
        raise ImportFailed(
            "broker data must say where it came from; missing: " + ", ".join(missing),
            fix="pass " + ", ".join(missing) + " or set them under `broker:` in the mapping",
        )
    assert terms.acquired is not None and terms.licence_expires is not None
    purpose = next((p for p in plan.purposes if p.id == terms.purpose), None)
    if purpose is None:
        raise ImportFailed(
            f"the plan has no purpose {terms.purpose!r}",
            fix="use one of: " + ", ".join(p.id for p in plan.purposes),
        )
    today = today or datetime.now(UTC).date()
    if terms.licence_expires < today:
        raise ImportFailed(
            f"the licence for this file expired on {terms.licence_expires.isoformat()}",
            fix="bought data may only be used while its licence runs; renew it or do not import",
        )
    if terms.acquired > today:
        raise ImportFailed(
            "the acquisition date is in the future", fix="give the date the file was bought"
        )
    return {
        "broker": terms.name,
        "acquired_on": terms.acquired.isoformat(),
        "licence_expires_on": terms.licence_expires.isoformat(),
        "purpose": purpose.id,
        "lawful_basis": purpose.legal_basis,
    }


BrokerConverter = ContactConverter
