//! A channel's JoinChat send rate (SPEC §5): a token bucket whose rate halves when Meta
//! throttles the Page and grows back gradually once it stops, as a pure function of the
//! bucket's state and the time.
//!
//! Both stores keep one [`Bucket`] per channel and apply [`Bucket::apply`] to it: SQLite in
//! memory (one relay per file), Postgres in a row every replica locks for the moment of a batch,
//! on the database's clock, so the rate holds for all replicas together.
//!
//! The shape follows TCP's congestion control, which is what a sender that only learns the
//! limit by hitting it needs: halving on a throttle backs off faster than the limit can have
//! moved. Growing back, like CUBIC, it remembers where it was throttled (the ceiling): it
//! climbs fast to just under it, probes slowly around it (where the Page's limit most likely
//! is), and only past it grows at the ordinary pace, so the channel spends its time near what
//! the Page takes rather than far under it or in refusals. A throttle answer arrives
//! for every request sent at the old rate, so only the first of a [`HALVING_GAP_MS`] halves the
//! rate; the later ones only extend the pause.

use std::collections::HashMap;
use std::sync::Mutex;

/// The least a throttled channel sends: one request a second keeps learning when the
/// throttle ends.
pub const MIN_RATE: f64 = 1.0;
/// Throttle answers within this long of a halving were answers to requests sent before it.
pub const HALVING_GAP_MS: i64 = 1000;
/// How long a channel pauses after a throttle answer that names no `Retry-After`.
pub const DEFAULT_PAUSE_MS: i64 = 1000;
/// How many seconds' worth of sends the bucket holds: small, so the rate holds over any
/// second, not only on average.
const BURST_SECS: f64 = 0.1;
/// Past the ceiling, the rate grows back by this share of the configured rate each second:
/// from half to all of it in 10 s.
const GROWTH_SHARE: f64 = 1.0 / 20.0;
/// Below this share of the ceiling the rate climbs fast: from half the ceiling in half a second.
/// Under the knee, not at the ceiling: a throttle often comes only after the Page's window
/// filled, past its limit, so the ceiling overshoots it.
const KNEE: f64 = 0.75;
const CLIMB_SHARE: f64 = 0.5;
/// From the knee to the ceiling it probes slowly: 10 s.
const PROBE_SHARE: f64 = 0.025;

/// One channel's bucket. Times are milliseconds since the epoch on the store's clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// The rate (sends a second) at `rate_at`, from which it grows back towards the configured
    /// one; the configured rate when nothing was throttled.
    pub rate: f64,
    pub rate_at: i64,
    pub tokens: f64,
    pub tokens_at: i64,
    /// No send before this (a throttle's pause).
    pub paused_until: i64,
    /// When the rate was last halved.
    pub halved_at: i64,
    /// The rate the last halving started from; 0 before any.
    pub ceiling: f64,
}

/// What is asked of a channel's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateOp {
    /// Up to `want` sends now.
    Take { want: u32 },
    /// JoinChat answered a send with a throttle: halve the rate and pause for `pause_ms`.
    Throttle { pause_ms: i64 },
}

/// The bucket's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// Sends granted now (0 for a throttle).
    pub granted: u32,
    /// When the next send can be granted: `now` when this one granted some.
    pub next_at: i64,
    /// The rate in effect now, sends a second.
    pub rate: f64,
}

impl Bucket {
    /// A channel's bucket before anything was sent: full, at the configured rate.
    pub fn new(max_per_sec: u32, now: i64) -> Self {
        let rate = f64::from(max_per_sec.max(1));
        Self {
            rate,
            rate_at: now,
            tokens: capacity(rate),
            tokens_at: now,
            paused_until: 0,
            halved_at: i64::MIN / 2,
            ceiling: 0.0,
        }
    }

