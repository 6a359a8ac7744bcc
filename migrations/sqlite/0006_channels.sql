-- Channels (SPEC §7): every job belongs to one channel, and everything keyed by a contact is
-- keyed by (channel, contact). What a single-channel relay stored belongs to `default`.

-- A new column with a constant default is a change of the schema only: no row of `jobs` (which
-- may hold millions) is rewritten.
ALTER TABLE jobs ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';

-- A redelivery is a duplicate within its channel only.
DROP INDEX jobs_dedup;
CREATE UNIQUE INDEX jobs_dedup ON jobs (channel, dedup_key) WHERE dedup_key IS NOT NULL;

-- Order and one in flight per (channel, direction, contact).
DROP INDEX jobs_queued;
CREATE INDEX jobs_queued ON jobs (channel, direction, contact, id) WHERE state = 'queued';

-- `jobs_receipts (contact, accepted_at)` stays as it is: a contact's delivered messages in
-- another channel are filtered out by the query, and contact ids are Page-scoped, so there are
-- practically none. Rebuilding it would read the whole delivered history.

-- The ready queue, per (channel, direction, contact). Claims walk the channels of a direction
-- through `queue_heads_claim` and take each one's earliest due heads.
CREATE TABLE queue_heads_new (
    channel   TEXT    NOT NULL,
    direction TEXT    NOT NULL,
    contact   TEXT    NOT NULL,
    job_id    INTEGER NOT NULL,
    due_at    INTEGER NOT NULL,
    PRIMARY KEY (channel, direction, contact)
) WITHOUT ROWID;
INSERT INTO queue_heads_new (channel, direction, contact, job_id, due_at)
SELECT 'default', direction, contact, job_id, due_at FROM queue_heads;
DROP TABLE queue_heads;
ALTER TABLE queue_heads_new RENAME TO queue_heads;
CREATE INDEX queue_heads_claim ON queue_heads (direction, channel, due_at);

-- Pacing and introductions per (channel, direction, contact).
CREATE TABLE contacts_new (
    channel           TEXT    NOT NULL,
    direction         TEXT    NOT NULL,
    contact           TEXT    NOT NULL,
    last_effective_at INTEGER,
    introduced        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, direction, contact)
) WITHOUT ROWID;
INSERT INTO contacts_new (channel, direction, contact, last_effective_at, introduced)
SELECT 'default', direction, contact, last_effective_at, introduced FROM contacts;
DROP TABLE contacts;
ALTER TABLE contacts_new RENAME TO contacts;

-- Echo records per (channel, contact).
ALTER TABLE echo_marks ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
DROP INDEX echo_marks_match;
CREATE INDEX echo_marks_match ON echo_marks (channel, contact, fingerprint, id);

-- Watermarks per (channel, contact).
CREATE TABLE watermarks_new (
    channel    TEXT    NOT NULL,
    contact    TEXT    NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('delivered', 'read')),
    watermark  INTEGER NOT NULL,
    timestamp  INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (channel, contact, status)
) WITHOUT ROWID;
INSERT INTO watermarks_new (channel, contact, status, watermark, timestamp, updated_at)
SELECT 'default', contact, status, watermark, timestamp, updated_at FROM watermarks;
DROP TABLE watermarks;
ALTER TABLE watermarks_new RENAME TO watermarks;
CREATE INDEX watermarks_age ON watermarks (updated_at);

-- Intake caps per channel (SPEC §5): queued jobs per (channel, direction). A channel's row is
-- made by its first queued job.
DROP TRIGGER jobs_depth_insert;
DROP TRIGGER jobs_depth_delete;
DROP TRIGGER jobs_depth_update;
CREATE TABLE queue_depth_new (
    channel   TEXT    NOT NULL,
    direction TEXT    NOT NULL,
    queued    INTEGER NOT NULL,
    PRIMARY KEY (channel, direction)
) WITHOUT ROWID;
INSERT INTO queue_depth_new (channel, direction, queued)
SELECT 'default', direction, queued FROM queue_depth;
DROP TABLE queue_depth;
ALTER TABLE queue_depth_new RENAME TO queue_depth;

CREATE TRIGGER jobs_depth_insert AFTER INSERT ON jobs WHEN NEW.state = 'queued'
BEGIN
    INSERT INTO queue_depth (channel, direction, queued) VALUES (NEW.channel, NEW.direction, 1)
    ON CONFLICT (channel, direction) DO UPDATE SET queued = queued + 1;
END;

CREATE TRIGGER jobs_depth_delete AFTER DELETE ON jobs WHEN OLD.state = 'queued'
BEGIN
    UPDATE queue_depth SET queued = queued - 1 WHERE channel = OLD.channel AND direction = OLD.direction;
END;

CREATE TRIGGER jobs_depth_update AFTER UPDATE OF state ON jobs WHEN (OLD.state = 'queued') <> (NEW.state = 'queued')
BEGIN
    INSERT INTO queue_depth (channel, direction, queued)
    VALUES (NEW.channel, NEW.direction, CASE WHEN NEW.state = 'queued' THEN 1 ELSE -1 END)
    ON CONFLICT (channel, direction) DO UPDATE SET queued = queued + excluded.queued;
END;
