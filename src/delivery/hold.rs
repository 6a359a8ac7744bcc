//! What an attempt knows of its claim on a job.
//!
//! The store fences every write about an attempt by its claim's token, so the holder of a lost
//! claim can never record anything. But a request to an upstream cannot be called back once it
//! has left: a replica paused past its lease (a `SIGSTOP`, a stalled host) that resumed and sent
//! the next part of a split message would send it beside the replica that took the job over. So
//! before each request an attempt checks that it still holds its claim: no renewal found the job
//! claimed by someone else, and the lease has surely not run out on the store's clock (a renewal
//! that failed does not count as one that succeeded).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// A claim as its holder sees it, shared between the attempt and the task renewing its lease.
#[derive(Debug)]
pub struct ClaimHold {
    /// The end of the lease on the store's clock, less a safety margin.
    held_until: AtomicI64,
    lost: AtomicBool,
    margin: i64,
}

impl ClaimHold {
    /// A claim whose lease ends at `lease_until` (the store's clock); `margin` covers the
    /// difference between this replica's reading of the store's clock and the store's own.
    pub fn new(lease_until: i64, margin: Duration) -> Self {
        let margin = i64::try_from(margin.as_millis()).unwrap_or(i64::MAX);
        Self { held_until: AtomicI64::new(lease_until.saturating_sub(margin)), lost: AtomicBool::new(false), margin }
    }

    /// Whether the claim is surely still this attempt's at `now` (the store's clock).
    pub fn is_held(&self, now: i64) -> bool {
        !self.lost.load(Ordering::Acquire) && now < self.held_until.load(Ordering::Acquire)
    }

    /// A renewal extended the lease to `lease_until`.
    pub fn renewed(&self, lease_until: i64) {
        self.held_until.fetch_max(lease_until.saturating_sub(self.margin), Ordering::AcqRel);
    }

    /// A renewal found the job claimed by someone else since: the claim is gone for good.
    pub fn lose(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Whether a renewal found the claim taken.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_held_until_its_lease_less_the_margin() {
        let hold = ClaimHold::new(10_000, Duration::from_secs(1));
        assert!(hold.is_held(8_999));
        assert!(!hold.is_held(9_000), "past the lease less the margin: a paused replica stops");
        hold.renewed(20_000);
        assert!(hold.is_held(18_999));
        hold.renewed(15_000);
        assert!(hold.is_held(18_999), "a late renewal's answer never shortens the lease");
    }

    #[test]
    fn a_claim_found_taken_is_never_held_again() {
        let hold = ClaimHold::new(10_000, Duration::from_secs(1));
        hold.lose();
        hold.renewed(20_000);
        assert!(!hold.is_held(1_000));
        assert!(hold.is_lost());
    }
}
