-- Intake counts (SPEC §5) at one row write per change: every connection counts in a row of its
-- own, keyed by its backend's process id.
--
-- Until now each change picked a shard among 64 per (channel, direction) with `FOR UPDATE SKIP
-- LOCKED` in a random order: a sort of 64 rows and a lock taken apart from the write, twice a
-- message, and once every shard was held a random shard of its own that nobody ever removed, so
-- that the sum read on every `/message` request grew with the history. A backend runs one
-- transaction at a time and no two live backends share a process id, so a row keyed by it is
-- never wanted by another transaction: one upsert through the primary key, no lock to wait for
-- or to skip, and still exact and transactional across replicas. A row left by a connection
-- that is gone is only a number to add up; `prune` folds such rows into shard 0 (no backend has
-- process id 0), so the rows of a (channel, direction) stay about as many as the connections that
-- wrote since the last prune.
--
-- Replicas of the previous version keep working during a rolling upgrade: their triggers are
-- these (a trigger belongs to the schema), they read the sum of the rows as this version does,
-- and their readiness probe still finds `relay_count_queued`.

CREATE OR REPLACE FUNCTION relay_count_queued(counted_channel TEXT, counted_direction TEXT, delta BIGINT) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO queue_depth (channel, direction, shard, queued)
    VALUES (counted_channel, counted_direction, pg_backend_pid(), delta)
    ON CONFLICT (channel, direction, shard) DO UPDATE SET queued = queue_depth.queued + excluded.queued
$$;

-- The same upsert written out in the trigger: a second function call per row would cost more
-- than the write.
CREATE OR REPLACE FUNCTION relay_jobs_depth() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO queue_depth (channel, direction, shard, queued)
        VALUES (OLD.channel, OLD.direction, pg_backend_pid(), -1)
        ON CONFLICT (channel, direction, shard) DO UPDATE SET queued = queue_depth.queued + excluded.queued;
    ELSE
        INSERT INTO queue_depth (channel, direction, shard, queued)
        VALUES (NEW.channel, NEW.direction, pg_backend_pid(),
                CASE WHEN TG_OP = 'INSERT' OR NEW.state = 'queued' THEN 1 ELSE -1 END)
        ON CONFLICT (channel, direction, shard) DO UPDATE SET queued = queue_depth.queued + excluded.queued;
    END IF;
    RETURN NULL;
END;
$$;

-- The shards of the previous scheme, folded into shard 0. A replica of the previous version in
-- the middle of a transaction holds its shard until it ends: the fold waits for it, and the
-- count stays exact either way (its change lands in its shard before the fold moves it, or in a
-- shard of its own after).
WITH folded AS (
    DELETE FROM queue_depth WHERE shard <> 0 RETURNING channel, direction, queued
)
INSERT INTO queue_depth (channel, direction, shard, queued)
SELECT channel, direction, 0, SUM(queued) FROM folded GROUP BY channel, direction
ON CONFLICT (channel, direction, shard) DO UPDATE SET queued = queue_depth.queued + excluded.queued;
