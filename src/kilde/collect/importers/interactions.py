"""Support tickets, chats, calls and sales meetings: `Support Interaction` and
`Sales Interaction` track events with channel, topic and the sentiment of the text.

The text itself is stored only as far as the plan allows: only when the event's schema in the
plan declares a `text` property, and cut to its `maxLength`. The sentiment score and label are
computed from the whole text either way.
"""

from __future__ import annotations

from typing import Any

from kilde.collect.importers.base import (
    Converted,
    ImportFailed,
    Record,
    Row,
    content_key,
    message_id,
)
from kilde.collect.importers.convert import (
    Context,
    RowProblem,
    identity,
    properties_of,
    text_cell,
    when,
)
from kilde.insights.sentiment import Analyzer, load_analyzer

EVENTS = {"support": "Support Interaction", "sales": "Sales Interaction"}
_SALES_WORDS = ("sales", "sale", "meeting", "demo", "lead", "opportunity", "salg")


def text_allowance(ctx: Context, event: str) -> int | None:
    """How many characters of the text the plan lets us keep: None for none, -1 for all."""
    spec = next((e for e in ctx.plan.events if e.type == "track" and e.name == event), None)
    if spec is None:
        return None
    declared = spec.properties.get("properties", {})
    text_schema = declared.get("text") if isinstance(declared, dict) else None
    if not isinstance(text_schema, dict):
        return None
    limit = text_schema.get("maxLength")
    return int(limit) if isinstance(limit, int) else -1


class InteractionConverter:
    def __init__(self, ctx: Context, analyzer: Analyzer | None = None) -> None:
        self.ctx = ctx
        if not any(f in ctx.resolved.fields for f in ("user_id", "email", "anonymous_id")):
            raise ImportFailed(
                "no customer id or email column was found",
                fix="map one in the mapping file: `columns: {email: <column>}`",
            )
        self.analyzer = analyzer or load_analyzer(ctx.mapping.sentiment)
        self.allowance = {name: text_allowance(ctx, name) for name in EVENTS.values()}

    def _event(self, row: Row) -> str:
        said = text_cell(row, self.ctx, "interaction_type")
        if said is not None:
            lowered = said.lower()
            return EVENTS["sales" if any(w in lowered for w in _SALES_WORDS) else "support"]
        return EVENTS[self.ctx.mapping.interaction or "support"]

    def _message(self, row: Row) -> dict[str, Any]:
        ctx = self.ctx
        ids, external, person = identity(row, ctx)
        timestamp = when(row, ctx, required=True)
        event = self._event(row)
        properties: dict[str, Any] = properties_of(row, ctx)
        for name in ("interaction_id", "channel", "topic", "status"):
            value = text_cell(row, ctx, name)
            if value is not None:
                properties[name] = value
        text = text_cell(row, ctx, "text")
        if text:
            sentiment = self.analyzer.analyze(text)
            properties["sentiment_score"] = sentiment.score
            properties["sentiment_label"] = sentiment.label
            properties["sentiment_model"] = self.analyzer.name
            allowed = self.allowance[event]
            if allowed is not None:
                properties["text"] = text if allowed < 0 else text[:allowed]
        key = properties.get("interaction_id") or f"{person}\x1f{timestamp}\x1f" + content_key(
            {"text": text, **properties}
        )
        context = ctx.context_for(row.line)
        if external:
            context["externalIds"] = external
        return {
            "type": "track",
            "event": event,
            "messageId": message_id(ctx.source, "interactions", str(key)),
            **ids,
            "timestamp": timestamp,
            "properties": properties,
            "context": context,
        }

    def feed(self, rows: list[Row]) -> Converted:
        out = Converted()
        for row in rows:
            try:
                out.records.append(Record(row.line, self._message(row)))
            except RowProblem as problem:
                out.errors.append(problem.at(row.line))
        return out

    def finish(self) -> Converted:
        return Converted()
