"""A synthetic outdoor shop: customers with several devices, sessions, carts and orders.

Everything is sent through the collection API with the plan's write keys, so the demo data
takes exactly the path real data takes. The same seed always gives the same shop, with the same
message ids, so running the demo twice stores nothing twice.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress

from kilde.errors import KildeError

CATEGORIES = {
    "tents": [("Fjellbu 2 tent", 3490.0), ("Vidde 3 tent", 4990.0), ("Tarp 3x3", 790.0)],
    "jackets": [("Storm shell", 2890.0), ("Down jacket", 2290.0), ("Fleece", 890.0)],
    "boots": [("Trail boot", 1990.0), ("Winter boot", 2490.0), ("Approach shoe", 1490.0)],
    "packs": [("Daypack 25 l", 990.0), ("Trekking pack 60 l", 2790.0)],
    "sleeping": [("Summer bag", 1290.0), ("Winter bag", 3290.0), ("Sleeping mat", 690.0)],
}
PRODUCTS: list[dict[str, Any]] = [
    {
        "product_id": f"p-{c[:3]}-{i}",
        "sku": f"FF-{c[:3].upper()}-{i:03d}",
        "name": n,
        "category": c,
        "price": p,
    }
    for c, items in CATEGORIES.items()
    for i, (n, p) in enumerate(items)
]
FIRST = [
    "Ingrid",
    "Ola",
    "Sara",
    "Lars",
    "Nora",
    "Emil",
    "Maja",
    "Jonas",
    "Ida",
    "Henrik",
    "Astrid",
    "Magnus",
    "Liv",
    "Sander",
    "Thea",
    "Erik",
    "Sofie",
    "Kristian",
    "Eva",
    "Tor",
]
LAST = [
    "Hansen",
    "Johansen",
    "Olsen",
    "Larsen",
    "Andersen",
    "Pedersen",
    "Nilsen",
    "Berg",
    "Haugen",
    "Bakken",
    "Lie",
    "Dahl",
    "Moen",
    "Strand",
    "Lund",
]
CITIES = [
    ("Oslo", "NO"),
    ("Bergen", "NO"),
    ("Trondheim", "NO"),
    ("Stockholm", "SE"),
    ("Gothenburg", "SE"),
    ("Copenhagen", "DK"),
    ("Berlin", "DE"),
    ("London", "GB"),
]
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
]
# Public addresses from several countries, so the geo enrichment has something to show.
IP_PREFIXES = ["84.208.20", "89.10.140", "81.2.69", "78.46.10", "193.150.22", "217.65.12"]
CAMPAIGNS = [
    {"source": "google", "medium": "cpc", "name": "winter-sale"},
    {"source": "newsletter", "medium": "email", "name": "november-news"},
    {"source": "instagram", "medium": "social", "name": "hiking-reels"},
    None,
    None,
    None,
]
BATCH_SIZE = 400


class ApiClient(Protocol):
    def post(self, path: str, **kwargs: Any) -> Any: ...


@dataclass
class Person:
    user_id: str
    email: str
    first_name: str
    last_name: str
    city: str
    country: str
    devices: list[tuple[str, str, str]] = field(default_factory=list)  # anon id, UA, IP


def _people(rng: random.Random, count: int) -> list[Person]:
    people = []
    for n in range(count):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        city, country = rng.choice(CITIES)
        person = Person(
            user_id=f"cust-{n + 1:06d}",
            email=f"{first}.{last}{n}@example.com".lower(),
            first_name=first,
            last_name=last,
            city=city,
            country=country,
        )
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            anon = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            ip = f"{rng.choice(IP_PREFIXES)}.{rng.randint(1, 254)}"
            person.devices.append((anon, rng.choice(USER_AGENTS), ip))
        people.append(person)
    return people


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def generate(
    customers: int, days: int, seed: int, now: datetime | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (source name, Segment message) in time order per person."""
    for _, source, message in generate_with_truth(customers, days, seed, now):
        yield source, message


