//! The schema, written once for both databases: `{id}` becomes each one's auto-increment key.
//! A migration that only one of them needs (a storage setting) is marked for it, and runs nothing
//! on the other.
//!
//! Money is stored as decimal text and summed in Rust (SQLite has no exact decimal type);
//! instants as microseconds since the Unix epoch (UTC).

use super::Backend;

/// The databases a migration is for. Every version is recorded on both (one that is not for a
/// database runs nothing there), so both count their migrations alike.
#[derive(Clone, Copy, PartialEq, Eq)]
enum For {
    Both,
    Postgres,
}

/// Applied in order; each runs once, recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, For, &str)] = &[
    (
        1,
        For::Both,
        r#"
CREATE TABLE customers (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    labels TEXT NOT NULL,
    primary_email TEXT,
    currency TEXT,
    billing_address TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT,
    clock BIGINT NOT NULL,
    lock_version BIGINT NOT NULL
);
CREATE UNIQUE INDEX customers_live_key ON customers (key) WHERE deleted_at IS NULL;
CREATE TABLE customer_subjects (
    subject_key TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    position BIGINT NOT NULL
);
CREATE INDEX customer_subjects_customer ON customer_subjects (customer_id);
CREATE TABLE grants (
    seq {id},
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    key TEXT,
    name TEXT NOT NULL,
    description TEXT,
    labels TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount TEXT NOT NULL,
    funding_method TEXT NOT NULL,
    purchase_currency TEXT,
    purchase_cost_basis TEXT,
    purchase_amount TEXT,
    settlement_status TEXT,
    priority BIGINT NOT NULL,
    effective_at BIGINT NOT NULL,
    expires_after TEXT,
    expires_at BIGINT,
    features TEXT NOT NULL,
    tax_config TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    voided_at BIGINT,
    funded BIGINT NOT NULL,
    used TEXT NOT NULL,
    expired TEXT NOT NULL,
    expiry_booked BIGINT NOT NULL,
    voided TEXT NOT NULL
);
CREATE UNIQUE INDEX grants_customer_key ON grants (customer_id, key);
CREATE INDEX grants_customer ON grants (customer_id, seq);
CREATE INDEX grants_due_expiry ON grants (expires_at) WHERE expiry_booked = 0 AND voided_at IS NULL;
CREATE INDEX grants_due_funding ON grants (effective_at) WHERE funded = 0 AND voided_at IS NULL;
CREATE TABLE movements (
    seq {id},
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    kind TEXT NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    grant_id TEXT,
    feature TEXT,
    balance_before TEXT NOT NULL,
    balance_after TEXT NOT NULL,
    booked_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    labels TEXT NOT NULL,
    operation TEXT NOT NULL
);
CREATE INDEX movements_customer ON movements (customer_id, seq);
CREATE TABLE debt_covers (
    seq {id},
    customer_id TEXT NOT NULL REFERENCES customers (id),
    grant_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    feature TEXT,
    amount TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX debt_covers_customer ON debt_covers (customer_id);
CREATE TABLE overages (
    seq {id},
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    currency TEXT NOT NULL,
    feature TEXT,
    amount TEXT NOT NULL,
    at BIGINT NOT NULL,
    operation TEXT NOT NULL
);
CREATE INDEX overages_customer ON overages (customer_id);
CREATE TABLE postings (
    seq {id},
    entry_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    account TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount TEXT NOT NULL
);
CREATE INDEX postings_entry ON postings (entry_id);
CREATE TABLE debts (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    currency TEXT NOT NULL,
    feature TEXT NOT NULL,
    amount TEXT NOT NULL,
    PRIMARY KEY (customer_id, currency, feature)
);
CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    currency TEXT NOT NULL,
    feature TEXT,
    amount TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    released_at BIGINT
);
CREATE INDEX holds_customer_open ON holds (customer_id) WHERE released_at IS NULL;
CREATE TABLE idempotency_records (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    operation TEXT NOT NULL,
    key TEXT NOT NULL,
    request TEXT NOT NULL,
    status BIGINT NOT NULL,
    response TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (customer_id, operation, key)
);
CREATE TABLE events (
    seq {id},
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    time BIGINT,
    body TEXT NOT NULL,
    ingested_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX events_source_id ON events (source, id);
"#,
    ),
    (
        2,
        For::Both,
        r#"
CREATE TABLE usage_records (
    key TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    node TEXT NOT NULL,
    subject TEXT NOT NULL,
    currency TEXT NOT NULL,
    feature TEXT,
    amount TEXT NOT NULL,
    calls BIGINT NOT NULL,
    settlement_mode TEXT NOT NULL,
    booked_at BIGINT NOT NULL
);
CREATE INDEX usage_records_customer ON usage_records (customer_id, booked_at);
"#,
    ),
    (
        3,
        For::Both,
        r#"
ALTER TABLE holds ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX holds_due_expiry ON holds (expires_at) WHERE released_at IS NULL;
"#,
    ),
    (
        4,
        For::Both,
        r#"
CREATE TABLE notification_channels (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    custom_headers TEXT NOT NULL,
    signing_secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE TABLE notification_rules (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE TABLE notification_rule_channels (
    rule_id TEXT NOT NULL REFERENCES notification_rules (id),
    channel_id TEXT NOT NULL REFERENCES notification_channels (id),
    PRIMARY KEY (rule_id, channel_id)
);
CREATE INDEX notification_rule_channels_channel ON notification_rule_channels (channel_id);
CREATE TABLE notification_thresholds_fired (
    rule_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    threshold TEXT NOT NULL,
    fired_at BIGINT NOT NULL,
    PRIMARY KEY (rule_id, customer_id, threshold)
);
CREATE INDEX notification_thresholds_fired_customer ON notification_thresholds_fired (customer_id);
CREATE TABLE notification_grant_notices (
    rule_id TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    noticed_at BIGINT NOT NULL,
    PRIMARY KEY (rule_id, grant_id)
);
CREATE TABLE notification_events (
    seq {id},
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE notification_deliveries (
    seq {id},
    event_id TEXT NOT NULL REFERENCES notification_events (id),
    channel_id TEXT NOT NULL REFERENCES notification_channels (id),
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    lease_until BIGINT,
    claim TEXT,
    last_status BIGINT,
    last_error TEXT,
    last_attempt_at BIGINT,
    UNIQUE (event_id, channel_id)
);
CREATE INDEX notification_deliveries_due ON notification_deliveries (next_attempt_at) WHERE status = 'pending';
"#,
    ),
    (
        5,
        For::Both,
        r#"
ALTER TABLE holds ADD COLUMN backing TEXT;
"#,
    ),
    (
        6,
        For::Both,
        r#"
ALTER TABLE holds ADD COLUMN recalled BIGINT NOT NULL DEFAULT 0;
"#,
    ),
    (
        USAGE_MARKS,
        For::Both,
        r#"
CREATE TABLE usage_marks (
    stream TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    booked_to BIGINT NOT NULL,
    keyed BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
"#,
    ),
    // Room in each page for the rows every gateway sync updates (a customer's clock and revision,
    // its grants' states, its usage marks, its leases' holds): PostgreSQL then writes the new
    // version of a row beside the old one without touching its indexes (a "HOT" update) and
    // prunes the old one on its own. In full pages (the default) nine in ten updates of
    // `usage_marks` went elsewhere with new index entries, the tables grew four- to fivefold
    // within a minute of syncs and ranges/s fell by almost half (bench/RESULTS.md §0k). Rows
    // already stored keep their pages until they move; SQLite updates rows in place.
    (
        8,
        For::Postgres,
        r#"
ALTER TABLE customers SET (fillfactor = 50);
ALTER TABLE grants SET (fillfactor = 50);
ALTER TABLE holds SET (fillfactor = 50);
ALTER TABLE usage_marks SET (fillfactor = 50);
"#,
    ),
];

/// The migration that adds usage marks; the streams already booked by key get theirs in its
/// transaction (`backfill::usage_marks`).
pub const USAGE_MARKS: i64 = 7;

/// The migrations not yet applied to a database at `applied`, rendered for `backend`.
pub fn pending(backend: Backend, applied: i64) -> impl Iterator<Item = (i64, String)> {
    let id = match backend {
        Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Backend::Postgres => "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    };
    MIGRATIONS.iter().filter(move |(v, _, _)| *v > applied).map(move |&(v, only, sql)| {
        let sql = match (only, backend) {
            (For::Both, _) | (For::Postgres, Backend::Postgres) => sql.replace("{id}", id),
            (For::Postgres, Backend::Sqlite) => String::new(),
        };
        (v, sql)
    })
}
