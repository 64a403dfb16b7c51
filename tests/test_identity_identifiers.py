"""Identifier normalisers and validity checks (pure functions, no server needed)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kilde.identity import extract
from kilde.identity.engine import Extracted
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


EMAILISH = st.one_of(
    st.sampled_from(
        [
            "Ola@Example.com",
            " mailto:kari@example.no ",
            "a+b@x.io",
            "+x@y.no",
            "test@test.com",
            "null",
            "",
            " ",
            "a b@c.no",
            "ø@æ.no",
            "x@y",
            "x@@y.no",
            "0000",
        ]
    ),
    st.from_regex(r"[a-zA-Z0-9.+ _-]{0,6}@[a-z.]{0,6}\.[a-z]{1,3}", fullmatch=True),
    st.text(alphabet="ab@.+ \t\x0bX", max_size=10),
)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["identify", "track", "page"]),
            st.one_of(st.none(), JUNKY),
            st.one_of(st.none(), JUNKY),
            # JSON integers as clients can send them (orjson reads and writes 64 bits)
            st.one_of(st.none(), EMAILISH, st.integers(-(2**63), 2**63 - 1)),
        ),
        min_size=1,
        max_size=12,
    ),
    fold=st.booleans(),
)
def test_set_based_extraction_matches_the_python_normaliser(
    rows: list[tuple[str, str | None, str | None, Any]], fold: bool
) -> None:
    """Records read set-based give the same records and observations as the Python path."""
    normaliser = Normaliser(IdentityRules(fold_plus_addressing=fold))
    events: dict[str, list[Any]] = {
        "source": [],
        "message_id": [],
        "type": [],
        "user_id": [],
        "anonymous_id": [],
        "timestamp": [],
        "received_at": [],
        "traits": [],
        "context": [],
        "write_seq": [],
    }
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for index, (kind, user, anon, mail) in enumerate(rows):
        traits = {} if mail is None else {"email": mail, "first_name": "x"}
        events["source"].append("web")
        events["message_id"].append(f"m{index}")
        events["type"].append(kind)
        events["user_id"].append(None if user is None else user.replace("\x00", ""))
        events["anonymous_id"].append(None if anon is None else anon.replace("\x00", ""))
        events["timestamp"].append(at)
        events["received_at"].append(at)
        events["traits"].append(orjson.dumps(traits).decode() if kind == "identify" else None)
        events["context"].append("{}")
        events["write_seq"].append(1 + index // 3)
    stamp = pa.timestamp("us", tz="UTC")
    kinds = {"timestamp": stamp, "received_at": stamp, "write_seq": pa.int64()}
    table = pa.table(
        events,
        schema=pa.schema([(name, kinds.get(name, pa.string())) for name in events]),
    )
    run = Runner(duckdb.connect())
    run.put("events", table)
    source = run.temp("events")
    rich = run.arrow("rich", lambda: source.filter(extract.is_rich(source)).select("message_id"))
    rich_ids = set(rich.column("message_id").to_pylist())
    ids = extract.simple(source, normaliser)
    got_records = run.arrow("r", lambda: extract.simple_records(ids, normaliser)).to_pylist()
    got_obs = run.arrow("o", lambda: extract.simple_observations(ids)).to_pylist()
    expected = Extracted()
    for row in table.to_pylist():
        if row["message_id"] not in rich_ids:
            expected.add({**row, "previous_id": None}, normaliser)
    want_records, want_obs = expected.tables()

    def records(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                r["message_id"],
                r["primary_type"],
                r["primary_value"],
                orjson.loads(r["dropped"]) if r["dropped"] else None,
            )
            for r in rows
        )

    def observations(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((r["message_id"], r["id_type"], r["id_value"]) for r in rows)

    assert records(got_records) == records(want_records.to_pylist())
    assert observations(got_obs) == observations(want_obs.to_pylist())
