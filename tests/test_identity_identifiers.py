"""Identifier normalisers and validity checks (pure functions, no server needed)."""

from __future__ import annotations

import hashlib

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kilde.identity.extract import plain_id
from kilde.identity.identifiers import Identifier, Normaliser, parse_identifier
from kilde.identity.runner import Runner
from kilde.plan.models import IdentityRules


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ola.Nordmann@Example.COM ", "ola.nordmann@example.com"),
        ("mailto:ola@example.com", "ola@example.com"),
        ("ola+shop@example.com", "ola+shop@example.com"),
        ("test@test.com", None),
        ("TEST@test.com", None),
        ("null", None),
        ("ola@", None),
        ("ola@example", None),
        ("ola example@example.com", None),
    ],
)
def test_email(raw: str, expected: str | None) -> None:
    assert Normaliser().normalise("email", raw) == expected


def test_plus_addressing_folds_only_when_the_plan_says_so() -> None:
    folding = Normaliser(IdentityRules(fold_plus_addressing=True))
    assert folding.normalise("email", "Ola+Shop@Example.com") == "ola@example.com"
    assert folding.normalise("email", "+x@example.com") is None


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("412 34 567", "NO", "+4741234567"),
        ("+47 412 34 567", "GB", "+4741234567"),
        ("07911 123456", "GB", "+447911123456"),
        ("0000000000", "NO", None),
        ("12", "NO", None),
        ("not a phone", "NO", None),
    ],
)
def test_phone_is_e164_with_the_default_region(raw: str, region: str, expected: str) -> None:
    rules = IdentityRules(default_phone_region=region)
    assert Normaliser(rules).normalise("phone", raw) == expected


@pytest.mark.parametrize("junk", ["null", "undefined", "0", "", "  ", "NaN", "none", "-1", "0000"])
def test_junk_ids_link_nothing(junk: str) -> None:
    normaliser = Normaliser()
    assert normaliser.normalise("user_id", junk) is None
    assert normaliser.normalise("anonymous_id", junk) is None


def test_the_plans_blocklist_is_junk_too() -> None:
    normaliser = Normaliser(IdentityRules(blocklist=["Guest-User", "info@fjordfell.example"]))
    assert normaliser.normalise("user_id", "guest-user") is None
    assert normaliser.normalise("email", "INFO@fjordfell.example") is None
    assert normaliser.normalise("user_id", "cust-1") == "cust-1"


def test_other_types() -> None:
    n = Normaliser()
    digest = hashlib.sha256(b"ola@example.com").hexdigest()
    assert n.normalise("email_sha256", digest.upper()) == digest
    assert n.normalise("email_sha256", "abc") is None
    assert n.normalise("external_id", "CRM_ID: C-1042 ") == "crm_id:C-1042"
    assert n.normalise("external_id", "no kind") is None
    ad = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
    assert n.normalise("mobile_ad_id", ad) == ad.lower()
    assert n.normalise("mobile_ad_id", "00000000-0000-0000-0000-000000000000") is None


def test_what_a_record_carries() -> None:
    row = {
        "type": "identify",
        "user_id": "cust-1",
        "anonymous_id": "null",
        "traits": '{"email": "Ola@Example.com", "phone": "412 34 567"}',
        "context": {
            "externalIds": [
                {"id": "C-1042", "type": "crm_id", "collection": "users", "encoding": "none"},
                {"id": "1134", "type": "google"},
            ],
            "device": {"advertisingId": "6d92078a-8246-4ba4-ae5b-76104861e7dc"},
        },
    }
    found = Normaliser().of_record(row)
    assert found.primary == Identifier("user_id", "cust-1")
    types = [i.type for i in found.own]
    assert types == [
        "user_id",
        "external_id",
        "external_id",
        "email",
        "email_sha256",
        "phone",
        "mobile_ad_id",
    ]
    assert ("anonymousId", "junk") in found.dropped
    # group traits describe a company, never a person
    group = Normaliser().of_record(
        {"type": "group", "user_id": "u", "traits": {"email": "sales@acme.example"}}
    )
    assert [i.type for i in group.own] == ["user_id"]
    # an opted-out advertising id is not used
    no_ads = Normaliser().of_record(
        {
            "type": "track",
            "anonymous_id": "a",
            "context": {
                "device": {
                    "advertisingId": row["context"]["device"]["advertisingId"],
                    "adTrackingEnabled": False,
                }
            },
        }
    )
    assert [i.type for i in no_ads.own] == ["anonymous_id"]


def test_parse_what_an_admin_typed() -> None:
    n = Normaliser()
    assert parse_identifier("Ola@Example.com", n) == [Identifier("email", "ola@example.com")]
    assert parse_identifier("user_id:cust-7", n) == [Identifier("user_id", "cust-7")]
    assert Identifier("user_id", "cust-7") in parse_identifier("cust-7", n)


JUNKY = st.one_of(
    st.sampled_from(["null", " NULL ", "0", "0000", "--", "x", "XXX", "...", "undefined", "-1"]),
    st.text(alphabet=" \t\n0x.-aZ9@é", max_size=8),
    st.text(max_size=20),
)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(JUNKY, min_size=1, max_size=30))
def test_set_based_plain_ids_match_the_python_normaliser(values: list[str]) -> None:
    """Simple records are normalised in SQL, rich ones in Python: both must agree."""
    normaliser = Normaliser(IdentityRules(blocklist=["Guest-User"]))
    values = [v for v in values if "\x00" not in v] + ["guest-user "]
    con = duckdb.connect()
    run = Runner(con)
    run.put("k_values", pa.table({"raw": values}))
    table = run.temp("k_values")
    got = run.arrow("plain", lambda: table.select(value=plain_id(table.raw, normaliser)))
    assert got.column("value").to_pylist() == [normaliser.plain_id(v) for v in values]
