"""Whether a segment a destination names still exists (in the plan or defined at run time)."""

from __future__ import annotations

from kilde.plan.models import Plan
from kilde.store import Store


def segment_exists(store: Store, plan: Plan, segment: str) -> bool:
    if plan.segments.get(segment) is not None:
        return True
    return bool(store.scalar("SELECT count(*) FROM segment_definitions WHERE id = ?", [segment]))


def missing_segment_message(segment: str) -> str:
    return f"segment {segment!r} does not exist"


MISSING_SEGMENT_FIX = "declare it under 'segments' in the plan, or remove it from the destination"
