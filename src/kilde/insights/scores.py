"""Every profile's insight traits in one table: RFM, lifetime value, churn, preferences.

`compute` builds the table (profile_insights) from the profiles and their events; the engine
(engine.py) stores it and the segments read it. A profile shows these as computed traits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import ibis
import numpy as np
import pyarrow as pa

from kilde.insights.churn import activity
from kilde.insights.clv import HORIZON_WEEKS, purchase_summary, score_profiles
from kilde.insights.data import hold_behaviour
from kilde.insights.preferences import channel_and_time, favourite_products
from kilde.insights.recommendations import recommended
from kilde.insights.rfm import rfm_scores

INSIGHT_COLUMNS = (
    "recency_days",
    "frequency",
    "monetary",
    "r_score",
    "f_score",
    "m_score",
    "rfm_score",
    "rfm_group",
    "expected_purchases",
    "p_alive",
    "expected_spend",
    "clv",
    "churn_risk",
    "churn_flag",
    "churn_basis",
    "days_inactive",
    "usual_gap_days",
    "favourite_products",
    "preferred_channel",
    "preferred_time",
    "recommended_products",
)


def _column(values: Any) -> pa.Array:
    arr = np.asarray(values, dtype=np.float64)
    return pa.array(arr, mask=np.isnan(arr), type=pa.float64())


def compute(
    backend: Any, now: datetime, out: Path, horizon_weeks: float = HORIZON_WEEKS
) -> dict[str, Any]:
    """Write every profile's insight row to the Parquet file `out`; return the models' info."""
    with hold_behaviour(backend):
        profiles = backend.table("profiles")
        # In a fixed order: the fits sum over rows, and the last bits of a sum depend on its
        # order, which differs between engines (and between runs of a parallel one).
        summary = purchase_summary(backend, now).order_by("profile_id").to_pyarrow()
        values = score_profiles(summary, horizon_weeks)
        clv_table = ibis.memtable(
            pa.table(
                {
                    "profile_id": pa.array(values.profile_id, pa.string()),
                    "expected_purchases": _column(values.expected_purchases),
                    "p_alive": _column(values.p_alive),
                    "expected_spend": _column(values.expected_spend),
                    "clv": _column(values.clv),
                    "repeat_purchases": _column(
                        summary.column("x").to_numpy(zero_copy_only=False)
                        if summary.num_rows
                        else np.zeros(0)
                    ),
                }
            )
        )
        # Each part on its own, one after the other (a row per profile at most): in one query
        # they would all hold their working memory at once, and spill under a memory limit.
        parts = [
            part.cache()
            for part in (
                activity(backend, now),
                favourite_products(backend),
                channel_and_time(backend),
                recommended(backend),
            )
        ]
        joined = (
            profiles.select("profile_id")
            .left_join(rfm_scores(profiles, now), "profile_id")
            .drop("profile_id_right")
            .left_join(clv_table, "profile_id")
            .drop("profile_id_right")
        )
        for part in parts:
            joined = joined.left_join(part, "profile_id").drop("profile_id_right")
        # BG/NBD assumes nobody leaves before their first repeat purchase, so it gives one-time
        # buyers no risk at all; for them (and non-buyers) the inactivity flag speaks instead.
        has_model = joined.p_alive.notnull() & (joined.repeat_purchases > 0)
        result = joined.select(
            "profile_id",
            "recency_days",
            "frequency",
            "monetary",
            "r_score",
            "f_score",
            "m_score",
            "rfm_score",
            "rfm_group",
            "expected_purchases",
            "p_alive",
            "expected_spend",
            "clv",
            churn_risk=ibis.ifelse(has_model, 1.0 - joined.p_alive, ibis.null("float64")),
            churn_flag=joined.churn_flag.fill_null(False),
            churn_basis=ibis.ifelse(has_model, "model", "inactivity"),
            days_inactive=joined.days_inactive,
            usual_gap_days=joined.usual_gap_days,
            favourite_products=joined.favourite_products,
            preferred_channel=joined.preferred_channel,
            preferred_time=joined.preferred_time,
            recommended_products=joined.recommended_products,
            computed_at=ibis.literal(now),
        )
        try:
            backend.to_parquet(result, out)
        finally:
            for part in parts:
                with contextlib.suppress(Exception):
                    part.release()
    return {
        "computed_at": now.isoformat(),
        "profiles_with_orders": len(values.profile_id),
        "horizon_weeks": horizon_weeks,
        "bgnbd": _clean(asdict(values.fit)) if values.fit else None,
        "gamma_gamma": _clean(asdict(values.spend_fit)) if values.spend_fit else None,
        "problem": values.problem,
    }


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
        for k, v in values.items()
    }
