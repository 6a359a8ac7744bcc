//! Per-contact pacing of JoinChat sends (SPEC §3.4), as a pure function.
//!
//! JoinChat warns that consecutive sends can overtake each other. Two requests to one contact
//! are therefore spaced by at least the configured gap, measured as the moment a request is
//! sent plus its `delay`: a request that follows too soon gets a `delay` (whole seconds, at
//! most 10), and where more than 10 seconds would be needed the relay waits the rest itself
//! (by rescheduling the job, never by holding a worker). The wait is never longer than the gap,
//! whatever the clock did: a clock set back must not park a contact's messages for hours.
//! When the last request to a contact takes effect is kept in the store, so the spacing holds
//! across jobs, restarts and replicas.

use std::time::Duration;

use crate::domain::joinchat::MAX_DELAY_SECS;

/// How the next request to a contact must go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// How long the relay waits before sending.
    pub wait: Duration,
    /// The `delay` to put in the request, in seconds.
    pub delay: Option<u64>,
}

impl Slot {
    pub const NOW: Self = Self { wait: Duration::ZERO, delay: None };

    /// When a request sent at `sent_at` (ms) with this slot's delay takes effect.
    pub fn effective_at(&self, sent_at: i64) -> i64 {
        sent_at + 1000 * i64::try_from(self.delay.unwrap_or(0)).unwrap_or(0)
    }
}

/// Plans a request about to be sent at `now`, given when the last one to the same contact took
/// effect (both in milliseconds since the epoch).
pub fn plan(gap: Duration, last_effective_at: Option<i64>, now: i64) -> Slot {
    let Some(last) = last_effective_at.filter(|_| !gap.is_zero()) else {
        return Slot::NOW;
    };
    let earliest = last.saturating_add(i64::try_from(gap.as_millis()).unwrap_or(i64::MAX));
    if earliest <= now {
        return Slot::NOW;
    }
    let needed_ms = u64::try_from(earliest.saturating_sub(now)).unwrap_or(0);
    let delay_secs = needed_ms.div_ceil(1000);
    if delay_secs <= MAX_DELAY_SECS {
        Slot { wait: Duration::ZERO, delay: Some(delay_secs) }
    } else {
        // The previous send takes effect at most 10 s from now, so an honest wait is at most the
        // gap; a longer one means the clock went back, and is capped.
        let wait = Duration::from_millis(needed_ms - MAX_DELAY_SECS * 1000).min(gap);
        Slot { wait, delay: Some(MAX_DELAY_SECS) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GAP: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_request_to_a_contact_goes_at_once() {
        assert_eq!(plan(GAP, None, 1_000), Slot::NOW);
    }

    #[test]
    fn a_request_right_after_another_gets_a_delay_rounded_up() {
        assert_eq!(plan(GAP, Some(10_000), 10_050), Slot { wait: Duration::ZERO, delay: Some(1) });
    }

    #[test]
    fn delays_add_up_across_a_burst() {
        let mut last = None;
        let mut delays = Vec::new();
        for i in 0..4 {
            let now = 10_000 + 10 * i;
            let slot = plan(GAP, last, now);
            last = Some(slot.effective_at(now));
            delays.push(slot.delay);
        }
        assert_eq!(delays, vec![None, Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn beyond_ten_seconds_the_relay_waits_the_rest() {
        let slot = plan(Duration::from_secs(12), Some(10_000), 10_500);
        assert_eq!(slot, Slot { wait: Duration::from_millis(1500), delay: Some(10) });
    }

    #[test]
    fn a_request_after_the_gap_needs_nothing() {
        assert_eq!(plan(GAP, Some(12_000), 13_000), Slot::NOW);
        assert_eq!(plan(GAP, Some(12_000), 12_500).delay, Some(1));
    }

    #[test]
    fn a_clock_set_back_never_makes_the_wait_longer_than_the_gap() {
        // The last send "takes effect" a day from now: the wall clock went back since.
        let slot = plan(Duration::from_secs(12), Some(86_400_000 + 10_000), 10_000);
        assert_eq!(slot, Slot { wait: Duration::from_secs(12), delay: Some(10) });
        assert_eq!(plan(GAP, Some(86_400_000), 0), Slot { wait: GAP, delay: Some(10) });
    }

    #[test]
    fn a_zero_gap_turns_pacing_off() {
        assert_eq!(plan(Duration::ZERO, Some(10_000), 10_000), Slot::NOW);
    }

    proptest! {
        /// Whatever the timing, a request takes effect no earlier than a gap after the last, and
        /// the relay never waits longer than the gap.
        #[test]
        fn the_gap_always_holds(gap_secs in 0_u64..40, last in 0_i64..100_000, now in 0_i64..100_000) {
            let gap = Duration::from_secs(gap_secs);
            let slot = plan(gap, Some(last), now);
            let sent_at = now + i64::try_from(slot.wait.as_millis()).unwrap();
            // The last send takes effect at most 10 s ahead, unless the clock went back: then
            // only the cap on the wait holds.
            prop_assert!(
                slot.effective_at(sent_at) >= last + 1000 * i64::try_from(gap_secs).unwrap() || gap_secs == 0 || last > now + 10_000
            );
            prop_assert!(slot.delay.is_none_or(|d| (1..=10).contains(&d)));
            prop_assert!(slot.wait <= gap);
        }
    }
}
