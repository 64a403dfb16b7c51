"""What the privacy tests share: a person with identifiers, sending through each channel, the
byte scan of the data directory, and the privacy API."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import BACKEND_KEY, WEB_KEY, Server

SAMPLES = Path(__file__).resolve().parent.parent / "docs" / "samples"


@dataclass
class Person:
    """A made-up customer whose every identifier is unique to one test."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def email(self) -> str:  # as the person typed it: mixed case
        return f"Ingrid.Test.{self.tag}@Example.org"

    @property
    def user_id(self) -> str:
        return f"user-{self.tag}"

    @property
    def anonymous_id(self) -> str:
        return f"anon-{self.tag}"

    @property
    def phone_digits(self) -> str:
        return "9" + str(int(self.tag, 16) % 10_000_000).zfill(7)  # a valid mobile number

    @property
    def phone(self) -> str:  # as typed: spaces
        d = self.phone_digits
        return f"+47 {d[:3]} {d[3:5]} {d[5:]}"

    @property
    def phone_e164(self) -> str:
        return "+47" + self.phone_digits

    def needles(self) -> list[bytes]:
        """What must not be found in any file after an erasure."""
        return [
            self.email.lower().encode(),
            self.user_id.encode(),
            self.anonymous_id.encode(),
            self.phone_e164.encode(),
            self.phone.encode(),
        ]


def mid() -> str:
    return f"m-{uuid.uuid4().hex}"


def send(server: Server, *messages: dict[str, Any], key: str = BACKEND_KEY) -> dict[str, Any]:
    """A batch with the write key as Basic auth (server SDKs); every message gets an id."""
    batch = [{"messageId": mid(), **m} for m in messages]
    answer = httpx.post(f"{server.url}/v1/batch", json={"batch": batch}, auth=(key, ""))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def send_unparseable(server: Server, person: Person) -> None:
    """A body cut off mid-way that names the person: refused, kept as sent in dead letters."""
    body = f'{{"type": "identify", "userId": "{person.user_id}", '
    body += f'"traits": {{"email": "{person.email}"'
    answer = httpx.post(
        f"{server.url}/v1/identify",
        content=body.encode(),
        auth=(BACKEND_KEY, ""),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert person.email not in answer.text


def send_like_kjs(server: Server, *messages: dict[str, Any]) -> dict[str, Any]:
    """A batch the way k.js sends it: writeKey in the body, no auth header, text/plain."""
    batch = [{"messageId": mid(), **m} for m in messages]
    answer = httpx.post(
        f"{server.url}/v1/batch",
        content=orjson.dumps({"batch": batch, "writeKey": WEB_KEY}),
        headers={"Content-Type": "text/plain"},
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def api(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=server.admin, timeout=120, **kwargs)


def privacy(server: Server, path: str, body: dict[str, Any], status: int = 200) -> Any:
    answer = api(server, "POST", f"/api/privacy/{path}", json=body)
    assert answer.status_code == status, answer.text
    return answer.json() if "json" in answer.headers.get("content-type", "") else answer


def events(server: Server, **filters: str) -> list[dict[str, Any]]:
    answer = api(server, "GET", "/api/events", params={"limit": 1000, **filters})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["events"]
    return found


def scan(data_dir: Path, needles: list[bytes]) -> list[tuple[str, str]]:
    """(file, needle) for every needle found in the raw bytes of any file under data_dir."""
    hits = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            data = path.read_bytes().lower()
            for needle in needles:
                if needle.lower() in data:
                    hits.append((str(path.relative_to(data_dir)), needle.decode()))
    return hits


def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def refresh_profiles(server: Server) -> None:
    assert api(server, "POST", "/api/profiles/refresh").status_code == 200


def submit_form(
    server: Server, form: str, fields: dict[str, str], *, visitor: str | None = None
) -> httpx.Response:
    """Fill in a hosted form as a browser would (CSRF token from the page, the k.js cookie)."""
    cookies = {"kilde_aid": visitor} if visitor else {}
    with httpx.Client(base_url=server.url, cookies=cookies) as client:
        page = client.get(f"/f/{form}")
        assert page.status_code == 200, page.text
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        return client.post(f"/f/{form}", data={"csrf": token.group(1), **fields})


def contacts_csv(path: Path, *people: Person) -> Path:
    rows = ["Contact ID,E-mail,First name,Last name,Phone,Town,Country,Signed up,Newsletter"]
    for p in people:
        rows.append(f"crm-{p.tag},{p.email},Ingrid,Test,{p.phone},Tromsø,NO,2025-03-14,yes")
    path.write_text("\n".join(rows) + "\n")
    return path


def broker_csv(path: Path, *people: Person) -> Path:
    rows = ["email,household_size,interests,income_band"]
    rows += [f"{p.email},3,hiking;skiing,high" for p in people]
    path.write_text("\n".join(rows) + "\n")
    return path
