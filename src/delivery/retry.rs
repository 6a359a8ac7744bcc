//! When to try again (SPEC §5): the configured schedule, ±20 % jitter so that a recovering
//! upstream is not hit by every retry at once, and the upstream's `Retry-After` honoured up to
//! an hour.

use std::time::Duration;

/// A `Retry-After` longer than this is not waited for in full: an upstream asking for a day
/// would otherwise turn the whole schedule into one wait.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Self {
        Self { delays }
    }

    /// The wait before the next attempt after `failed_attempts` failures (counting the one just
    /// made), or `None` when the schedule is used up. `jitter` is a number in [0, 1).
    pub fn next_delay(&self, failed_attempts: u32, retry_after: Option<Duration>, jitter: f64) -> Option<Duration> {
        let index = usize::try_from(failed_attempts).ok()?.checked_sub(1)?;
        let base = *self.delays.get(index)?;
        let jittered = base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
        Some(jittered.max(retry_after.unwrap_or_default().min(RETRY_AFTER_CAP)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule::new(vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)])
    }

    #[test]
    fn each_failure_takes_the_next_delay_then_the_schedule_ends() {
        let s = schedule();
        assert_eq!(s.next_delay(1, None, 0.5), Some(Duration::from_secs(1)));
        assert_eq!(s.next_delay(2, None, 0.5), Some(Duration::from_secs(5)));
        assert_eq!(s.next_delay(3, None, 0.5), Some(Duration::from_secs(30)));
        assert_eq!(s.next_delay(4, None, 0.5), None);
        assert_eq!(s.next_delay(0, None, 0.5), None);
    }

    #[test]
    fn retry_after_is_honoured_up_to_an_hour() {
        let s = schedule();
        assert_eq!(s.next_delay(1, Some(Duration::from_secs(90)), 0.5), Some(Duration::from_secs(90)));
        assert_eq!(s.next_delay(1, Some(Duration::from_secs(86_400)), 0.5), Some(RETRY_AFTER_CAP));
        assert_eq!(
            s.next_delay(3, Some(Duration::from_secs(2)), 0.5),
            Some(Duration::from_secs(30)),
            "never shorter than planned"
        );
    }

    proptest! {
        #[test]
        fn jitter_stays_within_twenty_percent(jitter in 0.0_f64..1.0, failure in 1_u32..=3) {
            let s = schedule();
            let planned = [1.0, 5.0, 30.0][failure as usize - 1];
            let delay = s.next_delay(failure, None, jitter).unwrap().as_secs_f64();
            prop_assert!(delay >= planned * 0.8 - 1e-9 && delay <= planned * 1.2 + 1e-9, "{delay} vs {planned}");
        }
    }
}
