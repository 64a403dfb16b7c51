"""A 2xx means the data is on disk: kill -9 the server under load and count what survived."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import WEB_KEY, Server, start_server

LOADERS = 4
BATCH = 50


@dataclass
class Load:
    """Loader threads that post batches until the server dies, recording what was acked."""

    url: str
    acknowledged: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    failed_after_kill: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    killed: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for number in range(LOADERS):
            thread = threading.Thread(target=self._post_until_dead, args=(number,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _post_until_dead(self, number: int) -> None:
        sequence = 0
        with httpx.Client(base_url=self.url, auth=(WEB_KEY, ""), timeout=30) as client:
            while True:
                ids = [f"crash-{number}-{sequence + i}" for i in range(BATCH)]
                sequence += BATCH
                batch = [_event(message_id, number) for message_id in ids]
                with self.lock:
                    self.sent.update(ids)
                try:
                    response = client.post("/v1/batch", json={"batch": batch})
                except httpx.TransportError:
                    if self.killed.is_set():
                        with self.lock:
                            self.failed_after_kill.add(number)
                        return
                    time.sleep(0.05)  # a hiccup before the kill: try the next batch
                    continue
                body = response.json() if response.status_code == 200 else {}
                if response.status_code != 200 or body.get("rejected"):
                    with self.lock:
                        self.unexpected.append(f"{response.status_code} {response.text[:200]}")
                    continue
                with self.lock:
                    self.acknowledged.update(ids)

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)


def _event(message_id: str, number: int) -> dict[str, object]:
    return {
        "type": "track",
        "event": "Product Added",
        "messageId": message_id,
        "anonymousId": f"crash-device-{number}",
        "properties": {"product_id": "p-ten-0", "sku": "FF-TEN-000", "quantity": 1},
        "context": {
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
            "page": {"path": "/p/p-ten-0", "url": "https://fjordfell.example/p/p-ten-0"},
        },
    }


def stored_ids(server: Server) -> list[str]:
    """Every message id in the store, page by page through the admin API."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"source": "web", "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(
            f"{server.url}/api/events", params=params, headers=server.admin, timeout=60
        ).json()
        ids.extend(e["message_id"] for e in page["events"])
        cursor = page["next_cursor"]
        if not cursor:
            return ids


def test_every_acknowledged_event_survives_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    load = Load(server.url)
    try:
        load.start()
        # A few seconds of load, and enough acknowledged data to span several group commits.
        deadline = time.monotonic() + 60
        started = time.monotonic()
        while time.monotonic() < deadline and (
            load.count() < 3000 or time.monotonic() - started < 3
        ):
            time.sleep(0.05)
        load.killed.set()
        server.kill()  # kill -9 while every loader has a request in flight or about to be
        for thread in load.threads:
            thread.join(timeout=60)
    finally:
        server.stop()

    assert not load.unexpected, load.unexpected[:3]
    assert load.count() >= 1000, "too little load ran before the kill to show anything"
    # Every loader was still posting when the server died (its next request failed).
    assert load.failed_after_kill == set(range(LOADERS))

    restarted = start_server(data)
    try:
        ids = stored_ids(restarted)
    finally:
        restarted.stop()
    stored = set(ids)
    lost = load.acknowledged - stored
    assert not lost, f"{len(lost)} acknowledged events are missing, e.g. {sorted(lost)[:5]}"
    assert len(ids) == len(stored), "some events were stored twice"
    assert stored <= load.sent, "the store holds events nobody sent"
