-- Jobs: one row per unit of delivery, in both directions. `id` orders the jobs of a contact:
-- only the lowest queued id of a (direction, contact) may be claimed.
CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    direction           TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    contact             TEXT    NOT NULL,
    m_id                TEXT    NOT NULL,
    -- Inbound events and receipts: what makes a redelivery a duplicate.
    dedup_key           TEXT,
    payload             TEXT    NOT NULL,
    state               TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'dead', 'rejected', 'dropped')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    progress            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     INTEGER NOT NULL,
    lease_owner         TEXT,
    lease_until         INTEGER,
    last_error          TEXT,
    -- Outbound: when JoinChat accepted the whole message, compared with Messenger's watermarks.
    accepted_at         INTEGER,
    delivered_reported  INTEGER NOT NULL DEFAULT 0,
    read_reported       INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);

-- Partial indexes: every job passes through them briefly, so they stay small and cheap.
CREATE UNIQUE INDEX jobs_dedup ON jobs (dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX jobs_queued ON jobs (direction, contact, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (direction, contact) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_receipts ON jobs (contact, accepted_at) WHERE accepted_at IS NOT NULL;

-- The ready queue: per (direction, contact) with queued jobs, its oldest queued job and when
-- that one may be claimed (its next attempt, or the end of a lease on any queued job of the
-- contact). Claims read this instead of scanning every queued job.
CREATE TABLE queue_heads (
    direction TEXT    NOT NULL,
    contact   TEXT    NOT NULL,
    job_id    INTEGER NOT NULL,
    due_at    INTEGER NOT NULL,
    PRIMARY KEY (direction, contact)
) WITHOUT ROWID;

CREATE INDEX queue_heads_due ON queue_heads (due_at);

-- Per (direction, contact): pacing of outbound sends, and whether BonyChat knows the contact.
CREATE TABLE contacts (
    direction         TEXT    NOT NULL,
    contact           TEXT    NOT NULL,
    last_effective_at INTEGER,
    introduced        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (direction, contact)
) WITHOUT ROWID;

-- What the relay sent recently, to recognise Messenger's echoes of it.
CREATE TABLE echo_marks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    contact     TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL
);

CREATE INDEX echo_marks_match ON echo_marks (contact, fingerprint, id);
