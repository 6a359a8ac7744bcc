-- Jobs: one row per unit of delivery, in both directions. `id` orders the jobs of a contact:
-- only the lowest queued id of a (direction, contact) may be claimed.
CREATE TABLE jobs (
    id                 BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    direction          TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    contact            TEXT    NOT NULL,
    m_id               TEXT    NOT NULL,
    -- Inbound events and receipts: what makes a redelivery a duplicate, whichever replica
    -- takes it.
    dedup_key          TEXT    UNIQUE,
    payload            TEXT    NOT NULL,
    state              TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'dead', 'rejected', 'dropped')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    progress           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    BIGINT  NOT NULL,
    lease_owner        TEXT,
    lease_until        BIGINT,
    -- Fencing: every claim gives a new token; writes about an attempt name theirs.
    lease_token        BIGINT  NOT NULL DEFAULT 0,
    -- Left to the `/message` request that stored it until then.
    reserved_until     BIGINT,
    last_error         TEXT,
    -- Outbound: when its last JoinChat request left, compared with Messenger's watermarks.
    accepted_at        BIGINT,
    delivered_reported BOOLEAN NOT NULL DEFAULT false,
    read_reported      BOOLEAN NOT NULL DEFAULT false,
    created_at         BIGINT  NOT NULL,
    updated_at         BIGINT  NOT NULL
);

-- Partial indexes: every job passes through them briefly, so they stay small.
CREATE INDEX jobs_queued ON jobs (direction, contact, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_receipts ON jobs (contact, accepted_at) WHERE accepted_at IS NOT NULL;
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE state IN ('delivered', 'rejected', 'dropped');
CREATE INDEX jobs_outbound_m_id ON jobs (m_id) WHERE direction = 'outbound';

-- The ready queue, one row per (direction, contact): its oldest queued job and when that one
-- may be claimed (its next attempt, its reservation, or the end of a lease on any queued job
-- of the contact). The row is also the contact's lock: every change to a contact's queue takes
-- it first, claims skip it while it is taken (FOR UPDATE SKIP LOCKED), so two replicas never
-- both claim a contact and one job per contact is in flight.
CREATE TABLE queues (
    direction TEXT   NOT NULL,
    contact   TEXT   NOT NULL,
    head_id   BIGINT,
    due_at    BIGINT NOT NULL,
    PRIMARY KEY (direction, contact)
);

CREATE INDEX queues_claim ON queues (direction, due_at) WHERE head_id IS NOT NULL;

-- Per (direction, contact): pacing of outbound sends, and whether BonyChat knows the contact.
CREATE TABLE contacts (
    direction         TEXT    NOT NULL,
    contact           TEXT    NOT NULL,
    last_effective_at BIGINT,
    introduced        BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (direction, contact)
);

-- What the relay sent recently, to recognise Messenger's echoes of it.
CREATE TABLE echo_marks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    contact     TEXT   NOT NULL,
    fingerprint TEXT   NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE INDEX echo_marks_match ON echo_marks (contact, fingerprint, id);
CREATE INDEX echo_marks_expiry ON echo_marks (expires_at);

-- Readiness writes here, a row per replica: a probe that commits.
CREATE TABLE relay_health (
    replica    TEXT   PRIMARY KEY,
    checked_at BIGINT NOT NULL
);
