//! Rest for a channel whose upstream keeps failing (SPEC §5: one channel's backlog never delays
//! another's messages).
//!
//! A channel whose JoinChat is down, with a backlog of many contacts, would otherwise have every
//! contact's head attempted on every retry, each attempt a store write: thousands a second,
//! taken from the one store every channel writes to. After [`TRIP_AFTER`] transient failures in
//! a row (no success between them) the channel's deliveries of that direction rest, from
//! [`FIRST_REST`] doubling to [`LONGEST_REST`] while the failures go on; its jobs stay queued,
//! their retry schedules untouched (a rest is not an attempt), and the first answer that is not
//! a transient failure ends it. Like the circuit breakers of webhook senders (Svix, Convoy), but
//! per channel, never per contact: a contact's own failures follow its retry schedule.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Direction;

/// Transient failures in a row, across the channel's contacts, that make it rest.
pub const TRIP_AFTER: u32 = 10;
pub const FIRST_REST: Duration = Duration::from_secs(1);
pub const LONGEST_REST: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Breakers {
    /// Channel → a breaker per direction (outbound, inbound); looked up by `&str`, so an
    /// attempt allocates nothing to record its answer.
    state: Mutex<HashMap<String, [Option<Breaker>; 2]>>,
}

#[derive(Debug)]
struct Breaker {
    failures: u32,
    resting_until: Option<Instant>,
    next_rest: Duration,
}

/// What an attempt's answer says about its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Accepted, or refused for good: the upstream answers.
    Answered,
    /// A timeout, a connection failure, a 5xx, 408 or 429.
    Failed,
}

impl Breakers {
    /// Records an attempt's answer; returns how long the channel now rests when this one made
    /// it start resting.
    pub fn record(&self, channel: &str, direction: Direction, answer: Answer, now: Instant) -> Option<Duration> {
        let mut state = self.state.lock().expect("breakers");
        if answer == Answer::Answered {
            if let Some(breakers) = state.get_mut(channel) {
                breakers[direction.index()] = None;
            }
            return None;
        }
        let breakers = match state.get_mut(channel) {
            Some(breakers) => breakers,
            None => state.entry(channel.to_owned()).or_default(),
        };
        let breaker = breakers[direction.index()].get_or_insert(Breaker {
            failures: 0,
            resting_until: None,
            next_rest: FIRST_REST,
        });
        breaker.failures = breaker.failures.saturating_add(1);
        let resting = breaker.resting_until.is_some_and(|until| until > now);
        if breaker.failures < TRIP_AFTER || resting {
            return None;
        }
        let rest = breaker.next_rest;
        breaker.resting_until = Some(now + rest);
        breaker.next_rest = (rest * 2).min(LONGEST_REST);
        Some(rest)
    }

    /// Ends every rest and forgets every count: the configuration changed (a reload), and with
    /// it, most likely, what made the upstream fail (a rotated secret, a fixed URL).
    pub fn forget(&self) {
        self.state.lock().expect("breakers").clear();
    }

    /// Whether `channel`'s deliveries of `direction` rest at `now`.
    pub fn resting(&self, channel: &str, direction: Direction, now: Instant) -> bool {
        let state = self.state.lock().expect("breakers");
        state
            .get(channel)
            .and_then(|breakers| breakers[direction.index()].as_ref())
            .and_then(|breaker| breaker.resting_until)
            .is_some_and(|until| until > now)
    }

    /// The channels resting now in `direction`: left out of claims.
    pub fn resting_channels(&self, direction: Direction, now: Instant) -> Vec<String> {
        let state = self.state.lock().expect("breakers");
        state
            .iter()
            .filter(|(_, breakers)| {
                breakers[direction.index()]
                    .as_ref()
                    .and_then(|breaker| breaker.resting_until)
                    .is_some_and(|until| until > now)
            })
            .map(|(channel, _)| channel.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_rests_after_failures_in_a_row_longer_each_time_and_an_answer_ends_it() {
        let breakers = Breakers::default();
        let start = Instant::now();
        let fail = |at: Instant| breakers.record("shoes", Direction::Outbound, Answer::Failed, at);

        for _ in 1..TRIP_AFTER {
            assert_eq!(fail(start), None);
        }
        assert!(!breakers.resting("shoes", Direction::Outbound, start));
        assert_eq!(fail(start), Some(FIRST_REST));
        assert!(breakers.resting("shoes", Direction::Outbound, start));
        assert!(!breakers.resting("shoes", Direction::Inbound, start), "each direction on its own");
        assert!(!breakers.resting("hats", Direction::Outbound, start), "each channel on its own");
        assert_eq!(fail(start), None, "a failure while resting (an attempt under way) changes nothing");

        let after = start + FIRST_REST;
        assert!(!breakers.resting("shoes", Direction::Outbound, after));
        assert_eq!(fail(after), Some(FIRST_REST * 2), "failing again at once: a longer rest");
        let much_later = after + Duration::from_secs(3600);
        let mut rests = Vec::new();
        for n in 0..6 {
            rests.extend(fail(much_later + LONGEST_REST * n));
        }
        assert_eq!(rests.last(), Some(&LONGEST_REST), "{rests:?}");

        breakers.record("shoes", Direction::Outbound, Answer::Answered, much_later);
        assert!(!breakers.resting("shoes", Direction::Outbound, much_later));
        assert_eq!(fail(much_later), None, "an answer starts the count again");

        for _ in 0..TRIP_AFTER {
            fail(much_later);
        }
        assert!(breakers.resting("shoes", Direction::Outbound, much_later));
        breakers.forget();
        assert!(!breakers.resting("shoes", Direction::Outbound, much_later), "a reload ends the rest");
    }
}
