-- The writer holds in memory what it alone changes (src/store/sqlite/memory.rs): each contact's
-- queue and when its head is due, the queued counts, leases and reservations, pacing horizons
-- and echo marks. A message then costs one INSERT when accepted and one UPDATE by rowid when
-- its attempt ends, instead of a dozen statements on contact-keyed rows, two trigger runs and a
-- savepoint. The queues are rebuilt from the queued jobs at each start.

DROP TRIGGER jobs_depth_insert;
DROP TRIGGER jobs_depth_delete;
DROP TRIGGER jobs_depth_update;
DROP TABLE queue_depth;
DROP TABLE queue_heads;

-- What a start reads to rebuild the queues, in id order. Keyed by id alone, so new entries land
-- at the right edge of the index (one page a commit) instead of where each contact's id puts
-- them.
DROP INDEX jobs_queued;
CREATE INDEX jobs_queued ON jobs (id) WHERE state = 'queued';

-- When the last send of an outbound job takes effect (its pacing horizon), written with the
-- attempt's outcome: after a crash the horizons are rebuilt from it.
ALTER TABLE jobs ADD COLUMN effective_at INTEGER;

-- Where a clean stop saves the horizons and echo marks still in use, read back and emptied at
-- the next start. A start that finds no `clean_stop` row follows a crash, and rebuilds them
-- from the jobs of the last minutes instead.
CREATE TABLE saved_horizons (
    channel      TEXT    NOT NULL,
    contact      TEXT    NOT NULL,
    effective_at INTEGER NOT NULL,
    forget_at    INTEGER NOT NULL,
    PRIMARY KEY (channel, contact)
) WITHOUT ROWID;

CREATE TABLE saved_echo_marks (
    digest     BLOB    NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE clean_stop (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    stopped_at INTEGER NOT NULL
);

-- What the previous relay kept on disk is exact: its pacing records become saved horizons (kept
-- for the longest gap a channel can have, an hour, past their moment), its echo marks stay in
-- `echo_marks` for the first start to read, and the upgrade counts as a clean stop.
INSERT INTO saved_horizons (channel, contact, effective_at, forget_at)
SELECT channel, contact, last_effective_at, last_effective_at + 3610000
FROM contacts WHERE direction = 'outbound' AND last_effective_at IS NOT NULL;
UPDATE contacts SET last_effective_at = NULL WHERE last_effective_at IS NOT NULL;
INSERT INTO clean_stop (id, stopped_at) VALUES (1, 0);
