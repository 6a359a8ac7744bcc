-- The operator console (SPEC §6): the attempts that did not deliver their job, the last 20 of
-- each job, pruned with it; and what its search looks jobs up by, a BonyChat mId or Messenger
-- mid, or a contact id.
CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    error TEXT NOT NULL
);
CREATE INDEX attempts_job ON attempts (job_id, id);
CREATE INDEX jobs_m_id ON jobs (m_id);
CREATE INDEX jobs_contact ON jobs (contact, id);
