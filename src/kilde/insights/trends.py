"""Survey and sentiment trends: NPS per week or month, and the mood of support contacts.

NPS comes from `Survey Answered` events (the answer named `score`, or `nps`), as in
surveys.py: promoters (9-10) minus detractors (0-6), in percent. Sentiment comes from
`Support Interaction` events (sentiment_score, -1 to 1, computed at import).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import ibis

from kilde.insights.data import behaviour

Period = Literal["week", "month"]


def trends(
    backend: Any, now: datetime, period: Period = "week", periods: int = 12
) -> dict[str, Any]:
    unit = "W" if period == "week" else "M"
    since = now - timedelta(days=(7 if period == "week" else 31) * periods)
    ev = behaviour(backend)
    ev = ev.filter((ev.timestamp >= ibis.literal(since)) & (ev.timestamp <= ibis.literal(now)))
    props = ev.properties.cast("json")
    answers = props["answers"]
    surveys = ev.filter(ev.event == "Survey Answered").select(
        when=ev.timestamp.truncate(unit),
        score=ibis.coalesce(answers["score"].float, answers["nps"].float, props["score"].float),
    )
    surveys = surveys.filter(surveys.score.notnull())
    nps = surveys.group_by("when").aggregate(
        responses=surveys.count(),
        promoters=(surveys.score >= 9).sum().cast("int64"),
        detractors=(surveys.score <= 6).sum().cast("int64"),
    )
    support = ev.filter(ev.event == "Support Interaction").select(
        when=ev.timestamp.truncate(unit),
        sentiment=ibis.coalesce(props["sentiment_score"].float, props["sentiment"].float),
        label=props["sentiment_label"].str,
    )
    mood = support.group_by("when").aggregate(
        contacts=support.count(),
        avg_sentiment=support.sentiment.mean(),
        negative=(support.label == "negative").sum().cast("int64"),
    )
    rows: dict[Any, dict[str, Any]] = {}
    for r in nps.to_pyarrow().to_pylist():
        n = int(r["responses"])
        rows.setdefault(r["when"], {})["nps"] = {
            "responses": n,
            "nps": round(100 * (r["promoters"] - r["detractors"]) / n, 1) if n else None,
        }
    for r in mood.to_pyarrow().to_pylist():
        n = int(r["contacts"])
        rows.setdefault(r["when"], {})["sentiment"] = {
            "contacts": n,
            "average": round(float(r["avg_sentiment"]), 3)
            if r["avg_sentiment"] is not None
            else None,
            "negative_share": round(r["negative"] / n, 4) if n else None,
        }
    series = [
        {"period": when.date().isoformat(), **values} for when, values in sorted(rows.items())
    ]
    return {"period": period, "series": series}