    /// The rate in effect at `now`: grown back since the last throttle, never above the
    /// configured `max_per_sec` (which a reload may have lowered).
    pub fn rate(&self, max_per_sec: u32, now: i64) -> f64 {
        let max = f64::from(max_per_sec.max(1));
        let mut secs = millis_as_secs(now.saturating_sub(self.rate_at).max(0));
        let mut rate = self.rate;
        // Each stage in turn: up to where it ends, at its own speed.
        let stages = [(KNEE * self.ceiling, CLIMB_SHARE * self.ceiling), (self.ceiling, PROBE_SHARE * self.ceiling)];
        for (until, speed) in stages {
            if rate < until && speed > 0.0 {
                let needed = (until - rate) / speed;
                if secs <= needed {
                    return (rate + speed * secs).clamp(MIN_RATE.min(max), max);
                }
                rate = until;
                secs -= needed;
            }
        }
        (rate + max * GROWTH_SHARE * secs).clamp(MIN_RATE.min(max), max)
    }

    /// Applies `op` at `now` for a channel configured at `max_per_sec`.
    pub fn apply(&mut self, op: RateOp, max_per_sec: u32, now: i64) -> Grant {
        let rate = self.rate(max_per_sec, now);
        // Refill for the time since the last look, but not across a pause: a throttled
        // channel resumes with an empty bucket, not with a burst.
        let refill_from = self.tokens_at.max(self.paused_until.min(now));
        let elapsed = millis_as_secs(now.saturating_sub(refill_from).max(0));
        self.tokens = (self.tokens + rate * elapsed).min(capacity(rate));
        self.tokens_at = now;
        match op {
            RateOp::Take { want } => {
                if now < self.paused_until {
                    return Grant { granted: 0, next_at: self.paused_until, rate };
                }
                let granted = (self.tokens.floor().max(0.0) as u32).min(want);
                self.tokens -= f64::from(granted);
                let next_at = if granted > 0 {
                    now
                } else {
                    now.saturating_add(((1.0 - self.tokens) / rate * 1000.0).ceil().max(1.0) as i64)
                };
                Grant { granted, next_at, rate }
            }
            RateOp::Throttle { pause_ms } => {
                if now.saturating_sub(self.halved_at) >= HALVING_GAP_MS {
                    self.ceiling = rate;
                    self.rate = (rate / 2.0).max(MIN_RATE.min(rate));
                    self.halved_at = now;
                } else {
                    self.rate = rate;
                }
                self.paused_until = self.paused_until.max(now.saturating_add(pause_ms.max(0)));
                // It grows back only once the pause is over.
                self.rate_at = self.paused_until;
                self.tokens = 0.0;
                Grant { granted: 0, next_at: self.paused_until, rate: self.rate }
            }
        }
    }
}

