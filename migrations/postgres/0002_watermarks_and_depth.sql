-- The highest delivery and read watermark Messenger reported per contact (SPEC §4.3): a
-- watermark can arrive while the message it covers is still waiting for JoinChat's answer, and
-- the receipt then follows once JoinChat accepts it. Written and read under the contact's
-- outbound queue lock, so a watermark and the end of a send never miss each other.
CREATE TABLE watermarks (
    contact    TEXT   NOT NULL,
    status     TEXT   NOT NULL CHECK (status IN ('delivered', 'read')),
    watermark  BIGINT NOT NULL,
    timestamp  BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (contact, status)
);

CREATE INDEX watermarks_age ON watermarks (updated_at);

-- Intake caps (SPEC §5) in O(1): queued jobs per direction, kept by triggers in the same
-- transaction as the change. Spread over shards, each writer takes one no other transaction
-- holds (SKIP LOCKED), so the counter never serialises writers, and a replica that died with a
-- transaction open never holds up another's intake. The depth is the sum of the shards.
CREATE TABLE queue_depth (
    direction TEXT    NOT NULL,
    shard     INTEGER NOT NULL,
    queued    BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (direction, shard)
);

INSERT INTO queue_depth (direction, shard)
SELECT d.direction, s.shard
FROM (VALUES ('outbound'), ('inbound')) d (direction), generate_series(0, 63) s (shard);

CREATE FUNCTION relay_count_queued(counted_direction TEXT, delta BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    picked INTEGER;
BEGIN
    -- Connections start at different shards, so they rarely even look at the same row; a
    -- transaction finds its own shard again (its own lock does not make a row skipped).
    SELECT shard INTO picked FROM queue_depth
    WHERE direction = counted_direction
    ORDER BY (shard + pg_backend_pid()) % 64, shard
    LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF picked IS NULL THEN
        -- Every shard is held by another transaction: a shard of its own.
        picked := 64 + (random() * 2000000000)::INTEGER;
        INSERT INTO queue_depth (direction, shard, queued) VALUES (counted_direction, picked, 0)
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE queue_depth SET queued = queued + delta WHERE direction = counted_direction AND shard = picked;
END;
$$;

CREATE FUNCTION relay_jobs_depth() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM relay_count_queued(NEW.direction, 1);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM relay_count_queued(OLD.direction, -1);
    ELSE
        PERFORM relay_count_queued(NEW.direction, CASE WHEN NEW.state = 'queued' THEN 1 ELSE -1 END);
    END IF;
    RETURN NULL;
END;
$$;

-- Replicas of the previous version may be writing during this migration: they wait for it, so
-- the count below is exact and the triggers see every change after it.
LOCK TABLE jobs IN SHARE MODE;

UPDATE queue_depth q SET queued = c.queued
FROM (SELECT direction, COUNT(*) AS queued FROM jobs WHERE state = 'queued' GROUP BY direction) c
WHERE q.direction = c.direction AND q.shard = 0;

CREATE TRIGGER jobs_depth_insert AFTER INSERT ON jobs
FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION relay_jobs_depth();
CREATE TRIGGER jobs_depth_delete AFTER DELETE ON jobs
FOR EACH ROW WHEN (OLD.state = 'queued') EXECUTE FUNCTION relay_jobs_depth();
CREATE TRIGGER jobs_depth_update AFTER UPDATE OF state ON jobs
FOR EACH ROW WHEN ((OLD.state = 'queued') <> (NEW.state = 'queued')) EXECUTE FUNCTION relay_jobs_depth();
