"""Customer-list normalisation and hashing the way the ad platforms require.

Google Ads Customer Match (Google's Ads API and Data Manager formatting guides): email lower-case
without any whitespace, and for gmail.com and googlemail.com addresses without the dots before
the @; phone numbers in E.164 (with the leading + and the country code); first and last names
lower-case, without punctuation and surrounding whitespace; then SHA-256 as lower-case hex.
Country (ISO 3166-1 alpha-2) and postal code are sent in clear. File columns: Email, Phone,
First Name, Last Name, Country, Zip.

Meta Custom Audiences (Meta's customer-list formatting guide): email trimmed and lower-cased (no
dot folding); phone with the country code, symbols, letters and leading zeros removed (no +);
first and last names lower-cased without punctuation, letters outside a-z kept in UTF-8;
country as a lower-case two-letter ISO code; each hashed with SHA-256 (country too). File
columns: email, phone, fn, ln, country; the upload API names them EMAIL, PHONE, FN, LN, COUNTRY.

A phone number written without its country code is read as a number of the person's country
(the `country` trait) when one is known.
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
    value = _SPACES.sub("", email).lower()
    if value.count("@") != 1:
        return None
    local, domain = value.split("@")
    if not local or "." not in domain:
        return None
    if domain in ("gmail.com", "googlemail.com"):
        local = local.replace(".", "")
    return f"{local}@{domain}"


def e164(phone: str, region: str | None = None) -> str | None:
    region = region.strip().upper() if region else None
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
    # Lower-case, no punctuation, no surrounding whitespace (inner spaces stay single).
    value = unicodedata.normalize("NFC", name.lower())
    value = "".join(ch for ch in value if ch.isalnum() or ch.isspace())
    value = _SPACES.sub(" ", value).strip()
    return value or None


def meta_email(email: str) -> str | None:
    value = email.strip().lower()
    return value if value.count("@") == 1 and "." in value.split("@")[1] else None


def meta_phone(phone: str, region: str | None = None) -> str | None:
    """Digits with the country code, no symbols, letters or leading zeros."""
    text = phone.strip()
    if region and not text.startswith(("+", "00")):
        number = e164(text, region)  # a national number: add the person's country code
        if number:
            return number[1:]
    digits = "".join(ch for ch in text if ch.isdigit()).lstrip("0")
    return digits if len(digits) >= 7 else None


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
