-- The contact-keyed bookkeeping of the hot path, keyed contact first: (contact, channel, …)
-- instead of (channel, …, contact). Every lookup gives all the key's columns, so nothing reads
-- more; what changes is where new keys land. Channel first, a relay of 1 000 channels grows
-- each of these indexes at 1 000 places at once, and a commit writes a page for each place it
-- touched; contact first, keys land where the contact's id puts them, whatever its channel,
-- as in a relay of one channel (bench/channels.sh: 12.6 kB written per message against 7.7 kB
-- with contact ids that arrive in order, as BonyChat's custom ids and phone numbers can).
-- `queue_heads_claim` stays channel first: claims walk the channels in turns through it.

CREATE TABLE queue_heads_new (
    channel   TEXT    NOT NULL,
    direction TEXT    NOT NULL,
    contact   TEXT    NOT NULL,
    job_id    INTEGER NOT NULL,
    due_at    INTEGER NOT NULL,
    PRIMARY KEY (contact, channel, direction)
) WITHOUT ROWID;
INSERT INTO queue_heads_new (channel, direction, contact, job_id, due_at)
SELECT channel, direction, contact, job_id, due_at FROM queue_heads;
DROP TABLE queue_heads;
ALTER TABLE queue_heads_new RENAME TO queue_heads;
CREATE INDEX queue_heads_claim ON queue_heads (direction, channel, due_at);

CREATE TABLE contacts_new (
    channel           TEXT    NOT NULL,
    direction         TEXT    NOT NULL,
    contact           TEXT    NOT NULL,
    last_effective_at INTEGER,
    introduced        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (contact, channel, direction)
) WITHOUT ROWID;
INSERT INTO contacts_new (channel, direction, contact, last_effective_at, introduced)
SELECT channel, direction, contact, last_effective_at, introduced FROM contacts;
DROP TABLE contacts;
ALTER TABLE contacts_new RENAME TO contacts;

-- Partial: built from the queued jobs, though SQLite reads the whole table to find them.
DROP INDEX jobs_queued;
CREATE INDEX jobs_queued ON jobs (contact, channel, direction, id) WHERE state = 'queued';

DROP INDEX echo_marks_match;
CREATE INDEX echo_marks_match ON echo_marks (contact, channel, fingerprint, id);
