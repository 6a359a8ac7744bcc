//! Per-contact pacing of JoinChat sends (SPEC §3.4).
//!
//! JoinChat warns that consecutive sends can overtake each other. Two requests to one contact
//! are therefore spaced by at least the configured gap, measured as the moment a request is
//! sent plus its `delay`: a request that follows too soon gets a `delay` (whole seconds, at
//! most 10), and where more than 10 seconds would be needed the relay waits the rest itself.
//!
//! The caller guarantees one send at a time per contact, so planning and recording need no
//! coordination beyond the map's lock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::joinchat::MAX_DELAY_SECS;

/// How the next request to a contact must go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// How long the relay waits before sending.
    pub wait: Duration,
    /// The `delay` to put in the request.
    pub delay: Option<u64>,
}

impl Slot {
    const NOW: Self = Self {
        wait: Duration::ZERO,
        delay: None,
    };
}

pub struct Pacer {
    gap: Duration,
    state: Mutex<PacerState>,
}

struct PacerState {
    /// When the last request to each contact takes effect: its send time plus its delay.
    last_effective: HashMap<String, Instant>,
    /// Entries older than the gap no longer matter; they are swept when the map reaches this size.
    sweep_at: usize,
}

const MIN_SWEEP_AT: usize = 1024;

impl Pacer {
    pub fn new(gap: Duration) -> Self {
        Self {
            gap,
            state: Mutex::new(PacerState {
                last_effective: HashMap::new(),
                sweep_at: MIN_SWEEP_AT,
            }),
        }
    }

    /// Plans a request to `contact` about to be sent at `now`.
    pub fn plan(&self, contact: &str, now: Instant) -> Slot {
        if self.gap.is_zero() {
            return Slot::NOW;
        }
        let state = self.state.lock().expect("pacer lock poisoned");
        let Some(&last) = state.last_effective.get(contact) else {
            return Slot::NOW;
        };
        let earliest = last + self.gap;
        if earliest <= now {
            return Slot::NOW;
        }
        let needed = earliest - now;
        let delay_secs = needed.as_secs() + u64::from(needed.subsec_nanos() > 0);
        if delay_secs <= MAX_DELAY_SECS {
            Slot {
                wait: Duration::ZERO,
                delay: Some(delay_secs),
            }
        } else {
            Slot {
                wait: needed - Duration::from_secs(MAX_DELAY_SECS),
                delay: Some(MAX_DELAY_SECS),
            }
        }
    }

    /// Records that a request to `contact` left at `sent_at` with `delay`.
    pub fn record(&self, contact: &str, sent_at: Instant, delay: Option<u64>) {
        if self.gap.is_zero() {
            return;
        }
        let effective = sent_at + Duration::from_secs(delay.unwrap_or(0));
        let mut state = self.state.lock().expect("pacer lock poisoned");
        state.last_effective.insert(contact.to_owned(), effective);
        if state.last_effective.len() >= state.sweep_at {
            let gap = self.gap;
            state.last_effective.retain(|_, last| *last + gap > sent_at);
            state.sweep_at = (state.last_effective.len() * 2).max(MIN_SWEEP_AT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_first_request_to_a_contact_goes_at_once() {
        let pacer = Pacer::new(secs(1));
        assert_eq!(pacer.plan("a", Instant::now()), Slot::NOW);
    }

    #[test]
    fn a_request_right_after_another_gets_a_delay_rounded_up() {
        let pacer = Pacer::new(secs(1));
        let t0 = Instant::now();
        pacer.record("a", t0, None);
        let slot = pacer.plan("a", t0 + Duration::from_millis(50));
        assert_eq!(
            slot,
            Slot {
                wait: Duration::ZERO,
                delay: Some(1)
            }
        );
        assert_eq!(
            pacer.plan("b", t0),
            Slot::NOW,
            "other contacts are not held back"
        );
    }

    #[test]
    fn delays_add_up_across_a_burst() {
        let pacer = Pacer::new(secs(1));
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..4 {
            let now = t0 + Duration::from_millis(10 * i);
            let slot = pacer.plan("a", now);
            pacer.record("a", now, slot.delay);
            delays.push(slot.delay);
        }
        assert_eq!(delays, vec![None, Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn beyond_ten_seconds_the_relay_waits_the_rest() {
        let pacer = Pacer::new(secs(12));
        let t0 = Instant::now();
        pacer.record("a", t0, None);
        let slot = pacer.plan("a", t0 + Duration::from_millis(500));
        assert_eq!(
            slot,
            Slot {
                wait: Duration::from_millis(1500),
                delay: Some(10)
            }
        );
    }

    #[test]
    fn a_request_after_the_gap_needs_nothing() {
        let pacer = Pacer::new(secs(1));
        let t0 = Instant::now();
        pacer.record("a", t0, Some(2));
        assert_eq!(pacer.plan("a", t0 + secs(3)), Slot::NOW);
        assert_eq!(
            pacer.plan("a", t0 + Duration::from_millis(2500)).delay,
            Some(1)
        );
    }

    #[test]
    fn a_zero_gap_turns_pacing_off() {
        let pacer = Pacer::new(Duration::ZERO);
        let t0 = Instant::now();
        pacer.record("a", t0, None);
        assert_eq!(pacer.plan("a", t0), Slot::NOW);
    }

    #[test]
    fn stale_contacts_are_swept() {
        let pacer = Pacer::new(secs(1));
        let t0 = Instant::now();
        for i in 0..MIN_SWEEP_AT - 1 {
            pacer.record(&format!("old{i}"), t0, None);
        }
        pacer.record("new", t0 + secs(5), None);
        let state = pacer.state.lock().unwrap();
        assert_eq!(state.last_effective.len(), 1);
        assert!(state.last_effective.contains_key("new"));
    }
}
