//! The series the store records itself. The store sits below monitoring (which reads its queue
//! counts at scrape time), so it records through the `metrics` facade directly, under names
//! [`crate::monitoring`] describes and gives buckets.

use std::time::Duration;

use metrics::histogram;

pub const COMMIT_DURATION: &str = "bonychat_relay_store_commit_duration_seconds";
pub const COMMIT_BATCH: &str = "bonychat_relay_store_commit_batch_size";

/// One group commit of a writer thread: how long it took and how many operations it carried.
pub fn commit(elapsed: Duration, operations: usize) {
    histogram!(COMMIT_DURATION).record(elapsed.as_secs_f64());
    histogram!(COMMIT_BATCH).record(operations as f64);
}
