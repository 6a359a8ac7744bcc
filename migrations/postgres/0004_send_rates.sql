-- Each channel's JoinChat send rate (SPEC §5), shared by every replica: one row per channel,
-- locked for the moment a replica takes a batch of sends or records a throttle. The rules
-- live in the relay (`store::send_rate::Bucket`); times are milliseconds on this database's
-- clock. Replicas of the previous version never read it.
CREATE TABLE send_rates (
    channel      TEXT PRIMARY KEY,
    rate         DOUBLE PRECISION NOT NULL,
    rate_at      BIGINT NOT NULL,
    tokens       DOUBLE PRECISION NOT NULL,
    tokens_at    BIGINT NOT NULL,
    paused_until BIGINT NOT NULL,
    halved_at    BIGINT NOT NULL,
    ceiling      DOUBLE PRECISION NOT NULL
);
