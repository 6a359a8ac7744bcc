-- Intake caps (SPEC §5): how many jobs each direction has queued, kept by triggers so that
-- every writer (the relay, the `jobs` command line) keeps it right and a check costs one row.
CREATE TABLE queue_depth (
    direction TEXT    PRIMARY KEY,
    queued    INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO queue_depth (direction, queued)
SELECT d.direction, (SELECT COUNT(*) FROM jobs j WHERE j.state = 'queued' AND j.direction = d.direction)
FROM (SELECT 'outbound' AS direction UNION ALL SELECT 'inbound') d;

CREATE TRIGGER jobs_depth_insert AFTER INSERT ON jobs WHEN NEW.state = 'queued'
BEGIN
    UPDATE queue_depth SET queued = queued + 1 WHERE direction = NEW.direction;
END;

CREATE TRIGGER jobs_depth_delete AFTER DELETE ON jobs WHEN OLD.state = 'queued'
BEGIN
    UPDATE queue_depth SET queued = queued - 1 WHERE direction = OLD.direction;
END;

CREATE TRIGGER jobs_depth_update AFTER UPDATE OF state ON jobs WHEN (OLD.state = 'queued') <> (NEW.state = 'queued')
BEGIN
    UPDATE queue_depth SET queued = queued + CASE WHEN NEW.state = 'queued' THEN 1 ELSE -1 END
    WHERE direction = NEW.direction;
END;

-- Each direction is claimed on its own (one never takes the other's capacity).
DROP INDEX queue_heads_due;
CREATE INDEX queue_heads_claim ON queue_heads (direction, due_at);

-- Dead jobs are redriven in batches, oldest first.
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';

-- Readiness writes here: a probe that commits, so a disk that cannot write is not "ready".
CREATE TABLE relay_health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);
