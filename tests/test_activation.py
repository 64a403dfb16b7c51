"""Destinations against real receivers: a webhook endpoint on loopback that fails, answers
slowly and recovers; customer lists checked against the platforms' normalisation rules."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow.parquet as pq
import pytest

from kilde.activate import hashing
from kilde.activate.webhooks import verify_signature
from tests.conftest import ADMIN_TOKEN, BACKEND_KEY, free_port, start_server

SECRET = "test-webhook-secret-0123456789"
HOOK_TOKEN = "hook-token-4b1d"


class Receiver:
    """A webhook receiver whose behaviour the test scripts: fail, stall, then accept."""

    def __init__(self) -> None:
        # Per request: "500", "401", "slow", "hold" (wait until `release` is set), "ok";
        # an empty script means ok (or `default`).
        self.script: list[str] = []
        self.default = "ok"
        self.received: list[tuple[dict[str, str], bytes, str]] = []  # headers, body, outcome
        self.arrivals: list[float] = []  # time.monotonic() of each request
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    step = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver.received.append((dict(self.headers), body, step))
                    receiver.arrivals.append(time.monotonic())
                if step == "slow":
                    time.sleep(3)
                if step == "hold":
                    receiver.release.wait(120)
                code = {"500": 500, "401": 401}.get(step, 200)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # the stdlib calls it by this name
                self._answer()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        # A token in the address, as many receivers want one; it must never reach a log.
        return f"http://127.0.0.1:{self.port}/hook?token={HOOK_TOKEN}"

    def accepted(self) -> list[dict[str, Any]]:
        with self.lock:
            return [orjson.loads(b) for _, b, step in self.received if step in ("ok", "hold")]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def plan_with(server_plan: Path, destinations: str) -> None:
    server_plan.write_text(server_plan.read_text() + "\ndestinations:\n" + destinations)


def wait_for(check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def order(user: str, n: int) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "messageId": f"{user}-order-{n}",
        "properties": {"order_id": f"{user}-{n}", "revenue": 100.0 + n, "currency": "NOK"},
    }


def test_webhook_survives_failures_and_slowness_in_order_signed(
    tmp_path: Path, receiver: Receiver
) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text((Path(__file__).parents[1] / "src/kilde/demo/kilde.yaml").read_text())
    plan_with(
        plan,
        f"""  - name: order-hook
    kind: webhook
    purpose: order_fulfilment
    url: {receiver.url}
    secret: {SECRET}
    events: [Order Completed]
    max_attempts: 20
    timeout: 1
""",
    )
    # The first requests fail, one stalls past the timeout, then the receiver recovers.
    receiver.script = ["500", "500", "slow", "500"]
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    try:
        sent = [order(user, n) for n in range(4) for user in ("ann", "bob", "cid")]
        for message in sent:  # one request each, as an order service would send them
            response = httpx.post(f"{server.url}/v1/track", json=message, auth=(BACKEND_KEY, ""))
            assert response.status_code == 200
        # Collection does not wait for the receiver: all acknowledged while it was failing.

        def all_arrived() -> bool:
            ids = {d["data"]["message_id"] for d in receiver.accepted()}
            return ids >= {m["messageId"] for m in sent}

        wait_for(all_arrived)
        status = httpx.get(
            f"{server.url}/api/destinations/order-hook/deliveries",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ).json()
    finally:
        server.stop()

    accepted = receiver.accepted()
    # Exactly as sent: the properties survive unchanged.
    by_id = {d["data"]["message_id"]: d["data"] for d in accepted}
    for message in sent:
        got = by_id[message["messageId"]]
        assert got["properties"] == message["properties"]
        assert got["user_id"] == message["userId"]
        assert got["event"] == "Order Completed"
    # In order per person: the first successful arrival of each person's orders is ascending.
    for user in ("ann", "bob", "cid"):
        seen: list[str] = []
        for d in accepted:
            mid = d["data"]["message_id"]
            if d["data"]["user_id"] == user and mid not in seen:
                seen.append(mid)
        assert seen == [f"{user}-order-{n}" for n in range(4)]
    # Signed: every request verifies with the shared secret, and a changed body does not.
    for headers, body, _ in receiver.received:
        assert verify_signature(SECRET, headers["Kilde-Signature"], body)
        assert not verify_signature(SECRET, headers["Kilde-Signature"], body + b" ")
    # The failures are in the delivery log with their reasons.
    errors = {row["error"] for row in status["log"]}
    assert "HTTP 500: the receiver failed" in errors
    assert "ReadTimeout: no answer within 1 s" in errors
    assert all(d["state"] == "delivered" for d in status["deliveries"])
    # The receiver's address, with its token, stays out of the server's log.
    assert HOOK_TOKEN not in server.log_text()


def test_dead_deliveries_can_be_replayed(tmp_path: Path, receiver: Receiver) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text((Path(__file__).parents[1] / "src/kilde/demo/kilde.yaml").read_text())
    plan_with(
        plan,
        f"""  - name: flaky
    kind: webhook
    purpose: order_fulfilment
    url: {receiver.url}
    secret: {SECRET}
    events: [Order Completed]
    max_attempts: 1
