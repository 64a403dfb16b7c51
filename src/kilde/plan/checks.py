"""Checks that span several parts of the plan (the models check each part on its own).

They run on the plain data read from YAML, before and whatever the models say, so that
`kilde plan check` reports a duplicate write key or an undeclared purpose in the same run as a
misspelt key elsewhere. Parts that are malformed are skipped here; the models report them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kilde.plan.destinations import destination_problems
from kilde.plan.forms import form_problems
from kilde.plan.models import schema_problem

Path = tuple[str | int, ...]


def _items(data: Mapping[str, Any], section: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    value = data.get(section)
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, Mapping):
                yield index, item


def _strings(value: Any) -> Iterator[tuple[int, str]]:
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, str):
                yield index, item


def cross_check(data: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """Return every problem as (path into the plan, message); empty when the plan is sound."""
    problems: list[tuple[Path, str]] = []

    def unique(section: str, field: str, name_of: Any = None) -> None:
        seen: set[Any] = set()
        for index, item in _items(data, section):
            name = name_of(item) if name_of else item.get(field)
            if name is None:
                continue
            if name in seen:
                shown = item.get(field)
                problems.append(
                    ((section, index, field), f"{shown!r} is declared twice in {section}")
                )
            seen.add(name)

    unique("sources", "name")
    unique("purposes", "id")
    unique("goals", "id")
    unique("traits", "name", lambda t: (t.get("scope", "user"), t.get("name")))
    unique("events", "name", lambda e: (e.get("type", "track"), e.get("name")))

    owners: dict[str, str] = {}
    for s_index, source in _items(data, "sources"):
        name = str(source.get("name"))
        keys = [*_strings(source.get("write_keys"))]
        for k_index, key in keys:
            if key in owners:
                other = owners[key]
                problems.append(
                    (
                        ("sources", s_index, "write_keys", k_index),
                        f"sources {other!r} and {name!r} share a write key; "
                        "give each source its own"
                        if other != name
                        else f"source {name!r} lists the same write key twice",
                    )
                )
            owners[key] = name
        active = {key for _, key in keys}
        for k_index, key in _strings(source.get("revoked_write_keys")):
            if key in active:
                problems.append(
                    (
                        ("sources", s_index, "revoked_write_keys", k_index),
                        "this write key is both active and revoked; remove it from one list",
                    )
                )

    for index, spec in _items(data, "events"):
        schema = spec.get("properties")
        if isinstance(schema, Mapping):
            problem = schema_problem(schema)
            if problem is not None:
                problems.append((("events", index, "properties", *problem[0]), problem[1]))

    known = {item.get("id") for _, item in _items(data, "purposes")}
    shown = sorted(str(k) for k in known if k is not None)
    for section in ("events", "traits"):
        for index, spec in _items(data, section):
            for p_index, purpose in _strings(spec.get("purposes")):
                if purpose not in known:
                    problems.append(
                        (
                            (section, index, "purposes", p_index),
                            f"purpose {purpose!r} is not declared under 'purposes'; "
                            f"declare it or use one of {shown}",
                        )
                    )
    problems.extend(form_problems(data))
    problems.extend(destination_problems(data))
    return problems
