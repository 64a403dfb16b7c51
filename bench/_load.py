"""Load generation for the benchmarks: realistic Segment events and a lean HTTP/1.1 client.

The events are what analytics.js and the server SDKs send to a shop like the demo's: page
views, product views, cart adds and identifies, about 600 bytes each as JSON, all allowed by
the demo plan (src/kilde/demo/kilde.yaml), so every one of them is stored.

The client speaks HTTP/1.1 with keep-alive over asyncio streams. It does the least work a
client can (one pre-encoded request head, a Content-Length read), so the load process is not
the bottleneck; bench/ingest.py measures the CPU it used to show that.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

WEB_KEY = "demo-web-write-key"

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.7 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Linux; Android 13; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Mobile Safari/537.36",
]
IP_PREFIXES = ["84.208.20", "89.10.140", "81.2.69", "78.46.10", "193.150.22", "217.65.12"]
PRODUCTS = [
    ("p-ten-0", "FF-TEN-000", "Fjellbu 2 tent", "tents", 3490.0),
    ("p-ten-1", "FF-TEN-001", "Vidde 3 tent", "tents", 4990.0),
    ("p-jac-0", "FF-JAC-000", "Storm shell", "jackets", 2890.0),
    ("p-jac-2", "FF-JAC-002", "Fleece", "jackets", 890.0),
    ("p-boo-0", "FF-BOO-000", "Trail boot", "boots", 1990.0),
    ("p-pac-1", "FF-PAC-001", "Trekking pack 60 l", "packs", 2790.0),
    ("p-sle-2", "FF-SLE-002", "Sleeping mat", "sleeping", 690.0),
]
CITIES = [("Oslo", "NO"), ("Bergen", "NO"), ("Stockholm", "SE"), ("Berlin", "DE")]
SITE = "https://fjordfell.example"


def _context(rng: random.Random, path: str) -> dict[str, Any]:
    context: dict[str, Any] = {
        "ip": f"{rng.choice(IP_PREFIXES)}.{rng.randint(1, 254)}",
        "userAgent": rng.choice(USER_AGENTS),
        "locale": "nb-NO",
        "library": {"name": "analytics.js", "version": "5.2.0"},
        "page": {"path": path, "url": SITE + path, "referrer": "https://www.google.com/"},
    }
    if rng.random() < 0.3:
        context["campaign"] = {"source": "newsletter", "medium": "email", "name": "november"}
    return context


def make_event(rng: random.Random) -> dict[str, Any]:
    """One message without messageId and timestamps (stamped when sent)."""
    anon = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    ids: dict[str, Any] = {"anonymousId": anon}
    if rng.random() < 0.4:
        ids["userId"] = f"cust-{rng.randint(1, 200_000):06d}"
    pid, sku, name, category, price = rng.choice(PRODUCTS)
    roll = rng.random()
    if roll < 0.35:
        path = f"/p/{pid}"
        return {
            "type": "page",
            "name": "Product",
            "properties": {"path": path, "url": SITE + path, "title": name},
            "context": _context(rng, path),
            **ids,
        }
    if roll < 0.75:
        path = f"/p/{pid}"
        return {
            "type": "track",
            "event": "Product Viewed",
            "properties": {
                "product_id": pid,
                "sku": sku,
                "name": name,
                "category": category,
                "price": price,
                "currency": "NOK",
            },
            "context": _context(rng, path),
            **ids,
        }
    if roll < 0.92:
        return {
            "type": "track",
            "event": "Product Added",
            "properties": {
                "cart_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "product_id": pid,
                "sku": sku,
                "price": price,
                "quantity": rng.randint(1, 3),
            },
            "context": _context(rng, "/cart"),
            **ids,
        }
    city, country = rng.choice(CITIES)
    user = f"cust-{rng.randint(1, 200_000):06d}"
    return {
        "type": "identify",
        "userId": user,
        "anonymousId": anon,
        "traits": {
            "email": f"{user}@example.com",
            "first_name": "Ingrid",
            "last_name": "Hansen",
            "city": city,
            "country": country,
            "newsletter": rng.random() < 0.4,
        },
        "context": _context(rng, "/account"),
    }


def event_pool(seed: int, size: int = 2000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_event(rng) for _ in range(size)]


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Stamper:
    """Hands out events from the pool with fresh message ids and the current time."""

    def __init__(self, pool: list[dict[str, Any]], prefix: str) -> None:
        self.pool = pool
        self.prefix = prefix
        self.count = 0

    def events(self, n: int) -> list[dict[str, Any]]:
        now = iso_now()
        out = []
        pool = self.pool
        size = len(pool)
        for _ in range(n):
            self.count += 1
            event = dict(pool[self.count % size])
            event["messageId"] = f"{self.prefix}-{self.count}"
            event["timestamp"] = now
            out.append(event)
        return out

    def batch_body(self, n: int) -> bytes:
        return orjson.dumps({"batch": self.events(n), "sentAt": iso_now()})

    def single_body(self) -> tuple[str, bytes]:
        event = self.events(1)[0]
        kind = event.pop("type")
        event["sentAt"] = event["timestamp"]
        return f"/v1/{kind}", orjson.dumps(event)


def basic_auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection; requests are sent one after another."""

    def __init__(self, host: str, port: int, auth: str) -> None:
        self.host = host
        self.port = port
        self.auth = auth
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: {self.auth}\r\nContent-Type: application/json\r\n"
            f"User-Agent: kilde-bench\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class LoadResult:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    events_acked: int = 0
    events_rejected: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    error_samples: list[str] = field(default_factory=list)


async def _drive(
    host: str,
    port: int,
    connections: int,
    duration: float,
    batch_size: int,
    seed: int,
    prefix: str,
) -> LoadResult:
    """Keep `connections` requests in flight for `duration` seconds.

    batch_size > 0 posts /v1/batch bodies of that many events; 0 posts single events to
    /v1/<type>, as browsers do.
    """
    result = LoadResult()
    pool = event_pool(seed)
    auth = basic_auth(WEB_KEY)
    deadline = time.perf_counter() + duration

    async def one(number: int) -> None:
        stamper = Stamper(pool, f"{prefix}-c{number}")
        conn = Connection(host, port, auth)
        await conn.open()
        try:
            while time.perf_counter() < deadline:
                if batch_size:
                    path, body = "/v1/batch", stamper.batch_body(batch_size)
                    sent = batch_size
                else:
                    path, body = stamper.single_body()
                    sent = 1
                started = time.perf_counter()
                status, payload = await conn.post(path, body)
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                result.requests += 1
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if 200 <= status < 300:
                    answer = orjson.loads(payload)
                    result.ok += 1
                    result.events_acked += int(answer.get("stored", sent))
                    result.events_rejected += len(answer.get("rejected", []))
                    if answer.get("rejected") and len(result.error_samples) < 3:
                        result.error_samples.append(payload[:300].decode(errors="replace"))
                else:
                    result.failed += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(
                            f"{status} {payload[:300].decode(errors='replace')}"
                        )
        finally:
            conn.close()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(connections)))
    result.wall_s = time.perf_counter() - wall0
    result.cpu_s = time.process_time() - cpu0
    return result


def run_load(
    host: str,
    port: int,
    connections: int,
    duration: float,
    batch_size: int,
    seed: int,
    prefix: str,
) -> LoadResult:
    """Entry of the load process (a separate process from both the server and the bench)."""
    drive = _drive(host, port, connections, duration, batch_size, seed, prefix)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(drive)
    return uvloop.run(drive)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
