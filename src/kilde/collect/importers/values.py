"""Turning cell values into typed values: amounts, quantities, dates and times, currencies.

Each parser raises `ValueProblem` with a reason and a fix that never quote the value itself,
since cells may hold personal data.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

_SYMBOLS = {"€": "EUR", "$": "USD", "£": "GBP", "¥": "JPY"}
_CODE = re.compile(r"^[A-Z]{3}$")
_AMOUNT_NOISE = re.compile(r"[\s\u00a0\u202f']")
_CURRENCY_AFFIX = re.compile(r"^([A-Za-z]{3})\s*|\s*([A-Za-z]{3})$")
_PLAIN = re.compile(r"^-?\d+(\.\d+)?$")
_EPOCH = re.compile(r"^\d{9,13}(\.\d+)?$")


class ValueProblem(ValueError):
    def __init__(self, code: str, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.fix = fix


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def text(value: Any) -> str | None:
    if is_blank(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # ids read from spreadsheets come as 1234.0
    return str(value).strip()


def amount(value: Any, decimal_mark: str | None = None) -> tuple[float, str | None]:
    """(amount, currency code found beside it). Accepts 1234.50, 1 234,50, 1,234.50, € 12."""
    if type(value) is str:
        raw = value.strip()
        if decimal_mark != "," and _PLAIN.match(raw):
            return float(raw), None
    elif isinstance(value, bool):
        raise _bad_amount()
    elif isinstance(value, int | float | Decimal):
        return float(value), None
    else:
        raw = str(value).strip()
    currency = None
    for symbol, code in _SYMBOLS.items():
        if symbol in raw:
            raw = raw.replace(symbol, "")
            currency = code
    match = _CURRENCY_AFFIX.search(raw)
    if match:
        currency = (match.group(1) or match.group(2)).upper()
        raw = raw[: match.start()] + raw[match.end() :]
    raw = _AMOUNT_NOISE.sub("", raw)
    negative = raw.startswith("(") and raw.endswith(")")  # accounting style
    if negative:
        raw = raw[1:-1]
    if decimal_mark == ",":
        raw = raw.replace(".", "").replace(",", ".")
    elif decimal_mark == ".":
        raw = raw.replace(",", "")
    elif "," in raw and "." in raw:
        if raw.rfind(",") > raw.rfind("."):
            raw = raw.replace(".", "").replace(",", ".")
        else:
            raw = raw.replace(",", "")
    elif "," in raw:
        whole, _, fraction = raw.rpartition(",")
        if raw.count(",") == 1 and len(fraction) in (1, 2):
            raw = f"{whole}.{fraction}"
        else:
            raw = raw.replace(",", "")
    try:
        number = Decimal(raw)
    except InvalidOperation:
        raise _bad_amount() from None
    if not number.is_finite():
        raise _bad_amount()
    return float(-number if negative else number), currency


def _bad_amount() -> ValueProblem:
    return ValueProblem(
        "invalid_amount",
        "is not an amount",
        "write amounts like 1234.50 or 1 234,50; set `decimal: ','` in the mapping for "
        "decimal commas",
    )


def quantity(value: Any) -> int:
    try:
        number = float(value) if not isinstance(value, str) else float(value.strip())
    except (TypeError, ValueError):
        number = float("nan")
    if number != number or not number.is_integer() or number < 1:
        raise ValueProblem(
            "invalid_quantity", "is not a whole number of at least 1", "write quantities like 2"
        )
    return int(number)


def currency_code(value: Any) -> str:
    code = str(value).strip().upper()
    code = _SYMBOLS.get(code, code)
    if not _CODE.match(code):
        raise ValueProblem(
            "invalid_currency",
            "is not a three-letter ISO 4217 currency code",
            "write currencies like NOK, EUR or USD, or set `currency:` in the mapping",
        )
    return code


def timestamp(value: Any, fmt: str | None = None, zone: tzinfo = UTC) -> datetime:
    """A moment in UTC. Without `fmt`: ISO 8601, or Unix seconds/milliseconds."""
    if fmt is None and type(value) is str and len(value) == 20 and value[10] == "T":
        try:  # the common case, 2026-11-29T08:15:00Z, without the general path
            return datetime.fromisoformat(value).astimezone(UTC)
        except ValueError:
            pass
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = _epoch(float(value))
    else:
        raw = str(value).strip()
        try:
            if fmt:
                moment = datetime.strptime(raw, fmt)
            elif _EPOCH.match(raw):
                moment = _epoch(float(raw))
            else:
                moment = datetime.fromisoformat(raw.replace(" UTC", "Z"))
        except ValueError:
            raise ValueProblem(
                "invalid_date",
                "is not a date and time in the expected format"
                + (" (the mapping's format)" if fmt else " (ISO 8601)"),
                "write dates like 2026-11-29 or 2026-11-29T08:15:00Z, or set the timestamp "
                "format in the mapping, e.g. format: '%d.%m.%Y %H:%M'",
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC)


def _epoch(number: float) -> datetime:
    if number > 1e11:  # milliseconds
        number /= 1000
    return datetime.fromtimestamp(number, UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_TRUE = {"true", "yes", "y", "1", "ja", "x", "on", "t"}
_FALSE = {"false", "no", "n", "0", "nei", "off", "f", ""}


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueProblem("invalid_boolean", "is not yes/no", "write true/false, yes/no or 1/0")


def typed(value: Any, kind: str) -> Any:
    """A trait value as the plan's trait type wants it."""
    if kind == "string":
        return text(value)
    if kind == "boolean":
        return boolean(value)
    if kind in ("number", "integer"):
        number, _ = amount(value) if isinstance(value, str) else (value, None)
        if not isinstance(number, int | float) or isinstance(number, bool):
            raise ValueProblem("invalid_number", "is not a number", "write numbers like 12.5")
        if kind == "integer":
            if not float(number).is_integer():
                raise ValueProblem(
                    "invalid_integer", "is not a whole number", "write whole numbers like 3"
                )
            return int(number)
        return float(number)
    if kind == "datetime":
        return iso(timestamp(value))
    return value
