"""The `segments:` section of the plan: audiences defined by rules, and how they refresh.

```yaml
segments:
  events_source: kilde        # Segment Entered/Exited are recorded under this source
  refresh: 15 minutes         # how often the server re-evaluates every segment
  definitions:
    - id: high-value-at-risk
      name: High-value customers at risk
      rule:
        all:
          - {computed: clv, gte: 3000}
          - {computed: churn_risk, gte: 0.5}
```

The shape of each rule is checked here (see kilde/insights/segments/rules.py); the names it uses
(traits, computed traits, events, purposes, other segments) are checked against the whole plan
when the rule is compiled, with the path of the part that is wrong.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kilde.insights.segments.rules import RuleError, duration_days, parse_rule

SEGMENT_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


class SegmentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    description: str | None = None
    rule: dict[str, Any]

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not SEGMENT_ID.match(value):
            raise ValueError(
                "use lower-case letters, digits, '-' and '_' (at most 64), starting with a "
                "letter or digit"
            )
        return value

    @field_validator("rule")
    @classmethod
    def _rule_shape(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            parse_rule(value, "rule")
        except RuleError as exc:
            raise PydanticCustomError("segment_rule", exc.message) from None
        return value


class Segments(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    events_source: str = "kilde"
    refresh: str = "15 minutes"
    definitions: list[SegmentSpec] = Field(default_factory=list)

    @field_validator("refresh")
    @classmethod
    def _refresh_shape(cls, value: str) -> str:
        try:
            duration_days(value, "refresh")
        except RuleError as exc:
            raise ValueError(exc.detail) from None
        return value

    @model_validator(mode="after")
    def _unique(self) -> Segments:
        seen: set[str] = set()
        for spec in self.definitions:
            if spec.id in seen:
                raise ValueError(f"segment {spec.id!r} is defined twice")
            seen.add(spec.id)
        return self

    @property
    def refresh_seconds(self) -> float:
        return duration_days(self.refresh, "refresh") * 86400

    def get(self, segment_id: str) -> SegmentSpec | None:
        return next((s for s in self.definitions if s.id == segment_id), None)
