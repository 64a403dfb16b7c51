"""What a profile shows of the insights: RFM group, CLV, churn risk, preferences, segments.

Registered as a hook of the profiles code (profiles/queries.py) by the insights API module.
"""

from __future__ import annotations

from typing import Any

from kilde.insights.segments.membership import profile_segments
from kilde.store.database import Store

SHOWN = (
    "rfm_group",
    "rfm_score",
    "clv",
    "expected_purchases",
    "p_alive",
    "churn_risk",
    "churn_flag",
    "favourite_products",
    "preferred_channel",
    "preferred_time",
    "recommended_products",
)


def profile_insights(store: Store, profile_id: str) -> dict[str, Any]:
    rows = store.query(
        f"SELECT {', '.join(SHOWN)}, computed_at FROM profile_insights WHERE profile_id = ?",
        [profile_id],
    )
    computed: dict[str, Any] = {}
    if rows:
        row = rows[0]
        for key in SHOWN:
            value = row[key]
            if isinstance(value, float):
                value = round(value, 4 if key in ("p_alive", "churn_risk") else 2)
            computed[key] = value
        computed["insights_computed_at"] = row["computed_at"]
    segments = profile_segments(store, profile_id)
    computed["segments"] = segments
    return {"computed": computed, "segments": segments}
