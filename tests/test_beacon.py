"""The 1x1 GIF beacon and Segment's pixel API, hit with a real HTTP client.

Whatever is sent, the answer is the transparent GIF and is never cached; good hits are stored
like any event, bad ones are in the dead letter with their reason, and nothing from the query
string reaches the server's log.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kilde.collect.beacon import GIF
from tests.conftest import WEB_KEY, Server
from tests.site import events, ledger


def hit(
    server: Server,
    path: str = "/v1/b.gif",
    headers: dict[str, str] | None = None,
    **params: str,
) -> httpx.Response:
    answer = httpx.get(f"{server.url}{path}", params=params, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.content == GIF and len(GIF) == 43
    assert answer.headers["content-type"] == "image/gif"
    assert "no-store" in answer.headers["cache-control"]
    assert answer.headers["expires"] == "0"
    return answer


def dead_letters(server: Server) -> list[dict[str, Any]]:
    listed = httpx.get(
        f"{server.url}/api/bad-events", params={"limit": "1000"}, headers=server.admin
    ).json()
    return list(listed["dead_letters"])


def letter(server: Server, letter_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/api/bad-events/{letter_id}", headers=server.admin)
    result: dict[str, Any] = answer.json()
    return result


def test_page_view_from_a_beacon_is_stored_with_its_campaign(kilde_server: Server) -> None:
    visitor = f"beacon-{uuid.uuid4()}"
    answer = hit(
        kilde_server,
        k=WEB_KEY,
        a=visitor,
        url="https://fjordfell.example/tents?utm_source=partner&utm_medium=banner",
        r="https://blog.example/best-tents",
        title="Tents",
        fbclid="fb-7",
    )
    assert answer.headers["x-kilde-result"] == "stored"
    (stored,) = events(kilde_server, anonymous_id=visitor)
    assert stored["type"] == "page"
    assert (
        stored["page_url"] == "https://fjordfell.example/tents?utm_source=partner&utm_medium=banner"
    )
    assert stored["properties"]["path"] == "/tents"
    assert stored["properties"]["referrer"] == "https://blog.example/best-tents"
    assert stored["context"]["campaign"] == {
        "source": "partner",
        "medium": "banner",
        "fbclid": "fb-7",
    }
    assert stored["context"]["library"] == {"name": "kilde-beacon"}


def test_track_beacon_with_string_and_typed_properties(kilde_server: Server) -> None:
    visitor = f"beacon-{uuid.uuid4()}"
    answer = hit(
        kilde_server,
        k=WEB_KEY,
        t="track",
        e="Product Added",
        a=visitor,
        u="beacon-user-1",
        **{"p.product_id": "tent-2p", "props": json.dumps({"quantity": 2, "price": 199.5})},
    )
    assert answer.headers["x-kilde-result"] == "stored"
    (stored,) = events(kilde_server, anonymous_id=visitor)
    assert stored["event"] == "Product Added" and stored["user_id"] == "beacon-user-1"
    assert stored["properties"] == {"product_id": "tent-2p", "quantity": 2, "price": 199.5}
    assert stored["plan_status"] == "ok"


def test_beacon_uses_the_first_party_cookie_and_the_referer(kilde_server: Server) -> None:
    visitor = f"cookie-visitor-{uuid.uuid4().hex[:12]}"
    answer = hit(
        kilde_server,
        k=WEB_KEY,
        headers={
            "Cookie": f"kilde_aid={visitor}",
            "Referer": "https://fjordfell.example/no-js-page",
        },
    )
    assert answer.headers["x-kilde-result"] == "stored"
    (stored,) = events(kilde_server, anonymous_id=visitor)
    assert stored["page_url"] == "https://fjordfell.example/no-js-page"


def test_retried_beacon_with_a_message_id_is_stored_once(kilde_server: Server) -> None:
    visitor = f"beacon-{uuid.uuid4()}"
    results = [
        hit(kilde_server, k=WEB_KEY, a=visitor, m=f"m-{visitor}").headers["x-kilde-result"]
        for _ in range(2)
    ]
    assert results == ["stored", "duplicate"]
    assert len(events(kilde_server, anonymous_id=visitor)) == 1


def test_bad_beacons_get_the_gif_and_their_reason_goes_to_the_dead_letter(
    kilde_server: Server,
) -> None:
    secret = "anna.hansen@example.com"
    cases = [
        ({"k": "no-such-write-key", "a": "x-visitor-1", "u": secret}, "unknown_write_key"),
        ({"a": "x-visitor-2", "u": secret}, "missing_write_key"),
        ({"k": WEB_KEY, "u": secret, "props": "{not json"}, "invalid_props"),
        ({"k": WEB_KEY, "u": secret, "t": "explode"}, "invalid_type"),
        ({"k": WEB_KEY, "t": "track", "u": secret}, "missing_event"),
        ({"k": WEB_KEY, "t": "track", "e": "Product Viewed", "u": secret}, "off_plan"),
        ({"k": WEB_KEY, "title": secret}, "missing_id"),
        ({"k": WEB_KEY, "u": secret, "p.x": "y" * 9000}, "query_too_large"),
    ]
    before = {d["id"] for d in dead_letters(kilde_server)}
    for params, code in cases:
        answer = hit(kilde_server, **params)
        assert answer.headers["x-kilde-result"] == f"rejected:{code}", params
    new = [d for d in dead_letters(kilde_server) if d["id"] not in before]
    assert len(new) == len(cases)
    assert all(d["channel"] == "beacon" for d in new)
    by_reason = {letter(kilde_server, d["id"])["envelope"]["code"] for d in new}
    assert by_reason == {code for _, code in cases}
    # The dead letter keeps what was sent, so it can be fixed and replayed ...
    kept = [letter(kilde_server, d["id"])["payload"] for d in new]
    assert sum(secret in payload for payload in kept) >= 6
    # ... but the query strings never reach the log.
    assert secret not in kilde_server.log_text()
    assert "no-such-write-key" not in kilde_server.log_text()


def test_segment_pixel_api(kilde_server: Server) -> None:
    visitor = f"pixel-{uuid.uuid4()}"
    message = {
        "writeKey": WEB_KEY,
        "anonymousId": visitor,
        "event": "Product Viewed",
        "properties": {"product_id": "p-9"},
    }
    data = base64.b64encode(json.dumps(message).encode()).decode()
    assert hit(kilde_server, "/v1/pixel/track", data=data).headers["x-kilde-result"] == "stored"
    urlsafe = base64.urlsafe_b64encode(json.dumps({**message, "event": "Signed In"}).encode())
    unpadded = urlsafe.decode().rstrip("=")
    assert hit(kilde_server, "/v1/pixel/track", data=unpadded).headers["x-kilde-result"] == "stored"
    stored = events(kilde_server, anonymous_id=visitor)
    assert sorted(e["event"] for e in stored) == ["Product Viewed", "Signed In"]

    for path, params, code in [
        ("/v1/pixel/track", {"data": "%%%not-base64"}, "invalid_data"),
        ("/v1/pixel/track", {}, "missing_data"),
        ("/v1/pixel/batch", {"data": data}, "invalid_type"),
        (
            "/v1/pixel/track",
            {"data": base64.b64encode(b'{"anonymousId": "a-1-2-3-4"}').decode()},
            "missing_write_key",
        ),
    ]:
        assert hit(kilde_server, path, **params).headers["x-kilde-result"] == f"rejected:{code}"


def test_gpc_header_on_a_beacon_is_recorded_as_an_opt_out(kilde_server: Server) -> None:
    visitor = f"beacon-gpc-{uuid.uuid4()}"
    hit(kilde_server, k=WEB_KEY, a=visitor, headers={"Sec-GPC": "1"})
    (stored,) = events(kilde_server, anonymous_id=visitor)
    assert stored["context"]["gpc"] is True
    records = ledger(kilde_server, anonymous_id=visitor)["records"]
    assert [(r["purpose"], r["state"], r["evidence"], r["channel"]) for r in records] == [
        ("advertising", "denied", "gpc", "beacon")
    ]


def test_bots_get_the_gif_and_are_stored_as_bots_and_head_records_nothing(
    kilde_server: Server,
) -> None:
    visitor = f"beacon-bot-{uuid.uuid4()}"
    googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    answer = hit(kilde_server, k=WEB_KEY, a=visitor, headers={"User-Agent": googlebot})
    assert answer.headers["x-kilde-result"] == "stored"
    (stored,) = events(kilde_server, anonymous_id=visitor)
    assert stored["device"] == "bot"  # reports can leave crawlers out

    # Link checkers and prefetchers ask with HEAD: the GIF's headers, nothing recorded.
    for path, params in (
        ("/v1/b.gif", {"k": WEB_KEY, "a": visitor, "m": "head-1"}),
        ("/v1/pixel/page", {"data": base64.b64encode(b'{"anonymousId": "x"}').decode()}),
    ):
        head = httpx.head(f"{kilde_server.url}{path}", params=params)
        assert head.status_code == 200 and head.headers["content-type"] == "image/gif"
        assert "no-store" in head.headers["cache-control"]
        assert head.headers["x-kilde-result"] == "not_recorded"
    assert len(events(kilde_server, anonymous_id=visitor)) == 1


# -- whatever arrives: the website's and the mails' endpoints never fail ------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
PARAMS = st.dictionaries(
    st.sampled_from(
        ["k", "t", "e", "u", "a", "m", "url", "path", "r", "title", "ts", "props", "p.x", "gclid"]
    )
    | TEXT,
    TEXT | JSON_VALUE.map(json.dumps),
    max_size=8,
)


def _pixel_data(message: Any, how: str) -> str:
    raw = json.dumps(message).encode()
    return (base64.urlsafe_b64encode(raw) if how == "urlsafe" else base64.b64encode(raw)).decode()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    params=PARAMS,
    key=st.sampled_from([WEB_KEY, "not-a-key", None]),
    message=JSON_VALUE
    | st.fixed_dictionaries(
        {"writeKey": st.just(WEB_KEY)},
        optional={
            "anonymousId": JSON_VALUE,
            "event": JSON_VALUE,
            "properties": JSON_VALUE,
            "context": JSON_VALUE,
            "timestamp": JSON_VALUE,
        },
    ),
    kind=st.sampled_from(["page", "track", "identify", "alias", "batch", "x"]),
    how=st.sampled_from(["standard", "urlsafe"]),
    token=TEXT,
    cookie=TEXT,
)
def test_no_beacon_pixel_or_mail_link_makes_the_server_fail(
    kilde_server: Server,
    params: dict[str, str],
    key: str | None,
    message: Any,
    kind: str,
    how: str,
    token: str,
    cookie: str,
) -> None:
    if key is not None:
        params = {**params, "k": key}
    url = kilde_server.url
    beacon = httpx.get(f"{url}/v1/b.gif", params=params, timeout=30)
    assert beacon.status_code == 200 and beacon.content == GIF
    pixel = httpx.get(
        f"{url}/v1/pixel/{kind}", params={"data": _pixel_data(message, how)}, timeout=30
    )
    assert pixel.status_code == 200 and pixel.content == GIF
    quoted = quote(token, safe="")
    if quoted in (".", ".."):
        # A dot segment is resolved by the client (RFC 3986), never sent: escape it to send it.
        quoted = "%2E" * len(quoted)
    opened = httpx.get(f"{url}/e/o/{quoted}.gif", timeout=30)
    assert opened.status_code == 200 and opened.headers["content-type"] == "image/gif"
    clicked = httpx.get(f"{url}/e/c/{quoted}", timeout=30)
    assert clicked.status_code == 400 and "location" not in clicked.headers
    made = httpx.post(
        f"{url}/v1/cookie",
        content=json.dumps({"writeKey": WEB_KEY, "anonymousId": message}).encode(),
        headers={"Cookie": f"kilde_aid={quote(cookie, safe='')}"},
        timeout=30,
    )
    assert made.status_code == 200 and made.json()["success"] is True


def test_the_fuzzing_of_beacons_left_no_crash_in_the_log(kilde_server: Server) -> None:
    log = kilde_server.log_text()
    assert "Traceback" not in log and "unhandled" not in log
