"""Server-side validation of a form submission: values or errors per field, never both.

Error messages describe the rule, not the value, so nothing typed into a form ends up in a log
or an error report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from kilde.plan.forms import Form, FormField

CONSENT_PREFIX = "consent."
HONEYPOT = "website"  # a field people never see and bots love to fill
CONTROL_FIELDS = {"csrf", "t", HONEYPOT}


@dataclass
class Submission:
    values: dict[str, Any] = field(default_factory=dict)  # typed answers by field name
    raw: dict[str, str | list[str]] = field(default_factory=dict)  # what to re-render
    errors: dict[str, str] = field(default_factory=dict)  # field name -> message
    consents: dict[str, bool] = field(default_factory=dict)  # purpose -> ticked
    tampered: list[str] = field(default_factory=list)  # why the post cannot be from our page

    @property
    def ok(self) -> bool:
        return not self.errors and not self.tampered


# Characters no one types into a form: C0 controls other than tab and line breaks, and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _one(data: Mapping[str, Sequence[str]], name: str) -> str:
    values = data.get(name) or []
    return values[0].strip() if values else ""


def visible(form_field: FormField, raw: Mapping[str, Any]) -> bool:
    """Whether a conditional question applies, given the other answers."""
    condition = form_field.show_if
    if condition is None:
        return True
    answer = raw.get(condition.field)
    answers = answer if isinstance(answer, list) else [answer]
    wanted = {str(v) for v in condition.equals}
    return any(str(a) in wanted for a in answers if a not in (None, ""))


def validate(
    form: Form, data: Mapping[str, Sequence[str]], phone_region: str | None = None
) -> Submission:
    sub = Submission()
    known = {f.name for f in form.fields} | CONTROL_FIELDS
    consent_purposes = {c.purpose for c in form.consents}
    for name in data:
        if name.startswith(CONSENT_PREFIX):
            purpose = name.removeprefix(CONSENT_PREFIX)
            if purpose not in consent_purposes:
                sub.tampered.append(f"consent for a purpose this form does not ask: {purpose[:60]}")
        elif name not in known:
            sub.tampered.append(f"a field this form does not have: {name[:60]}")
    for box in form.consents:
        ticked = _one(data, CONSENT_PREFIX + box.purpose)
        if ticked not in ("", "yes"):
            sub.tampered.append(f"consent box {box.purpose} has a value the form never sends")
        sub.consents[box.purpose] = ticked == "yes"

    for f in form.fields:
        sub.raw[f.name] = (
            list(data.get(f.name) or []) if f.type == "multiselect" else _one(data, f.name)
        )
    for f in form.fields:
        if not visible(f, sub.raw):
            continue
        raw = sub.raw[f.name]
        if raw in ("", []):
            if f.required:
                sub.errors[f.name] = "This field is required."
            continue
        try:
            sub.values[f.name] = _convert(f, raw, phone_region)
        except ValueError as exc:
            sub.errors[f.name] = str(exc)
    return sub


def _convert(f: FormField, raw: str | list[str], phone_region: str | None) -> Any:
    if isinstance(raw, list):
        if len(raw) > len(f.options) or any(v not in f.options for v in raw):
            raise ValueError("Choose among the options shown.")
        return raw
    if len(raw) > f.max_length:
        raise ValueError(f"Use at most {f.max_length} characters.")
    if _CONTROL.search(raw):  # NUL and the like: pasted by accident or sent by a script
        raise ValueError("Remove the invisible control characters from this answer.")
    if f.type in ("text", "textarea"):
        return raw
    if f.type == "email":
        try:
            return validate_email(raw, check_deliverability=False).normalized
        except EmailNotValidError:
            raise ValueError("Enter an email address like name@example.com.") from None
    if f.type == "phone":
        try:
            number = phonenumbers.parse(raw, phone_region)
        except phonenumbers.NumberParseException:
            number = None
        if number is None or not phonenumbers.is_valid_number(number):
            raise ValueError("Enter a phone number with its country code, like +47 912 34 567.")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if f.type == "select":
        if raw not in f.options:
            raise ValueError("Choose one of the options shown.")
        return raw
    if f.type == "date":
        try:
            return date.fromisoformat(raw).isoformat()
        except ValueError:
            raise ValueError("Enter a date like 2026-11-29.") from None
    if f.type in ("nps", "csat"):
        low, high = (0, 10) if f.type == "nps" else (1, 5)
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise ValueError(f"Choose a number from {low} to {high}.")
        return int(raw)
    # number
    try:
        number_value = float(raw.replace(",", "."))
    except ValueError:
        raise ValueError("Enter a number.") from None
    if f.min is not None and number_value < f.min:
        raise ValueError(f"Enter a number of at least {f.min:g}.")
    if f.max is not None and number_value > f.max:
        raise ValueError(f"Enter a number of at most {f.max:g}.")
    return int(number_value) if number_value.is_integer() else number_value
