"""`Pipeline.ingest(records, source)`: the one entry every channel ends in.

normalize -> plan check -> enrich -> durable write. Rejected records become dead letters in the
same transaction as the accepted ones, so an acknowledged request has lost nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson

from kilde.pipeline.consent import is_consent_event, ledger_statements
from kilde.pipeline.dead_letter import dead_letter_row
from kilde.pipeline.enrich import Enricher, protect_ip
from kilde.pipeline.normalize import Envelope, Rejection, normalize
from kilde.pipeline.plan_check import PlanChecker
from kilde.plan.models import Plan, Source
from kilde.privacy.enforcement import CollectionScreen, Tally
from kilde.store.writer import WriteBatch, Writer
from kilde.thread_names import name_os_thread

# A batch of this many records is prepared on the preparer thread, not on the event loop. A
# 100-event batch takes about 3 ms of CPU; on the loop, every request whose commit was done
# waited behind whole batches before it could answer (bench/ingest.py: 15 ms on 8
# connections, 4 ms off the loop). One thread, so batches still go through in order.
OFF_LOOP_RECORDS = 20
_preparer = ThreadPoolExecutor(1, thread_name_prefix="kilde-prepare", initializer=name_os_thread)

T = TypeVar("T")


async def off_loop(work: Callable[..., T], *args: Any) -> T:
    """Run `work(*args)` on the preparer thread, so the event loop stays free meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(_preparer, work, *args)


_JSON_COLUMNS = ("properties", "traits", "context", "integrations")


@dataclass
class Outcome:
    """What happened to one record."""

    index: int
    # suppressed: the person is on the suppression list; withheld: no lawful basis (consent
    # gate). Neither is stored anywhere, not even as a dead letter (kilde.privacy).
    status: Literal["stored", "flagged", "dead_lettered", "suppressed", "withheld"]
    message_id: str | None = None
    code: str | None = None
    reason: str | None = None
    path: str | None = None
    fix: str | None = None
    dead_letter_id: str | None = None


@dataclass
class IngestResult:
    outcomes: list[Outcome] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    @property
    def rejected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "dead_lettered"]


@dataclass
class Prepared:
    """Rows ready for the writer, and one outcome per input record."""

    rows: list[dict[str, Any]]
    outcomes: list[Outcome]
    rejections: list[tuple[int, Rejection]]
    privacy: Tally = field(default_factory=Tally)


