"""Survey results per question: NPS with promoters, passives and detractors; CSAT; choices.

NPS = % promoters (9-10) - % detractors (0-6), from -100 to 100. CSAT is the share of 4 and 5
answers on a 1-5 scale. Free-text questions report how many answered; their text stays on the
events (and in the privacy export), not in summaries.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from kilde.plan.forms import Form


def nps_summary(scores: list[int]) -> dict[str, Any]:
    promoters = sum(1 for s in scores if s >= 9)
    detractors = sum(1 for s in scores if s <= 6)
    passives = len(scores) - promoters - detractors
    total = len(scores)
    return {
        "responses": total,
        "promoters": promoters,
        "passives": passives,
        "detractors": detractors,
        "nps": round(100 * (promoters - detractors) / total, 1) if total else None,
        "distribution": {str(n): scores.count(n) for n in range(11)},
    }


def csat_summary(scores: list[int]) -> dict[str, Any]:
    total = len(scores)
    satisfied = sum(1 for s in scores if s >= 4)
    return {
        "responses": total,
        "average": round(sum(scores) / total, 2) if total else None,
        "csat": round(100 * satisfied / total, 1) if total else None,
        "distribution": {str(n): scores.count(n) for n in range(1, 6)},
    }


def survey_results(form: Form, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries for each question of `form` over a list of submitted answer objects."""
    questions = []
    for field in form.fields:
        given = [a[field.name] for a in answers if a.get(field.name) not in (None, "", [])]
        summary: dict[str, Any] = {"name": field.name, "label": field.label, "type": field.type}
        if field.type == "nps":
            summary.update(nps_summary([int(v) for v in given if isinstance(v, int | float)]))
        elif field.type == "csat":
            summary.update(csat_summary([int(v) for v in given if isinstance(v, int | float)]))
        elif field.type in ("select", "multiselect"):
            counts: Counter[str] = Counter()
            for value in given:
                counts.update(value if isinstance(value, list) else [value])
            summary["responses"] = len(given)
            summary["distribution"] = {option: counts[option] for option in field.options}
        elif field.type == "number":
            numbers = [float(v) for v in given if isinstance(v, int | float)]
            summary["responses"] = len(numbers)
            summary["average"] = round(sum(numbers) / len(numbers), 2) if numbers else None
        else:
            summary["responses"] = len(given)
        questions.append(summary)
    return {
        "form_id": form.id,
        "title": form.title,
        "submissions": len(answers),
        "questions": questions,
    }
