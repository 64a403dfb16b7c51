"""The worked examples of the activation pages (docs/activation*.md) run as written: their
destinations in one plan, the example data sent, each page's commands compared with the output
shown. Webhooks go to a receiver on loopback and uploads to a stand-in of the platform's API.

Markers (test_docs.py leaves them alone, as they need their own server and plan):
- `<!-- activation: data -->` a /v1/batch body sent by the shop's backend;
- `<!-- activation: plan -->` destinations added to the demo plan;
- `<!-- activation: bad-plan NAME -->` destinations added to the demo plan, written to NAME;
- `<!-- activation: run -->` a console block whose commands must print what it shows.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from tests.conftest import ADMIN_TOKEN, BACKEND_KEY, DEMO_PLAN, ROOT, start_server
from tests.test_activation import SECRET, Receiver, wait_for
from tests.test_activation_audiences import Platform, sha
from tests.test_docs import _run_console

MARK = re.compile(r"<!-- activation: ([^>]+?) -->\s*\n```[a-z]*\n(.*?)\n```", re.S)
PAGES = sorted((ROOT / "docs").glob("activation*.md"))


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in MARK.finditer(page.read_text())]


def test_every_destination_kind_has_a_page_with_a_worked_example() -> None:
    kinds: set[str] = set()
    for page in PAGES:
        for marker, text in blocks(page):
            if marker == "plan":
                kinds.update(d["kind"] for d in yaml.safe_load(text)["destinations"])
                assert any(m == "run" for m, _ in blocks(page)), page.name
    assert kinds == {
        "webhook",
        "google_customer_match",
        "meta_custom_audience",
        "file",
        "partner_export",
    }


def test_activation_pages_run_as_written(tmp_path: Path) -> None:
    receiver, platform = Receiver(), Platform()
    destinations: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    for page in PAGES:
        for marker, text in blocks(page):
            if marker == "plan":
                destinations += yaml.safe_load(text)["destinations"]
            elif marker == "data":
                data = orjson.loads(text)
    for destination in destinations:  # the network ends on loopback
        if destination["kind"] == "webhook":
            destination["url"] = receiver.url
        if "upload" in destination:
            destination["upload"]["api_url"] = f"{platform.url}/v21.0"
        destination.pop("schedule", None)  # run by the commands only, so outputs are as shown
    plan = tmp_path / "kilde.yaml"
    plan.write_text(DEMO_PLAN.read_text() + "\n" + yaml.safe_dump({"destinations": destinations}))
    server = start_server(
        tmp_path / "data",
        plan,
        KILDE_DELIVERY_BACKGROUND="0",
        KILDE_WINBACK_HOOK_SECRET=SECRET,
        META_ACCESS_TOKEN="meta-token-from-the-environment",
    )
    env = {
        **server.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        sent = httpx.post(f"{server.url}/v1/batch", json=data, auth=(BACKEND_KEY, ""))
        assert sent.status_code == 200, sent.text

        def members() -> bool:
            server.kilde("segment", "refresh", "repeat-buyers-90d")
            listed = httpx.get(
                f"{server.url}/api/segments/repeat-buyers-90d/members", headers=admin
            ).json()
            return bool(listed["total"] == 3)

        wait_for(members, timeout=120)
        work = tmp_path / "work"
        work.mkdir()
        for page in PAGES:
            for marker, text in blocks(page):
                if marker.startswith("bad-plan "):
                    name = marker.removeprefix("bad-plan ").strip()
                    (work / name).write_text(DEMO_PLAN.read_text() + "\n" + text + "\n")
                elif marker == "run":
                    _run_console(text, work, env)
    finally:
        server.stop()
        receiver.close()
        platform.close()

    # What the pages say the receivers got.
    hooked = [d["data"] for d in receiver.accepted()]
    assert sorted(d["customer"] for d in hooked) == ["alice", "bert"]
    assert {d["segment"] for d in hooked} == {"repeat-buyers-90d"}
    (method, path, headers, body), *_ = platform.requests
    assert (method, path) == ("POST", "/v21.0/23850000000000000/users")
    assert headers["Authorization"] == "Bearer meta-token-from-the-environment"
    assert [row[0] for row in body["payload"]["data"]] == [sha("alice.berg@gmail.com")]
    exports = tmp_path / "data" / "exports"
    (google_file,) = (exports / "google-winback").glob("*-add.csv")
    header, alice = google_file.read_text().splitlines()
    assert header == "Email,Phone,First Name,Last Name,Country,Zip"
    assert alice.split(",") == [
        sha("aliceberg@gmail.com"),
        sha("+4791234567"),
        sha("alice"),
        sha("berg"),
        "NO",
        "",
    ]
    (manifest,) = (exports / "partner-feed").glob("*.manifest.json")
    record = orjson.loads(manifest.read_bytes())
    assert (record["excluded_no_consent"], record["excluded_do_not_sell"]) == (1, 1)
    (crm,) = (exports / "crm-repeat-buyers").glob("*-add.csv")
    assert crm.read_text().splitlines()[0] == "profile_id,email,first_name,city"
