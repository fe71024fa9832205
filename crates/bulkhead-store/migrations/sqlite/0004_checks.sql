-- Constraints that pair the ledger's own assertions, so that a row breaking them is refused by
-- the database as well as by the code: statuses are the ledger's enums; money and counters are
-- never negative; a window's spend is part of the lifetime's. (Spend plus held within the cap is
-- asserted by the ledger after each allowed movement, not here: a patch may lower a cap below
-- what was already spent.) SQLite cannot add a constraint to a table, so each table is rebuilt,
-- in both dialects alike: copied into a new table with the constraints, then renamed.
CREATE TABLE agents_next (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    handle          TEXT    NOT NULL UNIQUE,
    parent_id       BIGINT,
    root_id         BIGINT  NOT NULL,
    path            TEXT    NOT NULL,
    depth           BIGINT  NOT NULL CHECK (depth >= 0),
    status          TEXT    NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    key_hash        TEXT    NOT NULL UNIQUE,
    key_expires_at  BIGINT,
    scopes          TEXT    NOT NULL,
    spending_cap    BIGINT  NOT NULL CHECK (spending_cap >= 0),
    window_ms       BIGINT  NOT NULL CHECK (window_ms > 0),
    per_tx_limit    BIGINT  NOT NULL CHECK (per_tx_limit >= 0),
    lifetime_cap    BIGINT  CHECK (lifetime_cap IS NULL OR lifetime_cap >= 0),
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
    enforce         BIGINT  NOT NULL DEFAULT 1 CHECK (enforce IN (0, 1)),
    labels          TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    revoked_at      BIGINT,
    revoke_reason   TEXT,
    suspended_at    BIGINT,
    window_index    BIGINT  NOT NULL DEFAULT 0,
    window_spent    BIGINT  NOT NULL DEFAULT 0 CHECK (window_spent >= 0),
    held            BIGINT  NOT NULL DEFAULT 0 CHECK (held >= 0),
    lifetime_spent  BIGINT  NOT NULL DEFAULT 0,
    tx_count        BIGINT  NOT NULL DEFAULT 0 CHECK (tx_count >= 0),
    denied_count    BIGINT  NOT NULL DEFAULT 0 CHECK (denied_count >= 0),
    CHECK (lifetime_spent >= window_spent)
);
INSERT INTO agents_next (id, handle, parent_id, root_id, path, depth, status, key_hash, key_expires_at, scopes,
    spending_cap, window_ms, per_tx_limit, lifetime_cap, rate_requests, rate_per_ms, rate_tat, breaker_denials,
    breaker_window_ms, breaker_recent, breaker_max_requests, breaker_rate_window_ms, breaker_repeats,
    breaker_repeat_window_ms, breaker_rate_tat_us, breaker_repeat_hash, breaker_repeat_count, breaker_repeat_since,
    cap_alerted_window, enforce, labels, created_at, revoked_at, revoke_reason, suspended_at, window_index,
    window_spent, held, lifetime_spent, tx_count, denied_count)
SELECT id, handle, parent_id, root_id, path, depth, status, key_hash, key_expires_at, scopes,
    spending_cap, window_ms, per_tx_limit, lifetime_cap, rate_requests, rate_per_ms, rate_tat, breaker_denials,
    breaker_window_ms, breaker_recent, breaker_max_requests, breaker_rate_window_ms, breaker_repeats,
    breaker_repeat_window_ms, breaker_rate_tat_us, breaker_repeat_hash, breaker_repeat_count, breaker_repeat_since,
    cap_alerted_window, enforce, labels, created_at, revoked_at, revoke_reason, suspended_at, window_index,
    window_spent, held, lifetime_spent, tx_count, denied_count
FROM agents;
DROP TABLE agents;
ALTER TABLE agents_next RENAME TO agents;
-- New agents are numbered after the copied ones (SQLite's AUTOINCREMENT does so by itself).
CREATE INDEX agents_root ON agents (root_id);
CREATE INDEX agents_parent ON agents (parent_id);

CREATE TABLE holds_next (
    id          TEXT    PRIMARY KEY,
    agent_id    BIGINT  NOT NULL,
    root_id     BIGINT  NOT NULL,
    path        TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    -- What the hold still holds (a lease's shrinks as its calls are settled).
    amount      BIGINT  NOT NULL CHECK (amount >= 0),
    status      TEXT    NOT NULL CHECK (status IN ('open', 'captured', 'released', 'expired')),
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    captured    BIGINT  CHECK (captured IS NULL OR captured >= 0),
    closed_at   BIGINT,
    -- 'release' (API holds) or 'capture' (gateway holds: an unsettled call is charged in full)
    on_expiry   TEXT    NOT NULL DEFAULT 'release' CHECK (on_expiry IN ('release', 'capture')),
    settled_seq BIGINT  NOT NULL DEFAULT 0 CHECK (settled_seq >= 0)
);
INSERT INTO holds_next (id, agent_id, root_id, path, scope, amount, status, created_at, expires_at, captured,
    closed_at, on_expiry, settled_seq)
SELECT id, agent_id, root_id, path, scope, amount, status, created_at, expires_at, captured,
    closed_at, on_expiry, settled_seq
FROM holds;
DROP TABLE holds;
ALTER TABLE holds_next RENAME TO holds;
CREATE INDEX holds_open ON holds (root_id, expires_at) WHERE status = 'open';