def generate_with_truth(
    customers: int, days: int, seed: int, now: datetime | None = None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (who really sent it, source name, Segment message): the identity truth."""
    for person, source, message in _generate(customers, days, seed, now):
        yield person.user_id, source, message


def _generate(
    customers: int, days: int, seed: int, now: datetime | None = None
) -> Iterator[tuple[Person, str, dict[str, Any]]]:
    rng = random.Random(seed)
    # The identity cases draw from their own generator, so the shop itself stays as it was.
    xrng = random.Random(seed * 1_000_003 + 17)
    kiosk = str(uuid.UUID(int=xrng.getrandbits(128), version=4))
    previous: Person | None = None
    now = now or datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=days)
    for person in _people(rng, customers):
        yield from ((person, src, msg) for src, msg in _shop(person, rng, start, days))
        for src, msg in _identity_cases(person, previous, kiosk, xrng, start, days):
            yield person, src, msg
        previous = person


def _shop(
    person: Person, rng: random.Random, start: datetime, days: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """One person's sessions, carts and orders."""

    def mid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    signed_up = False
    for _ in range(rng.randint(1, 8)):
        anon, ua, ip = rng.choice(person.devices)
        at = start + timedelta(seconds=rng.randint(0, days * 86400 - 3600))
        campaign = rng.choice(CAMPAIGNS)
        context: dict[str, Any] = {"ip": ip, "userAgent": ua, "locale": "nb-NO"}
        if campaign:
            context["campaign"] = campaign
        known = signed_up and rng.random() < 0.7
        ids = {"anonymousId": anon, **({"userId": person.user_id} if known else {})}

        def message(kind: str, **body: Any) -> dict[str, Any]:
            nonlocal at
            at += timedelta(seconds=rng.randint(5, 120))
            return {
                "type": kind,
                "messageId": mid(),
                "timestamp": _iso(at),
                "context": dict(context),  # noqa: B023 - called within this iteration only
                **ids,  # noqa: B023
                **body,
            }

        yield (
            "web",
            message(
                "page",
                name="Home",
                properties={
                    "path": "/",
                    "url": "https://fjordfell.example/",
                    "title": "Fjord & Fell",
                },
            ),
        )
        viewed = rng.sample(PRODUCTS, rng.randint(1, 4))
        for product in viewed:
            yield (
                "web",
                message(
                    "page",
                    name="Product",
                    properties={
                        "path": f"/p/{product['product_id']}",
                        "url": f"https://fjordfell.example/p/{product['product_id']}",
                    },
                ),
            )
            yield (
                "web",
                message("track", event="Product Viewed", properties={**product, "currency": "NOK"}),
            )
        if rng.random() < 0.05:
            # Not in the plan: the web source is strict, so this lands in the dead letter.
            yield (
                "web",
                message(
                    "track",
                    event="Wishlist Added",
                    properties={"product_id": viewed[0]["product_id"]},
                ),
            )
        if not signed_up and rng.random() < 0.5:
            signed_up = True
            ids = {"anonymousId": anon, "userId": person.user_id}
            yield (
                "web",
                message(
                    "identify",
                    traits={
                        "email": person.email,
                        "first_name": person.first_name,
                        "last_name": person.last_name,
                        "city": person.city,
                        "country": person.country,
                        "created_at": _iso(at),
                        "newsletter": rng.random() < 0.4,
                    },
                ),
            )
            yield (
                "web",
                message(
                    "track",
                    event="Signed Up",
                    properties={"method": rng.choice(["email", "google"])},
                ),
            )
        if rng.random() < 0.45:
            cart = [(p, rng.randint(1, 2)) for p in viewed[: rng.randint(1, len(viewed))]]
            cart_id = mid()
            for product, quantity in cart:
                yield (
                    "web",
                    message(
                        "track",
                        event="Product Added",
                        properties={"cart_id": cart_id, **product, "quantity": quantity},
                    ),
                )
            value = round(sum(float(p["price"]) * q for p, q in cart), 2)
            if signed_up and rng.random() < 0.6:
                yield (
                    "web",
                    message(
                        "track",
                        event="Checkout Started",
                        properties={"cart_id": cart_id, "value": value, "currency": "NOK"},
                    ),
                )
                order = message(
                    "track",
                    event="Order Completed",
                    properties={
                        "order_id": f"o-{mid()[:8]}",
                        "revenue": value,
                        "currency": "NOK",
                        "products": [{**p, "quantity": q} for p, q in cart],
                    },
                )
                order["userId"] = person.user_id
                order["context"] = {"library": {"name": "analytics-python"}}
                yield "backend", order
        if rng.random() < 0.15:
            app_context = {
                "app": {"name": "Fjord & Fell", "version": "3.2.0"},
                "os": {"name": "Android"},
                "ip": ip,
            }
            yield (
                "app",
                {
                    "type": "screen",
                    "messageId": mid(),
                    "name": "Catalogue",
                    "timestamp": _iso(at),
                    "context": app_context,
                    **ids,
                },
            )
            if rng.random() < 0.3:
                # Not yet in the plan: the app source is in warn mode, so it is flagged.
                yield (
                    "app",
                    {
                        "type": "track",
                        "event": "Push Opened",
                        "messageId": mid(),
                        "timestamp": _iso(at),
                        "context": app_context,
                        **ids,
                    },
                )


TYPOS = ("exmaple.com", "example.co", "examlpe.com")
TRUTH_FILE = "demo-truth.parquet"


def _phone(rng: random.Random) -> str:
    return f"+47 {rng.choice('49')}{rng.randint(0, 9_999_999):07d}"


def _identity_cases(
    person: Person,
    previous: Person | None,
    kiosk: str,
    rng: random.Random,
    start: datetime,
    days: int,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """What makes identity resolution hard: new phones, typos, shared devices, a kiosk."""

    def message(kind: str, anon: str | None, user: bool, **body: Any) -> dict[str, Any]:
        at = start + timedelta(seconds=rng.randint(0, days * 86400 - 60))
        msg: dict[str, Any] = {
            "type": kind,
            "messageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "timestamp": _iso(at),
            **body,
        }
        if anon:
            msg["anonymousId"] = anon
        if user:
            msg["userId"] = person.user_id
        return msg

    local, _, _domain = person.email.partition("@")
    home = {"path": "/", "url": "https://fjordfell.example/"}
    if rng.random() < 0.25:  # a phone number in the app, and for some a new one later
        app_device = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        yield "app", message("identify", app_device, True, traits={"phone": _phone(rng)})
        if rng.random() < 0.4:
            yield "app", message("identify", app_device, True, traits={"phone": _phone(rng)})
    if rng.random() < 0.06:  # the order system holds a mistyped address, with the user id
        typo = f"{local}@{rng.choice(TYPOS)}"
        yield "backend", message("identify", None, True, traits={"email": typo})
    if rng.random() < 0.03:  # a newsletter signup on a new device, mistyped, never logged in
        device = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        typo = f"{local}@{rng.choice(TYPOS)}"
        yield "web", message("page", device, False, name="Home", properties=home)
        yield "web", message("identify", device, False, traits={"email": typo})
    if previous is not None and rng.random() < 0.05:  # the family laptop
        laptop = previous.devices[0][0]
        yield "web", message("page", laptop, False, name="Home", properties=home)
        yield "web", message("identify", laptop, True, traits={"email": person.email})
    if rng.random() < 0.02:  # the shop's kiosk, where many people sign in
        yield "web", message("page", kiosk, False, name="Home", properties=home)
        yield "web", message("identify", kiosk, True, traits={"email": person.email})


def write_truth(data_dir: Path, truth: dict[str, str]) -> Path:
    """Who really sent each demo message (message id -> person), for `kilde identity report`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data_dir / TRUTH_FILE
    merged: dict[str, str] = {}
    if path.exists():
        old = pq.read_table(path).to_pydict()
        merged.update(zip(old["message_id"], old["person"], strict=True))
    merged.update(truth)
    data_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"message_id": list(merged), "person": list(merged.values())})
    pq.write_table(table, path)
    return path


def send_demo(
    client: ApiClient, *, customers: int, days: int, seed: int, console: Console | None = None
) -> dict[str, int]:
    from kilde.plan import load_plan

    settings = getattr(client, "settings", None)
    if settings is None:
        raise KildeError("the demo needs a Kilde client", fix="run `kilde demo`")
    plan = load_plan(settings.plan_path)
    keys = {s.name: s.write_keys[0] for s in plan.sources if s.write_keys}
    pending: dict[str, list[dict[str, Any]]] = {}
    summary = {"events": 0, "stored": 0, "duplicates": 0, "rejected": 0}

    def flush(source: str) -> None:
        batch = pending.pop(source, [])
        if not batch:
            return
        result = client.post(
            "/v1/batch",
            json={"batch": batch, "sentAt": _iso(datetime.now(UTC))},
            auth=(keys[source], ""),
        )
        summary["stored"] += result["stored"]
        summary["duplicates"] += result["duplicates"]
        summary["rejected"] += len(result["rejected"])

    with Progress(console=console, transient=True, disable=console is None) as progress:
        task = progress.add_task("sending the demo shop", total=customers)
        last_user = ""
        truth: dict[str, str] = {}
        for person, source, message in generate_with_truth(customers, days, seed):
            truth[message["messageId"]] = person
            if source not in keys:
                raise KildeError(
                    f"the plan has no write key for source {source!r}",
                    fix="use the demo plan, or add the source to your plan",
                )
            pending.setdefault(source, []).append(message)
            summary["events"] += 1
            if len(pending[source]) >= BATCH_SIZE:
                flush(source)
            user = message.get("userId") or ""
            if user and user != last_user:
                last_user = user
                progress.update(task, completed=int(user.split("-")[-1]))
        for source in list(pending):
            flush(source)
    write_truth(settings.data_dir, truth)
    return summary
