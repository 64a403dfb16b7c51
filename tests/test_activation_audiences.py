"""Audience syncs against a real server: only the difference since the last sync, a full sync
on demand, consent and do-not-sell exclusions at each sync, the customer-list files in the
platforms' columns, and the upload requests to the platforms' APIs (a stand-in on loopback that
first refuses the credentials, then accepts)."""

from __future__ import annotations

import csv
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, BACKEND_KEY, DEMO_PLAN, Server, free_port, start_server
from tests.test_activation import order, plan_with, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SEGMENT = "repeat-buyers-90d"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Platform:
    """An ad platform's API on loopback: records requests; answers from a script."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # method, path, headers
        self.script: list[int] = []  # statuses to answer first; then 200
        self.lock = threading.Lock()
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = orjson.loads(raw) if raw else None
                with platform.lock:
                    status = platform.script.pop(0) if platform.script else 200
                    platform.requests.append((self.command, self.path, dict(self.headers), body))
                if status == 200 and self.path.endswith("offlineUserDataJobs:create"):
                    customer = self.path.split("/")[3]  # /v18/customers/ID/...
                    answer: dict[str, Any] = {
                        "resourceName": f"customers/{customer}/offlineUserDataJobs/77"
                    }
                elif status == 200:
                    answer = {"num_received": len((body or {}).get("payload", {}).get("data", []))}
                else:
                    answer = {
                        "error": {
                            "message": "Invalid OAuth access token.",
                            "type": "OAuthException",
                            "code": 190,
                        }
                    }
                data = orjson.dumps(answer)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # the stdlib calls them by these names
                self._answer()

            def do_DELETE(self) -> None:
                self._answer()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def take(self) -> list[tuple[str, str, dict[str, str], Any]]:
        with self.lock:
            taken, self.requests = self.requests, []
        return taken

    def close(self) -> None:
        self.server.shutdown()


# user id: traits, consent for advertising
PEOPLE: dict[str, tuple[dict[str, str], bool]] = {
    "kim": (
        {
            "email": " Kim.Lund@GMail.com",
            "phone": "912 34 567",  # national: the country trait supplies +47
            "first_name": "Kim-André",
            "last_name": "Lund",
            "country": "NO",
        },
        True,
    ),
    "ola": ({"email": "ola@example.no", "first_name": "Ola", "country": "NO"}, True),
    "per": ({"email": "per@example.no", "first_name": "Per", "country": "NO"}, True),
    "siv": ({"email": "siv@example.no", "first_name": "Siv", "country": "NO"}, False),
}


@pytest.fixture
def platform() -> Iterator[Platform]:
    p = Platform()
    yield p
    p.close()


def send(server: Server, path: str, message: dict[str, Any]) -> None:
    response = httpx.post(f"{server.url}/v1/{path}", json=message, auth=(BACKEND_KEY, ""))
    assert response.status_code == 200, response.text


def refresh_until(server: Server, count: int) -> None:
    def members() -> bool:
        httpx.post(
            f"{server.url}/api/segments/refresh",
            json={"segments": [SEGMENT]},
            headers=ADMIN,
            timeout=120,
        )
        listed = httpx.get(f"{server.url}/api/segments/{SEGMENT}/members", headers=ADMIN).json()
        return bool(listed["total"] == count)

    wait_for(members, timeout=120)


def run(server: Server, name: str, *extra: str, check: bool = True) -> Any:
    result = server.kilde("destinations", "run", name, *extra, "--json", check=check)
    return orjson.loads(result.stdout)["syncs"][0] if result.returncode == 0 else result


def rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_audiences_send_differences_full_syncs_and_uploads_with_consent_only(
    tmp_path: Path, platform: Platform
) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text(DEMO_PLAN.read_text())
    plan_with(
        plan,
        f"""  - name: meta-list
    kind: meta_custom_audience
    purpose: advertising
    segments: [{SEGMENT}]
    upload:
      access_token: ${{META_TOKEN}}
      audience_id: "6000123"
      api_url: {platform.url}/v21.0
  - name: google-list
    kind: google_customer_match
    purpose: advertising
    segments: [{SEGMENT}]
    upload:
      access_token: google-oauth-token
      developer_token: dev-token
      customer_id: 123-456-7890
      user_list_id: "555"
      api_url: {platform.url}/v18
  - name: crm-file
    kind: file
    purpose: analytics
    segments: [{SEGMENT}]
    traits: [email, first_name]