/// The buckets of a store that serves one relay: kept in memory, since no other process sends
/// for its channels.
#[derive(Debug, Default)]
pub struct MemoryBuckets {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl MemoryBuckets {
    pub fn apply(&self, channel: &str, op: RateOp, max_per_sec: u32, now: i64) -> Grant {
        let mut buckets = self.buckets.lock().expect("send rate buckets");
        let bucket = match buckets.get_mut(channel) {
            Some(bucket) => bucket,
            None => buckets.entry(channel.to_owned()).or_insert_with(|| Bucket::new(max_per_sec, now)),
        };
        bucket.apply(op, max_per_sec, now)
    }
}

fn capacity(rate: f64) -> f64 {
    (rate * BURST_SECS).max(1.0)
}

fn millis_as_secs(millis: i64) -> f64 {
    millis as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn take(bucket: &mut Bucket, max: u32, now: i64) -> Grant {
        bucket.apply(RateOp::Take { want: u32::MAX }, max, now)
    }

    /// Sends granted in `secs` seconds to a sender asking every millisecond.
    fn sent_over(bucket: &mut Bucket, max: u32, from: i64, secs: i64) -> u32 {
        (0..secs * 1000).map(|ms| take(bucket, max, from + ms).granted).sum()
    }

    #[test]
    fn a_channel_sends_at_most_its_rate_over_any_second() {
        let mut bucket = Bucket::new(200, T0);
        assert_eq!(take(&mut bucket, 200, T0).granted, 20, "a burst of a tenth of a second");
        let sent = sent_over(&mut bucket, 200, T0 + 1, 5);
        assert!((995..=1000).contains(&sent), "{sent}");
        let mut slow = Bucket::new(3, T0);
        assert_eq!(take(&mut slow, 3, T0).granted, 1);
        let next = take(&mut slow, 3, T0);
        assert_eq!((next.granted, next.next_at), (0, T0 + 334), "the next token, a third of a second on");
        let sent = sent_over(&mut slow, 3, T0, 10);
        assert!((29..=30).contains(&sent), "{sent}");
    }

    #[test]
    fn a_throttle_halves_the_rate_once_and_pauses_every_send() {
        let mut bucket = Bucket::new(200, T0);
        let throttled = bucket.apply(RateOp::Throttle { pause_ms: 2000 }, 200, T0);
        assert_eq!((throttled.rate, throttled.next_at), (100.0, T0 + 2000));
        // Answers to the requests already sent at the old rate: no second halving.
        bucket.apply(RateOp::Throttle { pause_ms: 500 }, 200, T0 + 300);
        assert_eq!(bucket.rate(200, T0 + 300), 100.0);
        assert_eq!(take(&mut bucket, 200, T0 + 1999), Grant { granted: 0, next_at: T0 + 2000, rate: 100.0 });
        assert_eq!(take(&mut bucket, 200, T0 + 2000).granted, 0, "no burst saved up during the pause");
        // A throttle a second later halves again.
        let again = bucket.apply(RateOp::Throttle { pause_ms: DEFAULT_PAUSE_MS }, 200, T0 + 2100);
        assert!((again.rate - 55.0).abs() < 1e-9, "half of 110, climbed for 0.1 s: {}", again.rate);
    }

    #[test]
    fn the_rate_climbs_back_to_near_the_throttle_then_probes_slowly_and_never_past_the_configured_one() {
        let mut bucket = Bucket::new(200, T0);
        bucket.apply(RateOp::Throttle { pause_ms: 1000 }, 200, T0);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert_eq!(bucket.rate(200, T0 + 1000), 100.0, "no growth during the pause");
        assert!(close(bucket.rate(200, T0 + 1400), 140.0), "climbing at half the ceiling a second");
        assert!(close(bucket.rate(200, T0 + 1500), 150.0), "at the knee, 0.75 of the ceiling");
        assert!(close(bucket.rate(200, T0 + 6500), 175.0), "probing at a fortieth of the ceiling a second");
        assert!(close(bucket.rate(200, T0 + 11_500), 200.0));
        assert_eq!(bucket.rate(200, T0 + 60_000), 200.0);
        assert_eq!(bucket.rate(50, T0 + 60_000), 50.0, "a reload lowered the rate");

        // Throttled at 40 of a configured 200: past the ceiling the ordinary pace, 10 a second.
        let mut low = Bucket::new(200, T0);
        low.rate = 40.0;
        low.apply(RateOp::Throttle { pause_ms: 0 }, 200, T0);
        assert!(close(low.rate(200, T0 + 500), 30.0));
        assert!(close(low.rate(200, T0 + 10_500), 40.0));
        assert!(close(low.rate(200, T0 + 12_500), 60.0));
    }

    #[test]
    fn throttles_in_a_row_never_stop_the_channel() {
        let mut bucket = Bucket::new(10, T0);
        for second in 0..20 {
            bucket.apply(RateOp::Throttle { pause_ms: 0 }, 10, T0 + second * 1000);
        }
        assert_eq!(bucket.rate(10, T0 + 19_000), MIN_RATE);
        assert!(sent_over(&mut bucket, 10, T0 + 20_000, 2) >= 2);
    }

    #[test]
    fn memory_buckets_keep_channels_apart() {
        let buckets = MemoryBuckets::default();
        buckets.apply("shoes", RateOp::Throttle { pause_ms: 5000 }, 100, T0);
        assert_eq!(buckets.apply("shoes", RateOp::Take { want: 1 }, 100, T0).granted, 0);
        assert_eq!(buckets.apply("hats", RateOp::Take { want: 1 }, 100, T0).granted, 1);
    }
}
