"""Webhook destinations that are down, stalled, refuse our credentials or are rate limited,
and plans that map to unknown fields or name deleted segments: each against a real server and
a real receiver on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson

from kilde.activate.webhooks import backoff
from tests.conftest import ADMIN_TOKEN, BACKEND_KEY, DEMO_PLAN, free_port, start_server
from tests.test_activation import SECRET, Receiver, order, plan_with, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def hook(name: str, url: str, **extra: Any) -> str:
    lines = [
        f"  - name: {name}",
        "    kind: webhook",
        "    purpose: order_fulfilment",
        f"    url: {url}",
        f"    secret: {SECRET}",
        "    events: [Order Completed]",
    ]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def test_down_refusing_stalled_and_rate_limited_receivers_never_hold_up_collection(
    tmp_path: Path,
) -> None:
    stalled, refusing, limited = Receiver(), Receiver(), Receiver()
    stalled.default = "hold"  # answers nothing until the test releases it
    refusing.default = "401"  # a wrong secret on the receiver's side
    closed_port = free_port()  # nobody listens here: unreachable
    plan = tmp_path / "kilde.yaml"
    plan.write_text(DEMO_PLAN.read_text())
    plan_with(
        plan,
        hook("down-hook", f"http://127.0.0.1:{closed_port}/hook", max_attempts=2)
        + hook("stalled-hook", stalled.url, timeout=60)
        + hook("refusing-hook", refusing.url)
        + hook("limited-hook", limited.url, rate_limit=2),
    )
    server = start_server(tmp_path / "data", plan, KILDE_DELIVERY_TICK="0.3")
    try:
        first = order("erin", 0)
        assert httpx.post(f"{server.url}/v1/track", json=first, auth=(BACKEND_KEY, "")).is_success
        # The stalled receiver now holds a request open and will not answer it...
        wait_for(lambda: stalled.received)
        # ...and collection goes on regardless: every event is acknowledged while one
        # destination hangs, one refuses and one is unreachable.
        people = ["finn", "gro", "hans", "ida", "jon", "kari", "liv", "mons"]
        sent = [first, order("erin", 1), order("erin", 2)] + [order(p, 1) for p in people]
        for message in sent[1:]:
            response = httpx.post(
                f"{server.url}/v1/track", json=message, auth=(BACKEND_KEY, ""), timeout=30
            )
            assert response.status_code == 200
        assert len(stalled.received) == 1  # still the one request, still unanswered
        stalled.release.set()

        def log_of(name: str) -> dict[str, Any]:
            response = httpx.get(
                f"{server.url}/api/destinations/{name}/deliveries",
                params={"limit": 1000},
                headers=ADMIN,
            )
            body: dict[str, Any] = response.json()
            return body

        def settled(name: str, count: int) -> bool:
            rows = log_of(name)["deliveries"]
            return len(rows) == count and all(r["state"] in ("delivered", "dead") for r in rows)

        for name in ("down-hook", "refusing-hook", "limited-hook", "stalled-hook"):
            wait_for(lambda name=name: settled(name, len(sent)), timeout=120)  # type: ignore[misc]
        down, refused = log_of("down-hook"), log_of("refusing-hook")
        listed = server.kilde("destinations", "list", "--json")
        logged = server.kilde("destinations", "log", "refusing-hook")
    finally:
        server.stop()
        for r in (stalled, refusing, limited):
            r.close()

    # Nothing lost: every event is in each destination's outbox; the unreachable one is dead
    # after its two attempts, with the reason, ready to be replayed.
    assert all(d["state"] == "dead" and d["attempts"] == 2 for d in down["deliveries"])
    assert {row["error"] for row in down["log"]} == {
        "ConnectError: the receiver is unreachable (connection failed)"
    }
    # A refusal of our credentials is not retried: dead after one attempt, saying what to do.
    assert all(d["state"] == "dead" and d["attempts"] == 1 for d in refused["deliveries"])
    assert len(refusing.received) == len(sent)
    assert {row["error"] for row in refused["log"]} == {
        "HTTP 401: the receiver refused our credentials or signature; check the secret, then replay"
    }
    assert "check the secret" in logged.stdout and "401" in logged.stdout
    counts = {d["name"]: d["deliveries"] for d in orjson.loads(listed.stdout)["destinations"]}
    assert counts["down-hook"]["dead"] == counts["refusing-hook"]["dead"] == len(sent)
    assert counts["stalled-hook"]["delivered"] == counts["limited-hook"]["delivered"] == len(sent)
    # The stalled receiver got every event once it answered, each person's in order.
    got = [d["data"]["message_id"] for d in stalled.accepted()]
    assert sorted(set(got)) == sorted(m["messageId"] for m in sent)
    erin = [m for m in got if m.startswith("erin")]
    assert erin == ["erin-order-0", "erin-order-1", "erin-order-2"]
    # Rate limit 2 per second: never more than 2 + 2 requests (the initial burst) in any second,
    # where an unlimited sender sends the nine people's first orders in the same instant.
    times = sorted(limited.arrivals)
    assert len(times) == len(sent)
    assert max(sum(1 for t in times if start <= t < start + 1) for start in times) <= 4


def test_unknown_mapped_fields_are_refused_with_their_place_in_the_plan(tmp_path: Path) -> None:
    plan = tmp_path / "kilde.yaml"
    plan.write_text(DEMO_PLAN.read_text())
    plan_with(
        plan,
        hook("mapped", "http://127.0.0.1:9/hook")
        + "    mapping:\n      order: properties.ordr_id\n      who: userid\n"
        + "      mail: traits.e_mail\n      amount: properties.revenue\n"
        # A partner export whose purpose does not rest on consent would sell without it.
        + "  - name: broker\n    kind: partner_export\n    purpose: analytics\n"
        + "    segments: [repeat-buyers-90d]\n",
    )
    result = subprocess_check(plan)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "destinations.0.mapping.order: unknown field 'properties.ordr_id'" in out
    assert "destinations.0.mapping.who: unknown field 'userid'" in out
    assert "destinations.0.mapping.mail: unknown field 'traits.e_mail'" in out
    assert "mapping.amount" not in out  # a declared property is fine
    assert (
        "destinations.1.purpose: a partner_export destination shares people with a third "
        "party; its purpose must rest on consent" in " ".join(out.split())
    )


def subprocess_check(plan: Path) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "kilde.cli", "plan", "check", str(plan)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_retries_back_off_exponentially_with_jitter_up_to_an_hour() -> None:
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 512.0), (40, 3600.0)):
        waits = [backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jitter: receivers are not hit in lockstep
