"""The columns the writer writes: events and dead letters, as Arrow schemas."""

from __future__ import annotations

import pyarrow as pa

UTC_US = pa.timestamp("us", tz="UTC")

EVENT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("message_id", pa.string()),
    ("source", pa.string()),
    ("type", pa.string()),
    ("event", pa.string()),
    ("user_id", pa.string()),
    ("anonymous_id", pa.string()),
    ("group_id", pa.string()),
    ("previous_id", pa.string()),
    ("timestamp", UTC_US),
    ("original_timestamp", UTC_US),
    ("sent_at", UTC_US),
    ("received_at", UTC_US),
    ("properties", pa.string()),
    ("traits", pa.string()),
    ("context", pa.string()),
    ("integrations", pa.string()),
    ("ip", pa.string()),
    ("country", pa.string()),
    ("browser", pa.string()),
    ("browser_version", pa.string()),
    ("os", pa.string()),
    ("os_version", pa.string()),
    ("device", pa.string()),
    ("page_url", pa.string()),
    ("page_path", pa.string()),
    ("referrer", pa.string()),
    ("plan_status", pa.string()),
    ("plan_issues", pa.string()),
]

DEAD_LETTER_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("received_at", UTC_US),
    ("source", pa.string()),
    ("channel", pa.string()),
    ("reason", pa.string()),
    ("path", pa.string()),
    ("payload", pa.string()),
    ("envelope", pa.string()),
    ("status", pa.string()),
]

EVENT_SCHEMA = pa.schema(EVENT_COLUMNS)
DEAD_LETTER_SCHEMA = pa.schema(DEAD_LETTER_COLUMNS)
