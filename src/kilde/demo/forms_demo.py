"""Demo answers to the demo shop's forms, posted through the hosted pages like a browser would.

Some customers sign up for the newsletter, a few schools and
clubs ask for group offers, and a quarter of the customers answer the NPS survey from a
personal link. Each post carries the visitor's `kilde_aid` cookie, so the answers join the
browsing of the same device.
"""

from __future__ import annotations

import random
import re
from typing import Any, Protocol

import httpx

from kilde.demo.generator import FIRST, LAST, _people

REASONS_GOOD = [
    "Fast delivery and the boots fit perfectly.",
    "Great advice in the chat, they really know their gear.",
    "Good prices and easy returns.",
    "The tent was exactly as described. Love it!",
]
REASONS_BAD = [
    "Delivery took almost two weeks.",
    "The jacket was out of stock after I ordered.",
    "Too expensive compared to other shops.",
    "Customer service never answered my email. Very disappointing.",
]
ORGANISATIONS = ["Vidda school", "Fjellklubben", "Nordlys scouts", "Bergen hiking club"]


class FormClient(Protocol):
    def raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response: ...

    def post(self, path: str, **kwargs: Any) -> Any: ...


def _csrf(html: str) -> str | None:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    return match.group(1) if match else None


def _submit(client: FormClient, path: str, data: dict[str, Any], visitor: str) -> int:
    page = client.raw("GET", path, cookies={"kilde_aid": visitor})
    token = _csrf(page.text)
    if token is None:
        return page.status_code
    form_path = path.split("?", 1)[0]
    answer = client.raw(
        "POST", form_path, data={"csrf": token, **data}, cookies={"kilde_aid": visitor}
    )
    return answer.status_code


def send_form_demo(client: FormClient, *, customers: int, seed: int) -> dict[str, int]:
    """Post demo answers; return how many were accepted and refused per form."""
    rng = random.Random(seed + 1)
    people = _people(random.Random(seed), customers)
    counts = {"newsletter": 0, "b2b-lead": 0, "nps": 0, "refused": 0}

    def count(form: str, status: int) -> None:
        counts[form if status == 200 else "refused"] += 1

    for person in people:
        visitor = person.devices[0][0]
        if rng.random() < 0.15:
            data: dict[str, Any] = {"email": person.email, "first_name": person.first_name}
            if rng.random() < 0.7:
                data["consent.marketing_email"] = "yes"
            count("newsletter", _submit(client, "/f/newsletter", data, visitor))
        if rng.random() < 0.02:
            lead = {
                "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                "email": person.email,
                "company": rng.choice(ORGANISATIONS),
                "role": rng.choice(["Teacher", "Club leader", "Purchaser"]),
                "size": rng.choice(["11-50", "51-200", "1-10"]),
                "needs": "Tents and sleeping bags for a spring trip.",
            }
            count("b2b-lead", _submit(client, "/f/b2b-lead", lead, visitor))
        if rng.random() < 0.25:
            invite = client.post("/api/forms/nps/invites", json={"user_id": person.user_id})
            path = "/f/nps?" + invite["url"].split("?", 1)[1]
            score = rng.choices(range(11), weights=[1, 1, 1, 2, 2, 3, 4, 8, 10, 12, 10])[0]
            answer: dict[str, Any] = {"t": path.split("t=", 1)[1], "score": str(score)}
            if rng.random() < 0.6:
                answer["reason"] = rng.choice(REASONS_GOOD if score >= 7 else REASONS_BAD)
            if score <= 6:
                answer["missing"] = rng.sample(["Delivery time", "Prices", "Customer service"], 1)
            count("nps", _submit(client, path, answer, visitor))
    return counts
