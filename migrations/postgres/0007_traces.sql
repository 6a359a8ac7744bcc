-- Traces (SPEC §6): the W3C trace context of the request that stored a job (its traceparent,
-- then a line break and its tracestate when it has one), which each of its
-- attempts continues, whichever replica makes it. NULL when the request carried none and
-- traces are off.
ALTER TABLE jobs ADD COLUMN trace_context TEXT;
