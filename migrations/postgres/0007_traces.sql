-- Traces (SPEC §6): the W3C traceparent of the request that stored a job, which each of its
-- attempts continues, whichever replica makes it. NULL when the request carried none and
-- traces are off.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
