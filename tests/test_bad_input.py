"""Bad input: a 4xx JSON answer that says what was wrong and how to fix it, never a 500; what a
known source sent is kept in the dead letter; personal data is neither echoed nor logged."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import APP_KEY, WEB_KEY, Server


def secret_email() -> str:
    """Personal data with a unique marker, to look for in answers and logs."""
    return f"kari.nordmann.{uuid.uuid4().hex[:10]}@example.org"


def assert_problem(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["success"] is False
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["fix"], str) and body["fix"]
    return body


def dead_letter(server: Server, letter_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/bad-events/{letter_id}", headers=server.admin)
    assert response.status_code == 200, response.text
    letter: dict[str, Any] = response.json()
    return letter


def send(
    server: Server,
    path: str,
    content: bytes,
    key: str | None = WEB_KEY,
    content_type: str = "application/json",
    **headers: str,
) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        headers={"Content-Type": content_type, **headers},
        auth=(key, "") if key else None,
        timeout=30,
    )


def assert_not_leaked(server: Server, response: httpx.Response, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in response.text
        assert secret not in str(response.headers)
        assert secret not in server.log_text()


@pytest.fixture
def email(kilde_server: Server) -> Iterator[str]:
    value = secret_email()
    yield value
    assert value not in kilde_server.log_text()


# -- bodies that are not a JSON object ------------------------------------------------------


def test_malformed_json(kilde_server: Server, email: str) -> None:
    text = '{"userId": "u-1", "traits": {"email": "' + email + '"'
    response = send(kilde_server, "/v1/identify", text.encode())
    body = assert_problem(response, 400, "malformed_json")
    assert "not valid JSON" in body["message"]
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert letter["source"] == "web"
    assert letter["status"] == "pending"
    assert "not valid JSON" in letter["reason"]
    assert letter["payload"] == text  # kept exactly as sent, to fix and replay
    assert_not_leaked(kilde_server, response, email)


@pytest.mark.parametrize("content_type", ["application/xml", "application/x-www-form-urlencoded"])
def test_wrong_content_type(kilde_server: Server, email: str, content_type: str) -> None:
    content = orjson.dumps({"userId": "u-1", "traits": {"email": email}})
    response = send(kilde_server, "/v1/identify", content, content_type=content_type)
    body = assert_problem(response, 415, "unsupported_media_type")
    assert "application/json" in body["fix"]
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert letter["source"] == "web"
    assert letter["envelope"]["type"] == "identify"
    assert_not_leaked(kilde_server, response, email)


def test_body_that_is_not_an_object(kilde_server: Server) -> None:
    body = assert_problem(send(kilde_server, "/v1/track", b"[1, 2]"), 400, "invalid_body")
    assert dead_letter(kilde_server, body["dead_letter_id"])["payload"] == "[1, 2]"


def test_empty_body(kilde_server: Server) -> None:
    assert_problem(send(kilde_server, "/v1/track", b""), 400, "malformed_json")


def test_non_utf8_body(kilde_server: Server, email: str) -> None:
    content = b'{"userId": "\xff\xfe", "event": "Signed In", "traits": {"email": "%s"}}' % (
        email.encode()
    )
    response = send(kilde_server, "/v1/track", content)
    body = assert_problem(response, 400, "not_utf8")
    assert "UTF-8" in body["fix"]
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert "\\xff\\xfe" in letter["payload"]  # the undecodable bytes, shown escaped
    assert_not_leaked(kilde_server, response, email)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not gzip", id="not-gzip"),
        pytest.param(gzip.compress(b'{"userId": "u-1", "event": "Signed In"}')[:20], id="cut"),
    ],
)
def test_bad_gzip(kilde_server: Server, content: bytes) -> None:
    response = send(kilde_server, "/v1/track", content, **{"Content-Encoding": "gzip"})
    body = assert_problem(response, 400, "bad_gzip")
    assert "gzip" in body["fix"]
    assert dead_letter(kilde_server, body["dead_letter_id"])["source"] == "web"


def test_unsupported_content_encoding(kilde_server: Server) -> None:
    response = send(kilde_server, "/v1/track", b"{}", **{"Content-Encoding": "br"})
    assert_problem(response, 415, "unsupported_encoding")


# -- write keys ------------------------------------------------------------------------------


def test_missing_write_key(kilde_server: Server, email: str) -> None:
    content = orjson.dumps({"userId": "u-1", "traits": {"email": email}})
    response = send(kilde_server, "/v1/identify", content, key=None)
    body = assert_problem(response, 401, "missing_write_key")
    assert "Basic" in response.headers["www-authenticate"]
    assert "writeKey" in body["fix"]
    assert "dead_letter_id" not in body  # no known source: nothing is kept for a stranger
    assert_not_leaked(kilde_server, response, email)


@pytest.mark.parametrize(
    ("key", "error"),
    [("not-a-key-of-this-shop", "unknown_write_key"), ("old-app-key-2025", "revoked_write_key")],
)
def test_unknown_and_revoked_write_keys(
    kilde_server: Server, email: str, key: str, error: str
) -> None:
    content = orjson.dumps({"userId": "u-1", "traits": {"email": email}})
    for response in (
        send(kilde_server, "/v1/identify", content, key=key),
        send(
            kilde_server,
            "/v1/identify",
            orjson.dumps({"writeKey": key, "userId": "u-1", "traits": {"email": email}}),
            key=None,
            content_type="text/plain",
        ),
    ):
        body = assert_problem(response, 401, error)
        assert "plan" in body["fix"]
        assert key not in response.text  # not even the key is echoed
        assert_not_leaked(kilde_server, response, email)


def test_basic_auth_that_is_not_base64(kilde_server: Server) -> None:
    response = httpx.post(
        f"{kilde_server.url}/v1/track",
        content=b"{}",
        headers={"Authorization": "Basic %%%not-base64%%%", "Content-Type": "application/json"},
    )
    assert_problem(response, 401, "bad_authorization")


# -- messages the Segment spec or the plan does not allow ------------------------------------


@pytest.mark.parametrize(
    ("path", "message", "error", "field"),
    [
        ("/v1/track", {"event": "Signed In"}, "missing_id", "userId"),
        ("/v1/identify", {"userId": "", "anonymousId": ""}, "missing_id", "userId"),
        ("/v1/track", {"userId": "u-1"}, "missing_event", "event"),
        ("/v1/group", {"userId": "u-1"}, "missing_id", "groupId"),
        ("/v1/alias", {"userId": "u-1"}, "missing_id", "previousId"),
        ("/v1/alias", {"previousId": "a-1", "anonymousId": "a-2"}, "missing_id", "userId"),
    ],
)
def test_missing_ids_and_names(
    kilde_server: Server, email: str, path: str, message: dict[str, Any], error: str, field: str
) -> None:
    content = orjson.dumps({**message, "context": {"traits": {"email": email}}})
    response = send(kilde_server, path, content)
    body = assert_problem(response, 400, error)
    assert body["path"] == field
    assert body["stored_in"] == "dead letter"
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert letter["path"] == field
    assert letter["reason"] == body["message"]
    assert orjson.loads(letter["payload"])["context"]["traits"]["email"] == email
    assert_not_leaked(kilde_server, response, email)


@pytest.mark.parametrize(
    ("path", "message", "error", "field"),
    [
        ("/v1/track", {"userId": {"id": 1}, "event": "Signed In"}, "invalid_field", "userId"),
        ("/v1/track", {"userId": "u-1", "event": 42}, "invalid_field", "event"),
        ("/v1/track", {"userId": "u-1", "event": "Signed In", "properties": "x"}, "invalid_field",
         "properties"),
        ("/v1/identify", {"userId": "u-1", "traits": ["email"]}, "invalid_field", "traits"),
        ("/v1/page", {"anonymousId": "a-1", "context": [1]}, "invalid_field", "context"),
        ("/v1/page", {"anonymousId": "a-1", "name": {"x": 1}}, "invalid_field", "name"),
        ("/v1/track", {"userId": "u-1", "event": "Signed In", "timestamp": 1700000000},
         "invalid_timestamp", "timestamp"),
        ("/v1/track", {"userId": "u-1", "event": "Signed In", "sentAt": True},
         "invalid_timestamp", "sentAt"),
        ("/v1/track", {"userId": "u-1", "event": "Product Viewed",
                       "properties": {"product_id": "p-1", "price": "cheap"}},
         "off_plan", "properties.price"),
        ("/v1/track", {"userId": "u-1", "event": "Order Completed",
                       "properties": {"order_id": "o-1", "revenue": 10, "currency": "NOK",
                                      "products": [{"product_id": 7}]}},
         "off_plan", "properties.products[0].product_id"),
        ("/v1/identify", {"userId": "u-1", "traits": {"newsletter": "yes"}}, "off_plan",
         "traits.newsletter"),
    ],
)  # fmt: skip
def test_wrong_field_types(
    kilde_server: Server, email: str, path: str, message: dict[str, Any], error: str, field: str
) -> None:
    content = orjson.dumps({**message, "messageId": f"m-{uuid.uuid4().hex}"})
    response = send(kilde_server, path, content)
    body = assert_problem(response, 400, error)
    assert body["path"] == field
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert letter["path"] == field
    assert letter["source"] == "web"
    assert orjson.loads(letter["payload"]) == orjson.loads(content)


def test_wrong_type_does_not_echo_the_value(kilde_server: Server, email: str) -> None:
    """The plan says first_name is a string; a sender puts an email in an object there."""
    message = {"userId": "u-1", "traits": {"email": email, "first_name": {"value": email}}}
    response = send(kilde_server, "/v1/identify", orjson.dumps(message))
    body = assert_problem(response, 400, "off_plan")
    assert body["path"] == "traits.first_name"
    assert_not_leaked(kilde_server, response, email)


@pytest.mark.parametrize(
    "times",
    [
        pytest.param({"timestamp": "1970-01-01T00:00:00Z"}, id="epoch"),
        pytest.param({"timestamp": "2999-01-01T00:00:00Z"}, id="far-future"),
        pytest.param(
            {"timestamp": "2026-01-01T00:00:00Z", "sentAt": "1990-01-01T00:00:00Z"},
            id="sent-before-it-happened-by-decades",
        ),
        pytest.param(
            {"timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"},
            id="clock-correction-overflows",
        ),
    ],
)
def test_absurd_timestamps(kilde_server: Server, times: dict[str, str]) -> None:
    message = {"userId": "u-1", "event": "Signed In", **times}
    body = assert_problem(
        send(kilde_server, "/v1/track", orjson.dumps(message)), 400, "timestamp_out_of_range"
    )
    assert body["path"] == "timestamp"
    assert "clock" in body["fix"]
    assert dead_letter(kilde_server, body["dead_letter_id"])["path"] == "timestamp"


@pytest.mark.parametrize("value", ["yesterday", "2026-13-45T00:00:00Z", "99999-01-01"])
def test_timestamps_that_are_not_dates(kilde_server: Server, value: str) -> None:
    message = {"userId": "u-1", "event": "Signed In", "timestamp": value}
    body = assert_problem(
        send(kilde_server, "/v1/track", orjson.dumps(message)), 400, "invalid_timestamp"
    )
    assert "2026-11-29T08:15:00" in body["fix"]


# -- sizes ---------------------------------------------------------------------------------


def test_oversize_event(kilde_server: Server, email: str) -> None:
    message = {
        "userId": "u-1",
        "event": "Signed In",
        "traits": {"email": email},
        "properties": {"blob": "x" * 40_000},
    }
    response = send(kilde_server, "/v1/track", orjson.dumps(message))
    body = assert_problem(response, 413, "payload_too_large")
    assert "32 KB" in body["message"]
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert letter["source"] == "web"
    assert_not_leaked(kilde_server, response, email)


def test_huge_body_is_refused_unread(kilde_server: Server) -> None:
    message = {"userId": "u-1", "event": "Signed In", "properties": {"blob": "x" * 300_000}}
    response = send(kilde_server, "/v1/track", orjson.dumps(message))
    body = assert_problem(response, 413, "payload_too_large")
    assert "not read" in body["message"]


def test_gzip_bomb_is_refused(kilde_server: Server) -> None:
    bomb = gzip.compress(b'{"userId": "u-1", "event": "Signed In", "x": "' + b"0" * 5_000_000)
    assert len(bomb) < 32 * 1024
    response = send(kilde_server, "/v1/track", bomb, **{"Content-Encoding": "gzip"})
    assert_problem(response, 413, "payload_too_large")


def test_oversize_event_inside_a_batch_is_dead_lettered_alone(kilde_server: Server) -> None:
    user = f"u-{uuid.uuid4().hex}"
    batch = [
        {"type": "track", "userId": user, "event": "Signed In", "messageId": f"{user}-small"},
        {
            "type": "track",
            "userId": user,
            "event": "Signed In",
            "messageId": f"{user}-big",
            "properties": {"blob": "x" * 40_000},
        },
    ]
    response = send(kilde_server, "/v1/batch", orjson.dumps({"batch": batch}))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["stored"] == 1
    [rejected] = result["rejected"]
    assert (rejected["index"], rejected["messageId"], rejected["error"]) == (
        1,
        f"{user}-big",
        "event_too_large",
    )
    letter = dead_letter(kilde_server, rejected["dead_letter_id"])
    assert orjson.loads(letter["payload"])["messageId"] == f"{user}-big"


def test_oversize_batch(kilde_server: Server) -> None:
    batch = [
        {"type": "track", "userId": f"u-{i}", "event": "Signed In", "properties": {"p": "x" * 9000}}
        for i in range(60)
    ]
    content = orjson.dumps({"batch": batch})
    assert 500 * 1024 < len(content) < 2_000_000
    body = assert_problem(send(kilde_server, "/v1/batch", content), 413, "payload_too_large")
    assert "500 KB" in body["message"]
    assert "fewer events" in body["fix"]


def test_too_many_events_in_a_batch(kilde_server: Server) -> None:
    batch = [{"type": "page", "anonymousId": f"a-{i}"} for i in range(2501)]
    content = orjson.dumps({"batch": batch})
    assert len(content) < 500 * 1024
    body = assert_problem(send(kilde_server, "/v1/batch", content), 413, "too_many_events")
    assert "2500" in body["fix"]
    assert body["path"] == "batch"
    letter = dead_letter(kilde_server, body["dead_letter_id"])
    assert len(orjson.loads(letter["payload"])["batch"]) == 2501


def test_batch_that_is_not_a_list(kilde_server: Server) -> None:
    response = send(kilde_server, "/v1/batch", b'{"batch": {"type": "track"}}')
    body = assert_problem(response, 400, "invalid_batch")
    assert body["path"] == "batch"
    assert dead_letter(kilde_server, body["dead_letter_id"])["source"] == "web"


def test_bad_items_of_a_batch_are_reported_each_and_the_good_ones_stored(
    kilde_server: Server, email: str
) -> None:
    user = f"u-{uuid.uuid4().hex}"
    batch = [
        "not an object",
        {"type": "shout", "userId": user},
        {"type": "identify", "traits": {"email": email}},
        {"type": "track", "userId": user, "event": "Signed In"},
    ]
    response = send(kilde_server, "/v1/batch", orjson.dumps({"batch": batch}))
    assert response.status_code == 200
    result = response.json()
    assert result["stored"] == 1
    assert [(r["index"], r["error"]) for r in result["rejected"]] == [
        (0, "invalid_message"),
        (1, "invalid_type"),
        (2, "missing_id"),
    ]
    for rejected in result["rejected"]:
        assert rejected["fix"]
        assert (
            dead_letter(kilde_server, rejected["dead_letter_id"])["reason"] == (rejected["message"])
        )
    assert_not_leaked(kilde_server, response, email)


def test_unknown_endpoint_and_wrong_method(kilde_server: Server) -> None:
    body = assert_problem(send(kilde_server, "/v1/purchase", b"{}"), 404, "unknown_endpoint")
    assert "/v1/identify" in body["fix"]
    email = secret_email()  # a sender that puts personal data in the path is not echoed
    wrong = send(kilde_server, f"/v1/{email}", b"{}")
    assert_problem(wrong, 404, "unknown_endpoint")
    assert email not in wrong.text
    response = httpx.get(f"{kilde_server.url}/v1/track")
    assert_problem(response, 405, "http_405")


def test_personal_data_in_a_url_is_not_logged(kilde_server: Server, email: str) -> None:
    response = httpx.get(
        f"{kilde_server.url}/api/events", params={"user_id": email}, headers=kilde_server.admin
    )
    assert response.status_code == 200
    assert "/api/events" in kilde_server.log_text()
    assert email not in kilde_server.log_text()


# -- anything at all: never a 5xx -------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
FIELDS = [
    "type",
    "userId",
    "anonymousId",
    "event",
    "name",
    "groupId",
    "previousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "properties",
    "traits",
    "context",
    "integrations",
]
NEAR_VALID = {
    "type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias", "x"]),
    "userId": st.text(max_size=20) | st.integers(),
    "event": st.sampled_from(["Signed In", "Product Viewed", "Order Completed", "Nope"]),
    "timestamp": st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=30),
    "sentAt": st.datetimes().map(lambda d: d.isoformat()),
    "originalTimestamp": st.datetimes().map(lambda d: d.isoformat()),
    "properties": st.dictionaries(
        st.sampled_from(["product_id", "price", "order_id", "revenue", "currency", "products"]),
        JSON,
    ),
    "traits": st.dictionaries(st.sampled_from(["email", "newsletter", "created_at", "x"]), JSON),
    "context": st.dictionaries(st.sampled_from(["ip", "userAgent", "page", "traits"]), JSON),
}
MESSAGE = st.fixed_dictionaries(
    {},
    optional={field: NEAR_VALID.get(field, JSON) | JSON for field in FIELDS},
)
BODY = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    MESSAGE.map(lambda m: json.dumps(m).encode()),
    st.builds(
        lambda items, extra: json.dumps({"batch": items, **extra}).encode(),
        st.lists(MESSAGE | JSON, max_size=5),
        st.fixed_dictionaries(
            {},
            optional={"context": JSON, "integrations": JSON, "sentAt": JSON, "writeKey": JSON},
        ),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    path=st.sampled_from(["/v1/batch", "/v1/track", "/v1/identify", "/v1/page"]),
    body=BODY,
    key=st.sampled_from([WEB_KEY, APP_KEY, None]),
    encoding=st.sampled_from(["", "gzip"]),
    content_type=st.sampled_from(["application/json", "text/plain", ""]),
)
def test_no_input_makes_the_server_fail(
    kilde_server: Server, path: str, body: bytes, key: str | None, encoding: str, content_type: str
) -> None:
    headers = {"Content-Type": content_type}
    if encoding:
        body = gzip.compress(body)
        headers["Content-Encoding"] = encoding
    response = httpx.post(
        f"{kilde_server.url}{path}",
        content=body,
        headers=headers,
        auth=(key, "") if key else None,
        timeout=30,
    )
    assert response.status_code < 500, response.text
    answer = response.json()
    if response.status_code >= 400:
        assert answer["success"] is False and answer["fix"], answer
    else:
        assert answer["success"] is True


def test_the_fuzzing_left_no_crash_in_the_log(kilde_server: Server) -> None:
    log = kilde_server.log_text()
    assert "unhandled" not in log
    assert "Traceback" not in log
