-- Channels (SPEC §7): every job belongs to one channel, and everything keyed by a contact is
-- keyed by (channel, contact). What a single-channel relay stored belongs to `default`.
--
-- Replicas of the previous version may still run during a rolling upgrade. What they would do
-- to this schema must fail rather than do harm: their upserts name conflict targets that no
-- longer exist, and their claims read `queues`, which is replaced by `channel_queues` (an old
-- replica that claimed a job of another channel would send it through its own Page and could
-- record nothing about it). `relay_count_queued(direction, delta)` goes, so their readiness
-- probe fails and the load balancer leaves them.

-- A new column with a constant default is a change of the catalogue only: no row of `jobs`
-- (which may hold millions) is rewritten.
ALTER TABLE jobs ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';

-- A redelivery is a duplicate within its channel only. Partial: outbound messages, which have
-- no key, cost no entry.
ALTER TABLE jobs DROP CONSTRAINT jobs_dedup_key_key;
CREATE UNIQUE INDEX jobs_dedup ON jobs (channel, dedup_key) WHERE dedup_key IS NOT NULL;

-- Order and one in flight per (channel, direction, contact).
DROP INDEX jobs_queued;
CREATE INDEX jobs_queued ON jobs (channel, direction, contact, id) WHERE state = 'queued';

-- `jobs_receipts (contact, accepted_at)` stays as it is: a contact's delivered messages in
-- another channel are filtered out by the query, and contact ids are Page-scoped, so there are
-- practically none. Rebuilding it would read the whole delivered history.

-- The ready queue and the contacts' locks, per (channel, direction, contact). Claims walk the
-- channels of a direction through the primary key (direction first, so that the walk never
-- reads the other direction's rows) and take each one's earliest due rows through
-- `channel_queues_claim`.
CREATE TABLE channel_queues (
    direction TEXT   NOT NULL,
    channel   TEXT   NOT NULL,
    contact   TEXT   NOT NULL,
    head_id   BIGINT,
    due_at    BIGINT NOT NULL,
    PRIMARY KEY (direction, channel, contact)
);
INSERT INTO channel_queues (channel, direction, contact, head_id, due_at)
SELECT 'default', direction, contact, head_id, due_at FROM queues;
DROP TABLE queues;
CREATE INDEX channel_queues_claim ON channel_queues (direction, channel, due_at, contact) WHERE head_id IS NOT NULL;

-- Pacing and introductions per (channel, direction, contact).
ALTER TABLE contacts ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
ALTER TABLE contacts DROP CONSTRAINT contacts_pkey;
ALTER TABLE contacts ADD PRIMARY KEY (channel, direction, contact);

-- Echo records per (channel, contact).
ALTER TABLE echo_marks ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
DROP INDEX echo_marks_match;
CREATE INDEX echo_marks_match ON echo_marks (channel, contact, fingerprint, id);

-- Watermarks per (channel, contact).
ALTER TABLE watermarks ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
ALTER TABLE watermarks DROP CONSTRAINT watermarks_pkey;
ALTER TABLE watermarks ADD PRIMARY KEY (channel, contact, status);

-- Intake caps per channel (SPEC §5): queued jobs per (channel, direction), in shards as before.
ALTER TABLE queue_depth ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
ALTER TABLE queue_depth DROP CONSTRAINT queue_depth_pkey;
ALTER TABLE queue_depth ADD PRIMARY KEY (channel, direction, shard);

DROP FUNCTION relay_count_queued(TEXT, BIGINT);

CREATE FUNCTION relay_count_queued(counted_channel TEXT, counted_direction TEXT, delta BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    picked INTEGER;
BEGIN
    -- Connections start at different shards, so they rarely even look at the same row; a
    -- transaction finds its own shard again (its own lock does not make a row skipped).
    SELECT shard INTO picked FROM queue_depth
    WHERE channel = counted_channel AND direction = counted_direction
    ORDER BY (shard + pg_backend_pid()) % 64, shard
    LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF picked IS NULL THEN
        -- A channel's first job, or every shard held by another transaction: a shard of its
        -- own. A random one, never a conflict, so that nobody waits for another's insert: a
        -- channel gets as many shards as it had writers at once.
        picked := 64 + (random() * 2000000000)::INTEGER;
        INSERT INTO queue_depth (channel, direction, shard, queued) VALUES (counted_channel, counted_direction, picked, 0)
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE queue_depth SET queued = queued + delta
    WHERE channel = counted_channel AND direction = counted_direction AND shard = picked;
END;
$$;

CREATE OR REPLACE FUNCTION relay_jobs_depth() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM relay_count_queued(NEW.channel, NEW.direction, 1);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM relay_count_queued(OLD.channel, OLD.direction, -1);
    ELSE
        PERFORM relay_count_queued(NEW.channel, NEW.direction, CASE WHEN NEW.state = 'queued' THEN 1 ELSE -1 END);
    END IF;
    RETURN NULL;
END;
$$;