""",
    )
    receiver.script = ["500"]
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        httpx.post(
            f"{server.url}/v1/track", json=order("dora", 1), auth=(BACKEND_KEY, ""), timeout=30
        )

        def dead() -> bool:
            listed = httpx.get(f"{server.url}/api/destinations", headers=admin).json()
            return bool(listed["destinations"][0]["deliveries"]["dead"] == 1)

        wait_for(dead)
        replayed = server.kilde("destinations", "replay", "flaky")
        assert "1 dead deliveries queued again" in replayed.stdout
        wait_for(lambda: receiver.accepted())
    finally:
        server.stop()
    assert receiver.accepted()[0]["data"]["message_id"] == "dora-order-1"


def test_webhook_sends_only_people_with_consent_for_its_purpose(
    tmp_path: Path, receiver: Receiver
) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text((Path(__file__).parents[1] / "src/kilde/demo/kilde.yaml").read_text())
    plan_with(
        plan,
        f"""  - name: newsletter-tool
    kind: webhook
    purpose: marketing_email
    url: {receiver.url}
    secret: {SECRET}
    events: [Order Completed]
""",
    )
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        consent = {
            "type": "track",
            "event": "Consent Updated",
            "userId": "yes-person",
            "properties": {"purposes": {"marketing_email": True}},
        }
        refusal = {**consent, "userId": "no-person"}
        refusal["properties"] = {"purposes": {"marketing_email": False}}
        for message in (consent, refusal):
            httpx.post(f"{server.url}/v1/track", json=message, auth=(BACKEND_KEY, ""))
        for user in ("yes-person", "no-person", "silent-person"):
            httpx.post(f"{server.url}/v1/track", json=order(user, 1), auth=(BACKEND_KEY, ""))

        def settled() -> bool:
            rows = httpx.get(
                f"{server.url}/api/destinations/newsletter-tool/deliveries", headers=admin
            ).json()["deliveries"]
            return len(rows) == 3 and all(r["state"] != "pending" for r in rows)

        wait_for(settled)
    finally:
        server.stop()
    assert [d["data"]["user_id"] for d in receiver.accepted()] == ["yes-person"]


# -- customer lists: the platforms' published normalisation rules ------------------------------


def test_google_customer_match_normalisation() -> None:
    # Trim, lower-case; gmail.com and googlemail.com lose the dots before the @.
    assert hashing.google_email("  Jane.Doe@Gmail.com ") == "janedoe@gmail.com"
    assert hashing.google_email("jane.doe@googlemail.com") == "janedoe@googlemail.com"
    assert hashing.google_email("Jane.Doe@Example.com") == "jane.doe@example.com"
    # Phones in E.164 with the leading +.
    assert hashing.google_phone("+1 (650) 253-0000") == "+16502530000"
    assert hashing.google_phone("+47 912 34 567") == "+4791234567"
    assert hashing.google_phone("not a phone") is None
    row = hashing.hashed(hashing.google_email("  Jane.Doe@Gmail.com "))
    assert row == hashlib.sha256(b"janedoe@gmail.com").hexdigest()
    assert len(row) == 64 and row == row.lower()


def test_meta_custom_audience_normalisation() -> None:
    # Email trimmed and lower-cased (no gmail dot folding); phone digits with country code only.
    assert hashing.meta_email(" John.Smith@Gmail.com") == "john.smith@gmail.com"
    assert hashing.meta_phone("+1 (650) 253-0000") == "16502530000"
    assert hashing.meta_phone("+44 20 7946 0958") == "442079460958"
    # Names lower-cased without punctuation; UTF-8 letters kept; country as ISO code.
    assert hashing.meta_name("Mary-Jane") == "maryjane"
    assert hashing.meta_name("Ødegård") == "ødegård"
    assert hashing.meta_country("US ") == "us"
    assert (
        hashing.hashed(hashing.meta_email("test@fb.com"))
        == hashlib.sha256(b"test@fb.com").hexdigest()
    )


# -- the story: a segment to a webhook and to a Customer Match file ----------------------------

PEOPLE = {
    # user id: (email, consents)
    "alice": ("Alice.Berg@Gmail.com", {"marketing_email": True, "advertising": True}),
    "bert": ("bert@example.com", {"marketing_email": True, "advertising": False}),
    "cara": ("cara@example.com", {}),
}


def test_a_segment_reaches_a_webhook_and_a_customer_match_file_with_consent_only(
    tmp_path: Path, receiver: Receiver
) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text((Path(__file__).parents[1] / "src/kilde/demo/kilde.yaml").read_text())
    plan_with(
        plan,
        f"""  - name: winback-hook
    kind: webhook
    purpose: marketing_email
    url: {receiver.url}
    secret: {SECRET}
    segments: [repeat-buyers-90d]
  - name: google-winback
    kind: google_customer_match
    purpose: advertising
    segments: [repeat-buyers-90d]
  - name: partner-feed
    kind: partner_export
    purpose: advertising
    recipient: Nordic Outdoor Media AS
    segments: [repeat-buyers-90d]
    traits: [email, first_name]
    format: parquet
