"""Checks that span several parts of the plan (the models check each part on its own)."""

from __future__ import annotations

from kilde.plan.models import EventSpec, Plan

Path = tuple[str | int, ...]


def cross_check(plan: Plan) -> list[tuple[Path, str]]:
    """Return every problem as (path into the plan, message); empty when the plan is sound."""
    problems: list[tuple[Path, str]] = []

    def unique(section: str, names: list[str]) -> None:
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                problems.append(((section, index), f"{name!r} is declared twice in {section}"))
            seen.add(name)

    unique("sources", [s.name for s in plan.sources])
    unique("purposes", [p.id for p in plan.purposes])
    unique("goals", [g.id for g in plan.goals])
    unique("traits", [f"{t.scope}:{t.name}" for t in plan.traits])
    unique("events", [f"{e.type}:{e.name or '*'}" for e in plan.events])

    owners: dict[str, str] = {}
    for s_index, source in enumerate(plan.sources):
        for k_index, key in enumerate(source.write_keys):
            if key in owners:
                problems.append(
                    (
                        ("sources", s_index, "write_keys", k_index),
                        f"sources {owners[key]!r} and {source.name!r} share a write key; "
                        "give each source its own",
                    )
                )
            owners[key] = source.name

    known = {p.id for p in plan.purposes}
    specs: list[tuple[str, int, EventSpec | object]] = [
        *(("events", i, e) for i, e in enumerate(plan.events)),
        *(("traits", i, t) for i, t in enumerate(plan.traits)),
    ]
    for section, index, spec in specs:
        for p_index, purpose in enumerate(getattr(spec, "purposes", [])):
            if purpose not in known:
                problems.append(
                    (
                        (section, index, "purposes", p_index),
                        f"purpose {purpose!r} is not declared under 'purposes'; "
                        f"declare it or use one of {sorted(known)}",
                    )
                )
    return problems
