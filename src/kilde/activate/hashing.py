"""Customer-list normalisation and hashing the way the ad platforms require.

Google Ads Customer Match: trim and lower-case; for gmail.com and googlemail.com addresses also
remove the dots before the @; phone numbers in E.164 (with the leading +); then SHA-256 as
lower-case hex. Names are trimmed and lower-cased, country codes and postal codes are sent in
clear. Columns: Email, Phone, First Name, Last Name, Country, Zip.

Meta Custom Audiences: email trimmed and lower-cased; phone digits only, country code included,
no + and no leading zeros; first and last names lower-cased without punctuation; country as a
lower-case ISO code; each hashed with SHA-256 (country too). Columns: EMAIL, PHONE, FN, LN,
COUNTRY.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import phonenumbers

_SPACES = re.compile(r"\s+")


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def google_email(email: str) -> str | None:
    value = email.strip().lower()
    if value.count("@") != 1:
        return None
    local, domain = value.split("@")
    if not local or "." not in domain:
        return None
    if domain in ("gmail.com", "googlemail.com"):
        local = local.replace(".", "")
    return f"{local}@{domain}"


def e164(phone: str, region: str | None = None) -> str | None:
    try:
        number = phonenumbers.parse(phone, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def google_phone(phone: str, region: str | None = None) -> str | None:
    return e164(phone, region)


def google_name(name: str) -> str | None:
    value = _SPACES.sub(" ", name.strip().lower())
    return value or None


def meta_email(email: str) -> str | None:
    value = email.strip().lower()
    return value if value.count("@") == 1 and "." in value.split("@")[1] else None


def meta_phone(phone: str, region: str | None = None) -> str | None:
    number = e164(phone, region)
    return number.lstrip("+").lstrip("0") if number else None


def meta_name(name: str) -> str | None:
    # Lower-case, no punctuation; letters outside a-z are kept in UTF-8 as Meta asks.
    value = unicodedata.normalize("NFC", name.strip().lower())
    value = "".join(ch for ch in value if ch.isalnum())
    return value or None


def meta_country(country: str) -> str | None:
    value = country.strip().lower()
    return value if len(value) == 2 and value.isalpha() else None


def hashed(value: str | None) -> str:
    return sha256(value) if value else ""
