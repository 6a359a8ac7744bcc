-- Pruning reads finished jobs by age and echo marks by expiry. Without these indexes each prune
-- scanned the whole jobs table on the only writer thread (about 1.2 s per million rows), holding
-- up every write meanwhile. `jobs_finished` is appended to at the right edge (updated_at grows),
-- so it costs one page a commit, not one per message.
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE state IN ('delivered', 'rejected', 'dropped');
CREATE INDEX echo_marks_expiry ON echo_marks (expires_at);

-- The highest delivery and read watermark Messenger reported per contact (SPEC §4.3): a
-- watermark can arrive while the message it covers is still waiting for JoinChat's answer, and
-- the receipt then follows once JoinChat accepts it. `timestamp` is the watermark event's own,
-- carried by the receipt.
CREATE TABLE watermarks (
    contact    TEXT    NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('delivered', 'read')),
    watermark  INTEGER NOT NULL,
    timestamp  INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (contact, status)
) WITHOUT ROWID;

CREATE INDEX watermarks_age ON watermarks (updated_at);
