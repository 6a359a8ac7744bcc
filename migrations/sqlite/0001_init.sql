-- Jobs: one row per unit of delivery, in both directions. `id` orders the jobs of a contact:
-- only the lowest queued id of a (direction, contact) may be claimed.
CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    direction           TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    contact             TEXT    NOT NULL,
    m_id                TEXT    NOT NULL,
    -- Inbound events and receipts: what makes a redelivery a duplicate.
    dedup_key           TEXT    UNIQUE,
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

CREATE INDEX jobs_queue ON jobs (state, direction, contact, id);
CREATE INDEX jobs_receipts ON jobs (direction, contact, accepted_at) WHERE accepted_at IS NOT NULL;
CREATE INDEX jobs_lease ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_age ON jobs (state, updated_at);

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
