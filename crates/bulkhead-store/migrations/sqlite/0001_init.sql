-- Bulkhead schema (SQLite). Money in integer micro-units, times in Unix milliseconds.
CREATE TABLE agents (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    handle          TEXT    NOT NULL UNIQUE,
    parent_id       BIGINT,
    root_id         BIGINT  NOT NULL,
    path            TEXT    NOT NULL,
    depth           BIGINT  NOT NULL,
    status          TEXT    NOT NULL,
    key_hash        TEXT    NOT NULL UNIQUE,
    key_expires_at  BIGINT,
    scopes          TEXT    NOT NULL,
    spending_cap    BIGINT  NOT NULL,
    window_ms       BIGINT  NOT NULL,
    per_tx_limit    BIGINT  NOT NULL,
    lifetime_cap    BIGINT,
    rate_requests   BIGINT,
    rate_per_ms     BIGINT,
    rate_tat        BIGINT  NOT NULL DEFAULT 0,
    breaker_denials BIGINT,
    breaker_window_ms BIGINT,
    breaker_recent  TEXT    NOT NULL DEFAULT '',
    breaker_max_requests BIGINT,
    breaker_rate_window_ms BIGINT,
    breaker_repeats BIGINT,
    breaker_repeat_window_ms BIGINT,
    breaker_rate_tat_us BIGINT NOT NULL DEFAULT 0,
    breaker_repeat_hash TEXT  NOT NULL DEFAULT '',
    breaker_repeat_count BIGINT NOT NULL DEFAULT 0,
    breaker_repeat_since BIGINT NOT NULL DEFAULT 0,
    cap_alerted_window BIGINT NOT NULL DEFAULT -1,
    enforce         BIGINT  NOT NULL DEFAULT 1,
    labels          TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    revoked_at      BIGINT,
    revoke_reason   TEXT,
    suspended_at    BIGINT,
    window_index    BIGINT  NOT NULL DEFAULT 0,
    window_spent    BIGINT  NOT NULL DEFAULT 0,
    held            BIGINT  NOT NULL DEFAULT 0,
    lifetime_spent  BIGINT  NOT NULL DEFAULT 0,
    tx_count        BIGINT  NOT NULL DEFAULT 0,
    denied_count    BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX agents_root ON agents (root_id);
CREATE INDEX agents_parent ON agents (parent_id);

CREATE TABLE holds (
    id          TEXT    PRIMARY KEY,
    agent_id    BIGINT  NOT NULL,
    root_id     BIGINT  NOT NULL,
    path        TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    amount      BIGINT  NOT NULL,
    status      TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    captured    BIGINT,
    closed_at   BIGINT,
    -- 'release' (API holds) or 'capture' (gateway holds: an unsettled call is charged in full)
    on_expiry   TEXT    NOT NULL DEFAULT 'release'
);
CREATE INDEX holds_open ON holds (root_id, expires_at) WHERE status = 'open';

CREATE TABLE idempotency (
    agent_id      BIGINT  NOT NULL,
    key           TEXT    NOT NULL,
    request_hash  TEXT    NOT NULL,
    status        BIGINT  NOT NULL,
    body          TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL,
    PRIMARY KEY (agent_id, key)
);
CREATE INDEX idempotency_age ON idempotency (created_at);

CREATE TABLE audit_events (
    seq        BIGINT  PRIMARY KEY,
    at         BIGINT  NOT NULL,
    agent      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    outcome    TEXT    NOT NULL,
    reason     TEXT,
    scope      TEXT,
    amount     BIGINT,
    ref        TEXT,
    detail     TEXT,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL
);
CREATE INDEX audit_events_agent ON audit_events (agent, seq);

CREATE TABLE audit_head (
    id    BIGINT PRIMARY KEY,
    seq   BIGINT NOT NULL,
    hash  TEXT   NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Alerts waiting for (or done with) delivery: one row per alert and webhook. Rows are written in
-- the transaction of the decision that raised the alert, so an alert survives any restart.
CREATE TABLE alert_outbox (
    id            TEXT    NOT NULL,
    webhook       TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL,
    attempts      BIGINT  NOT NULL DEFAULT 0,
    next_at       BIGINT  NOT NULL,
    delivered_at  BIGINT,
    last_error    TEXT,
    PRIMARY KEY (id, webhook)
);
CREATE INDEX alert_outbox_due ON alert_outbox (next_at) WHERE delivered_at IS NULL;