""",
    )
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def send(message: dict[str, Any]) -> None:
        response = httpx.post(
            f"{server.url}/v1/track" if message["type"] == "track" else f"{server.url}/v1/identify",
            json=message,
            auth=(BACKEND_KEY, ""),
        )
        assert response.status_code == 200, response.text

    try:
        for user, (email, consents) in PEOPLE.items():
            send(
                {
                    "type": "identify",
                    "userId": user,
                    "traits": {"email": email, "first_name": user.title(), "country": "NO"},
                }
            )
            if consents:
                send(
                    {
                        "type": "track",
                        "event": "Consent Updated",
                        "userId": user,
                        "properties": {"purposes": consents},
                    }
                )
            for n in range(2):  # two orders over 500: the repeat-buyers segment
                message = order(user, n)
                message["properties"]["revenue"] = 900.0
                send(message)
        send(order("dan", 1))  # one order only: not in the segment

        def members() -> int:
            httpx.post(
                f"{server.url}/api/segments/refresh",
                json={"segments": ["repeat-buyers-90d"]},
                headers=admin,
                timeout=120,
            )
            listed = httpx.get(
                f"{server.url}/api/segments/repeat-buyers-90d/members", headers=admin
            ).json()
            return int(listed["total"]) if listed["total"] >= len(PEOPLE) else 0

        assert wait_for(members, timeout=120) == len(PEOPLE)  # dan, with one order, is not in
        synced = server.kilde("destinations", "run", "google-winback", "--json")
        partner = server.kilde("destinations", "run", "partner-feed", "--json")

        def hook_settled() -> bool:
            rows = httpx.get(
                f"{server.url}/api/destinations/winback-hook/deliveries", headers=admin
            ).json()["deliveries"]
            return len(rows) >= 3 and all(r["state"] != "pending" for r in rows)

        wait_for(hook_settled)
        audit = httpx.get(
            f"{server.url}/api/privacy/audit", params={"action": "EXPORT"}, headers=admin
        ).json()["entries"]
    finally:
        server.stop()

    # Every file shared is in the audit log with its manifest: what, when, with whom, why.
    shared_with = {e["action"]: e["detail"] for e in audit}
    assert set(shared_with) == {
        "EXPORT google_customer_match google-winback",
        "EXPORT partner_export partner-feed",
    }
    partner_entry = shared_with["EXPORT partner_export partner-feed"]
    assert partner_entry["recipient"] == "Nordic Outdoor Media AS"
    assert (partner_entry["legal_basis"], partner_entry["rows_added"]) == ("consent", 1)
    assert all(e["personal_data"] and e["actor"] == "kilde activation" for e in audit)

    # The webhook got the segment entries of the people who allow marketing mail only.
    entered = [d["data"] for d in receiver.accepted() if d["data"]["event"] == "Segment Entered"]
    assert sorted(d["user_id"] for d in entered) == ["alice", "bert"]
    assert {d["properties"]["segment"] for d in entered} == {"repeat-buyers-90d"}

    # The Customer Match file holds only the person who consented to advertising, hashed.
    result = orjson.loads(synced.stdout)["syncs"][0]
    assert (result["members"], result["added"]) == (3, 1)
    assert result["excluded_no_consent"] + result["excluded_do_not_sell"] == 2
    lines = Path(result["files"][0]).read_text().splitlines()
    assert lines[0] == "Email,Phone,First Name,Last Name,Country,Zip"
    assert len(lines) == 2
    alice = lines[1].split(",")
    assert alice[0] == hashlib.sha256(b"aliceberg@gmail.com").hexdigest()
    assert alice[2] == hashlib.sha256(b"alice").hexdigest()
    assert alice[4] == "NO"
    manifest = orjson.loads(Path(result["files"][0]).with_suffix(".manifest.json").read_bytes())
    assert manifest["legal_basis"] == "consent" and manifest["purpose"] == "advertising"

    # The partner gets the chosen traits of the one person who allows it; bert, who refused
    # advertising (a purpose marked as sale or sharing), is counted as an opt-out.
    shared = orjson.loads(partner.stdout)["syncs"][0]
    assert (shared["excluded_do_not_sell"], shared["excluded_no_consent"]) == (1, 1)
    table = pq.read_table(shared["files"][0]).to_pylist()
    assert [(r["email"], r["first_name"]) for r in table] == [("Alice.Berg@Gmail.com", "Alice")]
    record = orjson.loads(Path(shared["files"][0]).with_suffix(".manifest.json").read_bytes())
    assert record["recipient"] == "Nordic Outdoor Media AS"


def test_a_destination_whose_segment_is_gone_refuses_to_sync(tmp_path: Path) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text((Path(__file__).parents[1] / "src/kilde/demo/kilde.yaml").read_text())
    plan_with(
        plan,
        f"""  - name: stale-list
    kind: meta_custom_audience
    purpose: advertising
    segments: [deleted-segment]
  - name: stale-hook
    kind: webhook
    purpose: order_fulfilment
    url: http://127.0.0.1:{free_port()}/hook
    secret: {SECRET}
    segments: [deleted-segment]
  - name: scheduled-file
    kind: file
    purpose: analytics
    segments: [repeat-buyers-90d]
    schedule: 1s
