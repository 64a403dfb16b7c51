"""Versioned schema migrations, applied in order on start.

Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "events and dead letters",
        """
        CREATE TABLE events (
            message_id VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            type VARCHAR NOT NULL,
            event VARCHAR,
            user_id VARCHAR,
            anonymous_id VARCHAR,
            group_id VARCHAR,
            previous_id VARCHAR,
            timestamp TIMESTAMPTZ NOT NULL,
            original_timestamp TIMESTAMPTZ,
            sent_at TIMESTAMPTZ,
            received_at TIMESTAMPTZ NOT NULL,
            properties JSON,
            traits JSON,
            context JSON,
            integrations JSON,
            ip VARCHAR,
            country VARCHAR,
            browser VARCHAR,
            browser_version VARCHAR,
            os VARCHAR,
            os_version VARCHAR,
            device VARCHAR,
            page_url VARCHAR,
            page_path VARCHAR,
            referrer VARCHAR,
            plan_status VARCHAR NOT NULL,
            plan_issues JSON
        );
        CREATE TABLE dead_letters (
            id VARCHAR PRIMARY KEY,
            received_at TIMESTAMPTZ NOT NULL,
            source VARCHAR,
            channel VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            path VARCHAR,
            payload VARCHAR NOT NULL,
            envelope JSON,
            status VARCHAR NOT NULL,
            replay_count INTEGER NOT NULL DEFAULT 0,
            last_replayed_at TIMESTAMPTZ
        );
        """,
    ),
    (
        2,
        "consent ledger",
        # Append-only: every consent choice or signal is a new row, never an update, so the
        # history can be shown as evidence (GDPR Art. 7(1)). `ip` is stored after the plan's
        # IP policy (truncated by default); `evidence` is the banner version, 'gpc', ...
        """
        CREATE SEQUENCE consent_ledger_seq;
        CREATE TABLE consent_ledger (
            id VARCHAR PRIMARY KEY,
            seq BIGINT NOT NULL DEFAULT nextval('consent_ledger_seq'),  -- order of recording
            user_id VARCHAR,
            anonymous_id VARCHAR,
            purpose VARCHAR NOT NULL,
            state VARCHAR NOT NULL CHECK (state IN ('granted', 'denied', 'withdrawn')),
            decided_at TIMESTAMPTZ NOT NULL,  -- when the person chose (sender clock corrected)
            recorded_at TIMESTAMPTZ NOT NULL,
            source VARCHAR,
            channel VARCHAR NOT NULL,
            evidence VARCHAR,
            ip VARCHAR,
            message_id VARCHAR
        );
        """,
    ),
    (
        3,
        "email campaigns",
        # Tracked mail campaigns. Links are stored once per campaign and click tokens carry only
        # the link's id and a digest of its URL. A recipient is a pseudonym (an HMAC of the user
        # id or address) with the user id it stands for, if any; no email address is stored.
        """
        CREATE TABLE email_campaigns (
            id VARCHAR PRIMARY KEY,
            purpose VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE email_campaign_links (
            campaign_id VARCHAR NOT NULL,
            link_id INTEGER NOT NULL,
            url VARCHAR NOT NULL,
            label VARCHAR,
            PRIMARY KEY (campaign_id, link_id)
        );
        CREATE TABLE email_campaign_recipients (
            campaign_id VARCHAR NOT NULL,
            recipient VARCHAR NOT NULL,
            user_id VARCHAR,
            rendered_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (campaign_id, recipient)
        );
        """,
    ),
]
