-- Fewer pages written per message. A lease is only ever held on a queued job, so the contact's
-- leased job is found through `jobs_queued` like its queued ones; this index cost one more
-- contact-keyed (random) page in every commit, written at each lease and again at its end.
DROP INDEX jobs_leased;