""",
    )
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    try:
        result = server.kilde("destinations", "run", "stale-list", check=False)
        list_log = server.kilde("destinations", "log", "stale-list", "--json")

        def hook_logged() -> list[str]:
            shown = server.kilde("destinations", "log", "stale-hook", "--json").stdout
            return [row["error"] for row in orjson.loads(shown)["log"] if row["error"]]

        hook_log = wait_for(hook_logged)

        def scheduled_runs() -> int:
            shown = server.kilde("destinations", "log", "scheduled-file", "--json").stdout
            return len(orjson.loads(shown)["log"])

        # A list with a schedule syncs on its own; each sync is in the delivery log.
        wait_for(lambda: scheduled_runs() >= 2)
        scheduled = server.kilde("destinations", "log", "scheduled-file", "--json").stdout
        hook_run = server.kilde("destinations", "run", "stale-hook")
        # `test`: a signed request to an unreachable receiver fails with the reason...
        hook_test = server.kilde("destinations", "test", "stale-hook", check=False)
        # ...and a list's test checks that its folder can be written.
        list_test = server.kilde("destinations", "test", "stale-list")
    finally:
        server.stop()
    assert result.returncode == 1
    assert "segment 'deleted-segment' does not exist" in result.stderr
    # The same error is in the delivery log, for the scheduled runs nobody watches.
    assert [r["error"] for r in orjson.loads(list_log.stdout)["log"]] == [
        "segment 'deleted-segment' does not exist"
    ]
    assert hook_log == ["segment 'deleted-segment' does not exist; its changes cannot be sent"]
    runs = orjson.loads(scheduled)["log"]
    assert {(r["delivery_id"], r["error"]) for r in runs} == {("sync:repeat-buyers-90d", None)}
    assert "segment 'deleted-segment' does not exist" in " ".join(hook_run.stdout.split())
    assert hook_test.returncode == 1
    tested = orjson.loads(hook_test.stdout)
    assert tested["ok"] is False
    assert tested["error"] == "ConnectError: the receiver is unreachable (connection failed)"
    assert orjson.loads(list_test.stdout)["ok"] is True
    assert not (tmp_path / "data" / "exports" / "stale-list").exists() or not list(
        (tmp_path / "data" / "exports" / "stale-list").iterdir()
    )
