"""The demo shop's company records, imported the way a user imports theirs.

`kilde demo` writes four files under the data directory (demo-imports/): the order history of
the year before the web tracking started (CSV, one row per order line), a CRM export (CSV), a
helpdesk export with the free text of tickets and sales notes (JSON Lines) and a file bought
from a data broker (CSV, with its mapping). Then it imports each through the same engine and
admin API as `kilde import`. Same seed, same files, same message ids: running the demo again
stores nothing twice.
"""

from __future__ import annotations

import csv
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from kilde.collect.importers.base import Kind
from kilde.collect.importers.engine import run_import
from kilde.collect.importers.mapping import BrokerTerms, MappingFile
from kilde.collect.importers.sink import ApiSink
from kilde.demo.generator import PRODUCTS, Person, _people
from kilde.plan import load_plan

SUPPORT_TEXTS = [
    ("Broken zipper", "The zipper on my new jacket broke after two days. Very disappointed."),
    ("Where is my order?", "My order has not arrived yet and nobody answers. This is frustrating."),
    ("Size exchange", "Could I exchange the boots for one size bigger? Thanks for the help!"),
    ("Great tent", "Just wanted to say the tent was excellent on our trip, thank you!"),
    ("Invoice copy", "Please send me a copy of the invoice for my last order."),
    ("Wrong item", "I received the wrong item. Not happy, I needed it for the weekend."),
]
SALES_TEXTS = [
    ("Club order", "Good meeting with the hiking club; they want a quote for 20 daypacks."),
    ("School trip", "The school is interested in renting tents for a trip in May."),
    ("Company gifts", "They loved the fleece samples and will order 50 for Christmas."),
]
INTERESTS = ["hiking", "skiing", "climbing", "camping", "running", "fishing"]


def _orders(path: Path, people: list[Person], rng: random.Random, before: datetime) -> int:
    """Order lines of the year before `before`; a few refunds."""
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(
            [
                "Order No.",
                "Customer ID",
                "Order date",
                "SKU",
                "Product",
                "Category",
                "Unit price",
                "Qty",
                "Order total",
                "Currency",
                "Status",
            ]
        )
        number = 50_000
        for person in people:
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                number += 1
                at = before - timedelta(seconds=rng.randint(86_400, 365 * 86_400))
                lines = [(p, rng.randint(1, 2)) for p in rng.sample(PRODUCTS, rng.randint(1, 3))]
                total = round(sum(float(p["price"]) * q for p, q in lines), 2)
                stamp = at.strftime("%Y-%m-%d %H:%M:%S")
                for product, quantity in lines:
                    out.writerow(
                        [
                            f"H-{number}",
                            person.user_id,
                            stamp,
                            product["sku"],
                            product["name"],
                            product["category"],
                            f"{product['price']:.2f}",
                            quantity,
                            f"{total:.2f}",
                            "NOK",
                            "completed",
                        ]
                    )
                    rows += 1
                if rng.random() < 0.05:
                    back = (at + timedelta(days=rng.randint(3, 20))).strftime("%Y-%m-%d %H:%M:%S")
                    out.writerow(
                        [
                            f"H-{number}",
                            person.user_id,
                            back,
                            *[""] * 5,
                            f"{total:.2f}",
                            "NOK",
                            "refunded",
                        ]
                    )
                    rows += 1
    return rows


def _contacts(path: Path, people: list[Person], rng: random.Random, before: datetime) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["Contact ID", "E-mail", "First name", "Last name", "Mobile", "Town"])
        for person in people:
            if rng.random() < 0.6:
                phone = f"+47 9{rng.randint(1000000, 9999999)}" if rng.random() < 0.5 else ""
                out.writerow(
                    [
                        person.user_id,
                        person.email,
                        person.first_name,
                        person.last_name,
                        phone,
                        person.city,
                    ]
                )
                rows += 1
    return rows


def _tickets(path: Path, people: list[Person], rng: random.Random, before: datetime) -> int:
    rows = 0
    with path.open("wb") as handle:
        for number, person in enumerate(rng.sample(people, max(1, len(people) // 5))):
            sales = rng.random() < 0.25
            topic, text = rng.choice(SALES_TEXTS if sales else SUPPORT_TEXTS)
            at = before + timedelta(seconds=rng.randint(0, 60 * 86_400))
            ticket = {
                "ticket_id": f"T-{70_000 + number}",
                "requester": {"email": person.email},
                "created_at": at.isoformat().replace("+00:00", "Z"),
                "channel": rng.choice(["email", "chat", "phone"] if not sales else ["meeting"]),
                "subject": topic,
                "description": text,
                "team": "sales" if sales else "support",
            }
            handle.write(orjson.dumps(ticket) + b"\n")
            rows += 1
    return rows


def _broker(path: Path, people: list[Person], rng: random.Random) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["email", "household_size", "interests", "income_band"])
        for person in rng.sample(people, max(1, len(people) // 4)):
            out.writerow(
                [
                    person.email,
                    rng.randint(1, 5),
                    ";".join(rng.sample(INTERESTS, 2)),
                    rng.choice(["low", "medium", "high"]),
                ]
            )
            rows += 1
        for n in range(max(1, len(people) // 10)):  # people the shop does not know
            out.writerow([f"prospect{n}@example.net", rng.randint(1, 5), "hiking", "medium"])
            rows += 1
    return rows


def send_import_demo(
    client: Any, *, customers: int, seed: int, console: Console | None = None
) -> dict[str, int]:
    """Write the demo's company files and import them; records stored per kind."""
    settings = client.settings
    plan = load_plan(settings.plan_path)
    folder = Path(settings.data_dir) / "demo-imports"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    people = _people(rng, customers)
    rng = random.Random(seed * 7919 + 1)
    # The web history covers the last 90 days at most; company records go further back.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=90)
    files: list[tuple[Kind, Path, str, MappingFile]] = []
    orders = folder / "order-history.csv"
    _orders(orders, people, rng, start)
    files.append(("transactions", orders, "shop-orders", MappingFile()))
    crm = folder / "crm-export.csv"
    _contacts(crm, people, rng, start)
    files.append(("contacts", crm, "crm", MappingFile()))
    tickets = folder / "helpdesk-export.jsonl"
    _tickets(tickets, people, rng, start)
    files.append(
        (
            "interactions",
            tickets,
            "support",
            MappingFile(
                columns={
                    "email": "requester.email",
                    "interaction_type": "team",
                    "topic": "subject",
                    "text": "description",
                }
            ),
        )
    )
    bought = folder / "nordic-data-2026.csv"
    _broker(bought, people, rng)
    acquired = date(today.year, 1, 2) if today.month > 1 else today.date()
    terms = BrokerTerms(
        name="Nordic Data AS",
        acquired=acquired,
        licence_expires=acquired.replace(year=acquired.year + 1),
        purpose="advertising",
    )
    files.append(("broker", bought, "databroker", MappingFile(broker=terms)))
    stored: dict[str, int] = {}
    for kind, path, source, mapping in files:
        if plan.source(source) is None:
            continue  # a plan without this source: the demo leaves this file out
        summary = run_import(
            path,
            kind=kind,
            source=source,
            plan=plan,
            mapping=mapping,
            sink=ApiSink(client, kind, source, dry_run=False),
        )
        stored[kind] = summary.stored
        if console is not None:
            console.print(
                f"  imported {path.name}: {summary.stored} stored, {summary.duplicates} already "
                f"there, {summary.rejected} rejected",
                highlight=False,
            )
    return stored
