"""Forms and surveys declared in the plan: fields, the traits they fill, consent boxes.

A form asks; a survey asks again later (NPS, CSAT, choices, free text). Both are hosted by
Kilde at /f/{id} and everything they collect is tied to purposes declared in the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FieldType = Literal[
    "text", "textarea", "email", "phone", "number", "select", "multiselect", "date", "nps", "csat"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShowIf(_Strict):
    """Ask this question only when another field has one of these answers."""

    field: str
    equals: list[str | int] = Field(min_length=1)


class FormField(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    type: FieldType
    label: str
    help: str | None = None
    required: bool = False
    trait: str | None = None  # the trait this answer fills on the person's profile
    options: list[str] = Field(default_factory=list)
    min: float | None = None
    max: float | None = None
    max_length: int = Field(500, ge=1, le=10_000)
    show_if: ShowIf | None = None

    @model_validator(mode="after")
    def _options_for_choices(self) -> FormField:
        if self.type in ("select", "multiselect") and not self.options:
            raise ValueError(f"a {self.type} field needs options")
        if self.type not in ("select", "multiselect") and self.options:
            raise ValueError("only select and multiselect fields take options")
        return self


class ConsentBox(_Strict):
    """One unticked checkbox per purpose that needs the person's consent."""

    purpose: str
    label: str


class Form(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9\-]*$")
    kind: Literal["form", "survey"] = "form"
    source: str
    title: str
    intro: str | None = None
    fields: list[FormField] = Field(min_length=1)
    consents: list[ConsentBox] = Field(default_factory=list)
    purposes: list[str] = Field(min_length=1)  # what the answers themselves are used for
    privacy_notice: str
    submit_label: str = "Send"
    thank_you: str = "Thank you!"
    allowed_origins: list[str] = Field(default_factory=list)  # sites whose own forms post here

    @model_validator(mode="after")
    def _names_unique(self) -> Form:
        names = [f.name for f in self.fields]
        if len(names) != len(set(names)):
            raise ValueError("two fields share a name")
        for f in self.fields:
            if f.show_if and f.show_if.field not in names:
                raise ValueError(f"field {f.name!r} depends on unknown field {f.show_if.field!r}")
        return self

    @property
    def event_name(self) -> str:
        return "Survey Answered" if self.kind == "survey" else "Form Submitted"


def form_problems(data: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross checks of the `forms` section against the rest of the plan (on the raw YAML)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    forms = data.get("forms")
    if not isinstance(forms, list):
        return problems

    def named(section: str, key: str) -> dict[Any, Mapping[str, Any]]:
        items = data.get(section)
        if not isinstance(items, list):
            return {}
        return {i.get(key): i for i in items if isinstance(i, Mapping)}

    sources = named("sources", "name")
    purposes = named("purposes", "id")
    traits = {
        t.get("name") for t in named("traits", "name").values() if t.get("scope", "user") == "user"
    }
    events = {(e.get("type", "track"), e.get("name")) for e in named("events", "name").values()}
    seen: set[Any] = set()
    for index, form in enumerate(forms):
        if not isinstance(form, Mapping):
            continue
        if form.get("id") in seen:
            problems.append((("forms", index, "id"), f"form {form.get('id')!r} is declared twice"))
        seen.add(form.get("id"))
        source = sources.get(form.get("source"))
        if source is None:
            problems.append(
                (("forms", index, "source"), "not a source of the plan; add a source of kind form")
            )
        elif source.get("kind") != "form":
            problems.append((("forms", index, "source"), "the form's source must be of kind form"))
        event = "Survey Answered" if form.get("kind") == "survey" else "Form Submitted"
        if ("track", event) not in events:
            problems.append(
                (("forms", index), f"the plan must declare the event {event!r} that this sends")
            )
        for p_index, purpose in enumerate(form.get("purposes") or []):
            if purpose not in purposes:
                problems.append(
                    (("forms", index, "purposes", p_index), f"purpose {purpose!r} is not declared")
                )
        for c_index, box in enumerate(form.get("consents") or []):
            if not isinstance(box, Mapping):
                continue
            purpose = purposes.get(box.get("purpose"))
            if purpose is None:
                problems.append(
                    (("forms", index, "consents", c_index, "purpose"), "purpose is not declared")
                )
            elif purpose.get("legal_basis") != "consent":
                problems.append(
                    (
                        ("forms", index, "consents", c_index, "purpose"),
                        "only purposes whose legal basis is consent get a consent box",
                    )
                )
            elif purpose.get("double_opt_in") and not any(
                isinstance(f, Mapping) and f.get("type") == "email"
                for f in form.get("fields") or []
            ):
                problems.append(
                    (
                        ("forms", index, "consents", c_index, "purpose"),
                        "this purpose needs double opt-in, so the form needs a field of type "
                        "email to send the confirmation link to",
                    )
                )
        for f_index, field in enumerate(form.get("fields") or []):
            if isinstance(field, Mapping) and field.get("trait") and field["trait"] not in traits:
                problems.append(
                    (
                        ("forms", index, "fields", f_index, "trait"),
                        f"trait {field['trait']!r} is not declared under 'traits'",
                    )
                )
    return problems