""",
    )
    server = start_server(tmp_path / "data", plan, META_TOKEN="meta-system-user-token")
    try:
        for user, (traits, consent) in PEOPLE.items():
            send(server, "identify", {"type": "identify", "userId": user, "traits": traits})
            if consent:
                consented = {"purposes": {"advertising": True}}
                send(
                    server,
                    "track",
                    {
                        "type": "track",
                        "event": "Consent Updated",
                        "userId": user,
                        "properties": consented,
                    },
                )
            for n in range(2):
                message = order(user, n)
                message["properties"]["revenue"] = 900.0
                send(server, "track", message)
        refresh_until(server, len(PEOPLE))

        # 1. The platform refuses the token: a clear error, exit status 1, nothing lost.
        platform.script = [400]  # Meta answers an OAuthException with 400
        refused = server.kilde("destinations", "run", "meta-list", check=False)
        assert refused.returncode == 1
        said = " ".join(refused.stdout.split())
        assert "upload failed: Meta: HTTP 400 (OAuthException 190: Invalid OAuth access" in said
        assert "the platform refused the credentials; check upload.access_token" in said
        assert "nothing is lost: the next run sends these changes again" in said
        logged = httpx.get(
            f"{server.url}/api/destinations/meta-list/deliveries", headers=ADMIN
        ).json()["log"]
        assert "refused the credentials" in logged[0]["error"]
        assert logged[0]["status"] == 400
        platform.take()

        # 2. Credentials fixed (here: the platform accepts again): the same three are sent.
        first = run(server, "meta-list")
        ((method, path, headers, body),) = platform.take()
        assert (method, path) == ("POST", "/v21.0/6000123/users")
        assert headers["Authorization"] == "Bearer meta-system-user-token"
        assert body["payload"]["schema"] == ["EMAIL", "PHONE", "FN", "LN", "COUNTRY"]
        kim = [
            sha("kim.lund@gmail.com"),  # Meta: no dot folding
            sha("4791234567"),  # country code, no +
            sha("kimandré"),  # lower-case, no punctuation, UTF-8 letters kept
            sha("lund"),
            sha("no"),
        ]
        assert kim in body["payload"]["data"]
        assert len(body["payload"]["data"]) == 3  # siv never consented
        assert (first["added"], first["removed"], first["uploaded"]) == (3, 0, 3)
        assert (first["excluded_no_consent"], first["excluded_do_not_sell"]) == (1, 0)
        file_rows = rows(first["files"][0])
        assert list(file_rows[0]) == ["email", "phone", "fn", "ln", "country"]
        assert [kim[0], kim[1]] in [[r["email"], r["phone"]] for r in file_rows]

        # 3. Nothing changed: nothing is sent.
        unchanged = run(server, "meta-list")
        assert (unchanged["added"], unchanged["removed"], unchanged["files"]) == (0, 0, [])
        assert platform.take() == []

        # 4. Ola opts out of sale or sharing, Per withdraws consent: only they are removed.
        opt_out = httpx.post(
            f"{server.url}/api/privacy/do-not-sell", json={"user_id": "ola"}, headers=ADMIN
        )
        assert opt_out.status_code == 200, opt_out.text
        withdrawn = {"purposes": {"advertising": False}}
        send(
            server,
            "track",
            {"type": "track", "event": "Consent Updated", "userId": "per", "properties": withdrawn},
        )

        def per_withdrawn() -> bool:
            state = httpx.post(
                f"{server.url}/api/privacy/consent/state", json={"user_id": "per"}, headers=ADMIN
            ).json()
            current = state["current"].get("advertising", {}).get("state")
            return current in ("denied", "withdrawn")

        wait_for(per_withdrawn)
        second = run(server, "meta-list")
        assert (second["added"], second["removed"]) == (0, 2)
        assert (second["excluded_do_not_sell"], second["excluded_no_consent"]) == (2, 1)
        ((method, _, _, body),) = platform.take()
        assert method == "DELETE"
        removed_emails = {row[0] for row in body["payload"]["data"]}
        assert removed_emails == {sha("ola@example.no"), sha("per@example.no")}
        assert second["files"][0].endswith("-remove.csv")

        # 5. A full sync on demand: everyone allowed now, written and sent again.
        full = run(server, "meta-list", "--full")
        assert (full["added"], full["removed"]) == (1, 0)
        assert full["files"][0].endswith("-full.csv")
        ((method, _, _, body),) = platform.take()
        assert method == "POST" and [row[0] for row in body["payload"]["data"]] == [kim[0]]

        # 6. Google Ads: a Customer Match job with the consent signals, Kim's hashed
        # identifiers (Google: gmail dots removed, E.164 with +), then run.
        google = run(server, "google-list", "--full")
        assert google["uploaded"] == 1
        calls = platform.take()
        assert [(m, p) for m, p, _, _ in calls] == [
            ("POST", "/v18/customers/1234567890/offlineUserDataJobs:create"),
            ("POST", "/v18/customers/1234567890/offlineUserDataJobs/77:addOperations"),
            ("POST", "/v18/customers/1234567890/offlineUserDataJobs/77:run"),
        ]
        job = calls[0][3]["job"]
        assert job["customerMatchUserListMetadata"] == {
            "userList": "customers/1234567890/userLists/555",
            "consent": {"adUserData": "GRANTED", "adPersonalization": "GRANTED"},
        }
        assert calls[0][2]["developer-token"] == "dev-token"
        operations = calls[1][3]["operations"]
        assert operations[0] == {"removeAll": True}  # full: the list becomes the segment
        assert operations[1:] == [
            {
                "create": {
                    "userIdentifiers": [
                        {"hashedEmail": sha("kimlund@gmail.com")},
                        {"hashedPhoneNumber": sha("+4791234567")},
                    ]
                }
            }
        ]
        (google_row,) = rows(google["files"][0])
        assert list(google_row) == ["Email", "Phone", "First Name", "Last Name", "Country", "Zip"]

        # 7. A plain file with chosen traits; its purpose (analytics) needs no consent, so
        # everyone in the segment is in it, the opted-out too (it is not a sale).
        crm = run(server, "crm-file")
        written = rows(crm["files"][0])
        assert sorted(r["first_name"] for r in written) == ["Kim-André", "Ola", "Per", "Siv"]
        assert list(written[0]) == ["profile_id", "email", "first_name"]
    finally:
        server.stop()