class Pipeline:
    def __init__(self, plan: Plan, writer: Writer) -> None:
        self.writer = writer
        self.plan = plan
        self.checker = PlanChecker(plan)
        self.enricher = Enricher(plan.privacy.ip)
        self.privacy = CollectionScreen(plan, writer)

    def use_plan(self, plan: Plan) -> None:
        """Switch to a new plan (for example after fixing it, before a replay)."""
        self.plan = plan
        self.checker = PlanChecker(plan)
        self.enricher.ip_policy = plan.privacy.ip
        self.privacy.use_plan(plan)

    # -- the stages ---------------------------------------------------------------------------

    def prepare(
        self,
        records: Sequence[Any],
        source: Source,
        env: Envelope,
        message_type: str | None = None,
        max_event_bytes: int | None = None,
    ) -> Prepared:
        rows: list[dict[str, Any]] = []
        outcomes: list[Outcome] = []
        rejections: list[tuple[int, Rejection]] = []
        tally = self.privacy.tally()
        suppressed = self.privacy.door(records, tally)  # people who must not be collected
        for index, record in enumerate(records):
            if index in suppressed:  # nothing of them is kept, not even a dead letter
                outcomes.append(Outcome(index, "suppressed"))
                continue
            try:
                if max_event_bytes is not None and len(orjson.dumps(record)) > max_event_bytes:
                    raise Rejection(
                        "event_too_large",
                        f"the event is larger than {max_event_bytes // 1024} KB",
                        fix="send fewer or shorter properties",
                    )
                row = normalize(record, message_type, source.name, env)
                issues = [] if is_consent_event(row) else self.checker.check(row)
                if issues and source.mode == "strict":
                    first = issues[0]
                    raise Rejection(
                        "off_plan",
                        "; ".join(i.message for i in issues),
                        path=first.path,
                        fix="change the sender, or add this to the collection plan and run "
                        "`kilde bad-events replay`",
                    )
                self.enricher.enrich(row, env.ip, env.user_agent)
            except Rejection as rejection:
                rejections.append((index, rejection))
                message_id = record.get("messageId") if isinstance(record, dict) else None
                outcomes.append(
                    Outcome(
                        index,
                        "dead_lettered",
                        message_id=message_id if isinstance(message_id, str) else None,
                        code=rejection.code,
                        reason=rejection.message,
                        path=rejection.path,
                        fix=rejection.fix,
                    )
                )
                continue
            withheld = self.privacy.gate(row, env.channel, tally)
            if withheld:
                outcomes.append(
                    Outcome(
                        index,
                        "withheld",
                        message_id=row["message_id"],
                        code="no_lawful_basis",
                        reason="not stored: the person has not consented to "
                        + " or ".join(withheld),
                    )
                )
                continue
            row["plan_status"] = "warn" if issues else "ok"
            row["plan_issues"] = (
                orjson.dumps([dataclasses.asdict(i) for i in issues]).decode() if issues else None
            )
            for column in _JSON_COLUMNS:
                row[column] = orjson.dumps(row[column]).decode()
            rows.append(row)
            outcomes.append(
                Outcome(index, "flagged" if issues else "stored", message_id=row["message_id"])
            )
        return Prepared(rows, outcomes, rejections, tally)

    def batch_for(
        self,
        records: Sequence[Any],
        source: Source,
        env: Envelope,
        message_type: str | None = None,
        max_event_bytes: int | None = None,
    ) -> tuple[WriteBatch, list[Outcome]]:
        prepared = self.prepare(records, source, env, message_type, max_event_bytes)
        kept_env = dataclasses.replace(env, ip=protect_ip(env.ip, self.plan.privacy.ip))
        dead = []
        for index, rejection in prepared.rejections:
            row = dead_letter_row(
                records[index],
                source=source.name,
                env=kept_env,
                code=rejection.code,
                reason=rejection.message,
                path=rejection.path,
                message_type=message_type,
                ip_policy=self.plan.privacy.ip,
            )
            dead.append(row)
            prepared.outcomes[index].dead_letter_id = row["id"]
        consents = ledger_statements(prepared.rows, self.plan, env.channel)
        consents += self.privacy.statements(prepared.privacy, source.name, env)
        batch = WriteBatch(prepared.rows, dead, consents, screened_at=prepared.privacy.epoch)
        return batch, prepared.outcomes

    # -- the entry ----------------------------------------------------------------------------

    async def ingest(
        self,
        records: Sequence[Any],
        source: Source,
        env: Envelope,
        message_type: str | None = None,
        max_event_bytes: int | None = None,
    ) -> IngestResult:
        if len(records) >= OFF_LOOP_RECORDS:
            batch, outcomes = await off_loop(
                self.batch_for, records, source, env, message_type, max_event_bytes
            )
        else:
            batch, outcomes = self.batch_for(records, source, env, message_type, max_event_bytes)
        return await self.write(batch, outcomes)

    async def write(self, batch: WriteBatch, outcomes: list[Outcome]) -> IngestResult:
        """The second half of `ingest`, for a batch made by `batch_for`."""
        written = await self.writer.write(batch)
        return IngestResult(outcomes, written.stored, written.duplicates, written.dead_lettered)

    def ingest_sync(
        self,
        records: Sequence[Any],
        source: Source,
        env: Envelope,
        message_type: str | None = None,
        max_event_bytes: int | None = None,
    ) -> IngestResult:
        batch, outcomes = self.batch_for(records, source, env, message_type, max_event_bytes)
        written = self.writer.write_sync(batch)
        return IngestResult(outcomes, written.stored, written.duplicates, written.dead_lettered)
