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
    (
        4,
        "personal survey invitations",
        # A survey link carries only a signed invite id; who it was for stays here, so no
        # email ever appears in a URL. `used_at` makes each link answer once.
        """
        CREATE TABLE form_invites (
            id VARCHAR PRIMARY KEY,
            form_id VARCHAR NOT NULL,
            user_id VARCHAR,
            email VARCHAR,
            created_at TIMESTAMPTZ NOT NULL,
            used_at TIMESTAMPTZ
        );
        """,
    ),
    (
        6,
        "identity graph and profiles",
        # identity_records/observations: which identifiers each event carried (normalised);
        # identity_map: identifier -> profile; the rest is derived and can be rebuilt from the
        # events at any time (`kilde profiles rebuild`), except identity_separations (unmerges
        # an admin made) and identity_state (the profile id salt).
        """
        CREATE TABLE identity_records (
            source VARCHAR NOT NULL,
            message_id VARCHAR NOT NULL,
            ts TIMESTAMPTZ NOT NULL,
            received_at TIMESTAMPTZ NOT NULL,
            kind VARCHAR NOT NULL,
            primary_type VARCHAR,
            primary_value VARCHAR,
            dropped JSON
        );
        CREATE TABLE identity_observations (
            source VARCHAR NOT NULL,
            message_id VARCHAR NOT NULL,
            ts TIMESTAMPTZ NOT NULL,
            id_type VARCHAR NOT NULL,
            id_value VARCHAR NOT NULL,
            role VARCHAR NOT NULL
        );
        CREATE TABLE identity_map (
            id_type VARCHAR NOT NULL,
            id_value VARCHAR NOT NULL,
            profile_id VARCHAR NOT NULL,
            closure_id VARCHAR NOT NULL,
            first_seen TIMESTAMPTZ,
            last_seen TIMESTAMPTZ,
            shared BOOLEAN NOT NULL DEFAULT false
        );
        CREATE TABLE identity_conflicts (
            closure_id VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            id_type VARCHAR,
            id_value VARCHAR,
            kept_profile VARCHAR,
            refused_profile VARCHAR,
            source VARCHAR,
            message_id VARCHAR,
            first_at TIMESTAMPTZ,
            occurrences INTEGER NOT NULL DEFAULT 1,
            detail VARCHAR
        );
        CREATE TABLE identity_separations (
            id VARCHAR PRIMARY KEY,
            created_at TIMESTAMPTZ NOT NULL,
            profile_id VARCHAR NOT NULL,
            keep JSON NOT NULL,
            split JSON NOT NULL,
            reason VARCHAR
        );
        CREATE TABLE identity_state (key VARCHAR PRIMARY KEY, value VARCHAR);
        CREATE TABLE profiles (
            profile_id VARCHAR NOT NULL,
            closure_id VARCHAR NOT NULL,
            anchor_type VARCHAR NOT NULL,
            first_seen TIMESTAMPTZ,
            last_seen TIMESTAMPTZ,
            identifiers INTEGER NOT NULL,
            shared BOOLEAN NOT NULL DEFAULT false,
            events BIGINT,
            sessions BIGINT,
            page_views BIGINT,
            screen_views BIGINT,
            orders BIGINT,
            total_revenue DOUBLE,
            average_order_value DOUBLE,
            last_order_at TIMESTAMPTZ,
            favourite_categories VARCHAR[],
            channels VARCHAR[],
            email_opens BIGINT,
            email_clicks BIGINT,
            latest_nps INTEGER,
            support_sentiment DOUBLE,
            updated_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE profile_traits (
            profile_id VARCHAR NOT NULL,
            closure_id VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            value JSON,
            source VARCHAR,
            tier VARCHAR,
            observed_at TIMESTAMPTZ,
            message_id VARCHAR,
            candidates INTEGER
        );
        CREATE TABLE profile_ids (
            profile_id VARCHAR NOT NULL,
            anchor_type VARCHAR NOT NULL,
            anchor_value VARCHAR NOT NULL
        );
        """,
    ),
    (
        5,
        "import runs",
        # One row per file imported: where it came from and what became of it. Broker files
        # keep their provenance here (broker, acquisition date, licence expiry, purpose and its
        # lawful basis); each record carries the run id in context.provenance.import_run.
        """
        CREATE TABLE import_runs (
            id VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            file_name VARCHAR NOT NULL,
            file_format VARCHAR,
            file_bytes BIGINT,
            tier VARCHAR NOT NULL,
            broker VARCHAR,
            acquired_on DATE,
            licence_expires_on DATE,
            purpose VARCHAR,
            lawful_basis VARCHAR,
            started_at TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ,
            status VARCHAR NOT NULL,
            rows_read BIGINT,
            records BIGINT,
            stored BIGINT,
            duplicates BIGINT,
            flagged BIGINT,
            rejected BIGINT,
            summary JSON
        );
        """,
    ),
    (
        7,
        "segments and insights",
        # Segments defined through the API (the plan's own live in kilde.yaml); memberships with
        # the time each profile entered and left; one row per refresh of each segment. Profile
        # insights (RFM, lifetime value, churn, preferences) are derived from the profiles and
        # events and can be recomputed at any time (`kilde insights refresh`).
        """
        CREATE TABLE segment_definitions (
            id VARCHAR PRIMARY KEY,
            name VARCHAR NOT NULL,
            description VARCHAR,
            rule JSON NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE segment_memberships (
            segment_id VARCHAR NOT NULL,
            profile_id VARCHAR NOT NULL,
            entered_at TIMESTAMPTZ NOT NULL,
            exited_at TIMESTAMPTZ
        );
        CREATE TABLE segment_runs (
            segment_id VARCHAR NOT NULL,
            refreshed_at TIMESTAMPTZ NOT NULL,
            members BIGINT NOT NULL,
            entered BIGINT NOT NULL,
            exited BIGINT NOT NULL,
            seconds DOUBLE,
            error VARCHAR
        );
        CREATE TABLE profile_insights (
            profile_id VARCHAR NOT NULL,
            recency_days DOUBLE,
            frequency BIGINT,
            monetary DOUBLE,
            r_score INTEGER,
            f_score INTEGER,
            m_score INTEGER,
            rfm_score VARCHAR,
            rfm_group VARCHAR,
            expected_purchases DOUBLE,
            p_alive DOUBLE,
            expected_spend DOUBLE,
            clv DOUBLE,
            churn_risk DOUBLE,
            churn_flag BOOLEAN,
            churn_basis VARCHAR,
            days_inactive DOUBLE,
            usual_gap_days DOUBLE,
            favourite_products VARCHAR[],
            preferred_channel VARCHAR,
            preferred_time VARCHAR,
            recommended_products VARCHAR[],
            computed_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE insight_state (key VARCHAR PRIMARY KEY, value JSON, updated_at TIMESTAMPTZ);
        """,
    ),
    (
        12,
        "activation: delivery outbox, audience state, export manifests",
        """
        CREATE SEQUENCE delivery_seq;
        CREATE TABLE deliveries (
            id VARCHAR PRIMARY KEY,
            destination VARCHAR NOT NULL,
            person VARCHAR,  -- ordering key: deliveries of one person go out in order
            seq BIGINT NOT NULL,
            event JSON NOT NULL,
            state VARCHAR NOT NULL,  -- pending, delivered, skipped, dead
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TIMESTAMPTZ NOT NULL,
            last_status INTEGER,
            last_error VARCHAR,
            created_at TIMESTAMPTZ NOT NULL,
            delivered_at TIMESTAMPTZ
        );
        CREATE TABLE delivery_log (
            delivery_id VARCHAR NOT NULL,
            destination VARCHAR NOT NULL,
            attempt INTEGER NOT NULL,
            attempted_at TIMESTAMPTZ NOT NULL,
            status INTEGER,
            error VARCHAR,
            duration_ms DOUBLE
        );
        CREATE TABLE destination_state (
            destination VARCHAR PRIMARY KEY,
            watermark TIMESTAMPTZ,
            last_run_at TIMESTAMPTZ
        );
        CREATE TABLE audience_syncs (
            destination VARCHAR NOT NULL,
            segment VARCHAR NOT NULL,
            profile_id VARCHAR NOT NULL,
            synced_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE export_manifests (
            destination VARCHAR NOT NULL,
            segment VARCHAR,
            file VARCHAR NOT NULL,
            sha256 VARCHAR NOT NULL,
            rows_added INTEGER NOT NULL,
            rows_removed INTEGER NOT NULL,
            purpose VARCHAR NOT NULL,
            legal_basis VARCHAR,
            recipient VARCHAR,
            excluded_no_consent INTEGER NOT NULL,
            excluded_do_not_sell INTEGER NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        13,
        "privacy: suppression list, erasures, requests, audit log, retention runs",
        # No table here holds personal data in clear: people appear as salted hashes (the salt
        # is in privacy_state), so the proof of an erasure does not undo it.
        """
        CREATE TABLE privacy_state (key VARCHAR PRIMARY KEY, value VARCHAR);
        CREATE TABLE suppression_list (
            hash VARCHAR PRIMARY KEY,  -- salted SHA-256 of type:normalised value
            id_type VARCHAR NOT NULL,
            added_at TIMESTAMPTZ NOT NULL,
            reason VARCHAR NOT NULL,  -- erasure, admin
            erasure_id VARCHAR,
            hits BIGINT NOT NULL DEFAULT 0,  -- records dropped at the door since
            last_hit_at TIMESTAMPTZ
        );
        CREATE TABLE suppression_counts (
            day DATE NOT NULL,
            source VARCHAR NOT NULL,
            channel VARCHAR NOT NULL,
            records BIGINT NOT NULL,
            PRIMARY KEY (day, source, channel)
        );
        CREATE TABLE consent_gate_counts (
            day DATE NOT NULL,
            source VARCHAR NOT NULL,
            purpose VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,  -- event: a record not stored; trait: a trait left out
            records BIGINT NOT NULL,
            PRIMARY KEY (day, source, purpose, kind)
        );
        CREATE TABLE erasures (
            id VARCHAR PRIMARY KEY,
            requested_at TIMESTAMPTZ NOT NULL,
            completed_at TIMESTAMPTZ,
            request_id VARCHAR,
            subject VARCHAR NOT NULL,  -- salted hash of the identifier the request named
            identifiers INTEGER NOT NULL,
            profiles INTEGER NOT NULL,
            removed JSON NOT NULL,  -- rows removed per table, files cleaned
            compacted BOOLEAN NOT NULL,
            actor VARCHAR
        );
        CREATE TABLE privacy_requests (
            id VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL,  -- access, erasure, correction, opt_out
            law VARCHAR NOT NULL,  -- gdpr (30 days), ccpa (45 days)
            subject VARCHAR,  -- salted hash of the identifier the person gave
            received_at TIMESTAMPTZ NOT NULL,
            due_at TIMESTAMPTZ NOT NULL,
            extended BOOLEAN NOT NULL DEFAULT false,
            verification VARCHAR NOT NULL,  -- pending, verified, failed
            verification_method VARCHAR,
            verified_at TIMESTAMPTZ,
            state VARCHAR NOT NULL,  -- open, in_progress, done, refused
            outcome VARCHAR,
            closed_at TIMESTAMPTZ,
            note VARCHAR,
            updated_at TIMESTAMPTZ NOT NULL
        );
        CREATE SEQUENCE audit_seq;
        CREATE TABLE audit_log (
            seq BIGINT NOT NULL DEFAULT nextval('audit_seq'),
            logged_at TIMESTAMPTZ NOT NULL,
            actor VARCHAR NOT NULL,  -- which token (a fingerprint), and the client program
            action VARCHAR NOT NULL,  -- method and route template, never the URL itself
            status INTEGER,
            personal_data BOOLEAN NOT NULL,  -- the answer carried personal data
            subject VARCHAR,  -- salted hash of the person concerned, if one was named
            detail JSON
        );
        CREATE TABLE retention_runs (
            id VARCHAR PRIMARY KEY,
            started_at TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ,
            trigger VARCHAR NOT NULL,  -- command, schedule
            dry_run BOOLEAN NOT NULL,
            report JSON
        );
        """,
    ),
    (
        14,
        "dashboard users and sessions",
        # People who log in to the dashboard (staff, not customers): argon2id hashes only, each
        # with its own salt and parameters. A session row is keyed by the SHA-256 of the cookie's
        # random value, so the table alone cannot be used to log in.
        """
        CREATE TABLE dashboard_users (
            username VARCHAR PRIMARY KEY,
            password_hash VARCHAR NOT NULL,
            role VARCHAR NOT NULL CHECK (role IN ('admin', 'analyst', 'viewer')),
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            last_login_at TIMESTAMPTZ
        );
        CREATE TABLE dashboard_sessions (
            id VARCHAR PRIMARY KEY,
            username VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            last_seen_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        15,
        "write sequence of events",
        # The Writer's transaction number of each event (one per commit, increasing). The
        # identity engine reads what was written after the last number it read: exact, where
        # receipt times are not (a replayed dead letter keeps its old receipt time, and a
        # commit can land after a later receipt time was read). NULL: written before this
        # version or outside the Writer; a rebuild reads those.
        """
        ALTER TABLE events ADD COLUMN write_seq BIGINT;
        ALTER TABLE identity_records ADD COLUMN write_seq BIGINT;
        """,
    ),
    (
        16,
        "identity map indexes",
        # An identity update looks up a handful of identifiers and closures among millions
        # (kilde.identity.keyed); with these, DuckDB answers those semi-joins from the index in
        # milliseconds instead of scanning the map (hundreds of milliseconds at 3M rows).
        """
        CREATE INDEX identity_map_value ON identity_map (id_value);
        CREATE INDEX identity_map_closure ON identity_map (closure_id);
        """,
    ),
]
