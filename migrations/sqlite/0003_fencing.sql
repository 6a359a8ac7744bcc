-- Fencing: each claim of a job gives it a new token, and every write about an attempt names
-- the token it was claimed under, so the holder of a lost lease can never overwrite the work of
-- whoever claimed the job since.
ALTER TABLE jobs ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;

-- A `/message` request takes its own job's first attempt: until then, workers leave the job to it.
ALTER TABLE jobs ADD COLUMN reserved_until INTEGER;
